"""The declared torch range is read from the installed metadata, a torch outside it is warned about
once, and the generated-code release degrades on a code-cache layout it does not know."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from compilefuse import versions
from compilefuse._torch_private import code_cache


@pytest.mark.parametrize(
    ("version", "bounds", "inside"),
    [
        ("2.14.1+cu130", [(">=", "2.6")], True),
        ("2.6.0", [(">=", "2.6")], True),
        ("2.5.1", [(">=", "2.6")], False),
        ("2.15.0", [(">=", "2.6"), ("<", "2.15")], False),
    ],
)
def test_in_range(version, bounds, inside):
    assert versions.in_range(version, bounds) is inside


def test_declared_range_is_the_package_floor():
    assert (">=", "2.6") in versions.declared_torch_range()


@pytest.mark.parametrize(("bounds", "warned"), [([(">=", "99.0")], True), ([(">=", "2.6")], False)])
def test_torch_outside_the_range_is_warned_about_once(monkeypatch, caplog, bounds, warned):
    monkeypatch.setattr(versions, "_warned", False)
    monkeypatch.setattr(versions, "declared_torch_range", lambda: bounds)
    with caplog.at_level(logging.WARNING, logger="compilefuse"):
        versions.warn_once_if_untested()
        versions.warn_once_if_untested()
    messages = [r.getMessage() for r in caplog.records if "outside the range" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert torch.__version__ in messages[0] and "falls back to plain Inductor" in messages[0]


def test_unknown_code_cache_layout_skips_the_release(monkeypatch, caplog):
    from torch._inductor import codecache

    monkeypatch.setattr(codecache.PyCodeCache, "modules", {}, raising=False)  # not the list it knows
    module = types.ModuleType("compilefuse_test_module")
    with caplog.at_level(logging.DEBUG, logger="compilefuse"):
        code_cache.release_code_modules([module])
    assert "unknown PyCodeCache layout" in caplog.text
