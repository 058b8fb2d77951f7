"""The AOTInductor package of ``compilefuse.export``: building it from an exported program.

The backend's own rules, checks and float64 math fold the BatchNorms of the exported graph;
AOTInductor compiles the result into a ``.pt2`` package with the folded weights inside and the fold
report and input spec beside them (``exporting.export`` traces the model and calls ``build``).
Loading needs only torch (``loading.load`` in Python, ``AOTIModelPackageLoader`` in C++).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from .. import fold_prologue, freezing, graph_ops, weight_packing
from .._torch_private import aoti
from ..config import BnfuseConfig
from ..decisions import FoldDecision, FoldRecord, module_path, sort_in_program_order
from ..passes import fold_graph, folded_graph_patches
from ..report import FoldReport
from ..runtime.loading import FORMAT, METADATA_FILE, InputSpec
from . import package_refit

log = logging.getLogger("compilefuse")

_BINARY_FOLDABLE = (torch.ops.aten.convolution.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


def build(program: torch.export.ExportedProgram, args: tuple[Any, ...], path: str, config: BnfuseConfig,
          patches: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> FoldReport:
    """Fold ``program`` and write its package to ``path``, with Inductor ``patches`` on top and
    ``metadata`` added to the package's own."""
    with torch.no_grad():
        folded = fold_program(program, config.rules)
    return build_folded(folded, program, args, path, config, patches, metadata)


