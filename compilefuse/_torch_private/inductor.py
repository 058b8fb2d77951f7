"""Inductor: its config and modes, the decomposition table, the compile entry point, and the marks
it reads on or leaves in the graphs it compiles."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch._inductor import config as inductor_config
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.decomposition import select_decomp_table

from ..graph_ops import BN_INFERENCE_OP

aten = torch.ops.aten

__all__ = ["CustomGraphPass"]


@functools.cache
def max_pool_ops() -> tuple[Any, ...]:
    """Max-pool ops as a post-grad pass sees them: Inductor's decomposition into values and
    offsets, or the ATen op where Inductor falls back. Output 0 is the pooled values in each. (A
    function, not a constant: importing this module registers no prims.)"""
    import torch._inductor.inductor_prims  # registers the prims below

    decomposed = ("_low_memory_max_pool_with_offsets", "_low_memory_max_pool2d_with_offsets")  # torch >= 2.7, 2.6
    return (
        *(getattr(torch.ops.prims, name).default for name in decomposed if hasattr(torch.ops.prims, name)),
        aten.max_pool2d_with_indices.default,
        aten.max_pool3d_with_indices.default,
    )


def inductor_mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor config patches for a ``torch.compile`` mode (``RuntimeError`` for an unknown mode;
    torch up to about 2.7 raised ``KeyError``)."""
    try:
        return dict(list_mode_options(mode)) if mode else {}
    except KeyError:
        raise RuntimeError(f"Unrecognized mode={mode}, should be one of: default, reduce-overhead, "
                           "max-autotune, max-autotune-no-cudagraphs") from None


def inductor_config_keys() -> frozenset[str]:
    return frozenset(inductor_config.get_config_copy())


def inductor_settings() -> list[tuple[str, Any]]:
    """The user's Inductor settings as Inductor's own FX graph cache keys them (without paths,
    trace options and custom passes), sorted."""
    return sorted(inductor_config.save_config_portable().items())


def file_hash(paths: Sequence[str], extra: str) -> bytes:
    return get_hash_for_files(tuple(paths), extra)


class _DecompositionTable(dict):  # type: ignore[type-arg]
    """Pickles as a call to the function that builds it.

    Inductor puts a custom decomposition table into its FX graph cache key; the table's values
    include pybind functions, which cannot be pickled and make Inductor bypass the cache.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (decompositions_keeping_inference_bn, ())


def decompositions_keeping_inference_bn() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table minus inference BatchNorm, so the passes see BN as one op, and
    minus its CPU rewrite of a tiny ``addmm`` / ``mm`` (one row, at most 16 features) into multiply
    and sum, which would hide a Linear from the rules at batch 1."""
    table = _DecompositionTable(select_decomp_table())
    for op in (BN_INFERENCE_OP, aten._batch_norm_no_update.default, aten.addmm.default, aten.mm.default):
        table.pop(op, None)
    return table


def compile_with_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config_patches: dict[str, Any],
    *,
    keep_bn: bool,
) -> Callable[..., Any]:
    """Run Inductor (AOTAutograd included) on a Dynamo graph; ``keep_bn`` keeps inference BN whole."""
    decompositions = decompositions_keeping_inference_bn() if keep_bn else None
    return compile_fx(
        gm, list(example_inputs), config_patches=config_patches, decompositions=decompositions
    )


def caches_disabled() -> bool:
    """Inductor's caches are off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES``): so is bnfuse's fold cache."""
    return bool(inductor_config.force_disable_caches)


def is_inductor_error(error: BaseException) -> bool:
    """Whether ``error`` was raised by Inductor's lowering or code generation."""
    return any(type(e).__name__ in ("InductorError", "LoweringException") for e in _causes(error))


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def outputs_for_backward(graph: torch.fx.Graph) -> list[int]:
    """The outputs of a forward graph Inductor compiles that its user does not see (what AOTAutograd
    saves for the backward, and mutated inputs' values), by ``compile_fx``'s mark on the output node.
    Empty without the mark (``keep_output_stride=False``): then no output is known to be unseen. An
    inference or backward graph marks all its outputs as seen."""
    output = graph.find_nodes(op="output")[0]
    seen = output.meta.get("user_visible_output_idxs")
    if seen is None:
        return []
    seen = set(seen)
    return [i for i in range(len(output.args[0])) if i not in seen]


def keep_layout(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """``node`` through two aliases (to be inserted after the graph's last convolution): returned
    from the graph, it keeps its own strides. Inductor gives a channels-last copy to an output that
    lies on the way to a convolution (``GraphLowering.find_nodes_prefer_channels_last``), which is
    every user of such a node, the first alias included; it propagates only up to the last
    convolution, so the second alias is not on the way. (Torch 2.6 propagates through the whole
    graph: there the copy stays, as without this.)"""
    alias = node
    for _ in range(2):
        alias = graph.call_function(aten.alias.default, (alias,))
        alias.meta["val"] = aten.alias.default(node.meta["val"])
    return alias


def mark_frozen(value: torch.Tensor) -> None:
    """Tag a folded constant as a frozen parameter: the FX graph cache then keys on its metadata
    and reloads the value from the graph, as it does for Inductor's own frozen constants."""
    value._is_frozen_param = True  # type: ignore[attr-defined]
