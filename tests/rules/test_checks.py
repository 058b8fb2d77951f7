"""The rules on hand-built aten graphs, without Dynamo or Inductor: one test per refusal reason, and
each rule's fold checked against float64.

A graph is traced from aten calls with fake tensors (``make_fx``), as AOTAutograd hands it to the
fold pass; ``fold_graph`` then gets the real values of the inputs that count as frozen.
"""

from __future__ import annotations

import pytest
import torch
from helpers import relative_error
from torch.fx.experimental.proxy_tensor import make_fx

from compilefuse.decisions import FoldRecord
from compilefuse.passes import fold_graph
from compilefuse.rules import RULE_IDS

aten = torch.ops.aten
ALL_RULES = frozenset(RULE_IDS)


def bn(x, stats, eps=1e-5):
    gamma, beta, mean, var = stats
    return aten._native_batch_norm_legit_no_training.default(x, gamma, beta, mean, var, 0.1, eps)[0]


def conv(x, w, b, padding=0, transposed=False, groups=1):
    dims = w.dim() - 2
    return aten.convolution.default(x, w, b, [1] * dims, [padding] * dims, [1] * dims, transposed, [0] * dims, groups)


def linear(x, w, b):
    return aten.addmm.default(b, x, aten.permute.default(w, [1, 0]))


def stats(channels: int, dtype=torch.float32) -> list[torch.Tensor]:
    """gamma, beta, running mean, running var: far from identity."""
    return [torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype),
            torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.2]


class Folding:
    """``fn(x, *params)`` traced to an aten graph and folded with ``params`` frozen (by default)."""

    def __init__(self, fn, x, *params, not_frozen=(), frozen_values=None, rules=ALL_RULES, change=None):
        """``not_frozen``: argument positions that are run-time inputs; ``frozen_values``: what the
        pass is told the frozen ones hold, by position (default: the arguments themselves)."""
        self.fn, self.args = fn, [x, *params]
        self.gm = make_fx(fn, tracing_mode="fake")(*self.args)
        self.gm.graph.eliminate_dead_code()  # AOTAutograd's graphs carry no unused BN outputs
        if change is not None:
            change(self.gm.graph)
        placeholders = list(self.gm.graph.find_nodes(op="placeholder"))
        values = {**dict(enumerate(self.args)), **(frozen_values or {})}
        self.frozen = {placeholders[i]: values[i] for i in range(1, len(self.args)) if i not in not_frozen}
        self.record = FoldRecord()
        fold_graph(self.gm.graph, self.frozen, rules, self.record)
        self.gm.recompile()

    @property
    def decision(self):
        [decision] = self.record.decisions
        return decision

    def error_vs_float64(self) -> float:
        with torch.no_grad():
            reference = self.fn(*(a.double() for a in self.args))
            return relative_error(self.gm(*self.args), reference)


# --- every rule folds, exactly ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "fn", "shapes"),
    [
        ("conv_bn", lambda x, w, b, *s: bn(conv(x, w, b, padding=1), s), ((2, 3, 5, 5), (4, 3, 3, 3), 4)),
        ("conv_transpose_bn", lambda x, w, b, *s: bn(conv(x, w, b, transposed=True, groups=2), s),
         ((2, 4, 5, 5), (4, 3, 2, 2), 6)),
        ("linear_bn", lambda x, w, b, *s: bn(linear(x, w, b), s), ((3, 5), (4, 5), 4)),
        ("bn_conv", lambda x, w, b, *s: conv(bn(x, s), w, b, groups=3), ((2, 3, 5, 5), (6, 1, 3, 3), 3)),
        ("bn_linear", lambda x, w, b, *s: linear(bn(x, s), w, b), ((3, 5), (4, 5), 5)),
    ],
)
def test_rule_folds_and_matches_float64(rule, fn, shapes):
    x_shape, w_shape, bn_channels = shapes
    out_channels = w_shape[1] * 2 if rule == "conv_transpose_bn" else w_shape[0]
    folding = Folding(fn, torch.randn(x_shape), torch.randn(w_shape), torch.randn(out_channels), *stats(bn_channels))
    assert folding.decision.folded and folding.decision.rule == rule, folding.decision
    assert folding.record.bn_ops_after == 0
    assert folding.error_vs_float64() < 1e-5


def test_frozen_affine_after_a_conv_folds():
    def fn(x, w, b, scale, shift):
        return conv(x, w, b) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    folding = Folding(fn, torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4), torch.rand(4) + 0.5,
                      torch.randn(4))
    assert folding.decision.folded and folding.decision.rule == "conv_bn"
    assert folding.error_vs_float64() < 1e-5


