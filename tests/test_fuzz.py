"""Property test end to end: for random conv / conv-transpose / BatchNorm configurations (BN after
the conv, or before it), bnfuse answers what eager answers (against a float64 reference, with a
dtype-aware tolerance), and folds exactly the BNs the rules' exactness conditions allow.

Each example is a Dynamo trace and an Inductor compile, so this keeps to what Inductor adds: module
padding modes (circular included), channels-last layouts, generated low-precision kernels. The
rules' arithmetic and refusals are fuzzed far more broadly at graph level, in milliseconds an
example (``tests/rules/test_fuzz_graphs.py``).

Profiles (``HYPOTHESIS_PROFILE``, read in ``fuzzing.py``): ``ci`` (default, 40 examples), ``long``
(3000), ``quick`` (10).
"""

from __future__ import annotations

import torch
from fuzzing import conv_output_size, fuzz_settings, input_growth_fits
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

CONV = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
        (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZE = {1: 9, 2: 6, 3: 4}


@st.composite
def conv_bn_cases(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    size = SIZE[dims]
    conv_kwargs = dict(kernel_size=kernel, stride=stride, dilation=dilation, padding=padding,
                       groups=groups, bias=draw(st.booleans()))
    if transposed:
        conv_kwargs["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    else:
        conv_kwargs["padding_mode"] = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        if conv_kwargs["padding_mode"] == "reflect":
            conv_kwargs["padding"] = min(padding, size - 1)
    bn_before = draw(st.booleans())
    bn_kwargs = dict(affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                     momentum=draw(st.sampled_from([0.1, None])))
    return dict(
        dims=dims, transposed=transposed, in_channels=in_channels, out_channels=out_channels,
        conv_kwargs=conv_kwargs, bn_before=bn_before, bn_kwargs=bn_kwargs, size=size,
        batch=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        channels_last=dims == 2 and draw(st.booleans()),
    )


def output_size(case) -> int:
    kw = case["conv_kwargs"]
    return conv_output_size(case["size"], kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"],
                            case["transposed"], kw.get("output_padding", 0))


def build(case) -> tuple[nn.Module, torch.Tensor]:
    conv = CONV[case["dims"], case["transposed"]](case["in_channels"], case["out_channels"], **case["conv_kwargs"])
    if case["bn_before"]:
        model = nn.Sequential(BN[case["dims"]](case["in_channels"], **case["bn_kwargs"]), conv)
    else:
        model = nn.Sequential(conv, BN[case["dims"]](case["out_channels"], **case["bn_kwargs"]))
    x = torch.randn(case["batch"], case["in_channels"], *([case["size"]] * case["dims"]))
    model = randomize_bn(model.eval()).to(case["dtype"])
    x = x.to(case["dtype"])
    if case["channels_last"]:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return model, x


@fuzz_settings(ci=40, quick=10, long=3000)
@given(conv_bn_cases())
def test_bnfuse_matches_eager_on_random_conv_bn(case):
    assume(output_size(case) >= 1)  # hypothesis counts these, and fails the run if there are too many
    model, x = build(case)
    with torch.inference_mode():
        eager = model(x)
    torch._dynamo.reset()
    result = run_bnfuse(model, x)
    reference = float64_reference(model, x)
    assert result.outputs.shape == eager.shape and result.outputs.dtype == eager.dtype
    if case["dtype"] == torch.float32:
        tolerance = 1e-5
    else:  # a wrong fold is off by O(1); low-precision rounding by a few ulps of the output
        tolerance = 2 * relative_error(eager, reference) + 2**-7
    assert relative_error(result.outputs, reference) <= tolerance, (case, result.decisions)
    kwargs = case["conv_kwargs"]
    no_zero_padding = kwargs["padding"] == 0 or kwargs.get("padding_mode", "zeros") != "zeros"
    bn = model[0]
    foldable = not case["bn_before"] or (not case["transposed"] and no_zero_padding
                                         and input_growth_fits(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    assert [d.folded for d in result.decisions] == [foldable], (case, result.decisions)
