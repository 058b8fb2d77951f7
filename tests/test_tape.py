"""The tape a fold's arithmetic is recorded on (fake values) and replayed from (real ones)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compilefuse.passes.tape import Tape

TWO = torch.tensor(2.0, dtype=torch.float64)  # a real constant, as a graph's own constants are


def arithmetic(weight: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fold's kind of arithmetic: casts, a Python number, a real constant, a view, an op with two
    outputs."""
    scale = TWO / torch.sqrt(var.double() + 1e-5)
    low, high = torch.aminmax(scale)
    folded = (weight.double() * scale.view(-1, 1)).float()
    return folded, (scale * (high - low)).float()


def recorded(weight: torch.Tensor, var: torch.Tensor) -> tuple[Tape, tuple[int, int], tuple[int, int]]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # as Dynamo's: a graph's constants are real
    fake_weight, fake_var = mode.from_tensor(weight), mode.from_tensor(var)
    tape = Tape()
    with mode:
        inputs = (tape.add_input(fake_weight), tape.add_input(fake_var))
        with tape:
            outputs = arithmetic(fake_weight, fake_var)
    return tape, inputs, (tape.slot(outputs[0]), tape.slot(outputs[1]))


def test_a_replay_on_other_values_is_the_arithmetic_on_them_bit_for_bit():
    tape, inputs, outputs = recorded(torch.randn(4, 3), torch.rand(4))
    tape.release()
    for _ in range(3):
        weight, var = torch.randn(4, 3), torch.rand(4)
        replayed = tape.replay(dict(zip(inputs, (weight, var), strict=True)), outputs)
        for got, want in zip(replayed, arithmetic(weight, var), strict=True):
            assert torch.equal(got, want)


def test_a_fake_value_the_tape_never_saw_is_refused():
    mode = FakeTensorMode()
    seen, unseen = mode.from_tensor(torch.ones(3)), mode.from_tensor(torch.ones(3))
    tape = Tape()
    tape.add_input(seen)
    with mode, tape, pytest.raises(RuntimeError, match="neither its input nor its own result"):
        seen + unseen


def test_a_traced_replacement_computes_what_the_function_does():
    from compilefuse.passes.tape import NotRecordable, traced

    def replacement(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten.convolution.default(x, weight, bias, [1], [0], [1], False, [0], 1)
        low, _ = torch.aminmax(out, dim=1, keepdim=True)
        return out - low

    real = [torch.randn(2, 3, 8), torch.randn(4, 3, 3), torch.randn(4)]
    mode = FakeTensorMode()
    gm = traced(replacement, [mode.from_tensor(t) for t in real])
    assert all(n.meta.get("val") is not None for n in gm.graph.nodes if n.op == "call_function")
    assert torch.equal(gm(*real), replacement(*real))
    with pytest.raises(NotRecordable):
        traced(lambda x: x * TWO.float(), [mode.from_tensor(torch.ones(3))])
