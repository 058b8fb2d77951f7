"""The two graph passes bnfuse installs in Inductor's freezing compile: fold, then lower what is kept."""

from .fold import BnFoldPass, fold_graph
from .lower import BnLowerPass

__all__ = ["BnFoldPass", "BnLowerPass", "fold_graph"]