# --- one test per refusal -----------------------------------------------------------------------


def conv_bn(x, w, b, *s):
    return bn(conv(x, w, b), s)


def conv_bn_args(dtype=torch.float32):
    return [torch.randn(2, 3, 5, 5, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(4, dtype=dtype),
            *stats(4, dtype)]


def assert_refused(folding: Folding, reason: str) -> None:
    assert not folding.decision.folded and folding.decision.reason == reason, folding.decision
    assert folding.record.bn_ops_after == 1
    assert folding.error_vs_float64() < 1e-5  # the graph is unchanged


def test_conv_bn_refuses_output_also_used_elsewhere():
    def fn(x, w, b, *s):
        y = conv(x, w, b)
        return bn(y, s) + y

    assert_refused(Folding(fn, *conv_bn_args()), "output also used by add")


def test_refuses_weight_that_is_not_frozen():
    assert_refused(Folding(conv_bn, *conv_bn_args(), not_frozen=(1,)), "weight is not a frozen parameter or buffer")


def test_refuses_bias_that_is_not_frozen():
    assert_refused(Folding(conv_bn, *conv_bn_args(), not_frozen=(2,)), "bias is not a frozen parameter or buffer")


def test_refuses_statistics_that_are_not_frozen():
    assert_refused(Folding(conv_bn, *conv_bn_args(), not_frozen=(5,)),
                   "running_mean is not a frozen parameter or buffer")


def test_refuses_eps_that_is_not_a_number():
    def eps_as_input(graph: torch.fx.Graph) -> None:
        [bn_op] = graph.find_nodes(op="call_function", target=aten._native_batch_norm_legit_no_training.default)
        with graph.inserting_before(bn_op):
            eps = graph.call_function(aten.mean.default, (bn_op.args[4],))  # any value known only at run time
        eps.meta["val"] = bn_op.args[4].meta["val"].mean()
        bn_op.update_arg(6, eps)

    folding = Folding(conv_bn, *conv_bn_args(), change=eps_as_input)
    assert not folding.decision.folded and folding.decision.reason == "eps is not a compile-time number"


def test_refuses_values_on_the_meta_device():
    args = conv_bn_args()
    folding = Folding(conv_bn, *args, frozen_values={6: args[6].to("meta")})
    assert folding.decision.reason == "running_var is on the meta device: no values to fold"


def test_refuses_integer_values():
    args = conv_bn_args()
    folding = Folding(conv_bn, *args, frozen_values={4: args[4].round().to(torch.int64)})
    assert folding.decision.reason == "bn_bias has dtype torch.int64, only real floating point is folded"


def test_refuses_a_normalisation_that_changes_the_dtype():
    """A bfloat16 conv output times a float32 scale is float32: folding would round it to bfloat16."""

    def fn(x, w, b, scale, shift):
        return conv(x, w, b) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    args = [torch.randn(2, 3, 5, 5).bfloat16(), torch.randn(4, 3, 3, 3).bfloat16(), torch.randn(4).bfloat16(),
            torch.rand(4) + 0.5, torch.randn(4)]
    folding = Folding(fn, *args)
    assert folding.decision.reason == "the normalisation changes the dtype (torch.bfloat16 to torch.float32)"


def test_refuses_a_fold_that_overflows_the_weight_dtype():
    args = conv_bn_args(torch.float16)
    args[1] = torch.full_like(args[1], 100.0)
    args[6] = torch.full_like(args[6], 1e-6)  # scale ~ 300 * gamma: the folded weight passes 65504
    folding = Folding(lambda x, w, b, *s: bn(conv(x, w, b), s, eps=1e-6), *args)
    assert folding.decision.reason == "folded weight is not finite in torch.float16"


def test_disabled_rule_keeps_its_bn():
    folding = Folding(conv_bn, *conv_bn_args(), rules=ALL_RULES - {"conv_bn"})
    assert_refused(folding, "rule conv_bn disabled by options")


def test_bn_conv_refuses_zero_padding():
    args = [torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4), *stats(3)]
    assert_refused(Folding(lambda x, w, b, *s: conv(bn(x, s), w, b, padding=1), *args),
                   "conv zero-pads its input (padding=[1, 1]): the border would change")


def test_bn_conv_refuses_a_transposed_convolution():
    args = [torch.randn(2, 3, 5, 5), torch.randn(3, 4, 3, 3), torch.randn(4), *stats(3)]
    assert_refused(Folding(lambda x, w, b, *s: conv(bn(x, s), w, b, transposed=True), *args),
                   "BN before a transposed convolution: border outputs would get a different bias")


