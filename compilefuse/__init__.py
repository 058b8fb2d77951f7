"""compilefuse: a torch.compile backend that folds BatchNorm into conv, conv-transpose and linear.

    model = torch.compile(model, backend="bnfuse")   # found through the entry point

Importing this package is not needed for the backend name to work; it gives access to the fold
decisions and the backend callable itself.
"""

from .backend import RECORDS, bnfuse
from .config import BnfuseConfig
from .decisions import FoldDecision
from .fold_pass import FoldRecord
from .rules import RULE_IDS

__version__ = "0.1.0"

__all__ = ["RECORDS", "RULE_IDS", "BnfuseConfig", "FoldDecision", "FoldRecord", "bnfuse", "last_record"]


def last_record() -> FoldRecord | None:
    """The fold record of the most recently compiled bnfuse graph."""
    return RECORDS[-1] if RECORDS else None
