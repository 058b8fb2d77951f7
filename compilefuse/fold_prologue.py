"""A folded inference graph split in two: a prologue that runs once per set of weights, and a main
graph Inductor compiles once, taking what the prologue computes as inputs.

Each fold is one call in the graph (``passes.fold_graph_as_data``) that replays its float64
arithmetic on the module state. Everything the graph computes from module state alone, by pure
ops, is the *prologue*: the folded weights and biases, a frozen affine's scale, and on CPU the
oneDNN packing of the convolution weights freezing would pack. It runs eagerly, op by op, on the
real tensors; the main graph reads its outputs as inputs. A new set of weights (a
``load_state_dict``, another instance of the architecture) is a new run of the prologue, not a new
compile; each fold's checks run again on the new values, and a set that fails them is refused
(``RefitRefused``), to be compiled frozen with that BN kept.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from . import freezing, weight_packing
from ._torch_private import onednn
from .passes import computed_from
from .runtime.prologue import Fold, Packed, PackedLinear, Prologue, Ref, Step

aten = torch.ops.aten


@dataclasses.dataclass
class Split:
    prologue: Prologue
    #: The main graph: placeholders for the prologue's outputs first, then the graph inputs ``inputs_taken``.
    main: torch.fx.GraphModule
    inputs_taken: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Packing:
    """Which weights the prologue provides packed for oneDNN: ``convolution(node)`` for a CPU
    convolution, ``linear(rows, in_features, out_features)`` for a matrix product by a weight."""

    convolution: Callable[[torch.fx.Node], bool]
    linear: Callable[[int, int, int], bool]


NO_PACKING = Packing(lambda _convolution: False, lambda *_sizes: False)


def split(traced: torch.fx.GraphModule, readable: Sequence[int], pack: Packing) -> Split:
    """Split ``traced`` (its placeholders are the graph's inputs, in order) into the prologue
    computed from the inputs ``readable`` alone and the main graph, where the weights ``pack``
    chooses are read packed for oneDNN."""
    placeholders = traced.graph.find_nodes(op="placeholder")
    sources = {placeholders[i] for i in readable}
    # Constants (a traced fold's Python numbers) are as fixed as module state.
    computed = computed_from(traced.graph, sources | set(traced.graph.find_nodes(op="get_attr")))
    prologue_nodes = set(computed)
    if any(isinstance(n.target, Fold) and n not in prologue_nodes for n in traced.graph.nodes):
        raise RuntimeError("bnfuse: a fold reads a value computed from more than module state")
    # What the main graph reads from the prologue: the computed nodes it uses, and the readable
    # inputs whose convolution gets a packed weight.
    crossing = [n for n in computed if any(u not in prologue_nodes for u in n.users)]
    main = _MainGraph(traced, sources, prologue_nodes, crossing)
    main.pack_convolutions(pack.convolution)
    main.pack_linears(pack.linear)
    outputs, taken = main.finish(placeholders, readable)
    reads = [i for i in readable if any(u in prologue_nodes for u in placeholders[i].users)
             or any(isinstance(o, tuple) and o[0] is placeholders[i] for o in outputs)]
    return Split(_as_data(traced, sorted(reads), computed, outputs), main.gm, tuple(taken))


#: What the prologue hands the main graph, input by input: a value it computes, or a module-state
#: input (or a value) packed for oneDNN.
_Output = torch.fx.Node | tuple[torch.fx.Node, Packed | PackedLinear]


class _MainGraph:
    """The main graph being built: a copy of the traced graph whose prologue values arrive as inputs
    (``bnfuse_prologue_k``), then whose chosen weights arrive packed (``bnfuse_packed_k``)."""

    def __init__(self, traced: torch.fx.GraphModule, sources: set[torch.fx.Node], prologue_nodes: set[torch.fx.Node],
                 crossing: list[torch.fx.Node]) -> None:
        self.gm = copy.deepcopy(traced)
        self.graph = self.gm.graph
        self.twin = dict(zip(traced.graph.nodes, self.graph.nodes, strict=True))
        self.original = {v: k for k, v in self.twin.items()}
        self.sources = sources
        self.first = next(iter(self.graph.nodes))
        self.outputs: list[_Output] = []  # one per added placeholder, in order
        self.inputs_for: dict[torch.fx.Node, torch.fx.Node] = {}  # a main placeholder: the prologue node it reads
        with self.graph.inserting_before(self.first):
            for k, node in enumerate(crossing):
                placeholder = self.graph.placeholder(f"bnfuse_prologue_{k}")
                placeholder.meta.update(node.meta)
                self.twin[node].replace_all_uses_with(placeholder)
                self.inputs_for[placeholder] = node
                self.outputs.append(node)
        for node in reversed(self.graph.nodes):
            if node.op == "call_function" and self.original[node] in prologue_nodes and not node.users:
                self.graph.erase_node(node)

    def pack_convolutions(self, chosen: Callable[[torch.fx.Node], bool]) -> None:
        """Each chosen convolution whose weight is prologue output or module state reads it packed;
        one left to ATen's direct kernel may take its bias as an add after it (``_bias_after``)."""
        for convolution in list(self.graph.find_nodes(op="call_function", target=aten.convolution.default)):
            weight = convolution.args[1]
            source, hyper = self._source_of(weight), _packing_hyper(convolution)
            if source is None or hyper is None or not chosen(convolution):
                if _bias_after(convolution):
                    _add_bias_after(self.graph, convolution)
                continue
            placeholder = self._packed_input(weight.meta.get("val"), (source, Packed(-1, hyper)))
            op = onednn.MKLDNN_CONV_TRANSPOSE_POINTWISE if convolution.args[6] else onednn.MKLDNN_CONV_POINTWISE
            self._replace(convolution, op, (convolution.args[0], placeholder, convolution.args[2], *hyper[:-1],
                                            "none", [], ""))

    def pack_linears(self, chosen: Callable[[int, int, int], bool]) -> None:
        """Each chosen matrix product by a prologue output or module state runs oneDNN's linear on it packed."""
        for product in [*self.graph.find_nodes(op="call_function", target=aten.addmm.default),
                        *self.graph.find_nodes(op="call_function", target=aten.mm.default)]:
            bias, input, weight = product.args if product.target is aten.addmm.default else (None, *product.args)
            source, rows = self._source_of(weight), _linear_rows(product, input, weight)
            if source is None or rows is None or not chosen(rows, *weight.meta["val"].shape):  # (in, out)
                continue
            # oneDNN's linear reads the weight as the layer holds it (out x in), not transposed.
            placeholder = self._packed_input(weight.meta["val"].new_empty(weight.meta["val"].shape[::-1]),
                                             (source, PackedLinear(-1, rows)))
            self._replace(product, onednn.packed_linear_op(), (input, placeholder, bias))

    def finish(self, placeholders: list[torch.fx.Node], readable: Sequence[int]) -> tuple[list[_Output], list[int]]:
        """Drop the inputs nothing reads any more (a folded BN's statistics, a packed weight's plain
        copy): what the prologue hands over, and the graph inputs the main graph still takes."""
        new = [n for n in self.graph.find_nodes(op="placeholder") if self.original.get(n) is None]
        kept = [out for node, out in zip(new, self.outputs, strict=True) if node.users]
        for node in new:
            if not node.users:
                self.graph.erase_node(node)
        taken: list[int] = []
        readable = set(readable)
        for i, node in enumerate(placeholders):
            if self.twin[node].users or i not in readable:
                taken.append(i)
            else:
                self.graph.erase_node(self.twin[node])
        self.graph.lint()
        self.gm.recompile()
        return kept, taken

    def _source_of(self, weight: torch.fx.Node) -> torch.fx.Node | None:
        """The prologue node or module-state input a main-graph weight is, if it is one."""
        return self.inputs_for.get(weight) or (self.original.get(weight) if self.original.get(weight) in self.sources else None)

    def _packed_input(self, value: Any, output: tuple[torch.fx.Node, Packed | PackedLinear]) -> torch.fx.Node:
        with self.graph.inserting_before(self.first):
            placeholder = self.graph.placeholder(f"bnfuse_packed_{len(self.outputs)}")
        placeholder.meta["val"] = value
        self.outputs.append(output)
        return placeholder

    def _replace(self, old: torch.fx.Node, op: Any, args: tuple[Any, ...]) -> None:
        with self.graph.inserting_before(old):
            new = self.graph.call_function(op, args)
        new.meta.update(old.meta)
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)


