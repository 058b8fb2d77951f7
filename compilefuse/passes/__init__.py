"""The two graph passes bnfuse installs in Inductor's freezing compile: fold, then the post-grad pass
(lower what is kept, move ReLU after max-pool)."""

from .fold import BnFoldPass, fold_graph
from .post_grad import PostGradPass

__all__ = ["BnFoldPass", "PostGradPass", "fold_graph"]
