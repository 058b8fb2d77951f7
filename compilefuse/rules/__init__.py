"""The folding rules. One rule id names a rule everywhere: options, logs, decisions, tests and docs.

Rules that fold a BN into the op *before* it (conv_bn, ...) and rules that fold it into the op
*after* it (bn_conv, bn_linear) run in turn until nothing more folds (see ``fold_pass``); a BN that
one rule refuses may still be folded by another.
"""

from ._base import FoldRule
from .bn_conv import BnConvRule
from .conv_bn import ConvBnRule
from .conv_transpose_bn import ConvTransposeBnRule
from .linear_bn import BnLinearRule, LinearBnRule

RULES: tuple[FoldRule, ...] = (ConvBnRule(), ConvTransposeBnRule(), LinearBnRule(), BnConvRule(), BnLinearRule())
RULE_IDS: tuple[str, ...] = tuple(rule.id for rule in RULES)

__all__ = ["RULES", "RULE_IDS", "FoldRule"]