def _as_data(traced: torch.fx.GraphModule, reads: list[int], nodes: list[torch.fx.Node],
             outputs: list[_Output]) -> Prologue:
    """The prologue computing ``outputs`` by the calls ``nodes`` from the graph inputs ``reads``:
    each node a step reading earlier values, a ``get_attr`` the constant it names."""
    placeholders = traced.graph.find_nodes(op="placeholder")
    index = {placeholders[i]: k for k, i in enumerate(reads)}

    def argument(node: torch.fx.Node) -> Any:
        return freezing.attribute(traced, node.target) if node.op == "get_attr" else Ref(index[node])

    steps = []
    for node in nodes:
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), argument)
        index[node] = len(reads) + len(steps)
        steps.append(Step(node.target, _plain(args), _plain(kwargs)))
    return Prologue(reads, steps, [dataclasses.replace(o[1], source=index[o[0]]) if isinstance(o, tuple) else index[o]
                                   for o in outputs])


def _plain(value: Any) -> Any:
    """FX's immutable containers as lists, tuples and dicts (as a prologue keeps them)."""
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _packing_hyper(convolution: torch.fx.Node) -> tuple[Any, ...] | None:
    """``(padding, stride, dilation, groups, input size)`` of a CPU convolution Inductor's
    freezing would pack (float32 or a half type oneDNN takes, 2-D or 3-D, static input size),
    with the output padding after the padding for a transposed one (not depthwise, its output
    padding below its stride); None for any other."""
    input, weight, _bias, stride, padding, dilation, transposed, output_padding, groups = convolution.args
    x, w = input.meta.get("val"), weight.meta.get("val")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return None
    if x.device.type != "cpu" or w.dim() not in (4, 5) or x.dtype != w.dtype or not onednn.onednn_takes(w.dtype):
        return None
    if not all(isinstance(size, int) for size in x.shape):
        return None
    if not transposed:
        return (list(padding), list(stride), list(dilation), groups, list(x.shape))
    if (groups > 1 and groups == w.shape[0]) or any(o >= s for o, s in zip(output_padding, stride, strict=True)):
        return None
    return (list(padding), list(output_padding), list(stride), list(dilation), groups, list(x.shape))


