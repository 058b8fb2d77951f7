"""Packages that take new weights without a rebuild (``export(..., refittable=True)``).

A package built with freezing holds constants Inductor derived from the folded weights (packed,
transposed, folded again), with no record of how: new weights would need a new build. A
refittable package is built the way the backend compiles with the weights as data: the folds are
a prologue (``fold_prologue``) and AOTInductor compiles the rest without freezing, reading the
prologue's outputs and the weights no fold reads as constants with names of our own. A refit runs
the prologue on the new weights, with every fold's checks, and swaps the results into the loaded
package's constants.

The prologue is rebuilt in the process that refits, from the exported program the package keeps
without its weights (rules that judge values cannot be stored as data); so a first refit imports the
compiler, later ones run the prologue and the swap alone.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import InputKind

from . import fold_prologue
from .config import BnfuseConfig
from .decisions import FoldRecord
from .passes import fold_graph_as_data

#: The module state a program reads as placeholders, by kind; only these are refit.
_STATE = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclasses.dataclass(frozen=True)
class Constant:
    """One constant of a refittable package: a prologue output (``output``) or a weight no fold
    reads (``fqn``), with what a refit must give it."""

    name: str
    output: int | None
    fqn: str | None
    shape: list[int]
    dtype: str
    packed: bool


@dataclasses.dataclass
class Plan:
    """The folds of one program as a prologue, and which package constant each value becomes."""

    prologue: fold_prologue.Prologue
    main: torch.fx.GraphModule
    kept: tuple[int, ...]
    #: per placeholder of the program: the state's name in ``state_dict`` (None: a user input)
    targets: list[str | None]
    packing: list[bool]
    #: per placeholder of ``main``: the package constant it becomes (None: a user input) -- the
    #: prologue's outputs ``bnfuse_prologue_k``, then the kept program inputs ``bnfuse_state_i``
    names: list[str | None]

    def inputs(self, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor | None]:
        return [None if target is None else state[target] for target in self.targets]

    def constants(self, prepared: list[torch.Tensor], inputs: list[Any]) -> dict[str, torch.Tensor]:
        values = [*prepared, *(inputs[i] for i in self.kept)]
        return {name: value for name, value in zip(self.names, values, strict=True) if name is not None}


def plan(program: torch.export.ExportedProgram, rules: frozenset[str], pack: Callable[[torch.fx.Node], bool],
         record: FoldRecord) -> Plan:
    """Fold a decomposed exported program (in place) with the weights as data, adding the
    decisions to ``record``; ``pack`` decides each CPU convolution's packing (the decisions are
    recorded in ``Plan.packing``, in order)."""
    if program.graph_signature.buffers_to_mutate:
        raise ValueError("compilefuse.export(refittable=True): the model writes buffers "
                         f"({', '.join(sorted(program.graph_signature.buffers_to_mutate.values()))}); a refittable "
                         "package takes models that write no state")
    gm = program.graph_module
    for node in reversed(gm.graph.find_nodes(op="call_function", target=operator.getitem)):
        if not node.users:  # a BN's unused statistics (a saved program lists them): rules match a BN read once
            gm.graph.erase_node(node)
    specs = program.graph_signature.input_specs
    targets = [spec.target if spec.kind in _STATE else None for spec in specs]
    placeholders = gm.graph.find_nodes(op="placeholder")
    readable = [i for i, target in enumerate(targets) if target is not None]
    checks = fold_graph_as_data(gm.graph, {placeholders[i]: placeholders[i].meta["val"] for i in readable}, rules, record)
    gm.recompile()
    packing: list[bool] = []

    def recorded(convolution: torch.fx.Node) -> bool:
        packing.append(bool(pack(convolution)))
        return packing[-1]

    parts = fold_prologue.split(gm, readable, checks, recorded)
    outputs = len(parts.main.graph.find_nodes(op="placeholder")) - len(parts.kept)
    names = [f"bnfuse_prologue_{k}" for k in range(outputs)]
    names += [None if targets[i] is None else f"bnfuse_state_{i}" for i in parts.kept]
    return Plan(parts.prologue, parts.main, parts.kept, targets, packing, names)


def replaying(decisions: list[bool]) -> Callable[[torch.fx.Node], bool]:
    """The packing decisions of a build, in the order ``plan`` asks for them."""
    pending = list(decisions)
    return lambda _convolution: pending.pop(0) if pending else False


def package_module(plan_: Plan, constants: dict[str, torch.Tensor], like: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The main graph as AOTInductor compiles it: each prologue output and kept weight an
    attribute (a constant of the package, named as in ``Plan.constants``), the user's inputs its
    inputs, called as ``like`` (the unlifted program) is called."""
    main = plan_.main
    for node, name in zip(main.graph.find_nodes(op="placeholder"), plan_.names, strict=True):
        if name is None:
            continue
        # Parameters, not buffers: AOTInductor clones every buffer, and a packed weight cannot be.
        main.register_parameter(name, torch.nn.Parameter(constants[name], requires_grad=False))
        with main.graph.inserting_before(node):
            attribute = main.graph.get_attr(name)
        attribute.meta.update(node.meta)
        node.replace_all_uses_with(attribute)
        main.graph.erase_node(node)
    module = torch.fx.GraphModule(main, main.graph)  # with only the attributes the graph reads
    module.graph._codegen = like.graph._codegen  # the user's call structure (pytree specs)
    module.recompile()
    return module


