"""Per-step graphs: a graph input the forward saves for the backward is saved as it is, not as a
channels-last copy.

Inductor's layout optimisation gives channels-last strides to every 4-D tensor on the way to a
convolution, graph inputs included, and a graph input the forward returns for the backward is
returned as such a copy. For a weight bnfuse folds per step the copy is pure cost: the forward
reads the weight only through its fold, and the backward recomputes the fold from the weight (the
partitioner is asked to, ``fold.py``). So every folded weight was kept alive twice from forward to
backward, and under autocast in float32, twice the bfloat16 cast plain Inductor keeps.

Only inputs no convolution reads directly: for those, Inductor's copy is the one the forward's
convolution reads anyway.
"""

from __future__ import annotations

import torch
import torch.fx

from .. import code_identity
from .._torch_private import inductor

aten = torch.ops.aten


def save_inputs_as_they_are(graph: torch.fx.Graph) -> int:
    """Return each 4-D graph input the forward saves for the backward (no convolution reading it
    directly) through ``inductor.keep_layout``; the number of inputs so returned."""
    output = graph.find_nodes(op="output")[0]
    saved = inductor.outputs_for_backward(graph)
    values = list(output.args[0])
    changed = 0
    for index in saved:
        node = values[index]
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder" or _read_by_convolution(node):
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            with graph.inserting_before(output):
                values[index] = inductor.keep_layout(graph, node)
            changed += 1
    if changed:
        output.args = (tuple(values), *output.args[1:])
    return changed


def _read_by_convolution(node: torch.fx.Node) -> bool:
    return any(user.target is aten.convolution.default for user in node.users)


class SavedInputsPass(inductor.CustomGraphPass):
    """Installed as Inductor's post-grad post pass for per-step graphs; its uuid keys Inductor's caches."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        save_inputs_as_they_are(graph)

    def uuid(self) -> bytes:
        return code_identity.code_hash(__name__, extra="saved-inputs")