def _bias_after(convolution: torch.fx.Node) -> bool:
    """Whether a CPU convolution left to ATen's direct kernel (``weight_packing.worth_packing``
    false) takes its bias as an add after it, which Inductor fuses into the next kernel, as plain
    Inductor adds an unfolded BN: ATen's kernel writes a bias into its output by a copy first
    (docs/benchmarks.md). The arithmetic is the same up to where one float32 addition falls."""
    bias, output = convolution.args[2], convolution.meta.get("val")
    return isinstance(bias, torch.fx.Node) and not convolution.args[6] and isinstance(output, torch.Tensor) \
        and output.device.type == "cpu" and not weight_packing.worth_packing(convolution)


def _add_bias_after(graph: torch.fx.Graph, convolution: torch.fx.Node) -> None:
    bias, output = convolution.args[2], convolution.meta["val"]
    shape = [-1] + [1] * (output.dim() - 2)
    with graph.inserting_before(convolution):
        bare = graph.call_function(aten.convolution.default, (convolution.args[0], convolution.args[1], None,
                                                              *convolution.args[3:]))
        column = graph.call_function(aten.view.default, (bias, shape))
        added = graph.call_function(aten.add.Tensor, (bare, column))
    bare.meta.update(convolution.meta)
    column.meta["val"] = bias.meta["val"].view(shape)
    added.meta.update(convolution.meta)
    convolution.replace_all_uses_with(added)
    graph.erase_node(convolution)


def _linear_rows(product: torch.fx.Node, input: Any, weight: Any) -> int | None:
    """The rows of a CPU matrix product oneDNN's linear could run with ``weight`` packed (plain
    ``addmm``, a 2-D float input of static size in a type oneDNN takes); None for any other."""
    if product.kwargs.get("alpha", 1) != 1 or product.kwargs.get("beta", 1) != 1:
        return None
    x = input.meta.get("val") if isinstance(input, torch.fx.Node) else None
    w = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.device.type != "cpu":
        return None
    if x.dtype != w.dtype or not onednn.onednn_takes(w.dtype) or not all(isinstance(n, int) for n in (*x.shape, *w.shape)):
        return None
    return x.shape[0]


def packing_choice(patches: dict[str, Any], linear: bool = True) -> Packing:
    """Which weights are read packed: ``weight_packing``'s choice for each (linear layers' only
    where ``linear``), or for every one what ``cpp.weight_prepack`` says when the user sets it;
    under the C++ wrapper, no transposed convolution's."""
    convolution = weight_packing.convolution_choice(patches)
    if patches.get("cpp_wrapper"):
        # Under Inductor's JIT C++ wrapper, oneDNN's transposed convolution given a packed weight
        # as a graph input returned the wrong number of channels (torch 2.14.1; docs/limitations.md).
        convolution = lambda node, chosen=convolution: not node.args[6] and chosen(node)  # noqa: E731
    return Packing(convolution, weight_packing.linear_choice(patches) if linear else NO_PACKING.linear)
