"""What bnfuse decided for each BatchNorm it saw, in the user's own module and op names."""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterator, Sequence

import torch
import torch.fx

from .graph_ops import CASTS
from .runtime import _torch_runtime  # not _torch_private: a loaded package's report must not import Dynamo

AUTOGRAD_REASON = "autograd enabled (run under torch.inference_mode() to fold)"
_BN_ARG_POSITIONS = {"running_mean": 1, "training": 5}


@dataclasses.dataclass(frozen=True)
class FoldDecision:
    """One BatchNorm site: folded into its producer, or kept, with the reason."""

    bn: str
    folded: bool
    rule: str | None = None
    producer: str | None = None
    producer_kind: str | None = None
    reason: str | None = None
    #: Folded as arithmetic run at every step of a training graph, not into constants.
    per_step: bool = False

    @property
    def status(self) -> str:
        return ("folded per step" if self.per_step else "folded") if self.folded else "kept"

    def __str__(self) -> str:
        if self.folded:
            how = "folded per step" if self.per_step else "folded"
            return f"{self.bn}: {how} into {self.producer_kind} {self.producer} ({self.rule})"
        return f"{self.bn}: kept ({self.reason})"


@dataclasses.dataclass(frozen=True)
class MergeDecision:
    """Parallel branches on one input merged into one convolution (structural re-parameterisation)."""

    branches: tuple[str, ...]  # the user's module paths of the merged terms, in graph order
    into: str  # the module path the merged conv is named after (its largest branch)
    producer_kind: str
    rule: str

    def __str__(self) -> str:
        branches = ", ".join(self.branches)
        return f"merged {len(self.branches)} branches ({branches}) into {self.producer_kind} {self.into} ({self.rule})"


