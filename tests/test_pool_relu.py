"""ReLU moved after a max-pool (``passes/pool_relu.py``): bit-for-bit the same values, NaN, -inf
and padding included; left alone where the pool's indices are read or the ReLU has another reader;
and through the backend, exact against float64 with the folded BN."""

from __future__ import annotations

import operator

import pytest
import torch
from helpers import assert_matches_reference, float64_reference, randomize_bn
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from compilefuse._torch_private import inductor
from compilefuse.passes import pool_relu

aten = torch.ops.aten
RELU = aten.relu.default


def awkward_values(*shape: int) -> torch.Tensor:
    """Random signs, with NaN, -inf, +inf and -0.0 planted."""
    x = torch.randn(*shape)
    flat = x.view(-1)
    flat[::7], flat[3::11], flat[5::13], flat[1::17] = float("nan"), float("-inf"), float("inf"), -0.0
    return x


def pool1d(x):  # MaxPool1d as ATen traces it: unsqueeze, 2-D pool, squeeze
    return aten.max_pool2d_with_indices(torch.relu(x).unsqueeze(-2), [1, 4], [1, 4])[0].squeeze(-2)


def pool2d_padded_ceil(x):
    return aten.max_pool2d_with_indices(torch.relu(x), [3, 3], [2, 2], [1, 1], [1, 1], True)[0]


def pool3d(x):
    return aten.max_pool3d_with_indices(torch.relu(x), [2, 2, 2], [2, 2, 2])[0]


def inductor_decomposition(x):  # the values + offsets form Inductor decomposes max-pools into
    return inductor.max_pool_ops()[0](torch.relu(x), [3, 3], [2, 2], [1, 1], [1, 1], False)[0]


@pytest.mark.parametrize(
    "fn,shape",
    [
        (pool1d, (2, 3, 50)),
        (pool2d_padded_ceil, (2, 3, 9, 10)),
        (pool3d, (1, 2, 4, 6, 6)),
        (inductor_decomposition, (2, 3, 9, 9)),
    ],
    ids=["1d", "2d-padded-ceil", "3d", "inductor-decomposed"],
)
def test_moved_and_bit_for_bit_equal(fn, shape):
    x = awkward_values(*shape)
    gm = make_fx(fn)(x)
    before = gm(x)
    assert pool_relu.move_relu_after_max_pool(gm.graph) == 1
    gm.recompile()
    relu = next(iter(gm.graph.find_nodes(op="call_function", target=RELU)))
    assert relu.args[0].target is operator.getitem, "the ReLU reads the pooled values"
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0, equal_nan=True)


def indices_read(x):
    values, indices = aten.max_pool2d_with_indices(torch.relu(x), [2, 2], [2, 2])
    return values, indices


def relu_read_twice(x):
    y = torch.relu(x)
    return aten.max_pool2d_with_indices(y, [2, 2], [2, 2])[0], y.sum()


@pytest.mark.parametrize("fn", [indices_read, relu_read_twice], ids=["indices-read", "relu-read-twice"])
def test_left_alone(fn):
    gm = make_fx(fn)(torch.randn(1, 2, 4, 4))
    code = gm.code
    assert pool_relu.move_relu_after_max_pool(gm.graph) == 0
    gm.recompile()
    assert gm.code == code


class ConvPools(nn.Module):
    """Conv1d-BN-ReLU-MaxPool1d and Conv2d-BN-ReLU-MaxPool2d (padded), and a pool whose indices
    are returned."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Conv1d(1, 4, 9, 2), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool1d(4))
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.indexed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, return_indices=True))

    def forward(self, wave, image):
        values, indices = self.indexed(image)
        return self.audio(wave), self.image(image), values, indices


def test_through_the_backend(monkeypatch):
    """With Inductor's caches off: a cache hit (this test run before, the same sources) loads the
    compiled code without running the post-grad pass, and nothing would be counted."""
    moved = []
    original = pool_relu.move_relu_after_max_pool
    monkeypatch.setattr(pool_relu, "move_relu_after_max_pool", lambda graph: moved.append(original(graph)) or moved[-1])
    model = randomize_bn(ConvPools().eval())
    wave, image = torch.randn(2, 1, 200), torch.randn(2, 3, 12, 12)
    with torch.inference_mode(), torch.compiler.config.patch(force_disable_caches=True):
        out = torch.compile(model, backend="bnfuse")(wave, image)
        eager = model(wave, image)
    assert moved == [2], "the two pools whose indices are unused"
    reference = float64_reference(model, wave, image)
    assert_matches_reference(out[:3], eager[:3], reference[:3])
    assert torch.equal(out[3], eager[3]), "indices as eager's"
