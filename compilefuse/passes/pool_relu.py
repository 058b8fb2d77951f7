"""Move a ReLU that feeds a max-pool to after it: ``max_pool(relu(x))`` -> ``relu(max_pool(x))``.

Exact: max commutes with any non-decreasing function, NaN propagates through both orders, and
every pooling window holds at least one real element (the ``-inf`` padding never wins against
``relu``'s 0). It is a fix for what folding does to the schedule, not a fold: with the BN gone,
Inductor fuses the ReLU into the max-pool's loop, and where that loop is scalar (a pool over the
last, contiguous dim: ``MaxPool1d``, channels-first ``MaxPool2d``) the compiler turns each
element's ReLU into a data-dependent branch, a mispredict on half of them. An unfolded BN kept the
ReLU in its own vectorised loop (audio_cnn at batch 32: docs/benchmarks.md). After the move the
pool reads the raw values (a branchless max) and the ReLU runs once per pooled output.

Only where the pool's indices are unused (they would change: ReLU creates ties) and the ReLU has no
other reader (it would be computed twice).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from .._torch_private import inductor

aten = torch.ops.aten
_VIEWS = (aten.unsqueeze.default, aten.view.default)


def move_relu_after_max_pool(graph: torch.fx.Graph) -> int:
    """Rewrite every ``max_pool(relu(x))`` of ``graph`` whose indices are unused; the count moved."""
    moved = 0
    for pool in [n for op in inductor.max_pool_ops() for n in graph.find_nodes(op="call_function", target=op)]:
        values = _only_values_read(pool)
        relu, views = _relu_before(pool.args[0])
        if values is None or relu is None:
            continue
        (views[-1] if views else pool).replace_input_with(relu, relu.args[0])
        graph.erase_node(relu)
        readers = list(values.users)
        with graph.inserting_after(values):
            after = graph.call_function(aten.relu.default, (values,))
        after.meta["val"] = values.meta.get("val")
        for reader in readers:
            reader.replace_input_with(values, after)
        moved += 1
    return moved


def _only_values_read(pool: torch.fx.Node) -> torch.fx.Node | None:
    """The pool's ``getitem 0``, if nothing reads its other outputs."""
    items = {user.args[1]: user for user in pool.users if user.target is operator.getitem}
    if len(items) != len(pool.users) or 0 not in items:
        return None
    return items[0] if all(not item.users for index, item in items.items() if index != 0) else None


def _relu_before(node: torch.fx.Node) -> tuple[torch.fx.Node | None, list[torch.fx.Node]]:
    """The ReLU ``node`` reads through single-reader views (``unsqueeze``: how ``MaxPool1d`` pools),
    with those views, nearest the ReLU last; (None, []) if there is none."""
    views: list[torch.fx.Node] = []
    while node.target in _VIEWS and len(node.users) == 1:
        views.append(node)
        node = node.args[0]
    if node.target == aten.relu.default and len(node.users) == 1:
        return node, views
    return None, []
