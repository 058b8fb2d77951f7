"""The private torch that a replica touches, kept apart from ``_torch_private`` (the compiler's)
because importing it must not import Dynamo or Inductor: ``import compilefuse`` +
``compilefuse.load`` costs ``import torch`` plus a fraction of a second, where importing
``torch._inductor`` imports Dynamo too (docs/benchmarks.md, replica start). Like ``_torch_private``, the one file a
torch upgrade should touch on this side."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._python_dispatch
import torch.utils._pytree as pytree


class PackageRunner:
    """An AOTInductor package, run as ``torch._inductor.aoti_load_package``'s model runs it, minus
    what that costs on every call: it parses its call spec again (two ``treespec_loads``) and
    flattens the inputs with pytree. Here the spec is parsed once, at load."""

    def __init__(self, path: str) -> None:
        # torch._inductor.package.load_package's own call, without importing torch._inductor.
        self._loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        in_spec, out_spec = self._loader.get_call_spec()
        self.in_spec, self.out_spec = pytree.treespec_loads(in_spec), pytree.treespec_loads(out_spec)
        self._single_output = self.out_spec.is_leaf()
        #: The keyword arguments in the order the model was exported with (the spec is (args, kwargs)).
        children = self.in_spec.children() if hasattr(self.in_spec, "children") else self.in_spec.children_specs
        self.kwarg_names = list(children[1].context or []) if len(children) == 2 else []

    def update_constants(self, constants: dict[str, torch.Tensor]) -> None:
        """Point the package's constants of these names at these tensors (the caller keeps them
        alive): no copy, and oneDNN-packed tensors too, which the copying path cannot take."""
        self._loader.load_constants(constants, False, False, True)

    def run(self, tensors: list[torch.Tensor]) -> Any:
        """Run on the flattened tensor inputs; the outputs in the model's structure."""
        outputs = self._loader.boxed_run(tensors)
        return outputs[0] if self._single_output else pytree.tree_unflatten(outputs, self.out_spec)


def real_tensor_math() -> Any:
    """Context for eager math on real tensors inside a pass that runs under a fake-tensor mode."""
    return torch.utils._python_dispatch._disable_current_modes()


def is_operator_overload(target: Any) -> bool:
    """Whether ``target`` is an operator overload (``torch.ops.aten.mul.Tensor``)."""
    return isinstance(target, torch._ops.OpOverload)


def operator_named(name: str) -> Any:
    """The operator overload of a qualified name (``aten::mul.Tensor``, ``aten::relu``: its default)."""
    namespace, rest = name.split("::")
    op, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")


def pack_conv_weight(weight: torch.Tensor, *hyper: Any) -> torch.Tensor:
    """``weight`` reordered for oneDNN's convolution (``hyper``: padding, stride, dilation, groups,
    input size) or transposed convolution (padding, output padding, stride, dilation, groups, input
    size), as Inductor's freezing packs a frozen weight."""
    pack = torch.ops.mkldnn._reorder_convolution_weight if len(hyper) == 5 else \
        torch.ops.mkldnn._reorder_convolution_transpose_weight
    return pack(weight.contiguous(), *hyper)


def pack_linear_weight(weight_t: torch.Tensor, rows: int) -> torch.Tensor:
    """A matrix product's right operand ``weight_t`` (in x out, a linear layer's weight transposed)
    reordered for oneDNN's linear with ``rows`` rows on the left, as Inductor's freezing packs a
    frozen one when it compiles ahead of time."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous(), rows)


def dynamo_source(node: torch.fx.Node) -> Any:
    """The Dynamo source of a graph input (None when it has none)."""
    return getattr(node, "_dynamo_source", None)


def source_name(source: Any) -> str:
    """A Dynamo source's name, e.g. ``L['self'].layer1[0].bn1.weight``. ``Source.name`` is a method
    up to torch 2.8 and a property after."""
    name = source.name
    return name() if callable(name) else str(name)


def inductor_cache_dir() -> str:
    """Inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR`` or its default). Imports Inductor:
    called only where a compile or ``load_cache_artifacts`` has imported it already."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def register_cache_artifact(name: str, populate: Any) -> None:
    """Make ``name`` a type of ``torch.compiler.save_cache_artifacts``' artifacts: each is a
    ``(key, bytes)`` pair recorded with ``record_cache_artifact``; ``load_cache_artifacts`` hands it
    to ``populate(key, content)``. Once per process. A torch without the mega-cache (before about
    2.7) has nothing to register with: the compile cache then works without artifacts."""
    try:
        from torch.compiler._cache import CacheArtifact, CacheArtifactFactory
    except ImportError:
        return

    class _Artifact(CacheArtifact):
        def populate_cache(self) -> None:
            populate(self.key, self.content)

        @staticmethod
        def type() -> str:
            return name

    try:
        CacheArtifactFactory.register(_Artifact)
    except AssertionError:  # registered already (this module imported twice under two names)
        pass


def record_cache_artifact(name: str, key: str, content: bytes) -> None:
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:
        return

    CacheArtifactManager.record_artifact(name, key, content)


#: ``version_of(tensor)``: the version counter, read by the C getter itself (no attribute lookup:
#: the per-call freshness check maps it over hundreds of tensors). Raises for inference tensors.
version_of = torch.Tensor._version.__get__  # type: ignore[attr-defined]


def version_counter(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for an inference tensor, which has none."""
    if tensor.is_inference():
        return None
    return version_of(tensor)
