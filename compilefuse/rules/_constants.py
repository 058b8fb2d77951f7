"""Which graph values are compile-time constants, and their exact values.

Three shapes of constant reach a folding rule:

- a frozen parameter or buffer (a placeholder freezing will turn into a constant);
- a frozen tensor cast to another dtype, as ``torch.autocast`` casts conv and linear weights:
  the fold then starts from the full-precision master and rounds once, to the dtype the op uses;
- an expression of frozen tensors: torchvision's ``FrozenBatchNorm2d`` computes its scale and shift
  in ``forward``, and a parametrised weight (``weight_norm``: ``g * v / ||v||``; ``spectral_norm``
  in eval: ``W / (u . W v)``) is computed on every call. Evaluated here once, in float64 from the
  frozen leaves, never in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from ..fold_math import FOLD_DTYPE
from ..graph_ops import CASTS

aten = torch.ops.aten


#: Ops a constant expression may use: shape changes, elementwise arithmetic and the reductions and
#: products weight parametrisations use; nothing random, nothing that reads a run-time input. Casts
#: are evaluated as the identity: the expression is computed in float64.
EXPRESSION_OPS = frozenset(
    {
        aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
        aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.clone.default,
        aten.permute.default, aten.t.default, aten.transpose.int,
        aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
        aten.div.Tensor, aten.div.Scalar, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default,
        aten.neg.default, aten.abs.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
        aten.sum.default, aten.sum.dim_IntList, aten.mean.dim, aten.linalg_vector_norm.default,
        aten.norm.ScalarOpt_dim, aten.mv.default, aten.dot.default, aten.mm.default, aten.clamp_min.default,
        *CASTS,
    }
)


@dataclasses.dataclass(frozen=True)
class FrozenOperand:
    """A frozen tensor as an op reads it: its stored value, and the dtype the op sees it in."""

    value: torch.Tensor
    dtype: torch.dtype


def frozen_operand(node: torch.fx.Node, frozen: dict[torch.fx.Node, torch.Tensor]) -> FrozenOperand | None:
    """``node`` as a frozen tensor, possibly behind one dtype cast, or computed from frozen tensors
    alone (its float64 value); None when it reads anything else. A cast is looked through even
    where its result is known too (a per-step fold's values computed from frozen ones): the fold
    then rounds once, from the stored value, to the dtype the op reads (autocast's cast of a
    weight)."""
    if _is_plain_cast(node) and node.args[0] in frozen:
        return FrozenOperand(frozen[node.args[0]], node.meta["val"].dtype)
    if node in frozen:
        return FrozenOperand(frozen[node], frozen[node].dtype)
    leaves = expression_leaves(node, frozen)
    if leaves and all(frozen[leaf].device == node.meta["val"].device for leaf in leaves):
        return FrozenOperand(evaluate_float64(node, frozen), node.meta["val"].dtype)
    return None


def _is_plain_cast(node: torch.fx.Node) -> bool:
    """A dtype cast that changes nothing else (no device move, no layout change)."""
    if node.op != "call_function" or node.target not in CASTS or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
        return False
    source, result = node.args[0].meta.get("val"), node.meta.get("val")
    return source is not None and result is not None and source.device == result.device


def expression_leaves(node: object, frozen: dict[torch.fx.Node, torch.Tensor]) -> list[torch.fx.Node] | None:
    """The frozen tensors an expression is computed from; None when it reads anything else."""
    leaves: list[torch.fx.Node] = []
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, torch.fx.Node) or current in seen:
            continue
        seen.add(current)
        if current in frozen:
            leaves.append(current)
        elif current.op == "call_function" and current.target in EXPRESSION_OPS:
            stack.extend(current.all_input_nodes)
        else:
            return None
    return leaves


def evaluate_float64(node: object, frozen: dict[torch.fx.Node, torch.Tensor]) -> Any:
    """The value of an expression of frozen tensors, computed in float64 on real tensors."""
    memo: dict[torch.fx.Node, Any] = {}

    def value(current: object) -> Any:
        if not isinstance(current, torch.fx.Node):
            return current
        if current not in memo:
            if current in frozen:
                memo[current] = frozen[current].to(FOLD_DTYPE)
            elif current.target in CASTS:
                memo[current] = value(current.args[0])
            else:
                args = torch.fx.node.map_arg(current.args, value)
                kwargs = torch.fx.node.map_arg(current.kwargs, value)
                memo[current] = current.target(*args, **kwargs)
        return memo[current]

    return value(node)


def is_per_channel(shape: Sequence[int], output_shape: Sequence[int]) -> bool:
    """Whether a tensor of ``shape``, broadcast against ``output_shape``, is constant along every
    dimension but the channels (dimension 1)."""
    if len(shape) > len(output_shape) or len(output_shape) < 2:
        return False
    padded = [1] * (len(output_shape) - len(shape)) + list(shape)
    return all(size == 1 for dim, size in enumerate(padded) if dim != 1) and padded[1] in (1, output_shape[1])


def per_channel(value: Any, output: torch.Tensor) -> torch.Tensor:
    """``value`` as one float64 number per channel of ``output`` (its shape was checked per channel
    when the site was recognised)."""
    value = torch.as_tensor(value, dtype=FOLD_DTYPE)
    if not is_per_channel(value.shape, output.shape):
        raise ValueError(f"bnfuse: shape {tuple(value.shape)} is not per channel of {tuple(output.shape)}")
    return value.reshape(-1).expand(output.shape[1]).clone()
