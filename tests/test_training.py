"""Training graphs: inference-mode BatchNorm folded per step (fine-tuning with frozen statistics).

Each fold is arithmetic in the graph, run at every step on that step's tensors and differentiated
by AOTAutograd. Checked against a float64 eager copy of the same model: the loss and every
parameter's gradient at most 2x plain Inductor's error, and the cases that must not fold (BN in
training mode, without running statistics, reading state the graph writes) left alone.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_bn
from torch import nn

import compilefuse
from compilefuse._torch_private import gates
from compilefuse.bench.training import eval_bn_for_finetuning, saved_bytes
from compilefuse.examples.models import resnet_style

#: Relative gradient error every system reaches: a few float32 roundings of the largest gradient.
ROUNDING = 2e-6


class Detectron2FrozenBN(nn.Module):
    """detectron2's ``FrozenBatchNorm2d``: an affine map computed from buffers in ``forward``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(channels).uniform_(0.5, 2.0))
        self.register_buffer("bias", torch.empty(channels).uniform_(-1.0, 1.0))
        self.register_buffer("running_mean", torch.empty(channels).uniform_(-1.0, 1.0))
        self.register_buffer("running_var", torch.empty(channels).uniform_(0.2, 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        scale, bias = scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class EverySite(nn.Module):
    """One graph with a site of every per-step rule (one compile per system for all of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8)  # eval: a BatchNorm2d
        self.up, self.up_bn = nn.ConvTranspose2d(8, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8)
        self.tv_conv, self.tv_frozen = nn.Conv2d(8, 8, 1), torchvision.ops.FrozenBatchNorm2d(8)
        self.d2_conv, self.d2_frozen = nn.Conv2d(8, 8, 1, bias=False), Detectron2FrozenBN(8)
        self.f_conv = nn.Conv2d(8, 8, 1)
        self.register_buffer("f_mean", torch.empty(8).uniform_(-1, 1))
        self.register_buffer("f_var", torch.empty(8).uniform_(0.2, 3))
        self.pre_bn, self.reader_a, self.reader_b = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3)
        self.cat_a, self.cat_b, self.cat_bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(8)
        self.fc, self.fc_bn = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.head_bn, self.head = nn.BatchNorm1d(6), nn.Linear(6, 5)
        self.tokens, self.tokens_bn = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)  # LeViT's LinearNorm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x)).relu()  # conv_bn
        y = self.up_bn(self.up(y)).relu()  # conv_transpose_bn
        y = self.tv_frozen(self.tv_conv(y)).relu()  # conv_bn, torchvision's FrozenBatchNorm2d
        y = self.d2_frozen(self.d2_conv(y)).relu()  # conv_bn, detectron2's
        y = F.batch_norm(self.f_conv(y), self.f_mean, self.f_var, training=False).relu()  # conv_bn, functional
        z = self.pre_bn(y)  # bn_conv, read by two convs without zero padding
        a, b = self.reader_a(z)[..., 1:-1, 1:-1], self.reader_b(z)
        y = self.cat_bn(torch.cat([self.cat_a(a), self.cat_b(b)], 1)).relu()  # cat_bn
        pooled = y.mean((2, 3))
        features = self.fc_bn(self.fc(pooled)).relu()  # linear_bn
        logits = self.head(self.head_bn(features))  # bn_linear
        tokens = y.flatten(2).transpose(1, 2)  # (N, L, C)
        mixed = self.tokens_bn(self.tokens(tokens).transpose(1, 2))  # linear_tokens_bn
        return logits, mixed

    FOLDS: ClassVar[dict[str, str]] = {
        "bn": "conv_bn", "up_bn": "conv_transpose_bn", "tv_frozen": "conv_bn", "d2_frozen": "conv_bn",
        "batch_norm_2": "conv_bn", "pre_bn": "bn_conv", "cat_bn": "cat_bn", "fc_bn": "linear_bn",
        "head_bn": "bn_linear", "tokens_bn": "linear_tokens_bn",
    }


def every_site() -> nn.Module:
    return eval_bn_for_finetuning(randomize_bn(EverySite()))


def loss_of(output) -> torch.Tensor:
    outputs = [output] if isinstance(output, torch.Tensor) else output
    return sum((o.double() ** 2).mean() for o in outputs)


def step(fn, model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward: the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = loss_of(fn(x))
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def errors(loss: float, grads: dict[str, torch.Tensor], reference: tuple[float, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Relative error of the loss and of each gradient (max |g - g64| / max |g64|)."""
    ref_loss, ref_grads = reference
    assert set(grads) == set(ref_grads)
    out = {"loss": abs(loss - ref_loss) / abs(ref_loss)}
    for name, g in grads.items():
        ref = ref_grads[name]
        out[name] = ((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return out


def assert_within_twice(ours: dict[str, float], theirs: dict[str, float], whose: str) -> None:
    """Each of our errors (loss, every gradient) is at most 2x ``whose`` error, plus rounding."""
    for name, error in ours.items():
        assert error <= 2 * theirs[name] + ROUNDING, f"{name}: {error:.2e} vs {whose}'s {theirs[name]:.2e}"


def float64_step(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    reference = copy.deepcopy(model).double()
    return step(reference, reference, x.double())


def compiled_step(model: nn.Module, x: torch.Tensor, backend: str = "bnfuse", **kwargs):
    model = copy.deepcopy(model)
    with compilefuse.report.collecting() as records:
        result = step(torch.compile(model, backend=backend, **kwargs), model, x)
    return result, records


def test_every_per_step_rule_folds_with_gradients_as_exact_as_inductor():
    model, x = every_site(), torch.randn(2, 3, 8, 8)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    decisions = [d for r in records for d in r.decisions]
    assert {d.bn: (d.status, d.rule) for d in decisions} == {
        bn: ("folded per step", rule) for bn, rule in EverySite.FOLDS.items()
    }
    assert [r.bn_ops_after for r in records] == [0]  # every inference BN op is gone from the graph
    ours, inductors = errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference)
    assert len(ours) == len([p for p in model.parameters()]) + 1
    assert_within_twice(ours, inductors, "Inductor")


def test_a_wrong_per_step_fold_would_be_caught():
    """The comparison has teeth: a gradient with one BN's gamma off by 1e-4 fails it."""
    model, x = every_site(), torch.randn(2, 3, 8, 8)
    reference = float64_step(model, x)
    skewed = copy.deepcopy(model)
    with torch.no_grad():
        skewed.fc_bn.weight.mul_(1 + 1e-4)
    loss, grads = step(skewed, skewed, x)
    assert max(errors(loss, grads, reference).values()) > 10 * ROUNDING


def sgd_beside_eager(model: nn.Module, inputs: list[torch.Tensor]) -> list:
    """SGD with momentum on ``model`` compiled by bnfuse and on an eager copy, one step per input;
    then every parameter of the two compared. The fold records of the compiled steps."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, eager)]
    with compilefuse.report.collecting() as records:
        for x in inputs:
            for fn, optimizer in zip((compiled, eager), optimizers, strict=True):
                optimizer.zero_grad()
                loss_of(fn(x)).backward()
                optimizer.step()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    return records


def test_weights_after_optimizer_steps_match_eager():
    model = eval_bn_for_finetuning(randomize_bn(resnet_style(width=8)))
    records = sgd_beside_eager(model, [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    assert len(records) == 1 and all(d.per_step for d in records[0].decisions)


class ConvBnRelu(nn.Module):
    def __init__(self, **bn_kwargs) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **bn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


def test_bn_in_training_mode_is_not_folded_and_updates_its_statistics_as_eager():
    model = randomize_bn(ConvBnRelu()).train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records:
        for _ in range(3):
            x = torch.randn(4, 3, 6, 6)
            out = compiled(x)
            torch.testing.assert_close(out, eager(x))
            loss_of(out).backward()
    [decision] = [d for r in records for d in r.decisions]
    assert (decision.folded, decision.reason) == (False, "training mode")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model.bn, name), getattr(eager.bn, name), msg=name)


def test_bn_without_running_statistics_is_not_folded():
    model = ConvBnRelu(track_running_stats=False).eval()
    x = torch.randn(4, 3, 6, 6)
    (loss, grads), records = compiled_step(model, x)
    [decision] = [d for r in records for d in r.decisions]
    assert (decision.folded, decision.reason) == (False, "no running statistics (track_running_stats=False)")
    eager_loss, eager_grads = step(model, model, x)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], msg=name)


def test_mode_switches_train_eval_and_inference():
    model = randomize_bn(ConvBnRelu())
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")

    def both(x: torch.Tensor) -> None:
        out, expected = compiled(x), eager(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if out.requires_grad:
            loss_of(out).backward()
            loss_of(expected).backward()

    statuses = []
    for mode in ("eval", "train", "eval", "no_grad", "inference_mode", "eval"):
        with compilefuse.report.collecting() as records:
            for m in (model, eager):
                m.train(mode == "train")
            x = torch.randn(2, 3, 6, 6)
            if mode in ("no_grad", "inference_mode"):
                with getattr(torch, mode)():
                    both(x)
            else:
                both(x)
        statuses.append([d.status for r in records for d in r.decisions])
    # compiled once per mode (eval and inference graphs answer again from Dynamo's cache later)
    assert statuses[:4] == [["folded per step"], ["kept"], [], ["folded"]]
    for name in ("running_mean", "running_var"):  # the train-mode step updated them, as in eager
        torch.testing.assert_close(getattr(model.bn, name), getattr(eager.bn, name), msg=name)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


class StemAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.body, self.body_bn = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body_bn(self.body(self.stem_bn(self.stem(x)).relu()))


def test_frozen_stem_next_to_trained_layers():
    model = eval_bn_for_finetuning(randomize_bn(StemAndHead()))
    model.stem.requires_grad_(False)
    model.stem_bn.requires_grad_(False)
    x = torch.randn(2, 3, 10, 10)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    assert sorted(grads) == ["body.bias", "body.weight", "body_bn.bias", "body_bn.weight"]
    assert [(d.bn, d.status) for r in records for d in r.decisions] == [
        ("stem_bn", "folded per step"), ("body_bn", "folded per step")]
    assert max(errors(loss, grads, reference).values()) < 1e-5


def test_each_step_reads_the_statistics_and_weights_of_that_step():
    """Nothing is baked in: new running statistics, gamma and beta (``load_state_dict``) are read by
    the next step, without a recompile."""
    model = eval_bn_for_finetuning(randomize_bn(ConvBnRelu()))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records:
        for _ in range(3):
            x = torch.randn(2, 3, 6, 6)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
            state = randomize_bn(copy.deepcopy(eager)).state_dict()
            for m in (model, eager):
                m.load_state_dict(state)
    assert len(records) == 1


class WritesItsStatistics(ConvBnRelu):
    """A forward that writes the BN's running variance before reading it (a hand-made recalibration)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.bn.running_var.mul_(1.5)
        return super().forward(x)


def test_state_the_graph_writes_is_not_read_by_a_fold():
    model = eval_bn_for_finetuning(randomize_bn(WritesItsStatistics()))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records:
        for _ in range(2):
            x = torch.randn(2, 3, 6, 6)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var)
    [decision] = [d for r in records for d in r.decisions]
    assert not decision.folded and "running_var" in decision.reason


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))).relu()