def test_bn_conv_refuses_a_bn_output_read_elsewhere_too():
    def fn(x, w, b, *s):
        y = bn(x, s)
        return conv(y, w, b).sum() + y.sum()

    args = [torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4), *stats(3)]
    folding = Folding(fn, *args)
    assert not folding.decision.folded and folding.decision.reason.startswith("output also used by sum")


def test_bn_next_to_no_conv_or_linear_is_kept_with_its_neighbours():
    folding = Folding(lambda x, *s: aten.relu.default(bn(aten.relu.default(x), s)), torch.randn(2, 3, 4, 4), *stats(3))
    assert folding.decision.reason == "no conv or linear next to it (input from aten.relu, output to aten.relu)"


def identity_sum(padding: tuple[int, int]):
    """``conv(x) + conv(x) + x * scale``: two branches and an identity term."""
    def fn(x, w1, w2, scale):
        return conv(x, w1, None, padding=padding[0]) + conv(x, w2, None, padding=padding[1]) + x * scale.reshape(1, -1, 1, 1)

    return fn


@pytest.mark.parametrize(
    ("fn", "args", "reason"),
    [
        # A float64 scale sums in float64: merged into one float32 conv, the identity would round.
        (identity_sum((1, 0)), [torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3), torch.randn(4, 4, 1, 1),
                        torch.rand(4, dtype=torch.float64) + 0.5], "branches differ in dtype (torch.float32, torch.float64)"),
        # A 1x1 input broadcast over the 3x3 output of padded 1x1 convs: the identity is no centre tap.
        (identity_sum((1, 1)),
         [torch.randn(2, 4, 1, 1), torch.randn(4, 4, 1, 1), torch.randn(4, 4, 1, 1), torch.rand(4) + 0.5],
         "an identity branch, but the convs change the size or alignment of the input"),
    ],
    ids=["dtype", "alignment"],
)
def test_branch_merge_refuses_an_identity_term_it_cannot_carry(fn, args, reason, monkeypatch):
    """The identity term stays out; the two convs alone still merge, and the result is exact."""
    from compilefuse.rules import branch_merge

    reasons, real = [], branch_merge._refusal
    monkeypatch.setattr(branch_merge, "_refusal", lambda tree, frozen: reasons.append(real(tree, frozen)) or reasons[-1])
    folding = Folding(fn, *args)
    assert reason in reasons, reasons
    [merge] = folding.record.merges
    assert merge.branches == ("convolution", "convolution_1")
    assert folding.error_vs_float64() < 1e-5


def cat_of_convs(x, w1, w2, *s):
    return bn(aten.cat.default([conv(x, w1, None), conv(x, w2, None)], 1), s)


def cat_args(dtype=torch.float32):
    return [torch.randn(2, 3, 5, 5, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype),
            torch.randn(2, 3, 3, 3, dtype=dtype), *stats(6, dtype)]


def test_cat_bn_folds_each_slice_and_matches_float64():
    folding = Folding(cat_of_convs, *cat_args())
    assert folding.decision.folded and folding.decision.rule == "cat_bn", folding.decision
    assert folding.decision.producer == "convolution, convolution_1"
    assert folding.record.bn_ops_after == 0
    assert folding.error_vs_float64() < 1e-5


def test_cat_bn_disabled_keeps_its_bn():
    assert_refused(Folding(cat_of_convs, *cat_args(), rules=ALL_RULES - {"cat_bn"}), "rule cat_bn disabled by options")


def test_cat_bn_refuses_a_slice_whose_fold_overflows():
    """The values of the second slice's fold are refused: the whole BN is kept, the slice named."""
    args = cat_args(torch.float16)
    args[2] = torch.full_like(args[2], 100.0)
    args[3] = torch.ones_like(args[3])
    args[6] = torch.full_like(args[6], 1e-6)  # the BN's channels 4:6 scale by ~707: 70,700 is past 65,504
    args[6][:4] = 1.0
    folding = Folding(lambda x, w1, w2, *s: bn(aten.cat.default([conv(x, w1, None), conv(x, w2, None)], 1), s, eps=1e-6),
                      *args)
    assert folding.decision.reason == "channels 4:6 (convolution_1): folded weight is not finite in torch.float16"
    assert folding.record.bn_ops_after == 1


def test_every_rule_takes_the_shared_path():
    """No rule writes its own ``rewrite``: the order of refusals and the report rows are the same for all."""
    from compilefuse.rules import RULES
    from compilefuse.rules.rule import Rule

    for rule in RULES:
        assert isinstance(rule, Rule) and type(rule).rewrite is Rule.rewrite, rule.id
