"""branch_merge: parallel branches on one input, summed, merged into one convolution.

RepVGG, MobileOne, FastViT's RepMixer and RepViT are trained with parallel branches on the same
input ``x`` (k x k conv + BN, 1 x 1 conv + BN, an identity BN, several k x k branches) and are meant
to be served as one conv per block ("structural re-parameterisation"). Once the branch BNs are folded
into their convs (conv_bn), a block is a sum tree: ``add``/``sub`` nodes and frozen per-channel
multipliers (a layer scale) over terms that are each a convolution of ``x``, a frozen per-channel
affine of ``x`` (an identity-branch BN), or ``x`` itself. With ``c_i`` the per-output-channel
coefficient of term ``i`` (the product of the multipliers above it, negated under a ``sub``)::

    W[o]                  = sum_convs c_i[o] * zero_pad_to_K(W_i)[o]  +  sum_affines c_j[o] * s_j[o] * delta_centre(o)
    b[o]                  = sum_convs c_i[o] * b_i[o]                 +  sum_affines c_j[o] * t_j[o]

where ``delta_centre(o)`` is 1 at the centre tap of the kernel column that reads input channel ``o``
(``o % in_per_group``), computed in float64 and rounded once. Exact when (else refused, with this
reason) every convolution shares stride, dilation and groups, no term is transposed, every kernel is
centred in the largest one (``2 * padding - dilation * (kernel - 1)`` equal across terms, per
dimension: zero padding that keeps the terms aligned), and, with an identity term, the convs keep
the size and place of ``x`` (stride 1, that centring 0) and map ``in == out`` channels. Every
intermediate node is read only inside the tree.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx

from .. import fold_math
from .._torch_private.patterns import MULTIPLE, CallFunction, KeywordArg, Match
from ..decisions import FoldDecision, MergeDecision, module_path
from ..graph_ops import BN_INFERENCE_OP
from ..runtime._torch_runtime import real_tensor_math
from . import _constants
from .convolution import CONV_ARGS, conv_hyper, conv_kind
from .rule import BatchNormStats, Frozen, RewriteContext, Rule, erase_bn, keep_module_names

aten = torch.ops.aten

RULE_ID = "branch_merge"
_SUMS = (aten.add.Tensor, aten.sub.Tensor)


@dataclasses.dataclass
class _Conv:
    node: torch.fx.Node
    coefficient: torch.Tensor  # per output channel, float64


@dataclasses.dataclass
class _Affine:
    """``x * scale + shift`` (an identity BN: ``bn`` is its output; ``x`` itself: ``bn`` is None)."""

    node: torch.fx.Node
    coefficient: torch.Tensor
    bn: torch.fx.Node | None


@dataclasses.dataclass
class _Tree:
    root: torch.fx.Node
    x: torch.fx.Node
    convs: list[_Conv]
    affines: list[_Affine]
    inner: list[torch.fx.Node]  # every node the merge removes
    constant: torch.Tensor  # per output channel, from Python numbers in the sum (``0 + conv(x)``)


class BranchMerge(Rule):
    id = RULE_ID
    stage = 2  # after the BN folds: the branch BNs are in their convs by then
    per_step = False  # it reads the folded constants' values (a training graph has none)
    patterns = tuple(CallFunction(op, KeywordArg("a"), KeywordArg("b"), _users=MULTIPLE) for op in _SUMS)

    def claims(self, match: Match) -> bool:
        return not match.output_node().kwargs  # no alpha

    def find(self, match: Match, run: RewriteContext) -> _Tree | None:
        root = match.output_node()
        with real_tensor_math():
            tree = _sum_tree(root, run.frozen)
        if tree is None or len(tree.convs) + len(tree.affines) < 2 or not tree.convs:
            return None  # not a sum of branches of one input: nothing of this rule's
        if _outer_tree_merges(root, run.frozen):
            return None  # the whole block merges at once, from its outermost sum (one report row)
        return tree

    def reported(self, tree: _Tree, run: RewriteContext) -> list[torch.fx.Node]:
        return [a.bn for a in tree.affines if a.bn is not None]  # the identity BNs: each branch's own is folded

    def refusal(self, tree: _Tree, frozen: Frozen) -> str | None:
        with real_tensor_math():
            return _refusal(tree, frozen)

    def compute(self, tree: _Tree, run: RewriteContext) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        with real_tensor_math():
            return _merged(tree, run.frozen)

    def replace(self, match: Match, tree: _Tree, values: tuple[torch.Tensor, torch.Tensor, list[Any]],
                run: RewriteContext) -> bool:
        """One convolution of the branches' input in the sum's place; the branches removed."""
        weight, bias, hyper = values
        graph = tree.root.graph
        largest = _largest(tree)
        names = [module_path(t.node) for t in tree.convs]
        names += [module_path(a.bn) if a.bn is not None else "identity" for a in tree.affines]
        merge = MergeDecision(tuple(names), module_path(largest.node), conv_kind(largest.node), self.id)
        with graph.inserting_before(tree.root):
            weight_node = run.add_constant(weight, like=largest.node)
            bias_node = run.add_constant(bias, like=largest.node)
        match.replace_by_example(_convolution(hyper), [tree.x, weight_node, bias_node])
        keep_module_names(weight_node, largest.node)
        position = {node: i for i, node in enumerate(graph.nodes)}
        for node in sorted((n for n in tree.inner if n in position), key=position.get, reverse=True):
            if not node.users:  # the branches, now read by nothing (readers first)
                if node.target is operator.getitem and node.args[0].target is BN_INFERENCE_OP:
                    erase_bn(node)
                else:
                    graph.erase_node(node)
        run.merge(merge)
        return True

    def decision(self, tree: _Tree, bn: torch.fx.Node, reason: str | None = None) -> FoldDecision:
        largest = _largest(tree)
        return FoldDecision(bn=module_path(bn), folded=reason is None, rule=self.id,
                            producer=module_path(largest.node), producer_kind=conv_kind(largest.node), reason=reason)


BRANCH_MERGE = BranchMerge()


def _largest(tree: _Tree) -> _Conv:
    return max(tree.convs, key=lambda c: c.node.args[1].meta["val"].numel())


def _sum_tree(root: torch.fx.Node, frozen: Frozen) -> _Tree | None:
    """The terms of the sum rooted at ``root``, or None if it is not a sum of branches of one input."""
    channels = root.meta["val"].shape[1] if root.meta["val"].dim() >= 2 else None
    if channels is None:
        return None
    convs: list[_Conv] = []
    affines: list[_Affine] = []
    leaves: list[tuple[torch.fx.Node, torch.Tensor]] = []
    inner: list[torch.fx.Node] = []

    constant = torch.zeros(channels, dtype=fold_math.FOLD_DTYPE)

    def visit(node: Any, coefficient: torch.Tensor) -> bool:
        nonlocal constant
        if isinstance(node, (int, float)) and not isinstance(node, bool):  # ``0 + branch``, ``x + 1``
            constant = constant + coefficient * float(node)
            return True
        if not isinstance(node, torch.fx.Node):
            return False
        inside = node is root or len(node.users) == 1  # a sum read elsewhere too is a leaf: maybe the input
        if inside and node.op == "call_function" and node.target in _SUMS and not node.kwargs:
            inner.append(node)
            sign = -1.0 if node.target is aten.sub.Tensor else 1.0
            return visit(node.args[0], coefficient) and visit(node.args[1], sign * coefficient)
        if inside and node.op == "call_function" and node.target is aten.mul.Tensor:
            for term, multiplier in (node.args, node.args[::-1]):
                scale = _per_channel_constant(multiplier, root, frozen)
                if scale is not None:
                    inner.append(node)
                    return visit(term, coefficient * scale)
            return False
        if node.op == "call_function" and node.target is aten.convolution.default:
            inner.append(node)
            convs.append(_Conv(node, coefficient))
            return True
        if node.op == "call_function" and node.target is operator.getitem and node.args[0].target is BN_INFERENCE_OP:
            inner.append(node)
            affines.append(_Affine(node, coefficient, node))
            return True
        leaves.append((node, coefficient))  # x itself, if it is the branches' input
        return True

    if not visit(root, torch.ones(channels, dtype=fold_math.FOLD_DTYPE)):
        return None
    # The common input: every conv and BN reads it, every other leaf is it. A conv can be that input
    # itself (a residual ``conv(y) + f(conv(y))``): then it is an identity term, not a branch.
    candidates = {c.node.args[0] for c in convs} | {a.node.args[0].args[0] for a in affines} | {n for n, _ in leaves}
    for x in candidates:
        branches = [c for c in convs if c.node is not x]
        if all(c.node.args[0] is x for c in branches) and all(a.node.args[0].args[0] is x for a in affines) \
                and all(n is x for n, _ in leaves):
            identity = [_Affine(n, coefficient, None) for n, coefficient in leaves]
            identity += [_Affine(c.node, c.coefficient, None) for c in convs if c.node is x]
            return _Tree(root, x, branches, affines + identity, [n for n in inner if n is not x], constant)
    return None


def _outer_tree_merges(root: torch.fx.Node, frozen: Frozen) -> bool:
    """Whether a sum or per-channel product that is the only reader of ``root`` roots a mergeable tree."""
    node = root
    while len(node.users) == 1:
        (node,) = node.users
        if node.op != "call_function" or node.target not in (*_SUMS, aten.mul.Tensor):
            return False
        if node.target in _SUMS:
            with real_tensor_math():
                tree = _sum_tree(node, frozen)
                if tree is not None and tree.convs and _refusal(tree, frozen) is None:
                    return True
    return False


def _per_channel_constant(node: Any, like: torch.fx.Node, frozen: Frozen) -> torch.Tensor | None:
    """``node`` as one float64 number per channel of ``like``, if it is computed from frozen tensors."""
    if isinstance(node, (int, float)):
        return torch.full((like.meta["val"].shape[1],), float(node), dtype=fold_math.FOLD_DTYPE)
    if not isinstance(node, torch.fx.Node) or not _constants.expression_leaves(node, frozen):
        return None
    if not _constants.is_per_channel(node.meta["val"].shape, like.meta["val"].shape):
        return None
    return _constants.per_channel(_constants.evaluate_float64(node, frozen), like.meta["val"]).cpu()  # coefficients live on CPU


def _refusal(tree: _Tree, frozen: Frozen) -> str | None:
    """Why merging ``tree`` into one conv would not be exact, or None when it is."""
    removed = set(tree.inner) - {tree.root}
    for node in removed:
        for user in node.users:
            if user not in removed and user is not tree.root:
                return f"branch output also used by {module_path(user)}"
    hyper = [conv_hyper(c.node) for c in tree.convs]
    if any(h["transposed"] for h in hyper):
        return "a branch is a transposed convolution"
    for name in ("stride", "dilation", "groups"):
        values = sorted({str(list(h[name]) if isinstance(h[name], (list, tuple)) else h[name]) for h in hyper})
        if len(values) > 1:
            return f"branches differ in {name}: {', '.join(values)}"
    centring = {tuple(_centring(h, c.node)) for h, c in zip(hyper, tree.convs, strict=True)}
    if len(centring) > 1:
        return "kernels are not centred alike (2 * padding - dilation * (kernel - 1) differs between branches)"
    for conv in tree.convs:
        for operand in conv.node.args[1:3]:
            if operand is not None and _constants.frozen_operand(operand, frozen) is None:
                return "a branch's weight or bias is not a frozen parameter or buffer"
    dtypes = {tree.root.meta["val"].dtype, tree.x.meta["val"].dtype} | {c.node.meta["val"].dtype for c in tree.convs}
    if len(dtypes) > 1:
        return f"branches differ in dtype ({', '.join(sorted(map(str, dtypes)))})"
    if tree.affines:  # identity terms
        (center,) = centring
        if any(s != 1 for s in hyper[0]["stride"]) or any(center):
            return "an identity branch, but the convs change the size or alignment of the input"
        weight = tree.convs[0].node.args[1].meta["val"]
        groups = int(hyper[0]["groups"])
        if weight.shape[0] != tree.x.meta["val"].shape[1] or weight.shape[1] * groups != weight.shape[0]:
            return "an identity branch, but the convs change the number of channels"
        for affine in tree.affines:
            if affine.bn is not None:
                norm = BatchNormStats.of_op(affine.bn.args[0])
                for name, node in norm.tensors.items():
                    if node is not None and node not in frozen:
                        return f"identity {name} is not a frozen parameter or buffer"
                if norm.check():
                    return norm.check()
    return None


def _merged(tree: _Tree, frozen: Frozen) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """The merged weight and bias (float64, rounded once) and the merged conv's hyper-parameters."""
    f64 = {"device": "cpu", "dtype": fold_math.FOLD_DTYPE}  # small tensors: one place, one precision
    first = tree.convs[0].node
    hyper = conv_hyper(first)
    kernel = [max(c.node.args[1].meta["val"].shape[2 + d] for c in tree.convs) for d in range(len(hyper["stride"]))]
    out_channels, in_per_group = first.args[1].meta["val"].shape[:2]
    weight = torch.zeros(out_channels, in_per_group, *kernel, **f64)
    bias = torch.zeros(out_channels, **f64)
    for conv in tree.convs:
        w = _constants.frozen_operand(conv.node.args[1], frozen).value.to(**f64)
        start = [(k - s) // 2 for k, s in zip(kernel, w.shape[2:], strict=True)]
        window = tuple(slice(b, b + s) for b, s in zip(start, w.shape[2:], strict=True))
        weight[(slice(None), slice(None), *window)] += fold_math.scale_output_channels(w, conv.coefficient.to(**f64))
        if conv.node.args[2] is not None:
            bias += conv.coefficient.to(**f64) * _constants.frozen_operand(conv.node.args[2], frozen).value.to(**f64)
    bias += tree.constant.to(**f64)
    centre = tuple(k // 2 for k in kernel)
    channels = torch.arange(out_channels)
    for affine in tree.affines:
        scale, shift = torch.ones(out_channels, **f64), torch.zeros(out_channels, **f64)
        if affine.bn is not None:
            norm = BatchNormStats.of_op(affine.bn.args[0])
            scale, shift = (v.to(**f64) for v in norm.scale_shift(frozen, affine.bn.meta["val"]))
        coefficient = affine.coefficient.to(**f64)
        weight[(channels, channels % in_per_group, *centre)] += coefficient * scale
        bias += coefficient * shift
    # The merged kernel's padding keeps the centring every term shares.
    centring = _centring(hyper, first)
    hyper["padding"] = [(c + d * (k - 1)) // 2 for c, d, k in zip(centring, hyper["dilation"], kernel, strict=True)]
    target = first.meta["val"]
    return weight.to(target.device, target.dtype), bias.to(target.device, target.dtype), [hyper[name] for name in CONV_ARGS]


def _centring(hyper: dict[str, Any], conv: torch.fx.Node) -> list[int]:
    """``2 * padding - dilation * (kernel - 1)`` per spatial dimension: equal for kernels centred alike."""
    kernel = conv.args[1].meta["val"].shape[2:]
    return [2 * p - d * (k - 1) for p, d, k in zip(hyper["padding"], hyper["dilation"], kernel, strict=True)]


def _convolution(hyper: list[Any]):
    def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return aten.convolution.default(x, weight, bias, *hyper)

    return conv
