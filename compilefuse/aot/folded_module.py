"""``compilefuse.fold``: the folded model as a plain ``nn.Module``, for every runtime.

The same fold of an exported program that ``compilefuse.export`` packages (``package.fold_program``:
bnfuse's rules, checks, float64 math and report) returned as the graph module itself. It holds only
the tensors the folded program reads, so a runtime that fetches every parameter per call (Dynamo)
or serialises them (ONNX, ``torch.save``) sees what a hand re-parameterisation would leave; and
eager PyTorch, ``torch.compile`` with any backend, ``torch.export``, ONNX and PT2E quantization
get bnfuse's folds and merges without bnfuse.

Names: a folded weight and bias take the names of the weight and bias of the user's module the op
came from (``layer1.0.conv1.weight``); a merged conv is named after its block, the deepest module
holding all its branches (``stages.0.blocks.1.weight``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from ..config import BnfuseConfig
from ..decisions import module_path
from ..passes import FOLDED_PREFIX
from ..report import FoldReport
from ..runtime.loading import describe_sizes, size_fits
from .exporting import trace_for_export
from .package import fold_program, input_specs

aten = torch.ops.aten


def fold(
    model: nn.Module, args: Any, *, dynamic_shapes: Any = None, options: dict[str, Any] | None = None
) -> torch.fx.GraphModule:
    """``model`` exported on ``args`` with its BatchNorms folded and its parallel branches merged,
    as a plain module (a ``torch.fx.GraphModule``) whose parameters are only what it reads. The
    fold report is ``.report``. ``model`` is left untouched. ``dynamic_shapes`` is
    ``torch.export``'s; ``options`` takes the backend's ``rules``. For inference: a BatchNorm in
    training mode is an error."""
    config = BnfuseConfig.from_options(options, entry="compilefuse.fold", takes=("rules",))
    training = [name or "<root>" for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if training:
        shown = ", ".join(training[:3]) + (f", ... ({len(training)} in all)" if len(training) > 3 else "")
        raise ValueError(f"compilefuse.fold is for inference: BatchNorm {shown} is in training mode "
                         "(it would normalise with batch statistics and update its running ones); call model.eval() first")
    args = args if isinstance(args, tuple) else (args,)
    with torch.no_grad():
        program = trace_for_export(model, args, dynamic_shapes, caller="compilefuse.fold")
        gm, record = fold_program(program, config.rules)
    _name_after_modules(gm, record)
    _torch_level_ops(gm.graph)
    _activations_in_place(gm.graph)
    # A plain GraphModule (export's own module holds closures that do not pickle), which checks the
    # sizes export traced on each call, as a submodule its code calls first: ``torch.load``
    # re-traces a graph module's code keeping every submodule whole, where a function call (or a
    # forward hook) would be lost. dtype and device are left free (``.to()`` works).
    sizes = tuple(None if spec.sizes is None else tuple(map(_hashable, spec.sizes)) for spec in input_specs(program))
    check = _free_name(gm, "input_size_check")
    gm.add_submodule(check, InputSizeCheck(sizes))
    placeholders = gm.graph.find_nodes(op="placeholder")
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_module(check, tuple(placeholders))
    gm.graph._tracer_cls = None  # export's tracer needs arguments a reloaded module cannot give it
    folded = torch.fx.GraphModule(gm, gm.graph, class_name=type(model).__name__ + "Folded")
    folded.report = FoldReport.from_records([record])
    return folded.eval()  # an inference module (the flag changes nothing in its graph; exporters read it)


_CONV = {(False, 1): aten.conv1d.default, (False, 2): aten.conv2d.default, (False, 3): aten.conv3d.default,
         (True, 1): aten.conv_transpose1d.default, (True, 2): aten.conv_transpose2d.input,
         (True, 3): aten.conv_transpose3d.input}


def _torch_level_ops(graph: torch.fx.Graph) -> None:
    """Each convolution as the ``conv2d`` (``conv_transpose2d``, ...) and each matrix product with
    a weight as the ``linear`` that a module calls, as in an export of a hand-written model:
    quantizers (PT2E's ``X86InductorQuantizer``) annotate those ops. Same kernels, same numbers."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default and not node.kwargs:
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
            node.target = _CONV[(bool(transposed), len(stride))]
            node.args = ((x, weight, bias, stride, padding, output_padding, groups, dilation) if transposed
                         else (x, weight, bias, stride, padding, dilation, groups))
        elif node.target in (aten.addmm.default, aten.mm.default) and not node.kwargs:
            *bias, rows, transposed = node.args
            if (isinstance(transposed, torch.fx.Node) and transposed.target is aten.permute.default
                    and list(transposed.args[1]) == [1, 0] and transposed.args[0].op == "get_attr"):
                node.target, node.args = aten.linear.default, (rows, transposed.args[0], *bias)
                if not transposed.users:
                    graph.erase_node(transposed)


#: Activations whose in-place form eager modules use (``nn.ReLU(inplace=True)``): export
#: functionalises them, and an out-of-place one allocates its output on every call (mobileone_s0:
#: 21 µs per ReLU against 11).
_IN_PLACE = {op: getattr(aten, op._schema.name.split("::")[1] + "_").default for op in (
    aten.relu.default, aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.leaky_relu.default, aten.elu.default,
    aten.clamp_min.default, aten.clamp.default,
)}


def _activations_in_place(graph: torch.fx.Graph) -> None:
    """An activation of an intermediate that nothing else reads overwrites it. Safe because the
    input is a fresh result (an op whose output aliases nothing) with this one reader, so no other
    node, input, weight or output can see the write."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _IN_PLACE and _fresh_with_one_reader(node.args[0]):
            node.target = _IN_PLACE[node.target]


def _fresh_with_one_reader(source: Any) -> bool:
    return (isinstance(source, torch.fx.Node) and len(source.users) == 1 and source.op == "call_function"
            and isinstance(source.target, torch._ops.OpOverload)
            and not any(r.alias_info for r in source.target._schema.returns))


def _hashable(size: Any) -> Any:
    return tuple(size) if isinstance(size, list) else size


class InputSizeCheck(nn.Module):
    """Each tensor input has the sizes the model was exported with (an int, or ``(low, high)``
    for a dynamic size); called first in a folded module's code."""

    def __init__(self, sizes: tuple[Any, ...]) -> None:
        super().__init__()
        self.sizes = sizes

    def forward(self, *inputs: Any) -> None:
        for index, (value, expected) in enumerate(zip(inputs, self.sizes, strict=True)):
            if expected is None or not isinstance(value, torch.Tensor):
                continue
            if value.dim() != len(expected) or not all(map(size_fits, value.shape, expected)):
                raise ValueError(f"compilefuse.fold: input {index} has shape {tuple(value.shape)}; the model was "
                                 f"folded for {describe_sizes(list(expected))} (pass dynamic_shapes to fold for other sizes)")


def _name_after_modules(gm: torch.fx.GraphModule, record: Any) -> None:
    """Give each folded constant the name of what it replaces, as a parameter (no grad)."""
    blocks = {merge.into: _common_prefix(merge.branches) for merge in record.merges}
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.target.startswith(FOLDED_PREFIX):
            continue
        role, op = _role(node)
        if op is None:
            continue
        owner = module_path(op)
        owner = blocks.get(owner, owner)
        value = getattr(gm, node.target)
        target = _free_name(gm, f"{owner}.{role}" if owner and owner != "<root>" else role)
        _set(gm, target, nn.Parameter(value, requires_grad=False))
        delattr(gm, node.target)
        node.target = target
    gm.recompile()


def _role(constant: torch.fx.Node) -> tuple[str, torch.fx.Node | None]:
    """Whether a folded constant is the weight or the bias of the op reading it, and that op."""
    for user in constant.users:
        if user.target is aten.convolution.default:
            return ("weight" if user.args[1] is constant else "bias"), user
        if user.target is aten.permute.default:  # a Linear's weight, read transposed
            op = next(iter(user.users), None)
            return "weight", op
        if user.target is aten.addmm.default:
            return "bias", user
    return "constant", next(iter(constant.users), None)


def _common_prefix(paths: tuple[str, ...]) -> str:
    parts = [p.split(".") for p in paths if p != "identity"]
    prefix: list[str] = []
    for names in zip(*parts, strict=False):
        if len(set(names)) != 1:
            break
        prefix.append(names[0])
    return ".".join(prefix)


def _free_name(gm: torch.fx.GraphModule, name: str) -> str:
    candidate, n = name, 1
    while _exists(gm, candidate):
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _exists(gm: nn.Module, dotted: str) -> bool:
    owner, _, attr = dotted.rpartition(".")
    try:
        return hasattr(gm.get_submodule(owner), attr)
    except AttributeError:
        return False


def _set(gm: nn.Module, dotted: str, value: nn.Parameter) -> None:
    module = gm
    *owners, attr = dotted.split(".")
    for name in owners:
        if not hasattr(module, name):
            module.add_module(name, nn.Module())
        module = getattr(module, name)
    module.register_parameter(attr, value)


__all__ = ["fold"]