class CheckpointsOneBlock(nn.Module):
    """A stem, a checkpointed residual block and a plain one (issue 31: checkpointing the block sent
    the whole graph to plain Inductor, 0 of 5 BNs folded). ``context_fn``: selective checkpointing."""

    def __init__(self, checkpoint: bool = True, context_fn=None) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block, self.head = Residual(8), Residual(8)
        self.checkpoint, self.context_fn = checkpoint, context_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        if self.checkpoint:
            kwargs = {} if self.context_fn is None else {"context_fn": self.context_fn}
            x = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False, **kwargs)
        else:
            x = self.block(x)
        return self.head(x)


def _save_convolutions(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.convolution.default else CheckpointPolicy.PREFER_RECOMPUTE


def _selective():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_save_convolutions)


needs_checkpoint_tracing = pytest.mark.skipif(
    not gates.CHECKPOINT_TRACES_BEFORE_AUTOGRAD,
    reason="this torch cannot trace a checkpointed region before autograd (a graph with one is not folded per step)")


@needs_checkpoint_tracing
@pytest.mark.parametrize("context_fn", [None, _selective], ids=["plain", "selective"])
def test_checkpointing_one_block_folds_inside_and_outside_it(context_fn, caplog):
    model = eval_bn_for_finetuning(randomize_bn(CheckpointsOneBlock(context_fn=context_fn)))
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING):
        (loss, grads), records = compiled_step(model, x)
    decisions = [d for r in records for d in r.decisions]
    assert [(d.bn, d.folded, d.per_step) for d in decisions] == [
        (bn, True, True) for bn in ("bn", "block.bn1", "block.bn2", "head.bn1", "head.bn2")]
    if context_fn is None:  # a plain region stays plain (torch warns of a context_fn it was given)
        assert "context_fn" not in caplog.text
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    reference = float64_step(model, x)
    assert_within_twice(errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference), "Inductor")


