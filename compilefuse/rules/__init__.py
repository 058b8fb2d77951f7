"""The folding rules, in the order the pass tries them. One rule id names a rule everywhere:
options, logs, the report, tests and docs.

Every rule takes the path of ``rule.Rule.rewrite`` (find, refuse or compute, replace). Most are
``FoldRule(id, producer, place)``: rules with the BN after the op (``op -> BN``) and before it
(``BN -> op``) run in turn until nothing more folds (see ``compilefuse/passes/fold.py``); a BN that
one rule refuses may still be folded by another. ``cat_bn`` folds each slice of a BN with
``FoldRule``'s checks and arithmetic; ``branch_merge`` merges what the others folded.
"""

from .branch_merge import BRANCH_MERGE
from .cat import CAT_BN
from .convolution import BN_CONV, CONV_BN, CONV_TRANSPOSE_BN
from .linear import BN_LINEAR, BN_TOKENS_LINEAR, LINEAR_BN, LINEAR_TOKENS_BN
from .rule import FoldRule, Rule, Side

RULES: tuple[Rule, ...] = (
    CONV_BN, CONV_TRANSPOSE_BN, LINEAR_BN, LINEAR_TOKENS_BN, CAT_BN, BN_CONV, BN_LINEAR, BN_TOKENS_LINEAR, BRANCH_MERGE,
)
RULE_IDS: tuple[str, ...] = tuple(rule.id for rule in RULES)

__all__ = ["RULES", "RULE_IDS", "FoldRule", "Rule", "Side"]
