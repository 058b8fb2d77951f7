"""A training graph traced to aten ops before autograd (``make_fx``'s pre-dispatch tracing), so
that the rules fold per step and AOTAutograd differentiates the result: the decompositions autograd
is blind to, autocast's casts written out, activation checkpointing kept as its region."""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._higher_order_ops.wrap import tag_activation_checkpoint

from ..graph_ops import BN_INFERENCE_OP
from . import ops
from .aot_autograd import forget_traced_subgraphs
from .dynamo import autocast_on
from .gates import AUTOCAST_TRACES_BEFORE_AUTOGRAD, CHECKPOINT_TRACES_BEFORE_AUTOGRAD

aten = torch.ops.aten

#: Activation checkpointing (``torch.utils.checkpoint`` under ``torch.compile``) as Dynamo emits it.
CHECKPOINT_OP = tag_activation_checkpoint


def _inference_batch_norm(
    input: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: bool, momentum: float,
    eps: float, cudnn_enabled: bool,
) -> Any:
    """``aten.batch_norm`` in inference mode as the op the rules know; anything else left alone."""
    if training or running_mean is None or running_var is None:
        return NotImplemented
    return BN_INFERENCE_OP(input, weight, bias, running_mean, running_var, momentum, eps)[0]


def _transpose_2d(x: Any) -> Any:
    return aten.permute.default(x, [1, 0]) if x.dim() == 2 else NotImplemented


#: CompositeImplicitAutograd ops decomposed in a training graph before autograd, so that the rules
#: see the ops of an inference graph (``convolution``, ``addmm`` or ``mm`` of a permuted weight).
#: Autograd differentiates their decompositions anyway.
_COMPOSITE_OPS = tuple(
    getattr(getattr(aten, name), overload)
    for name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                 "linear", "matmul", "reshape_as", "view_as", "expand_as")
    for overload in ("default", "padding", "input")
    if hasattr(getattr(aten, name), overload)
)


#: The convolutions autocast casts as composites (``conv2d``, not the ``convolution`` they
#: decompose into, which it leaves alone): decomposed before autograd, they get autocast's casts
#: written out, or a training graph under autocast would convolve in float32.
_AUTOCAST_CONVOLUTIONS = tuple(op for op in _COMPOSITE_OPS if op.name().split("::")[1].split(".")[0]
                               in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))


def _convolution_as_autocast_runs_it(op: Any, *args: Any, **kwargs: Any) -> Any:
    """``op`` decomposed, its floating-point tensors (not float64) first cast to the autocast dtype
    of their device where autocast is on there, as autocast's kernel for ``op`` casts them."""
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if autocast_on(device):
        dtype = torch.get_autocast_dtype(device)

        def cast(value: Any) -> Any:
            eligible = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and value.device.type == device and value.dtype != dtype
            return aten._to_copy.default(value, dtype=dtype) if eligible else value

        args, kwargs = pytree.tree_map(cast, (args, kwargs))
    return op.decompose(*args, **kwargs)


def _before_autograd_decompositions() -> dict[Any, Callable[..., Any]]:
    """Only decompositions autograd is blind to: those of ``_COMPOSITE_OPS``, inference
    ``batch_norm`` as the inference BN op, and a matrix ``t`` as the ``permute`` it is. Not
    Inductor's table: some of its decompositions (max-pool's, into prims) have no derivative."""
    table: dict[Any, Callable[..., Any]] = {op: op.decompose for op in _COMPOSITE_OPS}
    for op in _AUTOCAST_CONVOLUTIONS:
        table[op] = functools.partial(_convolution_as_autocast_runs_it, op)
    table[aten.batch_norm.default] = _inference_batch_norm
    table[aten.t.default] = _transpose_2d
    return table


def trace_before_autograd(fn: Callable[..., Any], args: Sequence[Any]) -> torch.fx.GraphModule:
    """``fn`` traced on ``args`` (fake tensors) to aten ops autograd has not seen yet, with the
    decompositions above: how ``forward_before_autograd`` traces a graph, and the pattern
    matcher's ``trace_fn`` for a replacement in such a graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = next((a.fake_mode for a in args if isinstance(a, torch._subclasses.FakeTensor)), None)
    with fake_mode or contextlib.nullcontext(), torch.fx.traceback.preserve_node_meta():
        return make_fx(fn, decomposition_table=_before_autograd_decompositions(), pre_dispatch=True)(*args)


def higher_order_ops_in(graph: torch.fx.Graph) -> list[str]:
    """The names of the higher-order ops a graph calls (``cond``, ``invoke_subgraph``, ...), in order."""
    return [node.target.name() for node in graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)]


def unsupported_before_autograd(gm: torch.fx.GraphModule, *, checkpoint: bool = False, autocast: bool = False,
                                regions: bool = False) -> str | None:
    """Why ``forward_before_autograd`` cannot trace this Dynamo graph faithfully for a caller
    (None: it can). Higher-order ops (``wrap``, activation checkpointing unless ``checkpoint`` and
    this torch traces it, shared regions and ``cond`` unless ``regions``: a caller that folds
    around them) do not trace there; an autocast region traces with autocast's casts made explicit
    only for what the rules rewrite (``autocast``: a caller that folds per step)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            if node.target is CHECKPOINT_OP and checkpoint and CHECKPOINT_TRACES_BEFORE_AUTOGRAD:
                continue
            if regions and (ops.is_shared_region_call(node) or ops.is_cond_call(node)):
                continue
            return f"higher-order op {node.target.name()}"
        if getattr(node.target, "__name__", "") in ("_enter_autocast", "_exit_autocast") and not (
                autocast and AUTOCAST_TRACES_BEFORE_AUTOGRAD):
            return "an autocast region"
    return None