@needs_checkpoint_tracing
def test_a_checkpointed_block_is_still_recomputed_when_its_bns_fold():
    """What checkpointing is for: the folded block's activations are recomputed in the backward,
    not saved."""
    model = eval_bn_for_finetuning(randomize_bn(CheckpointsOneBlock()))
    x = torch.randn(4, 3, 16, 16)
    saved = {}
    for checkpoint in (True, False):
        torch._dynamo.reset()
        copy_ = copy.deepcopy(model)
        copy_.checkpoint = checkpoint
        fn = torch.compile(copy_, backend="bnfuse")
        with compilefuse.report.collecting() as records:
            loss_of(fn(x)).backward()
        assert all(d.folded for r in records for d in r.decisions)
        saved[checkpoint] = saved_bytes(lambda fn=fn: loss_of(fn(x)), [*copy_.parameters(), *copy_.buffers()])
    assert saved[True] < saved[False], saved


class WritesStateInACheckpointedRegion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def region(self, x: torch.Tensor) -> torch.Tensor:
        self.bn.running_var.mul_(1.5)
        return x * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.utils.checkpoint.checkpoint(self.region, x, use_reentrant=False)))


@needs_checkpoint_tracing
def test_state_a_checkpointed_region_writes_is_not_read_by_a_fold():
    """The writes inside a region count as the graph's: the BN reading the statistic the region
    scales stays unfolded, and the forward sees the write as eager's does. (The gradients of a
    region that writes state differ from eager's under plain Inductor too: not checked here.)"""
    model = eval_bn_for_finetuning(randomize_bn(WritesStateInACheckpointedRegion()))
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    with compilefuse.report.collecting() as records:
        out = torch.compile(model, backend="bnfuse")(x)
    [decision] = [d for r in records for d in r.decisions]
    assert not decision.folded and "running_var" in decision.reason
    torch.testing.assert_close(out, eager(x))
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var)


