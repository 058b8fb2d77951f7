"""The fold report: golden text for each refusal reason, counts that agree with the compiled graph,
graph breaks, logging, and the machine-readable forms."""

from __future__ import annotations

import json
import logging
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_counts_agree_with_graph, randomize_bn
from torch import nn

import compilefuse
from compilefuse.examples.models import SmallCNN


class EveryReason(nn.Module):
    """One BatchNorm for each way a site can end: folded by each rule, or kept for each reason."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.shared_bn = nn.BatchNorm2d(4)
        self.relu_bn = nn.BatchNorm2d(4)
        self.pool_bn = nn.BatchNorm2d(4)
        self.train_bn = nn.BatchNorm2d(4)
        self.untracked_bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.head = nn.Linear(4, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.up_bn(self.up(self.bn(self.conv(x))))
        s = self.shared(y)
        y = self.shared_bn(s) + s
        y = self.relu_bn(torch.relu(y))
        y = torch.relu(self.pool_bn(F.max_pool2d(y, 2)))
        y = self.untracked_bn(self.train_bn(y))
        return self.head_bn(self.head(y.mean((2, 3))))


def every_reason() -> EveryReason:
    model = randomize_bn(EveryReason().eval())
    model.train_bn.train()
    return model


class StatsAsInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.linear = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, mean, var):
        y = F.batch_norm(self.conv(x), mean, var, training=False)
        return self.bn(self.linear(y.mean((2, 3))))


def text(report: compilefuse.FoldReport) -> str:
    """The report without its timing, which differs run to run."""
    return re.sub(r"[\d.]+ ms in the folding rules", "<t> ms in the folding rules", str(report))


class TestReportText(expecttest.TestCase):
    def test_report_names_every_reason(self):
        report = compilefuse.explain(every_reason(), torch.randn(2, 3, 8, 8))
        self.assertExpectedInline(text(report), """\
batchnorm     status  folded into          rule / reason
------------  ------  -------------------  -------------
bn            folded  conv2d conv          conv_bn
up_bn         folded  conv_transpose2d up  conv_transpose_bn
shared_bn     kept                         output also used by add
relu_bn       kept                         no conv or linear next to it (input from relu, output to max_pool2d)
pool_bn       kept                         no conv or linear next to it (input from max_pool2d, output to relu)
train_bn      kept                         training mode
untracked_bn  kept                         no running statistics (track_running_stats=False)
head_bn       folded  linear head          linear_bn
folded 3 of 8 BatchNorms; <t> ms in the folding rules""")

    def test_report_for_autograd_graph(self):
        model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4).train()).eval())
        model[2].train()
        with compilefuse.report.collecting() as records:
            torch.compile(model, backend="bnfuse")(torch.randn(2, 3, 6, 6)).sum().backward()
        self.assertExpectedInline(text(compilefuse.FoldReport.from_records(records)), """\
batchnorm  status           folded into  rule / reason
---------  ---------------  -----------  -------------
1          folded per step  conv2d 0     conv_bn
2          kept                          training mode
folded 1 of 2 BatchNorms; <t> ms in the folding rules""")

    def test_report_for_autograd_graph_with_training_folds_off(self):
        model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
        with compilefuse.report.collecting() as records:
            compiled = torch.compile(model, backend="bnfuse", options={"training": False})
            compiled(torch.randn(2, 3, 6, 6)).sum().backward()
        self.assertExpectedInline(text(compilefuse.FoldReport.from_records(records)), """\
batchnorm  status  folded into  rule / reason
---------  ------  -----------  -------------
1          kept                 autograd enabled (run under torch.inference_mode() to fold)
folded 0 of 1 BatchNorms; <t> ms in the folding rules""")

    def test_report_for_disabled_rule_and_statistics_given_as_inputs(self):
        x, mean, var = torch.randn(2, 3, 6, 6), torch.zeros(4), torch.ones(4)
        report = compilefuse.explain(StatsAsInputs().eval(), x, mean, var, options={"rules": ["conv_bn"]})
        self.assertExpectedInline(text(report), """\
