"""Packages that take new weights without a rebuild (``export(..., refittable=True)``): the build side.

A package built with freezing holds constants Inductor derived from the folded weights (packed,
transposed, folded again), with no record of how: new weights would need a new build. A
refittable package is built the way the backend compiles with the weights as data: the folds are
a prologue (``fold_prologue``) and AOTInductor compiles the rest without freezing, reading the
prologue's outputs and the weights no fold reads as constants with names of our own. The package
keeps the prologue as data (``prologue.Prologue.to_bytes``); a refit (``refitting``) runs it on the
new weights, with every fold's checks, and swaps the results into the loaded package's constants,
without the compiler.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import InputKind

from .. import fold_prologue
from ..decisions import FoldRecord
from ..passes import fold_graph_as_data
from ..runtime import refitting
from ..runtime.prologue import Prologue

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

    prologue: Prologue
    main: torch.fx.GraphModule
    inputs_taken: tuple[int, ...]
    #: per placeholder of the program: the state's name in ``state_dict`` (None: a user input)
    targets: list[str | None]
    #: per placeholder of ``main``: the package constant it becomes (None: a user input) -- the
    #: prologue's outputs ``bnfuse_prologue_k``, then the program inputs taken, ``bnfuse_state_i``
    names: list[str | None]

    def inputs(self, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor | None]:
        return [None if target is None else state[target] for target in self.targets]

    def constants(self, prepared: list[torch.Tensor], inputs: list[Any]) -> dict[str, torch.Tensor]:
        values = [*prepared, *(inputs[i] for i in self.inputs_taken)]
        return {name: value for name, value in zip(self.names, values, strict=True) if name is not None}


def plan(program: torch.export.ExportedProgram, rules: frozenset[str], pack: fold_prologue.Packing,
         record: FoldRecord) -> Plan:
    """Fold a decomposed exported program (in place) with the weights as data, adding the
    decisions to ``record``; ``pack`` decides which weights are packed."""
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
    fold_graph_as_data(gm.graph, {placeholders[i]: placeholders[i].meta["val"] for i in readable}, rules, record)
    gm.recompile()
    parts = fold_prologue.split(gm, readable, pack)
    outputs = len(parts.main.graph.find_nodes(op="placeholder")) - len(parts.inputs_taken)
    names = [f"bnfuse_prologue_{k}" for k in range(outputs)]
    names += [None if targets[i] is None else f"bnfuse_state_{i}" for i in parts.inputs_taken]
    return Plan(parts.prologue, parts.main, parts.inputs_taken, targets, names)


def package_module(plan_: Plan, constants: dict[str, torch.Tensor], like: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The main graph as AOTInductor compiles it: each prologue output and weight taken an
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
    outputs = len(plan_.names) - len(plan_.inputs_taken)
    sources = [(k, None) for k in range(outputs)] + [(None, plan_.targets[i]) for i in plan_.inputs_taken]
    return [dataclasses.asdict(Constant(name, output, fqn, list(constants[name].shape), str(constants[name].dtype),
                                        constants[name].is_mkldnn))
            for name, (output, fqn) in zip(plan_.names, sources, strict=True) if name is not None]


def refit_metadata(plan_: Plan, program: torch.export.ExportedProgram, constants: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a loaded package refits with (``refitting.Refitter``): the prologue, what it reads, and
    what each constant must be."""
    placeholders = program.graph.find_nodes(op="placeholder")
    state = {target: placeholder.meta["val"] for target, placeholder in zip(plan_.targets, placeholders, strict=True)
             if target is not None}
    persistent = {spec.target for spec in program.graph_signature.input_specs
                  if spec.kind is InputKind.PARAMETER or (spec.kind is InputKind.BUFFER and spec.persistent)}
    values = {**program.state_dict, **program.constants}
    fixed = {name: values[name] for name in state if name not in persistent}
    return refitting.refit_metadata(plan_.prologue, plan_.targets, state, fixed, describe(constants, plan_))
