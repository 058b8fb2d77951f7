"""PostGradPass: what bnfuse does to a graph after freezing, before Inductor lowers it."""

from __future__ import annotations

import torch
import torch.fx

from .. import code_identity
from .._torch_private import inductor
from . import lower, pool_relu


class PostGradPass(inductor.CustomGraphPass):
    """Decompose the BNs the fold kept (``lower.py``), then move each ReLU that feeds a max-pool to
    after it (``pool_relu.py``). Its uuid keys Inductor's caches."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        lower.lower_kept_bns(graph)
        pool_relu.move_relu_after_max_pool(graph)

    def uuid(self) -> bytes:
        return code_identity.code_hash(__name__, extra="post-grad")
