"""The fold report: one row per BatchNorm site, what bnfuse did with it and why."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

from .decisions import FoldDecision, FoldRecord, MergeDecision

_COLUMNS = ("batchnorm", "status", "folded into", "rule / reason")


@dataclasses.dataclass
class FoldReport:
    """Rows are ``FoldDecision`` dataclasses, in program order within each compiled graph."""

    rows: list[FoldDecision]
    fold_seconds: float
    graphs: int
    #: Parallel branches merged into one convolution (each a line under the table).
    merges: list[MergeDecision] = dataclasses.field(default_factory=list)

    @classmethod
    def from_records(cls, records: Iterable[FoldRecord]) -> FoldReport:
        records = list(records)
        return cls(
            rows=[d for r in records for d in r.decisions],
            fold_seconds=sum(r.seconds for r in records),
            graphs=len(records),
            merges=[m for r in records for m in r.merges],
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoldReport:
        """The inverse of ``to_dict`` (a report stored in an exported package)."""
        return cls(
            rows=[FoldDecision(**{k: v for k, v in row.items() if k != "status"}) for row in data["rows"]],
            fold_seconds=data["fold_seconds"],
            graphs=data["graphs"],
            merges=[MergeDecision(**{**merge, "branches": tuple(merge["branches"])}) for merge in data["merges"]],
        )

    @property
    def folded(self) -> int:
        return sum(row.folded for row in self.rows)

    @property
    def total(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [{**dataclasses.asdict(row), "status": row.status} for row in self.rows],
            "folded": self.folded,
            "total": self.total,
            "fold_seconds": self.fold_seconds,
            "graphs": self.graphs,
            "merges": [dataclasses.asdict(merge) for merge in self.merges],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        cells = [_COLUMNS] + [
            (
                row.bn,
                row.status,
                f"{row.producer_kind} {row.producer}" if row.folded else "",
                row.rule if row.folded else str(row.reason),
            )
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1] for line in cells]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(_COLUMNS[-1]))
        lines += [str(merge) for merge in self.merges]
        graphs = f" in {self.graphs} graphs" if self.graphs != 1 else ""
        lines.append(
            f"folded {self.folded} of {self.total} BatchNorms{graphs}; "
            f"{self.fold_seconds * 1e3:.1f} ms in the folding rules"
        )
        return "\n".join(line.rstrip() for line in lines)


_COLLECTORS: list[tuple[list[FoldRecord], bool]] = []
#: The open ``collecting(reused=True)`` blocks: while any is, a compiled graph reports its record at
#: every call (a plain list, so the per-call test is one truth test).
RERUNS_WANTED: list[list[FoldRecord]] = []


def publish(record: FoldRecord, *, reused: bool = False) -> None:
    """Hand a graph's record to every ``collecting()`` block that is open: a new compile's to all of
    them, a graph compiled before and run again to those that asked for those too."""
    for collector, wants_reused in _COLLECTORS:
        if wants_reused or not reused:
            collector.append(record)


@contextlib.contextmanager
def collecting(*, reused: bool = False) -> Iterator[list[FoldRecord]]:
    """Collect the records of every graph bnfuse compiles inside the block; with ``reused``, also of
    every graph compiled before that runs inside it (``compilefuse.explain``)."""
    records: list[FoldRecord] = []
    entry = (records, reused)
    _COLLECTORS.append(entry)
    if reused:
        RERUNS_WANTED.append(records)
    try:
        yield records
    finally:
        _COLLECTORS.remove(entry)
        if reused:
            RERUNS_WANTED.remove(records)
