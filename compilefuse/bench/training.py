"""``compilefuse-bench --train``: one training step (forward + backward) of a model whose BatchNorms
are in eval mode with their affine trained (fine-tuning with a frozen backbone's statistics), for
eager, Inductor, Inductor with ``efficient_conv_bn_eval_fx_passes`` and bnfuse.

Reported per system: the median step time (systems interleaved round by round), the bytes saved
for backward (counted by ``torch.autograd.graph.saved_tensors_hooks``, which sees what AOTAutograd
saves, leaving out the model's own parameters and buffers), the CUDA peak memory of a step, and the
largest relative error of any parameter's gradient (and of the loss) against a float64 eager copy.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..report import collecting
from .harness import interleaved_order

TRAIN_SYSTEMS = ("eager", "inductor", "inductor_efficient_conv_bn", "bnfuse")


@dataclasses.dataclass
class TrainRow:
    model: str
    batch: int
    system: str
    compile_s: float | None = None
    step_ms: float | None = None
    saved_mib: float | None = None
    peak_mib: float | None = None
    grad_err: float | None = None
    loss_err: float | None = None
    x_inductor_saved: float | None = None
    x_inductor_time: float | None = None
    #: bnfuse: the BNs folded per step, of those it reported.
    bn_folded: int | None = None
    bn_total: int | None = None


def eval_bn_for_finetuning(model: nn.Module) -> nn.Module:
    """Every BatchNorm in eval mode (running statistics used and kept), its affine still trained;
    the rest of the model in train mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def _compiled(system: str, model: nn.Module) -> Callable[..., Any]:
    if system == "eager":
        return model
    if system == "bnfuse":
        return torch.compile(model, backend="bnfuse")
    options = {"efficient_conv_bn_eval_fx_passes": True} if system == "inductor_efficient_conv_bn" else None
    return torch.compile(model, backend="inductor", options=options)


def _loss(output: Any) -> torch.Tensor:
    out = output if isinstance(output, torch.Tensor) else output[0]
    return (out.float() ** 2).mean()


def saved_bytes(step: Callable[[], torch.Tensor], own: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during ``step`` (its forward), not counting
    the storage of ``own`` (the model's parameters and buffers); each storage counted once."""
    own_storages = {t.untyped_storage().data_ptr() for t in own}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in own_storages and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


def relative_errors(model: nn.Module, reference: nn.Module) -> float:
    """The largest, over parameters, of ``max |g - g64| / max |g64|``."""
    worst = 0.0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            continue
        scale = q.grad.abs().max().item() or 1.0
        worst = max(worst, (p.grad.double() - q.grad).abs().max().item() / scale)
    return worst


def _step_seconds(model: nn.Module, forward_loss: Callable[[], torch.Tensor], steps: int, cuda: bool) -> list[float]:
    """``steps`` training steps (gradients zeroed, forward, loss, backward), timed one by one."""
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_loss().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _cuda_peak_mib(model: nn.Module, forward_loss: Callable[[], torch.Tensor]) -> float:
    """The CUDA memory one training step allocates at its peak, above what was allocated before it."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_loss().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def benchmark_training(
    name: str, factory: Callable[[], nn.Module], example: torch.Tensor, systems: Sequence[str],
    *, rounds: int = 3, steps_per_round: int = 2, autocast: torch.dtype | None = None,
) -> list[TrainRow]:
    """``autocast``: each step's forward and loss under ``torch.autocast`` in that dtype (the
    float64 reference runs without)."""
    torch.manual_seed(0)

    def forward_loss(fn: Callable[..., Any]) -> torch.Tensor:
        with torch.autocast(example.device.type, dtype=autocast, enabled=autocast is not None):
            return _loss(fn(example))

    base = eval_bn_for_finetuning(factory().to(example.device))
    reference = copy.deepcopy(base).double()
    _loss(reference(example.double())).backward()
    reference_loss = _loss(reference(example.double())).item()
    rows, steps = [], {}
    for system in systems:
        row = TrainRow(name, example.shape[0], system)
        model = copy.deepcopy(base)
        fn = _compiled(system, model)
        start = time.perf_counter()
        with collecting() as records:
            loss = forward_loss(fn)
        loss.backward()
        if system == "bnfuse":
            decisions = [d for r in records for d in r.decisions]
            row.bn_folded, row.bn_total = sum(d.per_step for d in decisions), len(decisions)
        row.compile_s = time.perf_counter() - start if system != "eager" else None
        row.loss_err = abs(loss.item() - reference_loss) / abs(reference_loss)
        model.zero_grad(set_to_none=True)
        own = [*model.parameters(), *model.buffers()]
        row.saved_mib = saved_bytes(lambda fn=fn: forward_loss(fn), own) / 2**20
        model.zero_grad(set_to_none=True)
        forward_loss(fn).backward()
        row.grad_err = relative_errors(model, reference)
        steps[system] = (model, fn, [])
        rows.append(row)
    for order in interleaved_order(systems, rounds):  # each round rotated by one: drift hits all alike
        for system in order:
            model, fn, times = steps[system]
            times += _step_seconds(model, lambda fn=fn: forward_loss(fn), steps_per_round, example.is_cuda)
    for row in rows:
        model, fn, times = steps[row.system]
        row.step_ms = statistics.median(times) * 1e3
        if example.is_cuda:
            row.peak_mib = _cuda_peak_mib(model, lambda fn=fn: forward_loss(fn))
    inductor = next((r for r in rows if r.system == "inductor"), None)
    for row in rows:
        if inductor is not None and inductor.saved_mib and row.saved_mib is not None:
            row.x_inductor_saved = row.saved_mib / inductor.saved_mib
            row.x_inductor_time = row.step_ms / inductor.step_ms
    return rows


def format_rows(rows: Sequence[TrainRow]) -> str:
    head = ("model", "batch", "system", "compile s", "step ms", "x inductor", "saved MiB", "x inductor",
            "peak MiB", "grad err", "loss err", "folded per step")
    def f(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([r.model, str(r.batch), r.system, f(r.compile_s, ".1f"), f(r.step_ms, ".1f"),
                                 f(r.x_inductor_time, ".3f"), f(r.saved_mib, ".1f"), f(r.x_inductor_saved, ".3f"),
                                 f(r.peak_mib, ".1f"), f(r.grad_err, ".2e"), f(r.loss_err, ".2e"),
                                 "" if r.bn_total is None else f"{r.bn_folded}/{r.bn_total}"]))
    return "\n".join(lines)
