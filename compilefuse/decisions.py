"""What the folding pass decided for each BatchNorm it saw, in the user's own module names."""

from __future__ import annotations

import dataclasses
import re

import torch.fx


@dataclasses.dataclass(frozen=True)
class FoldDecision:
    """One BatchNorm site: folded into its producer, or kept, with the reason."""

    bn: str
    folded: bool
    rule: str | None = None
    producer: str | None = None
    producer_kind: str | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.folded:
            return f"{self.bn}: folded into {self.producer_kind} {self.producer} ({self.rule})"
        return f"{self.bn}: kept ({self.reason})"


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the user's module that created ``node`` (e.g. ``layer1.0.bn1``).

    Dynamo records the module call stack on each node; its innermost entry names the module.
    Nodes outside any submodule (functional calls in ``forward``) fall back to the node name.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path, _ = list(stack.values())[-1]
    return _clean_dynamo_path(path)


def _clean_dynamo_path(path: str) -> str:
    """``L['self'].layer1[0].bn1`` / ``L['self']._modules['bn']`` -> ``layer1.0.bn1`` / ``bn``."""
    path = re.sub(r"^[LG]\['[^']*'\]", "", path)
    path = path.replace("._modules['", ".").replace("['", ".").replace("']", "")
    path = path.replace("[", ".").replace("]", "")
    return path.strip(".") or "<root>"