def forward_before_autograd(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A Dynamo graph as aten ops that autograd has not seen yet (``make_fx``'s pre-dispatch
    tracing): AOTAutograd, compiling it, derives the backward of whatever a pass made of it. Traced
    on Dynamo's own example values, so sizes Dynamo keeps symbolic stay symbolic; grad-mode changes
    are kept as calls; each op keeps the metadata (module path) of the node it came from; a
    checkpointed region stays one (``checkpoint_regions``)."""
    values = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]
    with _plain_checkpoint_traceable(gm) as untagged:
        traced = trace_before_autograd(_AutocastEntered(gm).run, values)
        untagged(traced)
    for module in traced.modules():  # the graph, and each checkpointed region's body
        if isinstance(module, torch.fx.GraphModule):
            for node in reversed(module.graph.find_nodes(op="call_function", target=operator.getitem)):
                if not node.users:  # a BN's unused statistics: the rules match a BN read once
                    module.graph.erase_node(node)
            module.recompile()
    return traced


class _AutocastEntered(torch.fx.Interpreter):
    """Runs a Dynamo graph's autocast regions as ``with torch.autocast(...)`` does: pre-dispatch
    tracing records a bare ``_enter_autocast`` call without entering autocast, so the ops inside
    would be traced (and their fake values computed) in float32; entered through ``torch.autocast``,
    the region is recorded the same and autocast is on while its ops are traced."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is torch.amp.autocast_mode._enter_autocast:
            region = torch.autocast(*args, **kwargs)
            region.__enter__()
            return region
        if target is torch.amp.autocast_mode._exit_autocast:
            args[0].__exit__(None, None, None)
            return None
        return super().call_function(target, args, kwargs)


_CONTEXT_FN = "_checkpoint_context_fn"


@contextlib.contextmanager
def _plain_checkpoint_traceable(gm: torch.fx.GraphModule) -> Iterator[Callable[[torch.fx.GraphModule], None]]:
    """torch 2.14's pre-dispatch rule for the checkpoint op copies ``meta["_checkpoint_context_fn"]``
    from the region's body, which only a checkpoint given a ``context_fn`` (selective
    checkpointing) has: a plain one raises KeyError. While tracing, a plain region's body gets the
    policy the op uses for it anyway (recompute everything); the mark is taken off afterwards, from
    the Dynamo graph and from the traced bodies (``untagged(traced)``), so the op runs them as the
    plain regions they are."""
    bodies = [gm.get_submodule(node.args[0].target) for node in gm.graph.find_nodes(op="call_function", target=CHECKPOINT_OP)
              if node.args and getattr(node.args[0], "op", None) == "get_attr"]
    plain = [body for body in bodies if _CONTEXT_FN not in body.meta]
    if not plain:
        yield lambda _traced: None
        return

    from torch._higher_order_ops.wrap import _always_prefer_recompute
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    mark = functools.partial(create_selective_checkpoint_contexts, _always_prefer_recompute)

    class PlainRegion(dict):  # type: ignore[type-arg]
        """A body's meta that gives the rule its copy, while ``in`` still finds no context_fn (so
        the op runs the region as a plain one, without its warning about a context_fn)."""

        def __missing__(self, key: str) -> Any:
            if key == _CONTEXT_FN:
                return mark
            raise KeyError(key)

    def untagged(traced: torch.fx.GraphModule) -> None:
        for module in traced.modules():
            if isinstance(module, torch.fx.GraphModule) and module.meta.get(_CONTEXT_FN) is mark:
                del module.meta[_CONTEXT_FN]

    originals = [body.meta for body in plain]
    for body in plain:
        body.meta = PlainRegion(body.meta)
    try:
        yield untagged
    finally:
        for body, meta in zip(plain, originals, strict=True):
            body.meta = meta


def checkpoint_regions(traced: torch.fx.GraphModule) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    """Each checkpointed region of a graph ``forward_before_autograd`` traced: its body (aten ops)
    and the arguments of the call, one per placeholder of the body."""
    regions = []
    for node in traced.graph.find_nodes(op="call_function", target=CHECKPOINT_OP):
        body = traced.get_submodule(node.args[0].target)
        regions.append((body, list(node.args[1:])))
    return regions



def shared_regions_ready_for_autograd(traced: torch.fx.GraphModule) -> None:
    """Ready a graph ``forward_before_autograd`` traced for AOTAutograd where it calls shared
    regions. The trace cached each region's body under its identifier, traced without autograd:
    that cache is dropped, or AOTAutograd would reuse the body. And AOTAutograd's
    ``invoke_subgraph`` reads which outputs need a gradient off the body's output values, whose
    fake tensors from this trace may say none does: it would then trace the backward with no
    gradient for an output that gets one (an assertion fails). Without those values it runs the
    body on its own fake operands to learn it."""
    if not any(ops.is_shared_region_call(node) for node in traced.graph.nodes):
        return
    forget_traced_subgraphs()
    for node in traced.graph.nodes:
        if ops.is_shared_region_call(node):
            body = traced.get_submodule(ops.shared_region_parts(node)[0].target)
            for out in body.graph.find_nodes(op="output")[0].args[0]:
                if isinstance(out, torch.fx.Node):
                    out.meta.pop("val", None)
