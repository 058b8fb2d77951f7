"""The AOTInductor package of ``compilefuse.export``: building it from an exported program, and
``compilefuse.load``.

The backend's own rules, checks and float64 math fold the BatchNorms of the exported graph;
AOTInductor compiles the result into a ``.pt2`` package with the folded weights inside and the fold
report beside them (``exporting.export`` traces the model and calls ``build``). Loading needs only torch
(``torch._inductor.aoti_load_package`` in Python, ``AOTIModelPackageLoader`` in C++).

AOTInductor's compiled model does not check its inputs: a wrong shape or dtype runs and answers
garbage. ``load`` therefore checks each call against the input spec stored in the package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zipfile
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from . import _torch_private as tp
from . import weight_packing
from .config import BnfuseConfig
from .decisions import FoldDecision, FoldRecord, module_path, sort_in_program_order
from .passes import fold_graph, folded_graph_patches
from .report import FoldReport

log = logging.getLogger("compilefuse")

#: The package's own file (under the archive's ``extra/`` folder): report, input spec, device.
METADATA_FILE = "compilefuse.json"
_FORMAT = 1
_BINARY_FOLDABLE = (torch.ops.aten.convolution.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


class ExportError(RuntimeError):
    """The model could not be exported, or the package could not be built or read."""


def build(program: torch.export.ExportedProgram, args: tuple[Any, ...], path: str, config: BnfuseConfig,
          patches: dict[str, Any] | None = None) -> FoldReport:
    """Fold ``program`` and write its package to ``path``, with Inductor ``patches`` on top."""
    with torch.no_grad():
        gm, record = fold_program(program, config.rules)
        patches = {
            "freezing": not _kept_bn_after_producer(gm.graph),
            **folded_graph_patches(pytree.tree_leaves(args)),
            **config.inductor_patches,
            **(patches or {}),
        }
        with weight_packing.packing(patches):
            files = tp.aoti_compile(gm, args, {}, patches)
    report = FoldReport.from_records([record])
    metadata = {
        "format": _FORMAT,
        "device": device_of(args),
        "torch": torch.__version__,
        "inputs": [dataclasses.asdict(spec) for spec in input_specs(program)],
        "inductor": {"freezing": patches["freezing"]},
        "report": report.to_dict(),
    }
    tp.write_package(path, files, {METADATA_FILE: json.dumps(metadata)})
    return report


def load(path: str | os.PathLike[str], *, check_inputs: bool = True) -> ExportedModel:
    """Load a package written by ``export``; the result is called like the exported model.
    ``check_inputs=False`` skips the per-call input check (a few microseconds)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"compilefuse.load: no package at {path!r}")
    metadata = read_metadata(path)
    device = metadata["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"compilefuse.load: {path!r} was built for CUDA and this process has no CUDA device")
    return ExportedModel(
        tp.load_package(path),
        device=device,
        inputs=[InputSpec(**spec) for spec in metadata["inputs"]] if check_inputs else None,
        report=FoldReport.from_dict(metadata["report"]),
        metadata=metadata,
    )


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One flattened input of the exported model: a tensor's dtype, device type and sizes (an int,
    or ``[low, high]`` for a dynamic size, ``high`` None when unbounded), or a constant."""

    dtype: str | None
    device: str | None
    sizes: list[Any] | None
    constant: Any = None

    def problem(self, value: Any) -> str | None:
        if self.dtype is None:
            return None if value == self.constant else f"{value!r} where the model was exported with {self.constant!r}"
        if not isinstance(value, torch.Tensor):
            return f"a {type(value).__name__} where the model takes a tensor"
        if value.device.type != self.device or str(value.dtype) != self.dtype:
            return f"{value.dtype} on {value.device} where the package takes {self.dtype} on {self.device}"
        if value.dim() != len(self.sizes) or not all(map(size_fits, value.shape, self.sizes)):
            return f"shape {tuple(value.shape)} where the package takes {describe_sizes(self.sizes)}"
        return None


class ExportedModel:
    """A loaded package: call it like the model. ``report`` is the fold report of its export;
    ``metadata`` what else the package records (torch version, input spec, Inductor settings)."""

    def __init__(
        self, run: Any, *, device: str, inputs: list[InputSpec] | None, report: FoldReport, metadata: dict[str, Any]
    ) -> None:
        self._run, self._inputs = run, inputs
        self.device, self.report, self.metadata = device, report, metadata

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._inputs is not None:
            self._check(pytree.tree_leaves((args, kwargs)))
        return self._run(*args, **kwargs)

    def _check(self, leaves: list[Any]) -> None:
        if len(leaves) != len(self._inputs):
            raise ValueError(f"compilefuse: the package takes {len(self._inputs)} inputs, got {len(leaves)}")
        for index, (value, spec) in enumerate(zip(leaves, self._inputs, strict=True)):
            problem = spec.problem(value)
            if problem is not None:
                raise ValueError(f"compilefuse: input {index}: {problem}")


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
    gm = tp.unlifted_module(decomposed)
    # A buffer the program writes is state, not a weight: never folded (as in the backend).
    written = set(decomposed.graph_signature.buffers_to_mutate.values())
    frozen = {node: _attribute(gm, node.target) for node in gm.graph.find_nodes(op="get_attr") if node.target not in written}
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


def _attribute(gm: torch.fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


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
    return any(bn.args[0].target in _BINARY_FOLDABLE for bn in graph.find_nodes(op="call_function", target=tp.BN_INFERENCE_OP))


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


def size_fits(size: int, spec: Any) -> bool:
    if isinstance(spec, int):
        return size == spec
    low, high = spec
    return size >= low and (high is None or size <= high)


def describe_sizes(sizes: list[Any]) -> str:
    return "(" + ", ".join(str(s) if isinstance(s, int) else f"{s[0]}..{s[1] if s[1] is not None else ''}" for s in sizes) + ")"


def read_metadata(path: str) -> dict[str, Any]:
    suffix = f"/{tp.package_extra_prefix()}{METADATA_FILE}"
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(suffix)), None)
            if name is None:
                raise ExportError(f"compilefuse.load: {path!r} is a package not written by compilefuse.export "
                                  "(load it with torch._inductor.aoti_load_package)")
            metadata = json.loads(archive.read(name))
    except zipfile.BadZipFile:
        raise ExportError(f"compilefuse.load: {path!r} is not a .pt2 package") from None
    if metadata.get("format") != _FORMAT:
        found = metadata.get("format")
        raise ExportError(f"compilefuse.load: {path!r} has package format {found}, this compilefuse reads {_FORMAT}")
    return metadata


def copy_with_metadata(source: str, target: str, metadata: dict[str, Any]) -> None:
    """A copy of the package ``source`` at ``target`` with its compilefuse metadata replaced."""
    suffix = f"/{tp.package_extra_prefix()}{METADATA_FILE}"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, json.dumps(metadata) if info.filename.endswith(suffix) else old.read(info))
