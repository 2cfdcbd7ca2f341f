"""Markdown tables (mean +- std over seeds) from the JSON files `benchmarks.compare` writes.

    python -m benchmarks.report benchmarks/results/digits_td_vs_edm.json [--metric fid] [--nfe 1,3,5,9,35]
        [--plot fid_vs_nfe.png]

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


def plot(summary: list[dict], path: str, metric: str = "fid", nfes: list[int] | None = None) -> None:
    """Mean +- std of `metric` against NFE, one line per variant, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["metric"] == metric and (not nfes or s["nfe"] in nfes)]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for v in dict.fromkeys(s["variant"] for s in rows):
        pts = sorted((s["nfe"], s["mean"], s["std"]) for s in rows if s["variant"] == v)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=v, linestyle="--" if "@" in v else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="JSON files written by benchmarks.compare")
    p.add_argument("--metric", default="fid", help="fid | kid | sw2 | ...")
    p.add_argument("--nfe", default="", help="comma-separated NFE columns (default: all)")
    p.add_argument("--plot", default="", help="also write a plot of the (last) file's metric vs NFE here (.png)")
    a = p.parse_args()
    nfes = [int(n) for n in a.nfe.split(",") if n] or None
    for f in a.files:
        summary = json.loads(Path(f).read_text())["summary"]
        seeds = max(s["n_seeds"] for s in summary)
        print(f"{f} ({a.metric}, mean ± std over {seeds} seeds)\n\n{markdown_table(summary, a.metric, nfes)}\n")
        if a.plot:
            plot(summary, a.plot, a.metric, nfes)


if __name__ == "__main__":
    main()