def describe(constants: dict[str, torch.Tensor], plan_: Plan) -> list[dict[str, Any]]:
    """What a refit must give each constant, for the package's metadata."""
    outputs = len(plan_.names) - len(plan_.kept)
    sources = [(k, None) for k in range(outputs)] + [(None, plan_.targets[i]) for i in plan_.kept]
    return [dataclasses.asdict(Constant(name, output, fqn, list(constants[name].shape), str(constants[name].dtype),
                                        constants[name].is_mkldnn))
            for name, (output, fqn) in zip(plan_.names, sources, strict=True) if name is not None]


# --- the weightless program a package keeps ---------------------------------------------------


def weightless(program: torch.export.ExportedProgram) -> str:
    """``program`` saved without the weights a refit gives (parameters and persistent buffers are
    left on the meta device), as text for the package's metadata."""
    persistent = {spec.target for spec in program.graph_signature.input_specs
                  if spec.kind is InputKind.PARAMETER or (spec.kind is InputKind.BUFFER and spec.persistent)}
    state = {name: _on_meta(value) if name in persistent else value for name, value in program.state_dict.items()}
    stripped = torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict=state, range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        constants=program.constants, verifiers=program.verifiers)
    buffer = io.BytesIO()
    torch.export.save(stripped, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _on_meta(value: torch.Tensor) -> torch.Tensor:
    meta = value.detach().to("meta")
    return torch.nn.Parameter(meta, requires_grad=value.requires_grad) if isinstance(value, torch.nn.Parameter) else meta


def load_weightless(text: str) -> torch.export.ExportedProgram:
    return torch.export.load(io.BytesIO(base64.b64decode(text)))


# --- a refit in the process that loaded the package ---------------------------------------------


class Refitter:
    """The prologue of a loaded package, rebuilt once; ``__call__`` gives the constants for a state dict."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        refit = metadata["refit"]
        program = load_weightless(refit["program"])
        self._plan = plan(program, BnfuseConfig.from_options(refit.get("options"), entry="compilefuse.load",
                                                             takes=("rules", "inductor", "report")).rules,
                          replaying(refit["packing"]), FoldRecord())
        self._expected = {c["name"]: c for c in refit["constants"]}
        self._state = {target: placeholder.meta["val"]
                       for target, placeholder in zip(self._plan.targets, program.graph.find_nodes(op="placeholder"),
                                                      strict=True) if target is not None}
        self._fixed = {name: value for name, value in {**program.state_dict, **program.constants}.items()
                       if isinstance(value, torch.Tensor) and not value.is_meta}
        if {name for name in self._plan.names if name is not None} != set(self._expected):
            raise RuntimeError("compilefuse: this torch folds the package's program differently from the torch that "
                               "built it; export it again to refit it")

    def __call__(self, state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        wanted = {name for name in self._state if name not in self._fixed}
        missing = sorted(wanted - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._state))
        if missing or unexpected:
            raise KeyError(f"compilefuse: refit: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        state = dict(self._fixed)
        for name in wanted:
            value, like = state_dict[name], self._state[name]
            if not isinstance(value, torch.Tensor) or value.shape != like.shape or value.dtype != like.dtype \
                    or value.device.type != like.device.type:
                found = f"{value.dtype} {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor) else \
                    type(value).__name__
                raise ValueError(f"compilefuse: refit: {name} is {found}; the package takes {like.dtype} "
                                 f"{tuple(like.shape)} on {like.device.type}")
            state[name] = value.detach()
        inputs = self._plan.inputs(state)
        try:
            prepared = self._plan.prologue(inputs)
        except fold_prologue.RefitRefused as refusal:
            raise ValueError(f"compilefuse: refit: these weights fail a fold's check ({refusal}); export the model "
                             "with them to build a package that keeps that BatchNorm") from None
        constants = self._plan.constants(prepared, inputs)
        for name, value in constants.items():
            expected = self._expected[name]
            if list(value.shape) != expected["shape"] or str(value.dtype) != expected["dtype"] \
                    or value.is_mkldnn != expected["packed"]:
                raise RuntimeError(f"compilefuse: refit: constant {name} came out {value.dtype} {tuple(value.shape)}, "
                                   f"the package holds {expected['dtype']} {tuple(expected['shape'])}")
        return constants
