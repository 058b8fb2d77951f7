"""Markdown tables from compilefuse-bench JSON files (what docs/benchmarks.md shows).

    python benchmarks/summarize.py benchmarks/results/bench_cpu_builtin.json [...]
"""

from __future__ import annotations

import json
import sys

SYSTEMS = ("eager", "inductor", "inductor-freezing", "bnfuse", "limit", "export", "onnxruntime")


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def best_inductor(lat: dict[str, float | None]) -> float | None:
    """The faster of plain Inductor and Inductor with freezing (what bnfuse must not be slower than)."""
    values = [v for v in (lat.get("inductor"), lat.get("inductor-freezing")) if v is not None]
    return min(values) if values else None


#: Ratio columns: (title, numerator system, denominator), shown when both sides were run.
RATIOS = (
    ("bnfuse / limit", "bnfuse", lambda lat: lat.get("limit")),
    ("bnfuse / best Inductor", "bnfuse", best_inductor),
    ("export / best Inductor", "export", best_inductor),
    ("bnfuse / ORT", "bnfuse", lambda lat: lat.get("onnxruntime")),
    ("export / ORT", "export", lambda lat: lat.get("onnxruntime")),
)


def summarize(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["results"]
    if rows and "step_ms" in rows[0]:  # compilefuse-bench --train
        from compilefuse.bench.training import TrainRow, format_rows

        return format_rows([TrainRow(**row) for row in rows])
    systems = [s for s in SYSTEMS if s in meta["systems"]]
    ratios = [(title, num, den) for title, num, den in RATIOS
              if num in systems and den({s: 1.0 for s in systems}) is not None]
    cases = list(dict.fromkeys((r["model"], r["batch_size"]) for r in rows))
    lines = [
        f"`{meta['command']}` ({meta['device']}, {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"{meta['date']})",
        "",
        "| model | batch | " + " | ".join(f"{s} ms" for s in systems) + "".join(f" | {t}" for t, _, _ in ratios)
        + " | BN folded |",
        "| --- | --- | " + " | ".join("---" for _ in systems) + " | ---" * len(ratios) + " | --- |",
    ]
    for model, batch in cases:
        by = {r["system"]: r for r in rows if (r["model"], r["batch_size"]) == (model, batch)}
        lat = {s: by[s]["latency_ms_median"] if s in by else None for s in systems}
        cells = [f"{lat[s]:.3g}" if lat[s] is not None else "failed" for s in systems]
        bn = by.get("bnfuse", by.get("export", {}))
        folded = f"{bn['bn_folded']}/{bn['bn_total']}" if bn.get("bn_total") is not None else "-"
        lines.append(
            f"| {model} | {batch} | " + " | ".join(cells)
            + "".join(f" | {ratio(lat.get(num), den(lat))}" for _, num, den in ratios) + f" | {folded} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summarize(path) for path in sys.argv[1:]))
