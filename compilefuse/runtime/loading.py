"""``compilefuse.load``: a replica's side of a package written by ``compilefuse.export``.

Loading needs only torch and must not import the compiler: this module imports neither Dynamo
nor Inductor (``_torch_runtime`` runs the package with AOTInductor's C++ loader, as
``torch._inductor.aoti_load_package`` does), so a fresh process that loads a package and answers
pays ``import torch`` and little else.

AOTInductor's compiled model does not check its inputs: a wrong shape or dtype runs and answers
garbage. ``load`` therefore checks each call against the input spec stored in the package, at a
cost of about a microsecond per input (a dtype, device and shape comparison on the fast path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import zipfile
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..report import FoldReport
from ._torch_runtime import PackageRunner
from .refitting import Refitter

#: The package's own file (under the archive's ``extra/`` folder): report, input spec, device.
METADATA_FILE = "compilefuse.json"
FORMAT = 1


class ExportError(RuntimeError):
    """The model could not be exported, or the package could not be built or read."""


def load(path: str | os.PathLike[str], *, check_inputs: bool = True) -> ExportedModel:
    """Load a package written by ``export``; the result is called like the exported model.
    ``check_inputs=False`` skips the per-call input check."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"compilefuse.load: no package at {path!r}")
    metadata = read_metadata(path)
    device = metadata["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"compilefuse.load: {path!r} was built for CUDA and this process has no CUDA device")
    return ExportedModel(
        PackageRunner(path),
        device=device,
        inputs=[InputSpec(**spec) for spec in metadata["inputs"]] if check_inputs else None,
        report=FoldReport.from_dict(metadata["report"]),
        metadata=metadata,
    )


def is_metadata_file(name: str) -> bool:
    """Whether a package member is compilefuse's own file (whatever torch names the folder)."""
    return name.endswith("/" + METADATA_FILE)


def read_metadata(path: str) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if is_metadata_file(n)), None)
            if name is None:
                raise ExportError(f"compilefuse.load: {path!r} is a package not written by compilefuse.export "
                                  "(load it with torch._inductor.aoti_load_package)")
            metadata = json.loads(archive.read(name))
    except zipfile.BadZipFile:
        raise ExportError(f"compilefuse.load: {path!r} is not a .pt2 package") from None
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        raise ExportError(f"compilefuse.load: {path!r} has package format {found}, this compilefuse reads {FORMAT}")
    return metadata


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

    def accepts(self) -> Callable[[Any], bool]:
        """A quick test that passes exactly the values ``problem`` passes (``problem`` says why not)."""
        if self.dtype is None:
            return lambda value: self.problem(value) is None
        dtype, device = getattr(torch, self.dtype.removeprefix("torch.")), self.device
        if all(isinstance(size, int) for size in self.sizes):
            shape = torch.Size(self.sizes)
            return lambda value: (isinstance(value, torch.Tensor) and value.dtype is dtype and value.shape == shape
                                  and value.device.type == device)
        return lambda value: self.problem(value) is None


def size_fits(size: int, spec: Any) -> bool:
    if isinstance(spec, int):
        return size == spec
    low, high = spec
    return size >= low and (high is None or size <= high)


def describe_sizes(sizes: list[Any]) -> str:
    return "(" + ", ".join(str(s) if isinstance(s, int) else f"{s[0]}..{s[1] if s[1] is not None else ''}" for s in sizes) + ")"


class ExportedModel:
    """A loaded package: call it like the model. ``report`` is the fold report of its export;
    ``metadata`` what else the package records (torch version, input spec, Inductor settings)."""

    def __init__(
        self, runner: PackageRunner, *, device: str, inputs: list[InputSpec] | None, report: FoldReport,
        metadata: dict[str, Any],
    ) -> None:
        self._runner, self._inputs = runner, inputs
        self._accepts = None if inputs is None else [spec.accepts() for spec in inputs]
        self._constants = inputs is not None and any(spec.dtype is None for spec in inputs)
        self.device, self.report, self.metadata = device, report, metadata
        #: A refittable package's calls and refits take turns: no answer mixes two sets of weights.
        self._turns = threading.Lock() if "refit" in metadata else contextlib.nullcontext()
        self._refitter: Any = None
        self._weights: dict[str, torch.Tensor] = {}  # the constants swapped in, kept alive here

    def refit(self, state_dict: dict[str, Any]) -> None:
        """Take new weights (a ``state_dict`` of the exported model), folded as the package's build
        folded them, with the same checks; the compiled code stays. Only for a package exported
        with ``refittable=True``; runs the fold prologue the package keeps, without the compiler.
        ``KeyError`` / ``ValueError`` for a state dict that does not fit or weights a fold's check
        refuses (the package is left as it was)."""
        if "refit" not in self.metadata:
            raise ExportError("compilefuse: this package was not exported with refittable=True; it holds its "
                              "weights as code and cannot take new ones")
        if self._refitter is None:
            self._refitter = Refitter(self.metadata)
        constants = self._refitter(state_dict)
        with self._turns:
            self._runner.update_constants(constants)
            self._weights = constants

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:  # in the order the model was exported with, as AOTInductor's own runner does
            kwargs = {name: kwargs[name] for name in self._runner.kwarg_names if name in kwargs} | kwargs
            leaves = pytree.tree_leaves((args, kwargs))
        elif all(isinstance(a, torch.Tensor) for a in args):
            leaves = list(args)
        else:
            leaves = pytree.tree_leaves(args)
        if self._accepts is not None:
            if len(leaves) != len(self._accepts):
                raise ValueError(f"compilefuse: the package takes {len(self._accepts)} inputs, got {len(leaves)}")
            for index, (value, accepts) in enumerate(zip(leaves, self._accepts, strict=True)):
                if not accepts(value):
                    raise ValueError(f"compilefuse: input {index}: {self._inputs[index].problem(value)}")
        if self._constants or self._accepts is None:
            leaves = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        with self._turns:
            return self._runner.run(leaves)
