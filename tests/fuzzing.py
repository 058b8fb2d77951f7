"""Hypothesis settings the property tests share. Profiles (``HYPOTHESIS_PROFILE``): ``ci``
(default), ``long`` (300 examples, random) and ``quick``; ``ci`` and ``quick`` are derandomised,
so a CI run is reproducible."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def fuzz_settings(*, ci: int, quick: int, long: int = 300) -> settings:
    """Settings with the given number of examples per profile (compiles are slow: no deadline)."""
    examples = {"ci": ci, "quick": quick, "long": long}
    return settings(
        max_examples=examples.get(PROFILE, ci),
        deadline=None,
        derandomize=PROFILE != "long",
        suppress_health_check=[HealthCheck.too_slow],
    )
