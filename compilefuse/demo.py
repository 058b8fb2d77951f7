"""The README's first command: compile a small CNN with bnfuse, show what was folded and how far
the result is from eager and from a float64 reference.

    python -m compilefuse.demo
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import compilefuse


class SmallCNN(nn.Module):
    """Conv+BN, depthwise Conv+BN, ConvTranspose+BN, Linear+BN1d, and one BN that cannot fold."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 12, 2, stride=2, groups=4), nn.BatchNorm2d(12), nn.ReLU())
        self.skip_bn = nn.BatchNorm2d(3)  # normalises the raw input: no producer to fold into
        self.head = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.depthwise(self.stem(x)))
        y = y + self.skip_bn(x).mean(1, keepdim=True)
        return self.head(y.mean((2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # statistics far from identity, so that folding matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 32, 32)

    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        out = compiled(x)
        eager = model(x)
        reference = copy.deepcopy(model).double()(x.double())

    record = compilefuse.last_record()
    folded = sum(d.folded for d in record.decisions)
    print(f"bnfuse folded {folded} of {len(record.decisions)} BatchNorms ({record.seconds * 1e3:.1f} ms in the fold pass):")
    for decision in record.decisions:
        print(f"  {decision}")
    scale = reference.abs().max().item()
    print(f"max |bnfuse - eager|   = {(out - eager).abs().max().item():.3e}")
    print(f"max rel. error vs fp64: bnfuse {(out.double() - reference).abs().max().item() / scale:.3e}, "
          f"eager {(eager.double() - reference).abs().max().item() / scale:.3e}")


if __name__ == "__main__":
    main()
