"""The benchmark's uses of torch's private compiler internals (the backend's are in
``compilefuse/_torch_private/``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor import config as inductor_config


def inductor_freezing() -> contextlib.AbstractContextManager:
    """Inductor's ``freezing=True`` for the calls under it (Dynamo reads it at trace time)."""
    return inductor_config.patch(freezing=True)


def many_recompiles_allowed() -> contextlib.AbstractContextManager:
    """Raise Dynamo's recompile limits (the benchmark compiles one model class many times: past the
    limit Dynamo silently runs eager). Only the limits this torch has are touched."""
    wanted = {"recompile_limit": 64, "cache_size_limit": 64, "accumulated_recompile_limit": 4096,
              "accumulated_cache_size_limit": 4096}
    present = {key: value for key, value in wanted.items() if hasattr(torch._dynamo.config, key)}
    return torch._dynamo.config.patch(**present)


def generated_code(compiled: Callable[..., Any], *inputs: Any) -> str:
    """Call a compiled callable and return the source Inductor generated for it."""
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(compiled, *inputs)
    return "\n".join(code)
