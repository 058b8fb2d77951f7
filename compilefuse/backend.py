"""The ``bnfuse`` torch.compile backend: options in, an Inductor-compiled callable out.

Inference graphs (grad disabled, or nothing requiring grad) are compiled with Inductor's freezing,
module state lifted to frozen constants and the BN-folding pass installed. Graphs that need autograd
go to plain Inductor untouched: BN in them is not folded, and bnfuse says so once.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _torch_private as tp
from .config import BnfuseConfig
from .decisions import module_path, source_path, traced_decisions
from .fold_pass import BnFoldPass, BnLowerPass, FoldRecord
from .frozen_call import FrozenGraphCall
from .report import FoldReport, publish

log = logging.getLogger("compilefuse")

#: Fold records of the most recent compiled graphs, newest last.
RECORDS: collections.deque[FoldRecord] = collections.deque(maxlen=64)

_AUTOGRAD_MESSAGE = (
    "bnfuse: this graph needs autograd (grad is enabled and %s requires grad), so BatchNorm is not "
    "folded and gradients stay exact. To fold, run the model under torch.inference_mode() or "
    "torch.no_grad(), or call requires_grad_(False) on it."
)
_autograd_logged = False


def bnfuse(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """torch.compile backend folding inference BatchNorm into conv / conv-transpose / linear."""
    config = BnfuseConfig.from_options(options, mode)
    needing_grad = _first_requiring_grad(gm, example_inputs)
    if needing_grad is not None:
        _log_autograd_once(needing_grad)
        compiled = tp.compile_with_inductor(gm, example_inputs, dict(config.inductor_patches), keep_bn=False)
        _finish(FoldRecord(decisions=traced_decisions(gm, autograd=True)), gm, config)
        return compiled
    return _compile_inference(gm, example_inputs, config)


#: Compiled inference graphs by what determines them, so that threads racing through their first call
#: (Dynamo compiles once per thread that misses its cache) share one compile instead of a storm.
_COMPILED: weakref.WeakValueDictionary[tuple[Any, ...], FrozenGraphCall] = weakref.WeakValueDictionary()
_COMPILED_LOCK = threading.Lock()


def _compile_inference(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BnfuseConfig
) -> Callable[..., Any]:
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs_key = tuple(
        _input_key(value, frozen=tp.is_module_state(node))
        for node, value in zip(placeholders, example_inputs, strict=True)
    )
    key = (gm.code, repr(config), inputs_key)
    with _COMPILED_LOCK:
        compiled = _COMPILED.get(key)
        if compiled is None:
            compiled = _COMPILED[key] = _new_frozen_call(gm, example_inputs, config)
        return compiled


def _input_key(value: Any, frozen: bool) -> Any:
    """What of an input the compiled graph depends on: the identity and version of a tensor it
    freezes, the metadata of the others."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    meta = (tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    return (id(value), value._version, meta) if frozen else meta


def _new_frozen_call(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BnfuseConfig
) -> FrozenGraphCall:
    fake_mode, dynamic = tp.current_fake_mode(), tp.has_symbolic_shapes(gm)
    return FrozenGraphCall(
        lambda inputs: _compile_frozen(gm, inputs, config),
        example_inputs,
        recompile_context=lambda: tp.recompile_context(fake_mode, dynamic),
        input_names=[source_path(node) for node in gm.graph.find_nodes(op="placeholder")],
        fallback=None if config.strict else lambda inputs, error: _compile_plain(gm, inputs, config, error),
    )


def _compile_frozen(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BnfuseConfig
) -> tuple[Callable[..., Any], list[int]]:
    """Compile with module state frozen; returns the compiled graph and the inputs it still takes.

    If bnfuse's compile fails for any reason of its own, the graph is compiled by plain Inductor
    instead (nothing frozen, nothing folded) and the cause is logged once; ``strict`` raises.
    """
    try:
        return _compile_folding(gm, example_inputs, config)
    except Exception as error:
        if config.strict or tp.is_dynamo_control_flow(error):
            raise
        return _compile_plain(gm, example_inputs, config, error)


def _compile_plain(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BnfuseConfig, error: Exception
) -> tuple[Callable[..., Any], list[int]]:
    """bnfuse failed on this graph (compiling it, or running it the first time): plain Inductor."""
    _warn_fallback_once(error)
    compiled = tp.compile_with_inductor(gm, example_inputs, dict(config.inductor_patches), keep_bn=False)
    reason = f"bnfuse failed, compiled by plain Inductor: {type(error).__name__}"
    _finish(FoldRecord(decisions=traced_decisions(gm, autograd=False, reason=reason)), gm, config)
    return compiled, list(range(len(example_inputs)))


def _compile_folding(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BnfuseConfig
) -> tuple[Callable[..., Any], list[int]]:
    lifted, kept = tp.lift_module_state(gm, example_inputs)
    record = FoldRecord(decisions=traced_decisions(gm, autograd=False))
    patches = {
        **_float64_cpu_patches(example_inputs),
        **config.inductor_patches,
        "freezing": True,
        "joint_custom_pre_pass": BnFoldPass(config.rules, record),
        "post_grad_custom_pre_pass": BnLowerPass(),
    }
    with torch.no_grad():
        compiled = tp.compile_with_inductor(
            lifted, [example_inputs[i] for i in kept], patches, keep_bn=True
        )
    _finish(record, gm, config)  # only now: Dynamo may restart a compile that raised midway
    return compiled, kept


def _float64_cpu_patches(example_inputs: Sequence[Any]) -> dict[str, Any]:
    """Inductor's oneDNN weight prepacking, on by default under freezing on CPU, crashes on float64
    convolution weights ("itensor_view_from_dense expects float/bfloat16/half"); skip it there.
    (Inductor registers its prepacking patterns once per process: after an fp32 freezing compile the
    switch no longer helps, and a float64 graph falls back to plain Inductor.)"""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu" for t in example_inputs):
        return {"cpp.weight_prepack": False}
    return {}


def _finish(record: FoldRecord, gm: torch.fx.GraphModule, config: BnfuseConfig) -> None:
    """Put the decisions in program order and publish the record of a compiled graph."""
    order: dict[str, int] = {}
    for index, node in enumerate(gm.graph.nodes):  # a BN's rows sort where its module first runs
        if node.op.startswith("call_"):  # (placeholders carry their module's path too)
            order.setdefault(module_path(node), index)
    record.decisions.sort(key=lambda d: order.get(d.bn, len(order)))
    RECORDS.append(record)
    publish(record)
    for decision in record.decisions:
        log.debug("bnfuse: %s", decision)
    if config.report:
        log.info("bnfuse fold report:\n%s", FoldReport.from_records([record]))


def _first_requiring_grad(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    if not torch.is_grad_enabled():
        return None
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, example_inputs, strict=True):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return node.target
    return None


_fallback_warned = False


def _warn_fallback_once(error: Exception) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        log.warning(
            "bnfuse: the folded graph failed to compile or to run (%s: %s); this graph is compiled by plain "
            "Inductor instead, unfolded. options={'strict': True} raises instead.",
            type(error).__name__, str(error).splitlines()[0] if str(error) else "",
        )


def _log_autograd_once(name: str) -> None:
    global _autograd_logged
    if not _autograd_logged:
        _autograd_logged = True
        log.warning(_AUTOGRAD_MESSAGE, name)
