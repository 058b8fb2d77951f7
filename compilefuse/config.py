"""The backend's options: one validated dataclass built from ``torch.compile``'s mode and options."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any

from ._torch_private import dynamo, inductor
from .rules import RULE_IDS

#: Option keys accepted in ``torch.compile(..., backend="bnfuse", options={...})``.
OPTION_DOCS: dict[str, str] = {
    "rules": f"iterable of folding rule ids to enable (default: all of {', '.join(RULE_IDS)})",
    "inductor": "dict of extra torch._inductor.config settings for the compile",
    "report": "bool: log the fold report of each compiled graph at INFO on the 'compilefuse' logger",
    "training": "bool: fold inference-mode BatchNorm in graphs that need autograd too, per step (default True)",
    "cache": "bool: keep each folded CPU inference graph as an AOTInductor package on disk, so a later "
    "process compiling the same graph, inputs, weights and settings loads it "
    "(default: the COMPILEFUSE_CACHE environment variable, else False)",
    "freeze": "bool: bake the folded weights into the compiled code (Inductor's freezing) instead of passing "
    "them as data; then every weight change and every instance of the architecture recompiles (default False)",
    "strict": "bool: raise when folding fails instead of falling back to plain Inductor "
    "(default: the COMPILEFUSE_STRICT environment variable, else False)",
}


@dataclasses.dataclass(frozen=True)
class BnfuseConfig:
    rules: frozenset[str] = frozenset(RULE_IDS)
    inductor_patches: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    report: bool = False
    strict: bool = False
    #: Fold in graphs that need autograd (per step), not only in inference graphs.
    training: bool = True
    #: Keep folded CPU inference graphs as packages on disk (``graph_cache``).
    cache: bool = False
    #: Bake folded weights into the code (freezing) rather than pass them as data (``fold_prologue``).
    freeze: bool = False

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
