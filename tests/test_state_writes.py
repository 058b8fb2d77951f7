"""Models that write their own state: what a graph writes is never frozen, each call runs once, writes
to inputs reach the caller, and a graph's own writes never refold. Scenarios from PyTorch's
``test/inductor/test_inductor_freezing.py`` and ``torch.optim.swa_utils.update_bn``, each against an
eager twin built from the same seed (a deepcopy would not keep storage shared between tensors)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error
from torch import nn

import compilefuse

CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


class ParameterAddedInForward(nn.Module):
    """``test_mutation``: the forward writes a parameter and returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.mutated_param = nn.Parameter(torch.zeros(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mutated_param.add_(10)
        return self.mutated_param + x


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)


class RecalibratedBn(ConvBn):
    """``update_bn``: BN in training mode under ``no_grad``, updating its running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class CounterAndEma(ConvBn):
    """A step counter and an EMA buffer beside a conv + BN that is still folded."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step.add_(1)
        y = self.bn(self.conv(x))
        self.ema.mul_(0.9).add_(y.mean((0, 2, 3)), alpha=0.1)
        return y + self.step + self.ema[None, :, None, None]


class IndexCopyCache(nn.Module):
    """A ring buffer written with ``index_copy_`` beside a Linear + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.register_buffer("cache", torch.zeros(3, 4))
        self.register_buffer("slot", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.linear(x))
        self.cache.index_copy_(0, self.slot % 3, y[:1])
        self.slot.add_(1)
        return y + self.cache.sum(0)


class InputHalved(ConvBn):
    """The forward writes its input before the conv reads it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0.5)
        return self.bn(self.conv(x))


#: name -> (the model, built in eval mode unless it says otherwise; the input shape; folds expected)
SCENARIOS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    "parameter_mutated_in_forward": (lambda: ParameterAddedInForward().eval(), (4, 4), []),
    "train_mode_bn_recalibration": (lambda: RecalibratedBn().train(), (2, 3, 6, 6), []),
    "counter_and_ema_beside_conv_bn": (lambda: CounterAndEma().eval(), (2, 3, 6, 6), ["conv_bn"]),
    "index_copy_cache_beside_linear_bn": (lambda: IndexCopyCache().eval(), (2, 4), ["linear_bn"]),
    "input_written_in_forward": (lambda: InputHalved().eval(), (2, 3, 6, 6), ["conv_bn"]),
}


