"""Issue 31 item 4: why bnfuse's gradient of the FrozenBatchNorm2d stem of torchvision's
fasterrcnn_mobilenet_v3_large_320_fpn backbone is far from float64 where Inductor's is not.

Builds the backbone with FrozenBatchNorm2d (eps 1e-3, as torchvision's detection models do) and
statistics calibrated on random images, then:
1. the issue's row: ``body.0.0.weight``'s gradient error against float64 for eager, Inductor and
   bnfuse (per step), one forward and backward at 320 px, on the issue's input and five more;
2. the cause, on blocks 0-4 (up to the first squeeze-excitation) in eager float32: block 4's two
   folds written out by hand (float64 arithmetic, rounded once, as bnfuse folds), the ReLU
   pre-activations compared with float64's, and the gradient again with each ReLU's derivative
   taken on the side of zero float64 puts it.

    python benchmarks/relu_kink_gradient.py [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import compilefuse  # noqa: F401  (registers the backend)


def backbone(norm: type) -> nn.Module:
    kwargs = {"eps": 0.001} if norm is FrozenBatchNorm2d else {"eps": 0.001, "momentum": 0.01}
    return _mobilenet_extractor(torchvision.models.mobilenet_v3_large(norm_layer=functools.partial(norm, **kwargs)),
                                True, 6)


def calibrated() -> tuple[nn.Module, torch.Tensor]:
    """The backbone with calibrated statistics, and an input of the same distribution."""
    torch.manual_seed(0)
    with_bn = backbone(nn.BatchNorm2d).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(30):
            with_bn(torch.rand(4, 3, 320, 320) * 2 - 1)
        for module in with_bn.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # a cumulative average of the next batches
        for _ in range(5):
            with_bn(torch.rand(4, 3, 320, 320) * 2 - 1)
    frozen = backbone(FrozenBatchNorm2d)
    frozen.load_state_dict({k: v for k, v in with_bn.state_dict().items() if "num_batches" not in k})
    return frozen.train(), torch.rand(2, 3, 320, 320) * 2 - 1


def square_mean(out: torch.Tensor | dict) -> torch.Tensor:
    outs = out.values() if isinstance(out, dict) else [out]
    return sum((o.double() ** 2).mean() for o in outs)


def relative(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g.double() - ref).abs().max() / ref.abs().max()).item()


def issue_row(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    """The stem's gradient error per system on each input (one compile per system: the inputs share
    a shape), the first input being the issue's."""
    ref = copy.deepcopy(model).double()
    references = []
    for x in inputs:
        ref.zero_grad(set_to_none=True)
        square_mean(ref(x.double())).backward()
        references.append(ref.body["0"][0].weight.grad.clone())
    for system in ("eager", "inductor", "bnfuse"):
        m = copy.deepcopy(model)
        fn = m if system == "eager" else torch.compile(m, backend=system)
        errors = []
        for x, reference in zip(inputs, references, strict=True):
            m.zero_grad(set_to_none=True)
            square_mean(fn(x)).backward()
            errors.append(relative(m.body["0"][0].weight.grad, reference))
        print(f"{system:9s} body.0.0.weight gradient error per input: {' '.join(f'{e:.1e}' for e in errors)}")


def folded(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv2dNormActivation's conv weight and bias with its FrozenBatchNorm2d folded, float64, rounded once."""
    conv, bn = block[0], block[1]
    s = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
    return (conv.weight.double() * s.view(-1, 1, 1, 1)).float(), (bn.bias.double() - bn.running_mean.double() * s).float()


def cause(model: nn.Module, x: torch.Tensor) -> None:
    blocks = list(model.body.children())
    head, expand, depthwise, se = nn.Sequential(*blocks[:4]), *blocks[4].block[:3]

    def run(dtype: torch.dtype, fold: bool, masks: tuple[torch.Tensor, torch.Tensor] | None = None):
        m = copy.deepcopy(nn.ModuleList([head, expand, depthwise, se])).to(dtype)
        h, e, d, s = m
        pre = []
        z = h(x.to(dtype))
        for block, module in ((e, expand), (d, depthwise)):
            conv = block[0]
            if fold:
                w, b = folded(module)
                z = F.conv2d(z, w, None, conv.stride, conv.padding, conv.dilation, conv.groups) + b.view(-1, 1, 1)
            else:
                z = block[1](conv(z))
            pre.append(z.detach())
            z = F.relu(z) if masks is None else z * (masks[len(pre) - 1] > 0).to(dtype)
        square_mean(s(z)).backward()
        return pre, h[0][0].weight.grad

    pre64, grad64 = run(torch.float64, fold=False)
    for fold in (False, True):
        pre, grad = run(torch.float32, fold)
        flips = [(p > 0) != (r > 0) for p, r in zip(pre, pre64, strict=True)]
        where = [f"{r[f].tolist()} -> {p[f].tolist()}" for p, r, f in zip(pre, pre64, flips, strict=True) if f.any()]
        print(f"float32, block 4 {'folded' if fold else 'unfolded'}: stem gradient error {relative(grad, grad64):.1e}; "
              f"ReLU inputs on the other side of 0 than float64's: {sum(int(f.sum()) for f in flips)} {where}")
    _, grad = run(torch.float32, True, masks=tuple(pre64))
    print(f"float32, block 4 folded, ReLU's derivative on float64's side: stem gradient error {relative(grad, grad64):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="only the cause (eager, seconds)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, x = calibrated()
    if not args.no_compile:
        torch.manual_seed(2)
        issue_row(model, [x, *(torch.rand(2, 3, 320, 320) * 2 - 1 for _ in range(5))])
    cause(model, x)


if __name__ == "__main__":
    main()
