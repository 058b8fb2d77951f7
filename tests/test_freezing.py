"""The real values bnfuse folds from are paired with the graph's inputs by position, as AOTAutograd
orders them; the pairing is checked, not assumed. A scrambled order must fold nothing."""

from __future__ import annotations

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn

from compilefuse import freezing
from compilefuse._torch_private import aot_autograd


def conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    return randomize_bn(model.eval())


def scrambled(order):
    """``aot_parameters`` with its values reordered by ``order(values)``."""
    real = aot_autograd.aot_parameters

    def wrong_order():
        found = real()
        if found is None:
            return None
        values, not_frozen = found
        return order(list(values)), not_frozen

    return wrong_order


def swap_same_shaped(values):
    """Swap the first two tensors of equal shape (two BN statistics): shape, dtype and device all
    still match their graph inputs, so only identity can tell."""
    for i, a in enumerate(values):
        for j in range(i + 1, len(values)):
            if isinstance(a, torch.Tensor) and values[j].shape == a.shape and values[j].dtype == a.dtype:
                values[i], values[j] = values[j], values[i]
                return values
    raise AssertionError("no two tensors of one shape")


@pytest.mark.parametrize("order", [swap_same_shaped, lambda values: values[::-1], lambda values: values[:-1]],
                         ids=["swap_same_shaped", "reversed", "one_missing"])
def test_scrambled_frozen_values_fold_nothing_and_say_why(monkeypatch, order):
    monkeypatch.setattr(aot_autograd, "aot_parameters", scrambled(order))
    model, x = conv_bn(), torch.randn(2, 3, 6, 6)
    result = run_bnfuse(model, x, options={"freeze": True})
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    assert [d.folded for d in result.decisions] == [False, False]
    assert all(d.reason.startswith("not folded: ") for d in result.decisions), result.decisions
    assert sum(r.bn_ops_after for r in result.records) == 2


def test_values_in_order_fold():
    """The control: the same model with the values as AOTAutograd gives them folds both BNs."""
    model, x = conv_bn(), torch.randn(2, 3, 6, 6)
    result = run_bnfuse(model, x, options={"freeze": True})
    assert [d.folded for d in result.decisions] == [True, True]


def test_written_tensor_overlap_is_measured_in_bytes():
    """The check behind "a write that may alias a frozen tensor is not folded": overlapping views
    of one storage are caught, disjoint slices of it and other storages are not."""
    storage = torch.zeros(20)
    weight, head, tail, other = storage[:10].view(2, 5), storage[:2], storage[15:], torch.zeros(10)
    inputs = [weight, head, tail, other, storage[::4]]
    freezing.check_writes_spare_frozen([2, 3], [0], inputs)
    for written in (1, 4):
        with pytest.raises(freezing.UnprovableWrite) as refusal:
            freezing.check_writes_spare_frozen([written], [0, 3], inputs)
        assert (refusal.value.written, refusal.value.frozen) == (written, 0)