class ConvAndLinear(nn.Module):
    """A conv -> BN and a linear -> BN1d (the two ways autocast meets a fold: an explicit cast of
    the conv's weight, written out before autograd, and addmm, which autocast casts itself), and a
    conv -> torchvision FrozenBatchNorm2d (its float32 scale promotes the bfloat16 conv output)."""

    def __init__(self, inside: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.frozen = nn.Conv2d(8, 8, 1, bias=False), torchvision.ops.FrozenBatchNorm2d(8)
        self.fc, self.bn1d = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.inside = inside

    def body(self, x: torch.Tensor) -> torch.Tensor:
        features = self.frozen(self.conv2(self.bn(self.conv(x)).relu()))
        return self.bn1d(self.fc(features.relu().mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inside:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.body(x)
        return self.body(x)


def autocast_step(model: nn.Module, x: torch.Tensor, backend: str | None):
    """A step of ``model`` (compiled by ``backend``; None: eager), with autocast entered around the
    call when the model does not enter it: its loss, gradients, output dtype and fold records."""
    model = copy.deepcopy(model)
    fn = model if backend is None else torch.compile(model, backend=backend)
    model.zero_grad(set_to_none=True)
    with compilefuse.report.collecting() as records, torch.autocast("cpu", dtype=torch.bfloat16, enabled=not model.inside):
        out = fn(x)
    loss = loss_of(out)
    loss.backward()
    return (loss.item(), {name: p.grad for name, p in model.named_parameters()}), out.dtype, records


needs_autocast_tracing = pytest.mark.skipif(
    not gates.AUTOCAST_TRACES_BEFORE_AUTOGRAD,
    reason="this torch does not fold per step under autocast (the graph goes to plain Inductor)")


@needs_autocast_tracing
@pytest.mark.parametrize("inside", [True, False], ids=["inside_forward", "around_the_call"])
def test_autocast_folds_per_step_in_autocasts_dtypes_with_gradients_as_exact_as_inductor(inside):
    """Issue 31: under autocast the per-step trace lost autocast's cast of each convolution (it
    decomposes ``conv2d``, which autocast casts, into ``convolution``, which it does not), so the
    graph went to plain Inductor (or, entered around the call, would have convolved in float32).
    Now each fold starts from the float32 weights, rounds once to bfloat16 as autocast rounds the
    weight, and adds the bias at float32 after the op, as the BN adds its shift.

    bfloat16 errors of single gradients swing 0.1x-10x between systems from one seed to the next
    (16x either way measured on this model), so the bound is on three seeds pooled: the geometric
    mean of bnfuse's error over Inductor's (under the same autocast) at most 1.5, and no error
    above 10x Inductor's (a wrong fold, a float32 convolution, is off by far more)."""
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = eval_bn_for_finetuning(randomize_bn(ConvAndLinear(inside)))
        x = torch.randn(4, 3, 10, 10)
        ours, dtype, records = autocast_step(model, x, "bnfuse")
        _, eager_dtype, _ = autocast_step(model, x, None)
        inductor, _, _ = autocast_step(model, x, "inductor")
        assert dtype == eager_dtype == torch.bfloat16
        if seed == 0:
            assert [(d.bn, d.folded, d.per_step) for r in records for d in r.decisions] == [
                ("bn", True, True), ("frozen", True, True), ("bn1d", True, True)]
        reference = float64_step(model, x)
        theirs = errors(*inductor, reference)
        for name, error in errors(*ours, reference).items():
            assert error <= 10 * theirs[name] + ROUNDING, f"seed {seed}, {name}: {error:.2e} vs {theirs[name]:.2e}"
            ratios.append((error + ROUNDING) / (theirs[name] + ROUNDING))
    assert math.exp(statistics.fmean(math.log(r) for r in ratios)) <= 1.5, sorted(ratios)


@needs_autocast_tracing
def test_a_per_step_fold_computes_in_float32_under_autocast_and_float64_outside(monkeypatch):
    """Issue 31: each step's float64 fold arithmetic, converted to bfloat16, made a bf16 step on
    resnet18 1.6x Inductor's (1.2x now). Under autocast a per-step fold computes in the weight's
    stored float32, as autocast takes the weight, then rounds once; in float32 training it stays
    float64. The linear's fold runs under autocast too (addmm, cast by autocast itself)."""
    from compilefuse import fold_math

    seen: list[torch.dtype] = []
    computed_in = fold_math.computed_in

    def recording(dtype: torch.dtype):
        seen.append(dtype)
        return computed_in(dtype)

    monkeypatch.setattr(fold_math, "computed_in", recording)
    model, x = eval_bn_for_finetuning(randomize_bn(ConvAndLinear(inside=False))), torch.randn(4, 3, 10, 10)
    for autocast, expected in ((True, torch.float32), (False, torch.float64)):
        seen.clear()
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss_of(torch.compile(copy.deepcopy(model), backend="bnfuse")(x)).backward()
        assert seen and set(seen) == {expected}, (autocast, seen)


@needs_autocast_tracing
def test_saved_for_backward_under_bfloat16_autocast_is_at_most_inductors():
    """Under bfloat16 autocast: the folded graph saves no float32 copy of a BN's input on top of
    Inductor's."""
    saved = saved_for_backward_per_system(torch.bfloat16)
    assert saved["bnfuse"] <= saved["inductor"], saved
    assert saved["bnfuse"] <= saved["efficient"], saved


def test_training_option_off_compiles_autograd_graphs_unfolded_with_one_warning(caplog, monkeypatch):
    from compilefuse.jit import backend

    monkeypatch.setattr(backend, "_autograd_logged", False)
    model = eval_bn_for_finetuning(randomize_bn(StemAndHead()))
    x = torch.randn(2, 3, 10, 10)
    with caplog.at_level(logging.WARNING, logger="compilefuse"):
        (loss, grads), records = compiled_step(model, x, options={"training": False})
    assert [d.reason for r in records for d in r.decisions] == [compilefuse.decisions.AUTOGRAD_REASON] * 2
    [message] = [r.getMessage() for r in caplog.records if r.name == "compilefuse"]
    assert "BatchNorm is not folded" in message
    eager_loss, eager_grads = step(model, model, x)
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], msg=name)


def saved_for_backward_per_system(autocast: torch.dtype | None = None) -> dict[str, int]:
    """Bytes autograd saves for backward (the model's own tensors left out) in one step of a
    ResNet-style model with every BN in eval mode, per system, under ``autocast`` if given; every
    BN folded per step by bnfuse."""
    model, x = eval_bn_for_finetuning(randomize_bn(resnet_style(width=16))), torch.randn(4, 3, 32, 32)
    saved = {}
    for name, backend, options in [("inductor", "inductor", None), ("bnfuse", "bnfuse", None),
                                   ("efficient", "inductor", {"efficient_conv_bn_eval_fx_passes": True})]:
        torch._dynamo.reset()
        copy_ = copy.deepcopy(model)
        fn = torch.compile(copy_, backend=backend, options=options)

        def run(fn=fn) -> torch.Tensor:
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                return loss_of(fn(x))

        with compilefuse.report.collecting() as records:
            run().backward()  # compiled (forward and backward) before measuring
        if name == "bnfuse":
            assert all(d.folded for r in records for d in r.decisions)
        saved[name] = saved_bytes(run, [*copy_.parameters(), *copy_.buffers()])
    return saved


def test_saved_for_backward_is_below_efficient_conv_bn_eval_and_three_quarters_of_inductor():
    saved = saved_for_backward_per_system()
    assert saved["bnfuse"] <= saved["efficient"], saved
    assert saved["bnfuse"] <= 0.75 * saved["inductor"], saved


@pytest.mark.parametrize("autocast", [None, pytest.param(torch.bfloat16, marks=needs_autocast_tracing)],
                         ids=["float32", "bfloat16"])
def test_the_forward_saves_no_copy_of_a_weight_it_folds(autocast):
    """Inductor's layout optimisation returned each folded weight the backward recomputes its fold
    from as a channels-last copy: a second copy of every folded weight alive from forward to
    backward, float32 under autocast (``passes/saved_inputs.py``)."""
    model, x = eval_bn_for_finetuning(randomize_bn(resnet_style(width=16))), torch.randn(4, 3, 32, 32)
    weights = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)}
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    fn = torch.compile(model, backend="bnfuse")

    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return loss_of(fn(x))

    run().backward()
    copies = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own and tuple(t.shape) in weights:
            copies.append((tuple(t.shape), t.dtype, t.stride()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    assert copies == []


class MultiUserConvOp(nn.Module):
    """PyTorch's ``test_efficient_conv_bn_eval.py`` model: a conv applied twice, a BN applied twice."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        kwargs = {"kernel_size": 3, "stride": 2, "bias": bias}
        self.conv1, self.bn1 = nn.ConvTranspose3d(3, 32, **kwargs), nn.BatchNorm3d(32)
        self.conv2, self.bn2 = nn.ConvTranspose3d(32, 32, **kwargs), nn.BatchNorm3d(32)
        self.conv3, self.bn3 = nn.ConvTranspose3d(32, 32, **kwargs), nn.BatchNorm3d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.bn3(x) + x


@pytest.mark.parametrize("bias", [False, True], ids=["conv_without_bias", "conv_with_bias"])
def test_bn_bias_gradients_through_a_folded_transposed_conv_are_as_exact_as_inductors(bias):
    """Issue 31, item 4: bn3.bias's gradient was 250x Inductor's error. Folded, beta's gradient is
    the conv's bias gradient, which ATen's ConvTranspose3d backward sums with float32 rounding
    Inductor's reductions avoid (the unfolded conv's own bias gradient is 2.5e-2 off in every
    system). Per step, the folded bias is now added after the conv, and Inductor sums its gradient.

    With a conv bias, gamma's gradient is the folded weight's and bias's gradients summed back,
    which cancel where the conv's output is far from the BN's running mean: up to 100x Inductor's
    error (5e-5 relative), listed in limitations and bounded here at 300x."""
    torch.manual_seed(0)
    model, x = MultiUserConvOp(bias).eval(), torch.rand(4, 3, 4, 4, 4)
    (loss, grads), records = compiled_step(model, x)
    assert sum(d.folded and d.per_step for r in records for d in r.decisions) == 3
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    reference = float64_step(model, x)
    ours, theirs = errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference)
    eager = errors(*step(model, model, x), reference)
    worst = {name: max(theirs[name], eager[name]) for name in ours}
    cancels = {f"bn{i}.weight" for i in (1, 2, 3)} if bias else set()
    for name, error in ours.items():
        factor = 300 if name in cancels else 2
        assert error <= factor * worst[name] + ROUNDING, f"{name}: {error:.2e} vs {worst[name]:.2e}"


def test_explain_reports_a_training_graph():
    model = eval_bn_for_finetuning(randomize_bn(StemAndHead()))
    report = compilefuse.explain(model, torch.randn(2, 3, 10, 10), autograd=True)
    assert [str(row) for row in report.rows] == [
        "stem_bn: folded per step into conv2d stem (conv_bn)",
        "body_bn: folded per step into conv2d body (conv_bn)",
    ]
    assert "folded per step" in str(report)


@pytest.mark.slow
def test_torchvision_resnet_with_eval_bn():
    model = eval_bn_for_finetuning(randomize_bn(torchvision.models.resnet18(num_classes=10)))
    x = torch.randn(2, 3, 32, 32)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    decisions = [d for r in records for d in r.decisions]
    assert len(decisions) == 20 and all(d.status == "folded per step" for d in decisions)
    ours, inductors = errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference)
    assert_within_twice(ours, inductors, "Inductor")


def frozen_bn_backbone(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``model.backbone`` replaced by torchvision's FrozenBatchNorm2d with
    random statistics (as the detection builders do for pretrained backbones)."""
    for module in list(model.backbone.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                setattr(module, child_name, frozen)
    return randomize_bn(model)


def detection_with_frozen_bn_backbone() -> tuple[nn.Module, list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A small fasterrcnn_mobilenet_v3_large_fpn in train mode, its backbone's BNs frozen, with two
    images and their targets."""
    torch.manual_seed(0)
    model = frozen_bn_backbone(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=96,
        rpn_batch_size_per_image=16, box_batch_size_per_image=16)).train()
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 30.0, 40.0, 90.0]]), "labels": torch.tensor([2])}]
    return model, images, targets


@pytest.mark.slow
def test_fasterrcnn_training_step_with_frozen_bn_backbone():
    model, images, targets = detection_with_frozen_bn_backbone()
    eager = copy.deepcopy(model)

    def train_step(fn, module):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the samplers draw the same proposals in both
        losses = fn(images, targets)
        sum(losses.values()).backward()
        grads = {n.replace("._orig_mod", ""): p.grad for n, p in module.named_parameters() if p.grad is not None}
        return {k: v.item() for k, v in losses.items()}, grads

    # The backbone (MobileNetV3 + FPN) holds every BN; the heads sample proposals at random and
    # pick them by score, so compiling them too would compare Inductor's RNG and tie-breaking.
    model.backbone = torch.compile(model.backbone, backend="bnfuse")
    with compilefuse.report.collecting() as records:
        losses, grads = train_step(model, model)
    eager_losses, eager_grads = train_step(eager, eager)
    decisions = [d for r in records for d in r.decisions]
    assert sum(d.status == "folded per step" for d in decisions) >= 30, [str(d) for d in decisions]
    assert losses.keys() == eager_losses.keys()
    for key, value in losses.items():
        assert value == pytest.approx(eager_losses[key], rel=1e-4, abs=1e-6), key
    assert set(grads) == set(eager_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_dynamic_batch_folds_per_step_and_compiles_once():
    model = eval_bn_for_finetuning(randomize_bn(StemAndHead()))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse", dynamic=True)
    with compilefuse.report.collecting() as records:
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 10, 10)
            for m, fn in ((model, compiled), (eager, eager)):
                m.zero_grad()
                loss_of(fn(x)).backward()
            for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert [[d.status for d in r.decisions] for r in records] == [["folded per step"] * 2]


def test_float16_weights_are_not_folded_per_step():
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)).half()
    eval_bn_for_finetuning(randomize_bn(model))
    x = torch.randn(6, 8, dtype=torch.float16)
    (loss, _), records = compiled_step(model, x)
    [decision] = [d for r in records for d in r.decisions]
    assert not decision.folded and "float16" in decision.reason
    eager_loss, _ = step(model, model, x)
    assert loss == pytest.approx(eager_loss, rel=1e-2)


def parametrised_conv_bn(parametrize, train: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(parametrize(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    model = randomize_bn(model)
    return eval_bn_for_finetuning(model) if train else model.eval()


@pytest.mark.parametrize(("parametrize", "train"), [
    (torch.nn.utils.parametrizations.weight_norm, True),
    (torch.nn.utils.parametrizations.spectral_norm, False),
])
def test_a_parametrised_weight_folds_per_step_with_gradients_as_exact_as_inductor(parametrize, train):
    """Issue 31: the weight is computed in the graph (``g * v / |v|``, ``W / sigma``); the fold is
    elementwise on that value at every step. On main: "weight is not a frozen parameter or buffer"."""
    model, x = parametrised_conv_bn(parametrize, train), torch.randn(2, 3, 8, 8)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    assert [(d.status, d.rule) for r in records for d in r.decisions] == [("folded per step", "conv_bn")]
    ours, inductors = errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference)
    assert_within_twice(ours, inductors, "Inductor")


def test_spectral_norm_in_training_mode_updates_its_vectors_as_eager():
    """In training mode spectral_norm's power iteration writes ``_u`` / ``_v``: the weight is then
    computed from state the graph writes, and is not folded; the vectors end as eager's."""
    model = parametrised_conv_bn(torch.nn.utils.parametrizations.spectral_norm, True)
    x = torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")
    for _ in range(2):
        loss_of(compiled(x)).backward()
        loss_of(eager(x)).backward()
    for (name, ours), theirs in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


class PadsThenConvolves(nn.Module):
    """mmcv's ConvModule with ``order=("norm", "conv", "act")``: BN, then a padded conv."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.bn, self.conv = mode, nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(self.bn(x), (1, 1, 1, 1), mode=self.mode)).relu()


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_before_a_reflect_replicate_or_circular_padded_conv_folds_per_step(mode):
    """Issue 31: before autograd the padding is one ``aten.pad``; it moves values within channels,
    so the BN folds into the conv (on main: "no conv or linear next to it"). Compared with eager's
    error: plain Inductor fails to compile the replicate case (torch 2.14.1's fake kernel of
    ``replication_pad2d_backward`` gives other strides than the real one); folded, the pad reads
    the input, which needs no gradient, and compiles."""
    model, x = eval_bn_for_finetuning(randomize_bn(PadsThenConvolves(mode))), torch.randn(2, 4, 8, 8)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    eager = copy.deepcopy(model)
    assert [(d.status, d.rule) for r in records for d in r.decisions] == [("folded per step", "bn_conv")]
    ours, eagers = errors(loss, grads, reference), errors(*step(eager, eager, x), reference)
    assert_within_twice(ours, eagers, "eager")


def test_bn_before_a_zero_padded_conv_is_not_folded_per_step():
    model, x = eval_bn_for_finetuning(randomize_bn(PadsThenConvolves("constant"))), torch.randn(2, 4, 8, 8)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    assert [d.folded for r in records for d in r.decisions] == [False]
    assert max(errors(loss, grads, reference).values()) < 1e-5


class ScaleComputedWithoutGrad(nn.Module):
    """An affine map after a conv whose scale ``forward`` computes under ``no_grad`` from a trained
    parameter: eager gives that parameter no gradient through it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.g = nn.Conv2d(3, 4, 3), nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("shift", torch.rand(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = self.g.abs()
        return self.conv(x) * scale.view(1, -1, 1, 1) + self.shift


def test_a_fold_reads_a_value_computed_under_no_grad_as_computed():
    """On main the fold recomputed the scale from ``g`` with grad enabled: ``g`` got a gradient
    eager does not give it. The computed value is now the fold's leaf, grad mode and all."""
    torch.manual_seed(0)
    model, x = ScaleComputedWithoutGrad(), torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(model)
    loss_of(eager(x)).backward()
    (_loss, grads), records = compiled_step(model, x)
    assert [d.status for r in records for d in r.decisions] == ["folded per step"]
    assert eager.g.grad is None and "g" not in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(eager.named_parameters())[name].grad, msg=name)


class ScaleComputedWithoutGradAfterTheConv(ScaleComputedWithoutGrad):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        with torch.no_grad():
            scale = self.g.abs()
        return y * scale.view(1, -1, 1, 1) + self.shift


def test_a_value_computed_under_no_grad_after_the_op_is_never_moved_out_of_it():
    """Moving the scale ahead of the conv would take it out of its ``no_grad`` region. Whatever
    bnfuse makes of it (today the mul-add is not matched as an affine site; were it, moving the
    scale past the grad-mode change is refused, ``passes/fold.py: _hoist_before``), ``g`` gets no
    gradient and the others eager's."""
    torch.manual_seed(0)
    model, x = ScaleComputedWithoutGradAfterTheConv(), torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(model)
    loss_of(eager(x)).backward()
    (_loss, grads), _ = compiled_step(model, x, options={"strict": False})
    assert "g" not in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(eager.named_parameters())[name].grad, msg=name)


class ScaledAndShiftedByANumber(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.g = nn.Conv2d(3, 4, 3), nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.g.view(1, -1, 1, 1) + 1


def test_a_fold_with_a_python_number_in_it_folds_per_step():
    """The traced fold makes the ``1`` a tensor constant; main copied its node into the graph
    without the tensor ("references nonexistent attribute _tensor_constant0") and fell back."""
    torch.manual_seed(0)
    model, x = ScaledAndShiftedByANumber(), torch.randn(2, 3, 8, 8)
    reference = float64_step(model, x)
    (loss, grads), records = compiled_step(model, x)
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    assert [d.status for r in records for d in r.decisions] == ["folded per step"]
    ours, inductors = errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference)
    assert_within_twice(ours, inductors, "Inductor")


@pytest.mark.slow
@needs_autocast_tracing
def test_fasterrcnn_finetuning_loop_under_bfloat16_autocast():
    """Issue 31, item 5: a detection model fine-tuned as people run it, a FrozenBatchNorm2d
    backbone compiled, three SGD steps under bfloat16 autocast on CPU: every backbone BN folds per
    step, and the run stays with eager's under the same autocast.

    bfloat16 runs drift apart step by step (the samplers then pick other proposals), plain
    Inductor's too: measured, its second loss 6% off eager's, its backbone update 0.985 in cosine
    and 17% off in norm; bnfuse's 0.993 and 12%. Bounds: the first loss (same weights) within 1%,
    every loss within 10%, the backbone's update at least 0.95 in cosine and within 35% (a fold
    with a wrong scale moves it elsewhere entirely)."""
    model, images, targets = detection_with_frozen_bn_backbone()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("backbone.")}
    eager = copy.deepcopy(model)
    model.backbone = torch.compile(model.backbone, backend="bnfuse")

    def finetune(module: nn.Module) -> tuple[list[float], torch.Tensor]:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        losses = []
        for step_ in range(3):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step_)  # the samplers draw the same proposals in both
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = sum(module(images, targets).values())
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        params = {n.replace("._orig_mod", ""): p.detach() for n, p in module.named_parameters()}
        return losses, torch.cat([(params[n] - p).flatten() for n, p in start.items()])

    with compilefuse.report.collecting() as records:
        losses, update = finetune(model)
    eager_losses, eager_update = finetune(eager)
    decisions = [d for r in records for d in r.decisions]
    assert sum(d.status == "folded per step" for d in decisions) >= 30, [str(d) for d in decisions]
    assert losses[0] == pytest.approx(eager_losses[0], rel=1e-2)
    assert losses == pytest.approx(eager_losses, rel=0.1)
    assert float(F.cosine_similarity(update, eager_update, dim=0)) >= 0.95
    assert float((update - eager_update).norm() / eager_update.norm()) <= 0.35
