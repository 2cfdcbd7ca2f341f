"""Markdown tables (mean +- std over seeds) from the JSON files `benchmarks.compare` writes.

    python -m benchmarks.report benchmarks/results/digits_td_vs_edm.json [--metric fid] [--nfe 1,3,5,9,35]

The README's result tables are pasted from this output, so every number there is the JSON's, rounded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(x: float) -> str:
    """3 significant digits, at most 2 decimals."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def markdown_table(summary: list[dict], metric: str = "fid", nfes: list[int] | None = None) -> str:
    rows = [s for s in summary if s["metric"] == metric]
    nfes = nfes or sorted({s["nfe"] for s in rows})
    lines = ["| variant | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for v in dict.fromkeys(s["variant"] for s in rows):
        cell = {s["nfe"]: f"{fmt(s['mean'])} ± {fmt(s['std'])}" for s in rows if s["variant"] == v}
        lines.append(f"| {v} | " + " | ".join(cell.get(n, "-") for n in nfes) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="JSON files written by benchmarks.compare")
    p.add_argument("--metric", default="fid", help="fid | kid | sw2 | ...")
    p.add_argument("--nfe", default="", help="comma-separated NFE columns (default: all)")
    a = p.parse_args()
    nfes = [int(n) for n in a.nfe.split(",") if n] or None
    for f in a.files:
        summary = json.loads(Path(f).read_text())["summary"]
        seeds = max(s["n_seeds"] for s in summary)
        print(f"{f} ({a.metric}, mean ± std over {seeds} seeds)\n\n{markdown_table(summary, a.metric, nfes)}\n")


if __name__ == "__main__":
    main()
