"""Property test: random small conv / BN models whose forward writes random buffers (and its input)
between the layers answer what eager answers over several calls, leave buffers and inputs as eager
does, fold every conv + BN, and compile once.

Profiles (HYPOTHESIS_PROFILE): ``ci`` (default, 25 examples), ``long`` (300), ``quick`` (4).
"""

from __future__ import annotations

import torch
from fuzzing import fuzz_settings
from helpers import randomize_bn
from hypothesis import given
from hypothesis import strategies as st
from test_state_writes import CONTEXTS, CountingBnfuse, assert_state_equal
from torch import nn

import compilefuse

FUZZ_SETTINGS = fuzz_settings(ci=25, quick=4)

CHANNELS = 4
WRITES = ("add_mean", "mul", "copy_channel_means", "index_copy", "fill_slice")


class Writer(nn.Module):
    """Interprets ``steps``: ("conv_bn", kernel), ("write", buffer, how), ("read", buffer),
    ("relu_", None) (an in-place write to an activation, no side effect)."""

    def __init__(self, steps: tuple[tuple, ...], buffers: int, write_input: bool) -> None:
        super().__init__()
        self.steps, self.write_input = steps, write_input
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, k[0], padding=k[0] // 2), nn.BatchNorm2d(CHANNELS))
            for kind, *k in steps if kind == "conv_bn"
        )
        for i in range(buffers):
            self.register_buffer(f"buf{i}", torch.randn(CHANNELS))
        self.register_buffer("slot", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write_input:
            x.mul_(0.5)
        y, layer = x, 0
        for kind, *arg in self.steps:
            if kind == "conv_bn":
                y, layer = self.layers[layer](y), layer + 1
            elif kind == "relu_":
                y = y.relu_()
            elif kind == "read":
                y = y + getattr(self, f"buf{arg[0]}").view(1, -1, 1, 1)
            else:
                buf, how = getattr(self, f"buf{arg[0]}"), arg[1]
                means = y.mean((0, 2, 3))
                if how == "add_mean":
                    buf.add_(means.mean())
                elif how == "mul":
                    buf.mul_(0.9)
                elif how == "copy_channel_means":
                    buf.copy_(means)
                elif how == "index_copy":
                    buf.index_copy_(0, self.slot % CHANNELS, means[:1])
                    self.slot.add_(1)
                else:
                    buf[:2].fill_(1.5)
                y = y + buf.view(1, -1, 1, 1)
        return y


@st.composite
def writer_cases(draw):
    buffers = draw(st.integers(1, 3))
    step = st.one_of(
        st.tuples(st.just("conv_bn"), st.sampled_from([1, 3])),
        st.tuples(st.just("write"), st.integers(0, buffers - 1), st.sampled_from(WRITES)),
        st.tuples(st.just("read"), st.integers(0, buffers - 1)),
        st.tuples(st.just("relu_")),
    )
    steps = draw(st.lists(step, min_size=2, max_size=5))
    steps.insert(draw(st.integers(0, len(steps))), ("conv_bn", draw(st.sampled_from([1, 3]))))  # at least one
    return dict(
        steps=tuple(steps), buffers=buffers, write_input=draw(st.booleans()),
        context=draw(st.sampled_from(list(CONTEXTS))), batch=draw(st.integers(1, 2)),
    )


@FUZZ_SETTINGS
@given(case=writer_cases())
def test_random_state_writes_match_eager_and_compile_once(case):
    torch._dynamo.reset()  # each example starts fresh (no automatic dynamic shapes from the last)
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(randomize_bn(Writer(case["steps"], case["buffers"], case["write_input"]).eval()))
    model, eager = models
    backend = CountingBnfuse()
    compiled = torch.compile(model, backend=backend)
    with compilefuse.report.collecting() as records:
        for call in range(3):
            x = torch.randn(case["batch"], CHANNELS, 5, 5)
            with CONTEXTS[case["context"]]():
                mine, theirs = x.clone(), x.clone()
                out, expected = compiled(mine), eager(theirs)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"call {call}")
            torch.testing.assert_close(mine, theirs, msg=f"input after call {call}")
            assert_state_equal(model, eager)
    assert backend.graphs == 1 and len(records) == 1, (backend.graphs, len(records))
    convs = sum(kind == "conv_bn" for kind, *_ in case["steps"])
    assert [d.folded for d in records[0].decisions] == [True] * convs, records[0].decisions
