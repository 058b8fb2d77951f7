"""The folded constants are computed once, at compile time: no BN or weight-scaling math is left
in the code Inductor generates for the per-call path."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICES, assert_matches_reference, float64_reference, randomize_bn
from torch import nn
from torch._inductor.utils import run_and_get_code

import compilefuse
from compilefuse.bench.codegen import generated_code as generated_code_as
from compilefuse.bench.codegen import multiplications
from compilefuse.bench.systems import without_batch_norm
from compilefuse.examples.models import BUILTIN_MODELS


def generated_code(model: nn.Module, x: torch.Tensor, **options) -> str:
    compiled = torch.compile(model, backend="bnfuse", options=options or None)
    with torch.inference_mode():
        _, code = run_and_get_code(compiled, x)
    return "\n".join(code)


def dcgan_block(device: str) -> nn.Module:
    # More than 8 channels, so the check does not depend on how Inductor treats tiny constants.
    model = nn.Sequential(
        nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.Flatten(),
        nn.Linear(12 * 8 * 8, 10),
        nn.BatchNorm1d(10),
    )
    return randomize_bn(model.eval()).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_folded_model_runs_no_bn_math_per_call(device):
    code = generated_code(dcgan_block(device), torch.randn(2, 16, 4, 4, device=device))
    assert len(compilefuse.last_record().decisions) == 3
    assert all(d.folded for d in compilefuse.last_record().decisions)
    assert "sqrt" not in code  # BN's 1/sqrt(var + eps), in C++ or Triton spelling


@pytest.mark.parametrize("device", DEVICES)
def test_kept_bn_math_is_visible_in_generated_code(device):
    """The control for the test above: with folding disabled, the BN math is there to be found."""
    code = generated_code(dcgan_block(device), torch.randn(2, 16, 4, 4, device=device), rules=[])
    assert not any(d.folded for d in compilefuse.last_record().decisions)
    assert "sqrt" in code


def eight_channels() -> nn.Module:
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8),
    ).eval())


#: A per-call buffer for an 8-element bias, as the generated wrapper spells it.
SMALL_BIAS_BUFFER = "empty_strided_cpu((8, ), (1, )"


@pytest.mark.parametrize("batch", [1, 2], ids=["aten-convolution", "packed-convolution"])
def test_small_folded_bias_is_not_rebuilt_per_call(batch):
    """Inductor inlines 1-D constants of at most 8 elements; a folded bias read by an extern
    convolution would then be rebuilt into a buffer on every call. bnfuse keeps it a buffer."""
    model, x = eight_channels(), torch.randn(batch, 3, 10, 10)
    for freeze in (True, False):  # as data, the bias is an input: nothing to inline
        torch._dynamo.reset()
        code = generated_code(model, x, freeze=freeze)
        assert all(d.folded for d in compilefuse.last_record().decisions)
        assert SMALL_BIAS_BUFFER not in code
    with torch.inference_mode():
        out = torch.compile(model, backend="bnfuse")(x)
        assert_matches_reference(out, model(x), float64_reference(model, x))
    torch._dynamo.reset()  # the control: with Inductor's inlining, the per-call buffer is there to be found
    assert SMALL_BIAS_BUFFER in generated_code(model, x, freeze=True, inductor={"always_keep_tensor_constants": False})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dcgan_generator", "pointnet_head", "preact_cnn"])
def test_folded_code_multiplies_as_often_as_the_bn_free_code(name):
    """Zero run-time cost, shown on the code: bnfuse's kernels multiply exactly as often as those of
    the same model without any BN. (Inductor with freezing still scales per call on these models:
    ``benchmarks/codegen_compare.py`` and docs/benchmarks.md compare it; an upstream fix must not
    fail this suite.)"""
    spec = BUILTIN_MODELS[name]
    model, x = randomize_bn(spec.build().eval()), spec.example(4)
    bnfuse = multiplications(generated_code_as(copy.deepcopy(model), x, "bnfuse"))
    limit = multiplications(generated_code_as(without_batch_norm(model), x, "bnfuse"))
    assert bnfuse == limit, (bnfuse, limit)
