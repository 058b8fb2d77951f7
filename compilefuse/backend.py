"""The ``bnfuse`` torch.compile backend: options in, an Inductor-compiled callable out.

Inference graphs (grad disabled, or nothing requiring grad) are compiled with Inductor's freezing,
module state lifted to frozen constants and the BN-folding pass installed. Graphs that need autograd
go to plain Inductor untouched: BN in them is not folded, and bnfuse says so once.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _torch_private as tp
from .config import BnfuseConfig
from .decisions import batch_norm_calls, module_path, traced_decisions
from .fold_pass import BnFoldPass, BnLowerPass, FoldRecord
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


def _compile_inference(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BnfuseConfig
) -> Callable[..., Any]:
    lifted, kept = tp.lift_module_state(gm, example_inputs)
    record = FoldRecord(decisions=traced_decisions(gm, autograd=False))
    patches = {
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
    return _without_frozen_arguments(compiled, kept)


def _finish(record: FoldRecord, gm: torch.fx.GraphModule, config: BnfuseConfig) -> None:
    """Put the decisions in program order and publish the record of a compiled graph."""
    order: dict[str, int] = {}
    for index, node in enumerate(batch_norm_calls(gm)):
        order.setdefault(module_path(node), index)
    record.decisions.sort(key=lambda d: order.get(d.bn, len(order)))
    RECORDS.append(record)
    publish(record)
    for decision in record.decisions:
        log.debug("bnfuse: %s", decision)
    if config.report:
        log.info("bnfuse fold report:\n%s", FoldReport.from_records([record]))


def _without_frozen_arguments(compiled: Callable[..., Any], kept: list[int]) -> Callable[..., Any]:
    """Dynamo still passes the parameters it lifted as inputs; the frozen graph takes none."""

    def call(*args: Any) -> Any:
        return compiled(*[args[i] for i in kept])

    return call


def _first_requiring_grad(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    if not torch.is_grad_enabled():
        return None
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, example_inputs, strict=True):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return node.target
    return None


def _log_autograd_once(name: str) -> None:
    global _autograd_logged
    if not _autograd_logged:
        _autograd_logged = True
        log.warning(_AUTOGRAD_MESSAGE, name)
