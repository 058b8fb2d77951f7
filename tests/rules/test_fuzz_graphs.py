"""Property tests at graph level: random conv / conv-transpose and BatchNorm configurations (the BN
after the op or before it, through reflect / replicate padding or none), random parallel conv
branches (branch_merge) and random concatenations of convs (cat_bn), built as aten graphs and
folded by the pass alone (``test_checks.py``'s harness: no Dynamo, no Inductor). The fold or merge
happens exactly where the rules' conditions allow it, and the folded graph answers what the
unfolded one does, against float64.

A graph-level example costs a few milliseconds where an end-to-end one is an Inductor compile, so
these cover the rules' arithmetic and refusals broadly; ``tests/test_fuzz.py`` and
``tests/test_fuzz_branches.py`` keep end-to-end examples for what Dynamo and Inductor add (modules
traced to aten, layouts, channels-last, generated kernels, low-precision code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fuzzing import addable, branch_cases, cat_cases, conv_output_size, expected_merge, fuzz_settings, input_growth_fits
from helpers import relative_error
from hypothesis import assume, given
from hypothesis import strategies as st
from test_checks import Folding, bn, stats

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


def branch_graph(case):
    """``fn(x, *weights, *stats per branch, [*identity stats], [scale])``: a branch case as aten calls,
    each conv's output through its own BN (``test_fuzz_branches.Branches``)."""
    convs, identity, scale = case["convs"], case["identity"], case["scale"]

    def fn(x, *args):
        args = list(args)
        weights = [args.pop(0) for _ in convs]
        outputs = []
        for c, weight in zip(convs, weights, strict=True):
            out = torch.ops.aten.convolution.default(x, weight, None, [c["stride"]] * 2, [c["padding"]] * 2, [1, 1],
                                                     False, [0, 0], c["groups"])
            outputs.append(bn(out, [args.pop(0) for _ in range(4)]))
        out = outputs[0]
        for branch in outputs[1:]:
            out = out - branch if case["subtract"] else out + branch
        identity_stats = [args.pop(0) for _ in range(4)] if identity else None
        if scale:
            out = out * args.pop(0)
        return out + bn(x, identity_stats) if identity else out

    return fn


@fuzz_settings(ci=200, quick=30, long=3000)
@given(branch_cases())
def test_branches_merge_exactly_where_the_rule_allows_on_random_graphs(case):
    assume(addable(case))
    channels = case["channels"]
    args = [torch.randn(2, channels, case["size"], case["size"])]
    args += [torch.randn(channels, channels // c["groups"], c["kernel"], c["kernel"]) for c in case["convs"]]
    for _ in range(len(case["convs"]) + case["identity"]):
        args += stats(channels)
    if case["scale"]:
        args.append(torch.rand(channels, 1, 1) + 0.5)
    folding = Folding(branch_graph(case), *args)
    merges, all_folded = expected_merge(case)
    assert [len(m.branches) for m in folding.record.merges] == merges, (case, folding.record.merges)
    assert all(d.folded for d in folding.record.decisions) == all_folded, (case, folding.record.decisions)
    assert folding.error_vs_float64() < 1e-5, case


@st.composite
def cat_graph_cases(draw):
    """A cat case with what the end-to-end modules cannot easily make: plain and transposed convs
    in one cat, grouped convs, slices that are no conv, a conv also returned on its own."""
    case = draw(cat_cases())
    slices = len(case["splits"])
    case.update(
        transposed=[draw(st.booleans()) for _ in range(slices)],
        groups=[draw(st.sampled_from([1, 1, c])) for c in case["splits"]],
        bias=[draw(st.booleans()) for _ in range(slices)],
        raw=[draw(st.sampled_from([False, False, False, True])) for _ in range(slices)],
        shared=draw(st.sampled_from([None, *range(slices)] + [None] * slices)),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
    )
    return case


def cat_graph(case):
    """``fn(x, *weights and biases, *stats)``: split x, each slice through its conv (or none), cat, BN."""

    def fn(x, *args):
        args = list(args)
        outputs = []
        for i, part in enumerate(torch.ops.aten.split_with_sizes.default(x, case["splits"], 1)):
            if case["raw"][i]:
                outputs.append(part)
                continue
            weight, bias = args.pop(0), args.pop(0) if case["bias"][i] else None
            pad = case["kernels"][i] // 2
            outputs.append(torch.ops.aten.convolution.default(
                part, weight, bias, [1, 1], [pad, pad], [1, 1], case["transposed"][i], [0, 0], case["groups"][i]))
        out = bn(torch.ops.aten.cat.default(outputs, 1), args, case["eps"])
        return (out, outputs[case["shared"]] * 2) if case["shared"] is not None else out

    return fn


@fuzz_settings(ci=200, quick=30, long=3000)
@given(cat_graph_cases())
def test_concatenations_fold_exactly_where_the_rule_allows_on_random_graphs(case):
    args, channels = [torch.randn(2, sum(case["splits"]), 6, 6)], 0
    for c, k, transposed, groups, bias, raw in zip(case["splits"], case["kernels"], case["transposed"], case["groups"],
                                                    case["bias"], case["raw"], strict=True):
        if raw:
            channels += c
            continue
        out = c + 1 if groups == 1 else 2 * c  # grouped: a multiple of the groups
        args.append(torch.randn(c, out // groups, k, k) if transposed else torch.randn(out, c // groups, k, k))
        if bias:
            args.append(torch.randn(out))
        channels += out
    args += stats(channels)
    folding = Folding(cat_graph(case), *args)
    shared_conv = case["shared"] is not None and not case["raw"][case["shared"]]
    foldable = not any(case["raw"]) and not shared_conv
    [decision] = folding.record.decisions
    assert decision.folded == foldable, (case, decision)
    assert decision.rule == "cat_bn" or not foldable, (case, decision)
    assert folding.record.bn_ops_after == (0 if foldable else 1)
    with torch.no_grad():
        reference = cat_graph(case)(*(a.double() for a in args))
        folded = folding.gm(*args)
    for got, want in zip(*(r if isinstance(r, tuple) else (r,) for r in (folded, reference)), strict=True):
        assert relative_error(got, want) < 1e-5, case
