"""Markdown tables from compilefuse-bench JSON files (what docs/benchmarks.md shows).

    python benchmarks/summarize.py benchmarks/results/bench_cpu_builtin.json [...]
"""

from __future__ import annotations

import json
import sys

SYSTEMS = ("eager", "inductor", "inductor-freezing", "bnfuse", "limit", "onnxruntime")


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def summarize(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["results"]
    systems = [s for s in SYSTEMS if s in meta["systems"]]
    cases = list(dict.fromkeys((r["model"], r["batch_size"]) for r in rows))
    lines = [
        f"`{meta['command']}` ({meta['device']}, {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"{meta['date']})",
        "",
        "| model | batch | " + " | ".join(f"{s} ms" for s in systems)
        + " | bnfuse / limit | bnfuse / freezing | bnfuse vs eager | bnfuse / ORT | BN folded |",
        "| --- | --- | " + " | ".join("---" for _ in systems) + " | --- | --- | --- | --- | --- |",
    ]
    for model, batch in cases:
        by = {r["system"]: r for r in rows if (r["model"], r["batch_size"]) == (model, batch)}
        lat = {s: by[s]["latency_ms_median"] if s in by else None for s in systems}
        cells = [f"{lat[s]:.3g}" if lat[s] is not None else "failed" for s in systems]
        bn = by.get("bnfuse", {})
        folded = f"{bn['bn_folded']}/{bn['bn_total']}" if bn.get("bn_total") is not None else "-"
        speedup = ratio(lat.get("eager"), lat.get("bnfuse"))
        lines.append(
            f"| {model} | {batch} | " + " | ".join(cells)
            + f" | {ratio(lat.get('bnfuse'), lat.get('limit'))} | {ratio(lat.get('bnfuse'), lat.get('inductor-freezing'))}"
            f" | {speedup}x | {ratio(lat.get('bnfuse'), lat.get('onnxruntime'))} | {folded} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summarize(path) for path in sys.argv[1:]))