@dataclasses.dataclass
class FoldRecord:
    """What bnfuse decided for one compiled graph, and how long its rules took."""

    decisions: list[FoldDecision] = dataclasses.field(default_factory=list)
    merges: list[MergeDecision] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    #: Inference BN ops in the graph before and after the fold rules ran, counted on the graph
    #: itself (independently of the decisions, so the two can be checked against each other).
    bn_ops_before: int = 0
    bn_ops_after: int = 0


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the user's module that created ``node`` (e.g. ``layer1.0.bn1``).

    Dynamo records the module call stack on each node; its innermost entry names the module.
    A functional call outside any submodule is named after the call in the user's ``forward``
    (Dynamo's name for it, e.g. ``batch_norm``, which the aten nodes it becomes remember).
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = _clean_dynamo_path(list(stack.values())[-1][0])
        if path != "<root>":
            return path
    source_fn = node.meta.get("source_fn_stack")
    return source_fn[-1][0] if source_fn else node.name


def sort_in_program_order(record: FoldRecord, graph: torch.fx.Graph) -> None:
    """Put a record's decisions and merges in program order: each BN's row where its module first
    runs (placeholders carry their module's path too, so only calls count), or where the nearest
    module around it does (a shared region's body is traced in its first call only)."""
    order: dict[str, int] = {}
    for index, node in enumerate(_calls(graph)):
        order.setdefault(module_path(node), index)

    def position(path: str) -> int:
        while path not in order and "." in path:
            path = path.rpartition(".")[0]
        return order.get(path, len(order))

    record.decisions.sort(key=lambda d: position(d.bn))
    record.merges.sort(key=lambda m: position(m.into))


def _calls(graph: torch.fx.Graph) -> Iterator[torch.fx.Node]:
    """The calls of ``graph`` in order, a subgraph's (a checkpointed region's body) where the graph reads it."""
    owner = graph.owning_module
    for node in graph.nodes:
        if node.op == "get_attr" and owner is not None:
            body = getattr(owner, node.target, None) if "." not in node.target else None
            if isinstance(body, torch.fx.GraphModule):
                yield from _calls(body.graph)
        elif node.op.startswith("call_"):
            yield node


def source_path(placeholder: torch.fx.Node) -> str:
    """The user's name for a Dynamo graph input, e.g. ``layer1.0.bn1.running_var``."""
    if _FULL_NAME in placeholder.meta:
        return placeholder.meta[_FULL_NAME]
    source = _torch_runtime.dynamo_source(placeholder)
    return _clean_dynamo_path(_torch_runtime.source_name(source)) if source is not None else placeholder.name


_FULL_NAME = "compilefuse_full_name"
_DYNAMO_STACK = "compilefuse_dynamo_module_stack"  # Dynamo's own, before ``name_from_root``
_LOCAL = re.compile(r"^[LG]\['[^']*'\]")


def name_from_root(root: torch.nn.Module, gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> dict[str, str]:
    """Name ``gm``'s modules and inputs by their path in ``root``, the model the user compiled, for
    these inputs (instances of one block share a graph, each with its own weights).

    Dynamo names them from the frame it traced: after a graph break inside ``model[3]``, its frames
    have ``self = model[3]`` and ``model[3].bn`` is called ``bn``, as is every other block's. A
    parameter or buffer input tells which module the frame's ``self`` is (``3.bn.weight`` is
    ``L['self'].bn.weight``), and each path under it gets that prefix."""
    names = {id(t): name for name, t in (*root.named_parameters(remove_duplicate=False),
                                          *root.named_buffers(remove_duplicate=False))}
    prefixes: dict[str, str] = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs, strict=True):
        node.meta.pop(_FULL_NAME, None)
        full, source = names.get(id(value)), _torch_runtime.dynamo_source(node)
        if full is None or source is None:
            continue
        raw = _torch_runtime.source_name(source)
        local, relative = _LOCAL.match(raw), _clean_dynamo_path(raw)
        if local is not None and (full == relative or full.endswith("." + relative)):
            prefixes.setdefault(local.group(0), full[: len(full) - len(relative)].rstrip("."))
            node.meta[_FULL_NAME] = full
    for node in gm.graph.nodes:
        stack = node.meta.setdefault(_DYNAMO_STACK, node.meta.get("nn_module_stack"))
        if stack:
            node.meta["nn_module_stack"] = {key: (_prefixed(path, prefixes), *rest) for key, (path, *rest) in stack.items()}
    return prefixes


def renamed(record: FoldRecord, before: dict[str, str], after: dict[str, str]) -> FoldRecord:
    """``record`` of a graph named with the frame prefixes ``before`` (``name_from_root``), for the
    instance of it named with ``after`` (a graph shared by the blocks of a model: ``3.bn`` for
    ``4.bn``)."""
    moves = [(old, after[local]) for local, old in before.items() if local in after and after[local] != old]

    def name(path: str | None) -> str | None:
        for old, new in moves:
            if path is not None and (path == old or path.startswith(old + ".")):
                return new + path[len(old):]
        return path

    return dataclasses.replace(
        record,
        decisions=[dataclasses.replace(d, bn=name(d.bn), producer=name(d.producer)) for d in record.decisions],
        merges=[dataclasses.replace(m, branches=tuple(name(b) for b in m.branches), into=name(m.into))
                for m in record.merges],
    )


def _prefixed(path: str, prefixes: dict[str, str]) -> str:
    """``L['self'].bn`` with ``L['self']`` at ``3`` -> ``L['self'].3.bn`` (cleaned: ``3.bn``)."""
    local = _LOCAL.match(path)
    if local is None or not prefixes.get(local.group(0)):
        return path
    return f"{local.group(0)}.{prefixes[local.group(0)]}{path[local.end():]}"


def _clean_dynamo_path(path: str) -> str:
    """``L['self'].layer1[0].bn1`` / ``L['self']._modules['bn']`` -> ``layer1.0.bn1`` / ``bn``."""
    path = _LOCAL.sub("", path)
    path = re.sub(r"\._(modules|parameters|buffers)\['", ".", path)
    path = path.replace("['", ".").replace("']", "")
    path = path.replace("[", ".").replace("]", "")
    return path.strip(".") or "<root>"


def op_name(node: object) -> str:
    """The user's name for the op that made ``node``: the function or module class called in
    ``forward`` (``relu``, ``MaxPool2d``, ``cat``), not the aten op it decomposed into, which
    changes between torch releases."""
    if isinstance(node, torch.fx.Node) and node.target is operator.getitem:
        node = node.args[0]  # an output of a multi-output op
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return "a graph input"
    source_fn = node.meta.get("source_fn_stack")
    if source_fn:
        target = source_fn[-1][1]
        return target.__name__ if isinstance(target, type) else getattr(target, "__name__", str(target))
    return str(node.target).removesuffix(".default")


#: The ops a BN folds into, as they read an input autocast cast.
_WEIGHTED = (torch.ops.aten.convolution.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
             torch.ops.aten.linear.default)


def neighbours_description(bn: torch.fx.Node) -> str:
    """Why no rule matched a kept BN (``bn`` is its output): a cast to a lower precision between it
    and the op reading it (autocast's), or what made its input and what reads it."""
    users = list(bn.users)
    rounded = [user for user in users if _rounds_down(user, bn) and any(r.target in _WEIGHTED for r in user.users)]
    if rounded:
        dtype = str(rounded[0].meta["val"].dtype).removeprefix("torch.")
        readers = sorted({op_name(reader) for user in rounded for reader in user.users if reader.target in _WEIGHTED})
        return (f"its output is cast to {dtype} before {', '.join(readers)} (autocast): that rounding "
                "sits between the two and would not move into the weights exactly")
    readers = sorted({"the graph output" if user.op == "output" else op_name(user) for user in users})
    return f"no conv or linear next to it (input from {op_name(bn.args[0].args[0])}, output to {', '.join(readers) or 'nothing'})"


def _rounds_down(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """``node`` casts ``source`` to a dtype of fewer bits."""
    before, after = source.meta.get("val"), node.meta.get("val")
    return node.op == "call_function" and node.target in CASTS and isinstance(before, torch.Tensor) \
        and isinstance(after, torch.Tensor) and after.dtype.itemsize < before.dtype.itemsize


def _bn_arg(node: torch.fx.Node, name: str) -> object:
    position = _BN_ARG_POSITIONS[name]
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else None


def batch_norm_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The ``F.batch_norm`` calls of a Dynamo graph, in program order: one per BN site (those in
    the bodies of higher-order ops, activation checkpointing's say, after the graph's own)."""
    return [
        node
        for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.find_nodes(op="call_function", target=torch.nn.functional.batch_norm)
    ]


def traced_decisions(gm: torch.fx.GraphModule, *, autograd: bool, reason: str | None = None) -> list[FoldDecision]:
    """Decisions that are settled on the Dynamo graph, before any folding rule runs.

    An autograd graph folds nothing; a BN in training mode or without running statistics is not an
    inference BN at all, so the rules never see it. With ``reason``, every BN is kept for it.
    """
    decisions = []
    for node in batch_norm_calls(gm):
        why = reason or _traced_reason(node, autograd)
        if why is not None:
            decisions.append(FoldDecision(bn=module_path(node), folded=False, reason=why))
    return decisions


def _traced_reason(node: torch.fx.Node, autograd: bool) -> str | None:
    if autograd:
        return AUTOGRAD_REASON
    if _bn_arg(node, "running_mean") is None:
        return "no running statistics (track_running_stats=False)"
    if _bn_arg(node, "training") is not False:
        return "training mode"
    return None
