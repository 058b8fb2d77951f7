"""What this torch release can do, each a named gate with the releases it was measured on. The rest
of the shim branches on these names, not on version numbers or on which call raises."""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch._higher_order_ops.wrap import tag_activation_checkpoint


def _release() -> torch.torch_version.TorchVersion:
    return torch.torch_version.TorchVersion(torch.__version__.split("+")[0])


#: Whether this torch pickles a graph exactly (its code, node names and fake values) with
#: ``torch.fx._graph_pickler`` (torch >= 2.7): bnfuse's fold cache needs that for Inductor's caches
#: to hit on the graph it loads.
PICKLES_GRAPHS = importlib.util.find_spec("torch.fx._graph_pickler") is not None

#: Whether this torch's pre-dispatch tracing keeps a checkpointed region as the higher-order op with
#: its body traced to aten ops (its ``ProxyTorchDispatchMode`` rule, in torch 2.14; older releases
#: cannot trace the op there, and a graph with one is not folded per step).
CHECKPOINT_TRACES_BEFORE_AUTOGRAD = any(
    getattr(key, "__name__", "") == "ProxyTorchDispatchMode" for key in tag_activation_checkpoint.python_key_table)

#: Whether a graph under autocast folds per step on this torch: tested on 2.14 (and CI's 2.6, where
#: a linear's ``mm`` came out of AOTAutograd with one operand cast and one not, so not there).
AUTOCAST_TRACES_BEFORE_AUTOGRAD = _release() >= "2.14"

#: Whether ``ExportedProgram.module`` takes ``check_guards`` (new in about 2.9): AOTInductor does
#: not compile the input guards it adds.
EXPORTED_MODULE_TAKES_CHECK_GUARDS = "check_guards" in inspect.signature(torch.export.ExportedProgram.module).parameters

#: Whether AOTAutograd describes each input of the graph it traces (``node.meta["desc"]``, torch
#: >= 2.9): the graph traced at top level then tells itself apart from a higher-order op's body.
AOT_DESCRIBES_INPUTS = importlib.util.find_spec("torch._functorch._aot_autograd.descriptors") is not None

#: Whether this torch writes PT2 archives (``torch.export.pt2_archive``), compilefuse.export's format.
WRITES_PT2_ARCHIVES = importlib.util.find_spec("torch.export.pt2_archive") is not None

#: Whether bnfuse compiles a CPU inference graph with Inductor's C++ wrapper unless the options say
#: which wrapper: measured faster at batch 1 and tested on 2.14 only (docs/benchmarks.md).
CPP_WRAPPER_FOR_CPU_INFERENCE = _release() >= "2.14"
