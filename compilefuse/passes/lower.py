"""Decompose every inference BatchNorm the fold pass kept, exactly as Inductor would.

bnfuse keeps BN whole through AOTAutograd and freezing so the rules can see it as one op. This pass
runs after freezing on purpose: a kept BN decomposed earlier would be picked up by Inductor's
binary folding, which folds it anyway, in low precision, and wrongly for transposed convolutions,
which is what the refusal was there to prevent. An unfolded BN then costs what it costs today.
"""

from __future__ import annotations

import torch
import torch.fx

from .. import graph_ops
from .._torch_private import patterns
from ..rules.rule import BN_TENSORS, bn_of

PATTERN = bn_of(patterns.KeywordArg("input"))


def _lower(match: patterns.Match, *_matched_args: object, **_matched_kwargs: object) -> None:
    kw = match.kwargs
    present = [name for name in BN_TENSORS if kw[name] is not None]
    momentum, eps = kw["momentum"], kw["eps"]

    def bn(x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(present, tensors, strict=True))
        return graph_ops.BN_INFERENCE_OP(x, *(given.get(name) for name in BN_TENSORS), momentum, eps)[0]

    match.replace_by_example(bn, [kw["input"], *(kw[name] for name in present)])


def lower_kept_bns(graph: torch.fx.Graph) -> None:
    """Decompose every inference BN left in ``graph``."""
    lower = patterns.PatternMatcherPass()
    patterns.register_graph_pattern(PATTERN, pass_dict=lower)(_lower)
    lower.apply(graph)

