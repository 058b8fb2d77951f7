"""Property test at graph level: random conv / conv-transpose and BatchNorm configurations, the BN
after the op or before it (through reflect / replicate padding or none), built as aten graphs and
folded by the pass alone (``test_checks.py``'s harness: no Dynamo, no Inductor). The fold happens
exactly where the rules' conditions allow it, and the folded graph answers what the unfolded one
does, against float64.

A graph-level example costs a few milliseconds where an end-to-end one is an Inductor compile, so
this one covers the rules' arithmetic and refusals broadly; ``tests/test_fuzz.py`` keeps end-to-end
examples for what Inductor adds (layouts, channels-last, generated kernels, low-precision code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fuzzing import conv_output_size, fuzz_settings, input_growth_fits
from helpers import relative_error
from hypothesis import assume, given
from hypothesis import strategies as st
from test_checks import Folding, bn

SIZE = {1: 9, 2: 6, 3: 4}


@st.composite
def cases(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    bn_before = draw(st.booleans())
    padding = draw(st.integers(0, 2))
    mode = "zeros" if transposed else draw(st.sampled_from(["zeros", "reflect", "replicate"]))
    stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    return dict(
        dims=dims, transposed=transposed, groups=groups, bn_before=bn_before,
        in_channels=groups * draw(st.integers(1, 3)), out_channels=groups * draw(st.integers(1, 3)),
        kernel=draw(st.integers(1, 3)), stride=stride, dilation=dilation,
        padding=min(padding, SIZE[dims] - 1) if mode == "reflect" else padding, mode=mode,
        output_padding=draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0,
        bias=draw(st.booleans()), affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        batch=draw(st.integers(1, 3)), dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
    )


def output_size(case) -> int:
    return conv_output_size(SIZE[case["dims"]], case["kernel"], case["stride"], case["padding"], case["dilation"],
                            case["transposed"], case["output_padding"])


def graph_function(case):
    """``fn(x, weight, bias?, gamma?, beta?, mean, var)``: the case as aten calls."""
    dims = case["dims"]

    def op(x, weight, bias):
        zero_padded = case["mode"] == "zeros"
        if not zero_padded and case["padding"]:
            x = F.pad(x, [case["padding"]] * 2 * dims, mode=case["mode"])
        return torch.ops.aten.convolution.default(
            x, weight, bias, [case["stride"]] * dims, [case["padding"] if zero_padded else 0] * dims,
            [case["dilation"]] * dims, case["transposed"], [case["output_padding"]] * dims, case["groups"])

    def fn(*args):
        args = list(args)
        x, weight = args.pop(0), args.pop(0)
        bias = args.pop(0) if case["bias"] else None
        gamma, beta = (args.pop(0), args.pop(0)) if case["affine"] else (None, None)
        stats = (gamma, beta, *args)
        if case["bn_before"]:
            return op(bn(x, stats, case["eps"]), weight, bias)
        return bn(op(x, weight, bias), stats, case["eps"])

    return fn


def arguments(case) -> list[torch.Tensor]:
    cin, cout, groups, dtype = case["in_channels"], case["out_channels"], case["groups"], case["dtype"]
    kernel = [case["kernel"]] * case["dims"]
    weight = torch.randn(cin, cout // groups, *kernel) if case["transposed"] else torch.randn(cout, cin // groups, *kernel)
    channels = cin if case["bn_before"] else cout
    args = [torch.randn(case["batch"], cin, *[SIZE[case["dims"]]] * case["dims"]), weight]
    if case["bias"]:
        args.append(torch.randn(cout))
    if case["affine"]:
        args += [torch.rand(channels) + 0.5, torch.randn(channels)]
    args += [torch.randn(channels), torch.rand(channels) + 0.2]
    return [a.to(dtype) for a in args]


@fuzz_settings(ci=300, quick=50, long=5000)
@given(cases())
def test_the_pass_folds_exactly_where_the_rules_allow_on_random_graphs(case):
    assume(output_size(case) >= 1)
    args = arguments(case)
    fn = graph_function(case)
    folding = Folding(fn, *args)
    [decision] = folding.record.decisions
    gamma = args[-4] if case["affine"] else None
    foldable = not case["bn_before"] or (
        not case["transposed"] and (case["padding"] == 0 or case["mode"] != "zeros")
        and input_growth_fits(args[-2], args[-1], gamma, args[-3] if case["affine"] else None, case["eps"]))
    assert decision.folded == foldable, (case, decision)
    assert folding.record.bn_ops_after == (0 if foldable else 1)
    with torch.no_grad():
        reference = fn(*(a.double() for a in args))
        unfolded, folded = fn(*args), folding.gm(*args)
    assert folded.shape == reference.shape and folded.dtype == unfolded.dtype
    # a wrong fold is off by O(1); rounding by a few ulps of the output
    tolerance = 1e-5 if case["dtype"] == torch.float32 else 2 * relative_error(unfolded, reference) + 2**-7
    assert relative_error(folded, reference) <= tolerance, (case, decision)
