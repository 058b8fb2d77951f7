"""Dynamo: the sources of a graph's inputs, the exceptions a backend must let through or raise,
the model being compiled, and the global state its guards check."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import torch
import torch.fx
from torch._dynamo.source import is_from_unspecialized_param_buffer_source

from ..runtime._torch_runtime import dynamo_source


def set_dynamo_source(node: torch.fx.Node, source: Any) -> None:
    node._dynamo_source = source  # type: ignore[attr-defined]


def is_module_state(node: torch.fx.Node) -> bool:
    """A placeholder that Dynamo lifted from a module's parameters or buffers."""
    source = dynamo_source(node)
    return source is not None and is_from_unspecialized_param_buffer_source(source)


def param_sources(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """The ``attribute name -> Dynamo source`` map AOTAutograd reads off a Dynamo graph module."""
    return dict(getattr(gm, "_param_name_to_source", None) or {})


def set_param_sources(gm: torch.fx.GraphModule, sources: dict[str, Any]) -> None:
    gm._param_name_to_source = sources  # type: ignore[assignment]


def compile_time_error(message: str) -> Exception:
    """A ``ValueError`` that Dynamo lets through to the user instead of wrapping it.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed``, except its own
    ``ShortenTraceback``; an error that is both reaches ``except ValueError`` in user code.
    """
    shorten = getattr(torch._dynamo.exc, "ShortenTraceback", None)
    if shorten is None:
        return ValueError(message)

    class BnfuseOptionError(ValueError, shorten):  # type: ignore[misc, valid-type]
        def __init__(self, text: str) -> None:
            ValueError.__init__(self, text)
            self.first_useful_frame = None

    return BnfuseOptionError(message)


#: Dynamo's exceptions that restart or skip a frame's compile; a backend must let them through.
#: Not every ``TorchDynamoException``: Inductor's own ``InductorError`` is one too (a
#: ``BackendCompilerFailed``), and it is a failure to fall back from. (Both names exist in torch 2.6-2.14.)
_DYNAMO_RESTARTS: tuple[type[BaseException], ...] = tuple(
    getattr(torch._dynamo.exc, name) for name in ("RestartAnalysis", "SkipFrame") if hasattr(torch._dynamo.exc, name)
)


def is_dynamo_restart(error: BaseException) -> bool:
    """Whether ``error`` is Dynamo restarting or skipping the compile (not a failure of it)."""
    return isinstance(error, _DYNAMO_RESTARTS)


#: Fake-tensor errors Dynamo turns into a graph break when a backend raises them: the frame then
#: runs eagerly, with a warning of Dynamo's (``exceptions_allowed_to_be_fallback``, torch 2.6-2.14).
_GRAPH_BREAKING: tuple[type[BaseException], ...] = tuple(getattr(torch._dynamo.exc, "exceptions_allowed_to_be_fallback", ()))


def raise_as_failure(error: BaseException) -> NoReturn:
    """Raise ``error`` so that the backend's compile fails: one Dynamo would turn into a graph break
    (an eager run) is raised wrapped in a ``RuntimeError``, which Dynamo raises to the caller."""
    if isinstance(error, _GRAPH_BREAKING):
        raise RuntimeError(f"{type(error).__name__}: {error}") from error
    raise error


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced this graph with symbolic (dynamic) sizes."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


def compiled_root() -> torch.nn.Module | None:
    """The model whose compiled call is running (``torch.compile(model)``'s ``OptimizedModule``, or
    a module after ``model.compile()``), found on the Python stack while Dynamo compiles one of its
    frames: the outermost, so a graph break's frames are named from the model the user compiled.
    None for a compiled function."""
    from torch._dynamo.eval_frame import OptimizedModule

    root = None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, OptimizedModule):
            root = owner._orig_mod
        elif isinstance(owner, torch.nn.Module) and getattr(owner, "_compiled_call_impl", None) is not None:
            root = owner
        frame = frame.f_back
    return root


def autocast_on(device: str) -> bool:
    """Whether autocast is on for a device type (False for one this torch has no autocast for)."""
    try:
        return torch.is_autocast_enabled(device)
    except (RuntimeError, ValueError):  # a device autocast does not know (meta on torch 2.6)
        return False


#: The device types ``traced_global_state`` reads autocast's state of.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def traced_global_state() -> tuple[Any, ...]:
    """The process state a trace of a Dynamo graph depends on beyond its code and inputs, as
    Dynamo's global-state guard sees it: autocast (per device type: on, dtype), grad mode, the
    default dtype, deterministic algorithms."""
    autocast = tuple((device, torch.get_autocast_dtype(device)) for device in AUTOCAST_DEVICES if autocast_on(device))
    return autocast, torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()
