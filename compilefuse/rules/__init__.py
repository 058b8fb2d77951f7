"""The folding rules, in the order the pass tries them. One rule id names a rule everywhere:
options, logs, the report, tests and docs.

A rule is ``FoldRule(id, producer, side)`` (``rule.py``): rules with the BN on the output side
(``op -> BN``) and on the input side (``BN -> op``) run in turn until nothing more folds (see
``compilefuse/passes/fold.py``); a BN that one rule refuses may still be folded by another.
"""

from .convolution import BN_CONV, CONV_BN, CONV_TRANSPOSE_BN
from .linear import BN_LINEAR, LINEAR_BN
from .rule import FoldRule, Side

RULES: tuple[FoldRule, ...] = (CONV_BN, CONV_TRANSPOSE_BN, LINEAR_BN, BN_CONV, BN_LINEAR)
RULE_IDS: tuple[str, ...] = tuple(rule.id for rule in RULES)

__all__ = ["RULES", "RULE_IDS", "FoldRule", "Side"]
