"""ATen ops that more than one part of bnfuse recognises in a graph, named once. Imports only torch:
the report of a loaded package reads it too."""

from __future__ import annotations

import torch

aten, prims = torch.ops.aten, torch.ops.prims

#: The inference BatchNorm op that Inductor normally decomposes before any custom pass runs.
BN_INFERENCE_OP = aten._native_batch_norm_legit_no_training.default

#: Ops that change only a tensor's dtype: autocast's cast of an op's input (``convert_element_type``
#: after decomposition, ``_to_copy`` before it), and ``to`` as a training graph's aten ops before
#: autograd keep it.
CASTS = frozenset({prims.convert_element_type.default, aten._to_copy.default, aten.to.dtype})