def build_folded(folded: tuple[torch.fx.GraphModule, FoldRecord], program: torch.export.ExportedProgram,
                 args: tuple[Any, ...], path: str, config: BnfuseConfig, patches: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> FoldReport:
    """``build`` from ``fold_program(program)``'s result."""
    gm, record = folded
    with torch.no_grad():
        patches = build_patches(gm, args, config, patches)
        with weight_packing.packing(patches):
            files = aoti.aoti_compile(gm, args, {}, patches)
    return _write(path, files, program, args, record, patches["freezing"], metadata)


def build_refittable(program: torch.export.ExportedProgram, args: tuple[Any, ...], path: str, config: BnfuseConfig,
                     options: dict[str, Any] | None) -> FoldReport:
    """A package that takes new weights without a rebuild (``package_refit``): the folds as a
    prologue, run here once, and AOTInductor without freezing on the rest, reading the prologue's
    outputs and the weights no fold reads as constants of bnfuse's naming."""
    record = FoldRecord(_traced_decisions(program.graph))
    start = time.perf_counter()
    with torch.no_grad():
        decomposed = program.run_decompositions(_core_aten_with_linear_on_rows())
        like = aoti.unlifted_module(decomposed)
        values = {**decomposed.state_dict, **decomposed.constants}
        patches = {**build_patches(like, args, config), "freezing": False}
        plan = package_refit.plan(decomposed, config.rules, fold_prologue.packing_choice(patches, linear=False), record)
        inputs = plan.inputs(values)
        constants = plan.constants(plan.prologue(inputs), inputs)
        record.seconds = time.perf_counter() - start
        sort_in_program_order(record, program.graph)
        files = aoti.aoti_compile(package_refit.package_module(plan, constants, like), args, {}, patches)
    return _write(path, files, program, args, record, False,
                  {"refit": package_refit.refit_metadata(plan, decomposed, constants)})


def _write(path: str, files: list[Any], program: torch.export.ExportedProgram, args: tuple[Any, ...],
           record: FoldRecord, frozen: bool, metadata: dict[str, Any] | None) -> FoldReport:
    """Write the package of AOTInductor's ``files`` with compilefuse's metadata (``metadata`` on
    top); its fold report."""
    report = FoldReport.from_records([record])
    metadata = {
        "format": FORMAT,
        "device": device_of(args),
        "torch": torch.__version__,
        "inputs": [dataclasses.asdict(spec) for spec in input_specs(program)],
        "inductor": {"freezing": frozen},
        "report": report.to_dict(),
        **(metadata or {}),
    }
    aoti.write_package(path, files, {METADATA_FILE: json.dumps(metadata)})
    return report


def build_patches(gm: torch.fx.GraphModule, args: tuple[Any, ...], config: BnfuseConfig,
                  patches: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Inductor settings a folded program is compiled with (``patches`` on top): freezing,
    unless a kept BN reads a convolution or matrix product directly (freezing's binary folding
    would fold it, unchecked)."""
    return {
        "freezing": not _kept_bn_after_producer(gm.graph),
        **folded_graph_patches(pytree.tree_leaves(args)),
        **config.inductor_patches,
        **(patches or {}),
    }


# --- export's steps ---------------------------------------------------------------------------


def device_of(args: tuple[Any, ...]) -> str:
    devices = {leaf.device.type for leaf in pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)}
    if len(devices) != 1:
        found = ", ".join(sorted(devices)) or "no tensors"
        raise ValueError(f"compilefuse.export: the example inputs must be tensors on one device type, found {found}")
    return devices.pop()


def fold_program(program: torch.export.ExportedProgram, rules: frozenset[str]) -> tuple[torch.fx.GraphModule, FoldRecord]:
    """The exported program with BN kept whole, its weights as attributes, folded by the rules,
    holding only the tensors the folded graph reads: what a package compiles and what
    ``compilefuse.fold`` returns."""
    record = FoldRecord(_traced_decisions(program.graph))
    decomposed = program.run_decompositions(_core_aten_with_linear_on_rows())
    gm = aoti.unlifted_module(decomposed)
    # A buffer the program writes is state, not a weight: never folded (as in the backend).
    written = set(decomposed.graph_signature.buffers_to_mutate.values())
    frozen = {node: freezing.attribute(gm, node.target)
              for node in gm.graph.find_nodes(op="get_attr") if node.target not in written}
    start = time.perf_counter()
    fold_graph(gm.graph, {n: v for n, v in frozen.items() if isinstance(v, torch.Tensor)}, rules, record)
    record.seconds = time.perf_counter() - start
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.recompile()
    sort_in_program_order(record, program.graph)
    return gm, record


def _core_aten_with_linear_on_rows() -> Any:
    """Core ATen, where inference BN is one op: enough for the rules, and what a folded module
    runs in eager. (Inductor's table would also split ``gelu`` and friends into arithmetic, which
    only Inductor itself gains from: fastvit_t8's folded module ran 1.14x slower in eager with it.)"""
    table = torch.export.default_decompositions()
    table[torch.ops.aten.linear.default] = _linear_on_rows
    return table


def _linear_on_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as one matrix product over the rows of ``x``, whatever its leading dims: the
    form the backend's graphs have, which the linear and token rules read. (Export's own
    decomposition turns a linear on a permuted token tensor into ``expand`` + ``bmm``.)"""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    transposed = weight.permute(1, 0)
    out = torch.mm(rows, transposed) if bias is None else torch.addmm(bias, rows, transposed)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def _traced_decisions(graph: torch.fx.Graph) -> list[FoldDecision]:
    """BNs that are not inference BNs (``aten.batch_norm`` in export's graph, before decomposition):
    kept, with the reasons the backend gives."""
    decisions = []
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.batch_norm.default):
        running_mean, training = node.args[3], node.args[5]
        if running_mean is None:
            reason = "no running statistics (track_running_stats=False)"
        elif training:
            reason = "training mode"
        else:
            continue
        decisions.append(FoldDecision(bn=module_path(node), folded=False, reason=reason))
    return decisions


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Weights the folds replaced: without this, the package would carry them too."""
    used = {node.target for node in gm.graph.find_nodes(op="get_attr")}
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner)
            if hasattr(module, attr):
                delattr(module, attr)


def _kept_bn_after_producer(graph: torch.fx.Graph) -> bool:
    """Whether a kept BN reads a conv or linear directly. Inductor's freezing would fold it anyway
    (binary folding, in the model's precision, without bnfuse's checks), so such a package is
    compiled without freezing: a refusal stays a refusal."""
    bns = graph.find_nodes(op="call_function", target=graph_ops.BN_INFERENCE_OP)
    return any(bn.args[0].target in _BINARY_FOLDABLE for bn in bns)


def input_specs(program: torch.export.ExportedProgram) -> list[InputSpec]:
    nodes = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    specs = []
    for name in program.graph_signature.user_inputs:
        value = nodes[name].meta.get("val")
        if isinstance(value, torch.Tensor):
            sizes = [_size_spec(size, program.range_constraints) for size in value.shape]
            specs.append(InputSpec(str(value.dtype), value.device.type, sizes))
        else:
            specs.append(InputSpec(None, None, None, constant=value if isinstance(value, (int, float, bool, str)) else None))
    return specs


def _size_spec(size: Any, ranges: dict[Any, Any]) -> Any:
    if isinstance(size, int):
        return size
    bounds = ranges.get(size.node.expr)
    if bounds is None:
        return [0, None]
    upper = bounds.upper
    return [int(bounds.lower), int(upper) if upper.is_finite else None]