def twins(make: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        model = make()
        models.append(randomize_bn(model) if not model.training else model)
    return models[0], models[1]


class CountingBnfuse:
    """bnfuse, counting the Dynamo graphs it is handed (a recompile by Dynamo shows here; a refold
    shows in the fold records)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: list) -> Callable:
        self.graphs += 1
        return compilefuse.bnfuse(gm, inputs)


def assert_state_equal(model: nn.Module, eager: nn.Module) -> None:
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), eager.state_dict().items(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_state_writing_model_matches_eager_for_four_calls_and_compiles_once(scenario, context, caplog):
    make, shape, folds = SCENARIOS[scenario]
    model, eager = twins(make)
    backend = CountingBnfuse()
    compiled = torch.compile(model, backend=backend)
    with caplog.at_level(logging.WARNING, logger="compilefuse"), compilefuse.report.collecting() as records:
        for call in range(4):
            x = torch.randn(shape)
            with CONTEXTS[context]():
                mine, theirs = x.clone(), x.clone()
                out, expected = compiled(mine), eager(theirs)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"output of call {call}")
            torch.testing.assert_close(mine, theirs, msg=f"input after call {call}")
            assert_state_equal(model, eager)
    assert backend.graphs == 1, "Dynamo recompiled"
    assert len(records) == 1, "bnfuse refolded"
    assert [d.rule for d in records[0].decisions if d.folded] == folds, records[0].decisions
    assert not [r for r in caplog.records if r.name == "compilefuse"], "no warning expected"


def test_graph_own_writes_keep_the_rest_folded_against_float64():
    model = randomize_bn(CounterAndEma().eval())
    x = torch.randn(2, 3, 6, 6)
    reference = float64_reference(model, x)  # a float64 copy: the model's own counter is untouched
    with compilefuse.report.collecting() as records, torch.inference_mode():
        out = torch.compile(model, backend="bnfuse")(x)
    assert relative_error(out, reference) < 1e-5
    assert int(model.step) == 1
    [record] = records
    assert [(d.bn, d.folded) for d in record.decisions] == [("bn", True)]


def test_a_real_change_still_refolds_and_the_call_runs_once():
    """load_state_dict, an optimizer step and ``param.data = x`` on a graph that also writes a
    counter: each refolds once, and the counter goes up by one per call (the call is not answered
    twice)."""
    model, eager = twins(lambda: CounterAndEma().eval())
    compiled = torch.compile(model, backend="bnfuse")
    x = torch.randn(2, 3, 6, 6)
    donor = randomize_bn(CounterAndEma().eval())

    def change_both(change: Callable[[nn.Module], None]) -> None:
        for m in (model, eager):
            change(m)

    def sgd_step(m: nn.Module) -> None:
        m.conv.weight.grad = torch.ones_like(m.conv.weight)
        torch.optim.SGD([m.conv.weight], lr=0.1).step()
        m.conv.weight.grad = None

    changes = {
        "load_state_dict": lambda m: m.load_state_dict({k: v for k, v in donor.state_dict().items() if k.startswith("bn.")},
                                                       strict=False),
        "optimizer step": sgd_step,
        "param.data = x": lambda m: setattr(m.conv.bias, "data", m.conv.bias.detach() + 1),
    }
    with compilefuse.report.collecting() as records:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x))
        for name, change in changes.items():
            change_both(change)
            with torch.no_grad():
                for _ in range(2):
                    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5, msg=name)
            assert int(model.step) == int(eager.step), name
    assert len(records) == 1 + len(changes)


def test_aliased_parameter_is_returned_as_a_view_of_the_live_parameter():
    """``test_aliased_param_return``: the outputs are views of the user's parameter, as in eager."""

    class Mod(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.aliased_param = nn.Parameter(torch.zeros(10, 10))

        def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.aliased_param[1:], self.aliased_param

    mod = Mod().eval()
    with torch.no_grad():
        part, whole = torch.compile(mod, backend="bnfuse")()
        mod.aliased_param.add_(1)
        assert whole.data_ptr() == mod.aliased_param.data_ptr()
        assert part.data_ptr() == mod.aliased_param[1:].data_ptr()
        torch.testing.assert_close(part, mod.aliased_param[1:])
        assert float(part.min()) == 1.0  # the write after the call shows through the outputs


def test_rng_op_draws_fresh_numbers_each_call():
    """``test_rng_op``."""

    @torch.compile(backend="bnfuse")
    def foo() -> torch.Tensor:
        return torch.rand(4, 4) + 1

    with torch.no_grad():
        assert not torch.equal(foo(), foo())


def test_a_refold_of_a_graph_that_draws_random_numbers_draws_them_once():
    """A graph with an rng op is checked before it runs: after a weight change it runs once, so the
    generator advances exactly as in a call without a change."""

    class Noisy(ConvBn):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + torch.rand(4, 1, 1)

    model = randomize_bn(Noisy().eval())
    compiled = torch.compile(model, backend="bnfuse")
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        compiled(x)
        start = torch.get_rng_state()
        first = compiled(x)
        after_one_call = torch.get_rng_state()
        noise = first - model(x)
        model.conv.bias.add_(1.0)
        torch.set_rng_state(start)
        with compilefuse.report.collecting() as records:
            refolded = compiled(x)
        assert len(records) == 1
        assert torch.equal(torch.get_rng_state(), after_one_call)
        torch.testing.assert_close(refolded, model(x) + noise, rtol=1e-5, atol=1e-5)


def test_symbolic_sizes_with_a_counter():
    """``test_symint_not_folded``, with a counter beside a folded conv + BN, over three batch sizes."""
    model, eager = twins(lambda: CounterAndEma().eval())
    compiled = torch.compile(model, backend="bnfuse", dynamic=True)
    with compilefuse.report.collecting() as records, torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 6, 6)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
            assert_state_equal(model, eager)
    assert len(records) == 1
    assert [d.folded for d in records[0].decisions] == [True]


def test_bn_used_with_grad_enabled_then_without():
    """``test_unfolded_bn``: the same BN compiled once for autograd (per step), then folded."""
    bn = randomize_bn(nn.BatchNorm2d(8, eps=1e-3).eval())
    x = torch.rand(3, 8, 5, 5)

    @torch.compile(backend="bnfuse")
    def foo(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mod(x) + 10

    with_grad = foo(bn, x)
    with torch.no_grad():
        without = foo(bn, x)
    torch.testing.assert_close(with_grad.detach(), without)
    torch.testing.assert_close(without, bn(x) + 10)


class SharedStorage(ConvBn):
    """A buffer that shares memory with the conv weight, written in forward."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.zeros(4 * 3 * 3 * 3 + 8)
        self.register_buffer("flat", flat)
        self.conv.weight = nn.Parameter(flat[:108].view(4, 3, 3, 3))
        nn.init.normal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.flat[:2].add_(1)
        return self.bn(self.conv(x))


def test_write_through_memory_shared_with_a_weight_goes_to_plain_inductor_with_one_warning(caplog):
    model, eager = twins(lambda: SharedStorage().eval())
    assert model.flat.data_ptr() == model.conv.weight.data_ptr()
    compiled = torch.compile(model, backend="bnfuse")
    with caplog.at_level(logging.WARNING, logger="compilefuse"), compilefuse.report.collecting() as records:
        for _ in range(4):
            x = torch.randn(2, 3, 6, 6)
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
            assert_state_equal(model, eager)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "compilefuse"]
    assert "conv.weight" in warning and "flat" in warning and "plain Inductor" in warning
    [record] = records
    [decision] = record.decisions
    assert not decision.folded and "share memory" in decision.reason


@pytest.mark.parametrize("view", [False, True])
def test_written_input_that_is_the_models_own_weight_keeps_the_weight_live(view):
    """A call whose input is the model's weight (or a view of it), written in forward: the weight is
    never frozen, and the answer and the weight are eager's."""

    class WritesInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.add_(1)
            return self.bn(self.linear(x))

    model, eager = twins(lambda: WritesInput().eval())
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records, torch.no_grad():
        for _ in range(3):
            x, y = (model.linear.weight[:2], eager.linear.weight[:2]) if view else (model.linear.weight, eager.linear.weight)
            torch.testing.assert_close(compiled(x), eager(y), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.linear.weight, eager.linear.weight)
    assert records and not any(d.folded for r in records for d in r.decisions)


def test_explain_reports_a_model_compiled_before():
    model = randomize_bn(CounterAndEma().eval())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.compile(model, backend="bnfuse")(x)
    report = compilefuse.explain(model, x)
    assert (report.folded, report.total, report.graphs) == (1, 1, 1), str(report)


def test_explain_of_a_pure_model_compiled_before_under_inference_mode():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    x = torch.randn(1, 3, 6, 6)
    with torch.inference_mode():
        torch.compile(model, backend="bnfuse")(x)
    report = compilefuse.explain(model, x)
    assert (report.folded, report.total) == (1, 1), str(report)
