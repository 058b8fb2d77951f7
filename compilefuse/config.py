"""The backend's options: one validated dataclass built from ``torch.compile``'s mode and options."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any

from ._torch_private import dynamo, inductor
from .rules import RULE_IDS


def _option(doc: str, default: Any = dataclasses.MISSING, *, key: str | None = None, **field: Any) -> Any:
    """A field of ``BnfuseConfig`` with its help text and the option key that sets it (default: its name)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "key": key}, **field)


@dataclasses.dataclass(frozen=True)
class BnfuseConfig:
    """What ``options={...}`` sets, each field with its help text: the one source of the option keys
    (``OPTION_DOCS``) and of the error that lists them."""

    rules: frozenset[str] = _option(
        f"iterable of folding rule ids to enable (default: all of {', '.join(RULE_IDS)})", frozenset(RULE_IDS))
    inductor_patches: Mapping[str, Any] = _option(
        "dict of extra torch._inductor.config settings for the compile", key="inductor", default_factory=dict)
    report: bool = _option("bool: log the fold report of each compiled graph at INFO on the 'compilefuse' logger", False)
    training: bool = _option(
        "bool: fold inference-mode BatchNorm in graphs that need autograd too, per step (default True)", True)
    cache: bool = _option(
        "bool: keep each folded CPU inference graph as an AOTInductor package on disk, so a later process "
        "compiling the same graph, inputs, weights and settings loads it "
        "(default: the COMPILEFUSE_CACHE environment variable, else False)", False)
    freeze: bool = _option(
        "bool: bake the folded weights into the compiled code (Inductor's freezing) instead of passing them as "
        "data; then every weight change and every instance of the architecture recompiles (default False)", False)
    strict: bool = _option("bool: raise when folding fails instead of falling back to plain Inductor "
                           "(default: the COMPILEFUSE_STRICT environment variable, else False)", False)

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | None, mode: str | None = None, *, entry: str = "", takes: Collection[str] = ()
    ) -> BnfuseConfig:
        """``entry`` names an entry point that uses only the options ``takes``: the others are refused
        by name, never silently ignored."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_DOCS))
        if unknown:
            valid = "; ".join(f"{k!r}: {v}" for k, v in OPTION_DOCS.items())
            raise _error(f"bnfuse: unknown option(s) {unknown}. Valid options are {valid}.")
        unused = sorted(set(options) - set(takes)) if entry else []
        if unused:
            raise _error(f"{entry} does not use option(s) {unused}; it takes {sorted(takes)}")
        return cls(
            rules=_rules(options.get("rules", RULE_IDS)),
            inductor_patches={**_mode_patches(mode), **_inductor(options.get("inductor", {}))},
            report=_bool("report", options.get("report", False)),
            training=_bool("training", options.get("training", True)),
            freeze=_bool("freeze", options.get("freeze", False)),
            cache=_bool("cache", options.get("cache", os.environ.get("COMPILEFUSE_CACHE", "") == "1")),
            strict=_bool("strict", options.get("strict", os.environ.get("COMPILEFUSE_STRICT", "") == "1")),
        )


#: Option keys accepted in ``torch.compile(..., backend="bnfuse", options={...})``, with their help.
OPTION_DOCS: dict[str, str] = {
    field.metadata["key"] or field.name: field.metadata["doc"] for field in dataclasses.fields(BnfuseConfig)
}


def _error(message: str) -> Exception:
    return dynamo.compile_time_error(message)


def _rules(value: Any) -> frozenset[str]:
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise _error(f"bnfuse: option 'rules' must be an iterable of rule ids, got {value!r}")
    rules = frozenset(value)
    unknown = sorted(rules - set(RULE_IDS))
    if unknown:
        raise _error(f"bnfuse: unknown rule id(s) {unknown} in option 'rules'; valid ids: {list(RULE_IDS)}")
    return rules


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _error(f"bnfuse: option {name!r} must be True or False, got {value!r}")
    return value


def _inductor(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _error(f"bnfuse: option 'inductor' must be a dict of Inductor config, got {value!r}")
    unknown = sorted(set(value) - inductor.inductor_config_keys())
    if unknown:
        raise _error(f"bnfuse: unknown Inductor config key(s) {unknown} in option 'inductor'")
    reserved = sorted({"freezing", "joint_custom_pre_pass", "post_grad_custom_pre_pass", "post_grad_custom_post_pass"}
                      & set(value))
    if reserved:
        raise _error(f"bnfuse: option 'inductor' may not set {reserved}: bnfuse controls them")
    return dict(value)


def _mode_patches(mode: str | None) -> dict[str, Any]:
    try:
        return inductor.inductor_mode_options(mode)
    except RuntimeError as err:
        raise _error(f"bnfuse: {err}") from None
