"""A loaded package's refit (``ExportedModel.refit``): the fold prologue the package keeps
(``prologue.Prologue``) run on new weights, with every fold's checks, giving the constants to
swap in. Imports no compiler: a replica refits in the time the prologue takes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import torch

from .prologue import Prologue, RefitRefused


def refit_metadata(prologue: Prologue, targets: list[str | None], state: Mapping[str, torch.Tensor],
                   fixed: Mapping[str, torch.Tensor], constants: list[dict[str, Any]]) -> dict[str, Any]:
    """The package metadata ``Refitter`` reads: the prologue; per input of the program, the
    ``state_dict`` entry it is (``targets``, None: a user input); the size, dtype and device each
    entry must have (``state``, fake values do); the entries a state dict does not hold (``fixed``:
    non-persistent buffers, constants); what each package constant is (``package_refit.Constant``)."""
    return {
        "prologue": _text(prologue.to_bytes()),
        "targets": targets,
        "state": {name: {"shape": list(value.shape), "dtype": str(value.dtype), "device": value.device.type}
                  for name, value in state.items()},
        "fixed": _text(_saved(dict(fixed))),
        "constants": constants,
    }


class Refitter:
    """The constants of a loaded refittable package for a state dict (``__call__``)."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        refit = metadata["refit"]
        self._prologue = Prologue.from_bytes(base64.b64decode(refit["prologue"]))
        self._targets: list[str | None] = refit["targets"]
        self._state: dict[str, dict[str, Any]] = refit["state"]
        self._fixed: dict[str, torch.Tensor] = torch.load(io.BytesIO(base64.b64decode(refit["fixed"])), weights_only=True)
        self._constants: list[dict[str, Any]] = refit["constants"]

    def __call__(self, state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        wanted = {name for name in self._state if name not in self._fixed}
        missing = sorted(wanted - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._state))
        if missing or unexpected:
            raise KeyError(f"compilefuse: refit: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        state = dict(self._fixed)
        for name in wanted:
            value, like = state_dict[name], self._state[name]
            if not isinstance(value, torch.Tensor) or list(value.shape) != like["shape"] \
                    or str(value.dtype) != like["dtype"] or value.device.type != like["device"]:
                found = f"{value.dtype} {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor) else \
                    type(value).__name__
                raise ValueError(f"compilefuse: refit: {name} is {found}; the package takes {like['dtype']} "
                                 f"{tuple(like['shape'])} on {like['device']}")
            state[name] = value.detach()
        try:
            prepared = self._prologue([None if target is None else state[target] for target in self._targets])
        except RefitRefused as refusal:
            raise ValueError(f"compilefuse: refit: these weights fail a fold's check ({refusal}); export the model "
                             "with them to build a package that keeps that BatchNorm") from None
        constants = {c["name"]: prepared[c["output"]] if c["output"] is not None else state[c["fqn"]]
                     for c in self._constants}
        for c in self._constants:
            value = constants[c["name"]]
            if list(value.shape) != c["shape"] or str(value.dtype) != c["dtype"] or value.is_mkldnn != c["packed"]:
                raise RuntimeError(f"compilefuse: refit: constant {c['name']} came out {value.dtype} {tuple(value.shape)}, "
                                   f"the package holds {c['dtype']} {tuple(c['shape'])}")
        return constants


def _saved(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
