"""The folding rules, in the order they are tried. One rule id names a rule everywhere: options,
logs, decisions, tests and docs."""

from ._base import FoldRule
from .conv_bn import ConvBnRule
from .conv_transpose_bn import ConvTransposeBnRule
from .linear_bn import LinearBnRule

RULES: tuple[FoldRule, ...] = (ConvBnRule(), ConvTransposeBnRule(), LinearBnRule())
RULE_IDS: tuple[str, ...] = tuple(rule.id for rule in RULES)

__all__ = ["RULES", "RULE_IDS", "FoldRule"]
