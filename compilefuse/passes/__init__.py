"""The two graph passes bnfuse installs in Inductor's freezing compile: fold, then the post-grad pass
(lower what is kept, move ReLU after max-pool); and the Inductor settings every folded graph gets."""

from collections.abc import Sequence
from typing import Any

from .. import freezing, weight_packing
from .fold import (
    FOLDED_PREFIX,
    BnFoldPass,
    computed_from,
    fold_graph,
    fold_graph_as_data,
    fold_graph_per_step,
    fold_regions_per_step,
    merges_read_values,
    merges_when_frozen,
)
from .post_grad import PostGradPass
from .saved_inputs import SavedInputsPass

__all__ = ["FOLDED_PREFIX", "BnFoldPass", "PostGradPass", "SavedInputsPass", "computed_from", "fold_graph", "fold_graph_as_data",
           "fold_graph_per_step", "fold_regions_per_step", "folded_graph_patches", "merges_read_values", "merges_when_frozen"]


def folded_graph_patches(example_inputs: Sequence[Any]) -> dict[str, Any]:
    """Inductor patches for every graph bnfuse folds, in the backend and in a package alike: the
    post-grad pass, folded constants kept as buffers, no packing of float64 weights. A user's own
    Inductor options go on top (they may not set the pass: ``config.py`` reserves it)."""
    return {
        **freezing.constants_as_buffers(),
        **weight_packing.cpu_float64_patches(example_inputs),
        "post_grad_custom_pre_pass": PostGradPass(),
    }
