"""Which models the benchmark knows: the built-in ones (no download), torchvision's (built without
weights) when torchvision is installed, and the user's own as ``package.module:factory``."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch
from torch import nn

from ..examples.models import BUILTIN_MODELS, calibrate_bn

#: torchvision models the documentation's tables use (convnext_tiny has no BN: it must not regress).
TORCHVISION_SET = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
    "shufflenet_v2_x1_0", "densenet121", "convnext_tiny",
)


class UnknownModel(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: how to build it (BN statistics calibrated on a batch of random inputs
    after random affine parameters: far from identity, so folding matters, and in range in every
    dtype) and an input for a batch size."""

    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models)
                  + torchvision.models.list_models(module=torchvision.models.video))


def resolve(name: str, image_size: int = 224) -> ModelSpec:
    """A model by name; raises ``UnknownModel`` with the valid choices."""
    if ":" in name:
        return _from_factory(name)
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        return ModelSpec(name, lambda: _calibrated(spec.build(), spec.example(8)), spec.example)
    if name in torchvision_names():
        return _torchvision(name, image_size)
    hint = "" if torchvision_names() else " (torchvision is not installed: pip install torchvision for its models)"
    raise UnknownModel(
        f"unknown model {name!r}{hint}. Built-in: {', '.join(builtin_names())}; or torchvision model names "
        "(--list), or package.module:factory for your own"
    )


def _torchvision(name: str, image_size: int) -> ModelSpec:
    import torchvision

    video = name in torchvision.models.list_models(module=torchvision.models.video)
    shape = (3, 16, 112, 112) if video else (3, image_size, image_size)

    def build() -> nn.Module:
        return _calibrated(torchvision.models.get_model(name, weights=None), torch.randn(4, *shape))

    return ModelSpec(name, build, lambda batch: torch.randn(batch, *shape))


def _calibrated(model: nn.Module, example: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return calibrate_bn(model, example).eval()


def _from_factory(path: str) -> ModelSpec:
    """``package.module:factory``: ``factory()`` returns ``(model, example_input)``; the benchmark
    draws inputs of the example's shape with the batch dimension (0) set to each batch size."""
    module_name, _, attribute = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UnknownModel(f"cannot load model factory {path!r}: {error}") from error
    built: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def made() -> tuple[nn.Module, torch.Tensor]:
        if "value" not in built:
            value = factory()
            if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], nn.Module)
                    and isinstance(value[1], torch.Tensor)):
                raise UnknownModel(f"{path} must return (model, example_input), got {type(value).__name__}")
            built["value"] = value
        return built["value"]

    def make_input(batch: int) -> torch.Tensor:
        example = made()[1]
        return torch.randn(batch, *example.shape[1:], dtype=example.dtype)

    return ModelSpec(path, lambda: made()[0].eval(), make_input)
