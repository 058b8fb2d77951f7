"""Property test: compiled inference calls interleaved with random weight changes of every kind a
user makes (eager training-mode forwards, optimizer steps fused / foreach / for-loop, load_state_dict,
``param.data =``, replaced parameters and modules, in-place writes under no_grad) answer what eager
answers, every time.

Profiles (HYPOTHESIS_PROFILE): ``ci`` (default, 30 examples), ``long`` (300), ``quick`` (5).
"""

from __future__ import annotations

import torch
from fuzzing import fuzz_settings
from helpers import randomize_bn, relative_error
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

FUZZ_SETTINGS = fuzz_settings(ci=30, quick=5)

OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "NAdam", "RAdam", "Adamax", "Adadelta", "ASGD", "Rprop")
IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
CHANGES = st.one_of(
    st.tuples(st.just("train_forward"), st.integers(1, 3)),
    st.tuples(st.just("optimizer"), st.sampled_from(OPTIMIZERS), st.sampled_from(IMPLEMENTATIONS)),
    st.tuples(st.just("load_state_dict"), st.booleans()),  # assign=True or a copy
    st.tuples(st.just("data_assign"), st.integers(0, 3)),
    st.tuples(st.just("replace_parameter"), st.integers(0, 3)),
    st.tuples(st.just("replace_bn"), st.integers(0, 1)),
    st.tuples(st.just("in_place"), st.integers(0, 3)),
    st.tuples(st.just("nothing"), st.just(0)),
)


def model() -> nn.Sequential:
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
    ).eval())


def tensors(m: nn.Sequential) -> list[torch.Tensor]:
    """Four of the model's frozen tensors, by number: a conv weight, a BN weight, two statistics."""
    return [m[0].weight, m[1].weight, m[4].running_mean, m[4].running_var]


def optimizer(name: str, implementation: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``name`` with the implementation asked for (fused where the class has a fused CPU kernel,
    foreach otherwise)."""
    cls = getattr(torch.optim, name)
    if implementation == "fused":
        try:
            return cls(params, lr=0.05, fused=True)
        except (TypeError, RuntimeError, ValueError):
            implementation = "foreach"
    return cls(params, lr=0.05, foreach=implementation == "foreach")


def change(m: nn.Sequential, what: tuple, x: torch.Tensor) -> None:
    kind, arg, *more = what
    if kind == "train_forward":
        m.train()
        for _ in range(arg):
            m(torch.randn(4, 3, 8, 8) * 2 + 1)
        m.eval()
    elif kind == "optimizer":
        opt = optimizer(arg, more[0], list(m.parameters()))
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elif kind == "load_state_dict":
        m.load_state_dict(model().state_dict(), assign=arg)
    elif kind == "data_assign":
        t = tensors(m)[arg]
        t.data = t.data.clone() * 1.5 + 0.1
    elif kind == "replace_parameter":
        owner, name = [(m[0], "weight"), (m[1], "weight"), (m[4], "running_mean"), (m[4], "running_var")][arg]
        value = getattr(owner, name).detach() * 0.5 + 0.25
        setattr(owner, name, nn.Parameter(value) if name == "weight" else value)
    elif kind == "replace_bn":
        index = (1, 4)[arg]
        m[index] = randomize_bn(nn.BatchNorm2d(4).eval())
    elif kind == "in_place":
        with torch.no_grad():
            tensors(m)[arg].mul_(1.25).add_(0.1)


@FUZZ_SETTINGS
@given(changes=st.lists(CHANGES, min_size=2, max_size=5), inference=st.booleans())
def test_every_answer_equals_eager_whatever_changes_the_weights(changes, inference):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = model(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(m, backend="bnfuse")
    context = torch.inference_mode if inference else torch.no_grad
    for what in [("nothing", 0), *changes]:
        change(m, what, x)
        with context():
            out, eager = compiled(x), m(x)
        assert relative_error(out, eager) < 1e-5, (what, relative_error(out, eager))
