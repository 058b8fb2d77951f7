"""What every folding rule shares: the BN pattern, the site it matches, the safety checks, and the
rewrite into frozen constants.

A rule only says which producer op it matches, how to scale that op's weight, and how to rebuild
the op around the folded constants. Everything that decides *whether* a fold is exact lives here,
once, so it cannot drift between rules.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .. import fold_math
from .._torch_private import BN_INFERENCE_OP, CallFunction, KeywordArg, Match
from ..decisions import FoldDecision, module_path

BN_ARGS = ("bn_weight", "bn_bias", "running_mean", "running_var", "momentum", "eps")


def bn_of(producer: Any) -> Any:
    """Pattern: ``getitem(_native_batch_norm_legit_no_training(producer, ...), 0)``."""
    bn = CallFunction(BN_INFERENCE_OP, producer, *(KeywordArg(name) for name in BN_ARGS))
    return CallFunction(operator.getitem, bn, 0)


@dataclasses.dataclass
class BnSite:
    """A BatchNorm matched on the output of a producer op (conv / linear)."""

    bn: torch.fx.Node
    producer: torch.fx.Node
    input: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    bn_tensors: dict[str, torch.fx.Node | None]
    eps: Any
    args: dict[str, Any]  # the matched producer hyper-parameters (stride, groups, ...)

    @classmethod
    def from_match(cls, match: Match, producer_targets: tuple[Any, ...]) -> BnSite:
        kw = match.kwargs
        producer = next(n for n in match.nodes if n.target in producer_targets)
        return cls(
            bn=match.output_node(),
            producer=producer,
            input=kw["input"],
            weight=kw["weight"],
            bias=kw.get("bias"),
            bn_tensors={k: kw[k] for k in ("bn_weight", "bn_bias", "running_mean", "running_var")},
            eps=kw["eps"],
            args=kw,
        )


class FoldRule:
    """A BN-folding rule. Subclasses set ``id`` and ``patterns`` and implement three methods."""

    id: str
    producer_targets: tuple[Any, ...]
    patterns: tuple[Any, ...]

    def applies(self, match: Match) -> bool:
        """Whether this rule (rather than a sibling matching the same op) owns the match."""
        return True

    def producer_kind(self, site: BnSite) -> str:
        raise NotImplementedError

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        raise NotImplementedError

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        """A function ``(input, folded_weight, folded_bias) -> output`` rebuilding the producer."""
        raise NotImplementedError


def refusal_reason(site: BnSite, frozen: dict[torch.fx.Node, torch.Tensor]) -> str | None:
    """Why folding ``site`` would not be exact, or None when it is."""
    other_users = [u for u in site.producer.users if u is not site.bn.args[0]]
    if other_users:
        return f"output also used by {module_path(other_users[0])}"
    tensors = {"weight": site.weight, "bias": site.bias, **site.bn_tensors}
    for name, node in tensors.items():
        if node is not None and node not in frozen:
            return f"{name} is not a frozen parameter or buffer"
    if not isinstance(site.eps, (int, float)):
        return "eps is not a compile-time number"
    for name, node in tensors.items():
        if node is not None and frozen[node].is_meta:
            return f"{name} is on the meta device: no values to fold"
    for name, node in tensors.items():
        if node is not None and not _is_real_floating(frozen[node]):
            return f"{name} has dtype {frozen[node].dtype}, only real floating point is folded"
    return None


def _is_real_floating(value: torch.Tensor) -> bool:
    return value.is_floating_point() and not value.is_complex()


def folded_constants(
    rule: FoldRule, site: BnSite, frozen: dict[torch.fx.Node, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The folded (weight, bias) in the weight's dtype, or the reason they cannot be used."""

    def value(node: torch.fx.Node | None) -> torch.Tensor | None:
        return None if node is None else frozen[node]

    bn = {k: value(v) for k, v in site.bn_tensors.items()}
    scale, shift = fold_math.bn_scale_shift(
        bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"], float(site.eps)
    )
    weight = frozen[site.weight]
    folded_weight = fold_math.cast_like(rule.scale_weight(weight, scale, site), weight)
    folded_bias = fold_math.fold_bias(value(site.bias), scale, shift).to(weight.dtype)
    for name, folded in (("weight", folded_weight), ("bias", folded_bias)):
        if not torch.isfinite(folded).all():
            return f"folded {name} is not finite in {weight.dtype}"
    return folded_weight, folded_bias


def decision(rule: FoldRule, site: BnSite, reason: str | None) -> FoldDecision:
    return FoldDecision(
        bn=module_path(site.bn),
        folded=reason is None,
        rule=rule.id,
        producer=module_path(site.producer),
        producer_kind=rule.producer_kind(site),
        reason=reason,
    )
