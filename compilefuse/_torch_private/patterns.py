"""Inductor's pattern matcher, as bnfuse's rules and passes use it."""

from __future__ import annotations

from torch._inductor.pattern_matcher import (
    MULTIPLE,
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

__all__ = ["MULTIPLE", "CallFunction", "KeywordArg", "Match", "PatternMatcherPass", "register_graph_pattern"]