batchnorm   status  folded into  rule / reason
----------  ------  -----------  -------------
batch_norm  kept                 running_mean is not a frozen parameter or buffer
bn          kept                 rule linear_bn disabled by options
folded 0 of 2 BatchNorms; <t> ms in the folding rules""")


def test_a_bn_whose_output_autocast_casts_down_before_a_conv_is_kept_for_that_reason():
    """Issue 31: under autocast a BN on a float32 input is rounded to bfloat16 before the conv
    after it, so it stays (that rounding would not move into the conv's weights exactly); the
    report said "no conv or linear next to it (..., output to Conv2d)". Without autocast it folds."""
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval())
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (kept,) = compilefuse.explain(model, x).rows
    (folded,) = compilefuse.explain(model, x).rows
    assert not kept.folded
    assert re.fullmatch(r"its output is cast to bfloat16 before conv2d \(autocast\): .*", kept.reason, re.IGNORECASE)
    assert folded.folded


def explain_with_records(model, *inputs):
    with compilefuse.report.collecting() as records:
        report = compilefuse.explain(model, *inputs)
    return report, records


@pytest.mark.parametrize(
    ("make", "shape", "not_inference"),
    [(every_reason, (2, 3, 8, 8), 2), (lambda: randomize_bn(SmallCNN().eval()), (2, 3, 16, 16), 0)],
    ids=["every_reason", "small_cnn"],
)
def test_report_counts_agree_with_compiled_graph(make, shape, not_inference):
    report, records = explain_with_records(make(), torch.randn(*shape))
    assert_counts_agree_with_graph(report, records, not_inference)


def test_one_report_covers_every_graph_of_a_model_with_graph_breaks():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    report = compilefuse.explain(randomize_bn(Broken().eval()), torch.randn(1, 3, 8, 8))
    assert report.graphs == 2
    assert [(row.bn, row.folded) for row in report.rows] == [("a.1", True), ("b.1", True)]


def test_report_option_logs_each_graph_and_last_report_returns_it(caplog):
    model = randomize_bn(SmallCNN().eval())
    with caplog.at_level(logging.INFO, logger="compilefuse"), torch.inference_mode():
        torch.compile(model, backend="bnfuse", options={"report": True})(torch.randn(2, 3, 16, 16))
    [message] = [r.getMessage() for r in caplog.records if r.name == "compilefuse" and r.levelno == logging.INFO]
    assert message.startswith("bnfuse fold report:\nbatchnorm")
    assert str(compilefuse.last_report()) in message
    assert compilefuse.last_report().folded == 4


def test_report_option_must_be_a_bool():
    with pytest.raises(ValueError, match="option 'report' must be True or False"):
        compilefuse.BnfuseConfig.from_options({"report": "yes"})


def test_report_to_dict_and_json():
    report = compilefuse.explain(randomize_bn(SmallCNN().eval()), torch.randn(2, 3, 16, 16))
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert (data["folded"], data["total"], data["graphs"]) == (4, 5, 1)
    assert data["rows"][0] == {
        "bn": "stem.1", "folded": True, "rule": "conv_bn", "producer": "stem.0",
        "producer_kind": "conv2d", "reason": None, "per_step": False, "status": "folded",
    }
    assert {type(row) for row in report.rows} == {compilefuse.FoldDecision}


def test_collecting_sees_new_records_when_the_recent_records_are_full(restore_records):
    """Found by the fuzz test: counting new records by the length of the bounded RECORDS deque
    stops working once it is full (64 graphs); collecting() does not."""
    for _ in range(restore_records.maxlen):
        restore_records.append(compilefuse.FoldRecord())
    report = compilefuse.explain(randomize_bn(SmallCNN().eval()), torch.randn(2, 3, 16, 16))
    assert report.total == 5
