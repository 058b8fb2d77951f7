"""torchvision's model zoo, built without downloaded weights and with BN statistics randomised:
every model matches float64 like eager does, and bnfuse folds exactly the BatchNorms that an
independent count calls exactly foldable.

The count (``foldable_sites``) reads Dynamo's torch-level graph, not the aten graph the rules see:
a BN site (``F.batch_norm``, or the output of a ``FrozenBatchNorm2d``) is foldable when

- its input is a conv / conv-transpose / linear (2-D input) output that nothing else reads, or
- (``F.batch_norm`` only) its output is read only by a conv without zero padding (directly or
  through a single reflect / replicate / circular ``F.pad``) or by a linear on 2-D input.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_counts_agree_with_graph, float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import compilefuse

pytestmark = pytest.mark.slow

CONVS = {torch.conv1d, torch.conv2d, torch.conv3d}
PRODUCERS = CONVS | {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d, F.linear}
COPYING_PADS = {"reflect", "replicate", "circular"}


def _module_type(node: torch.fx.Node) -> type | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][1] if stack else None


def _dims(node: torch.fx.Node) -> int:
    return node.meta["example_value"].dim()


def _zero_padding(conv: torch.fx.Node) -> bool:
    padding = conv.args[4] if len(conv.args) > 4 else conv.kwargs.get("padding", 0)
    return padding == "valid" or not any(padding if isinstance(padding, (tuple, list)) else [padding])


def bn_sites(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, bool]]:
    """(site, its input, whether it is F.batch_norm) for every BN site of a Dynamo graph."""
    sites = []
    for node in gm.graph.nodes:
        if node.target is F.batch_norm:
            sites.append((node, node.args[0], True))
        elif (
            _module_type(node) is FrozenBatchNorm2d
            and node.target is operator.add
            and all(_module_type(user) is not FrozenBatchNorm2d for user in node.users)
        ):
            product = node.args[0]
            sites.append((node, product.args[0], False))
    return sites


def _reads_only(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def foldable_sites(gm: torch.fx.GraphModule) -> int:
    count = 0
    for site, source, functional in bn_sites(gm):
        after = source.target in PRODUCERS and len(source.users) == 1 and (source.target is not F.linear or _dims(source) == 2)
        consumer = _reads_only(site) if functional else None
        if consumer is not None and consumer.target is torch._C._nn.pad and consumer.args[2] in COPYING_PADS:
            consumer = _reads_only(consumer)
        before = consumer is not None and (
            (consumer.target in CONVS and _zero_padding(consumer)) or (consumer.target is F.linear and _dims(site) == 2)
        )
        count += after or before
    return count


@dataclasses.dataclass
class Zoo:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]


def frozen_bn_backbone() -> nn.Module:
    """Faster R-CNN's ResNet-FPN backbone (FrozenBatchNorm2d throughout), on a resnet18 body."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


ZOO = {
    "resnet18": Zoo(torchvision.models.resnet18, (1, 3, 64, 64)),
    "mobilenet_v3_small": Zoo(torchvision.models.mobilenet_v3_small, (1, 3, 64, 64)),
    "efficientnet_b0": Zoo(torchvision.models.efficientnet_b0, (1, 3, 64, 64)),
    "regnet_y_400mf": Zoo(torchvision.models.regnet_y_400mf, (1, 3, 64, 64)),
    "shufflenet_v2_x0_5": Zoo(torchvision.models.shufflenet_v2_x0_5, (1, 3, 64, 64)),
    "densenet121": Zoo(torchvision.models.densenet121, (1, 3, 32, 32)),
    "vgg11_bn": Zoo(torchvision.models.vgg11_bn, (1, 3, 32, 32)),
    "r3d_18": Zoo(torchvision.models.video.r3d_18, (1, 3, 4, 32, 32)),
    "fasterrcnn_backbone": Zoo(frozen_bn_backbone, (1, 3, 64, 64)),
}


def dynamo_graphs(model: nn.Module, x: torch.Tensor) -> list[torch.fx.GraphModule]:
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.inference_mode():
        torch.compile(model, backend=capture)(x)
    torch._dynamo.reset()
    return graphs


def outputs_of(value) -> list[torch.Tensor]:
    return list(value.values()) if isinstance(value, dict) else [value]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_folds_every_exactly_foldable_bn_and_matches_float64(name):
    torch.manual_seed(0)
    zoo = ZOO[name]
    model = randomize_bn(zoo.build().eval())
    x = torch.randn(zoo.shape)
    graphs = dynamo_graphs(model, x)
    sites = sum(len(bn_sites(gm)) for gm in graphs)
    foldable = sum(foldable_sites(gm) for gm in graphs)
    with torch.inference_mode():
        eager = outputs_of(model(x))
    result = run_bnfuse(model, x)
    report = compilefuse.FoldReport.from_records(result.records)
    reference = outputs_of(float64_reference(model, x))
    errors = [relative_error(out, ref) for out, ref in zip(outputs_of(result.outputs), reference, strict=True)]
    eager_errors = [relative_error(out, ref) for out, ref in zip(eager, reference, strict=True)]
    print(f"\nzoo {name}: folded {report.folded} / {report.total} BN (foldable {foldable}); "
          f"max relative error vs float64 {max(errors):.2e} (eager {max(eager_errors):.2e})")
    assert (report.folded, report.total) == (foldable, sites), str(report)
    assert max(errors) < 1e-5 and max(eager_errors) < 1e-5
    if not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()):
        assert_counts_agree_with_graph(report, result.records)
