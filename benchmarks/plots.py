"""The benchmark report's figures, drawn from a `benchmarks.compare` JSON: FID vs NFE, the ratio-to-baseline heat
map, FID vs the TD stride, the budget curve (FID vs training steps) and the sample montage. Cells where the solver
itself fails with an exact denoiser (`fails`, from benchmarks.paired's solver regime) are hatched or drawn pale."""
from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

from benchmarks.labels import is_baseline, solver_name, solvers_of, split_label
from benchmarks.paired import FAILS_ABOVE, reference_baseline
from benchmarks.variant import Variant


FAILS_HATCH = dict(facecolor="0.88", edgecolor="0.55", hatch="//", lw=0)  # how plots grey out "solver fails here"
FAILS_TITLE = f"hatched: solver fails here (exact-denoiser error > {FAILS_ABOVE:g})"


def plot_vs_nfe(d: dict, path: Path, metric: str = "fid", fails: Collection[tuple[str, int]] = ()) -> None:
    """FID vs NFE, one panel per solver, one line per variant (mean ± std over seeds), log axes; the baseline in
    thick black, up to 20 distinct colours and varying markers for the rest; the NFEs where the solver fails (the
    (solver, NFE) of `fails`) hatched grey."""
    plt = _pyplot()
    summary = [s for s in d["summary"] if s["metric"] == metric]
    solvers = solvers_of(summary)
    bases = list(dict.fromkeys(split_label(s["variant"])[0] for s in summary))
    colours = plt.get_cmap("tab20").colors
    style = {b: (colours[i % 20], "osD^v<>ph*"[i % 10]) for i, b in enumerate(x for x in bases if not is_baseline(x))}
    nfes = sorted({s["nfe"] for s in summary})
    fig, axes = plt.subplots(1, len(solvers), figsize=(6 * len(solvers), 4.8), squeeze=False, sharey=True)
    for ax, solver in zip(axes[0], solvers):
        for v in dict.fromkeys(s["variant"] for s in summary if split_label(s["variant"])[1] == solver):
            base = split_label(v)[0]
            pts = sorted((s["nfe"], s["mean"], s["std"]) for s in summary if s["variant"] == v)
            colour, marker = ("black", "o") if is_baseline(v) else style[base]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                        capsize=3, label=d["labels"].get(base, base), lw=2.5 if is_baseline(v) else 1.2,
                        color=colour, ms=4)
        failing = [n for n in nfes if (solver, n) in fails]
        for n in failing:
            ax.axvspan(n / 1.15, n * 1.15, zorder=0, **FAILS_HATCH)
        ax.set(xscale="log", yscale="log", xlabel="NFE",
               title=solver_name(d, solver) + (f"\n{FAILS_TITLE}" if failing else ""))
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"{metric.upper()} (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratio_heatmap(d: dict, path: Path, metric: str = "fid", fails: Collection[tuple[str, int]] = ()) -> bool:
    """Each variant's mean FID over the baseline's (same solver, same NFE), one panel per solver: blue cells (< 1) are
    wins, red cells losses; the numbers are the ratios; the columns where the solver fails (`fails`) hatched and
    marked †. False (nothing written) without a baseline."""
    summary = [s for s in d["summary"] if s["metric"] == metric]
    solvers = [sv for sv in solvers_of(summary)
               if any(is_baseline(s["variant"]) and split_label(s["variant"])[1] == sv for s in summary)]
    if not solvers:
        return False
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    mean = {(s["variant"], s["nfe"]): s["mean"] for s in summary}
    nfes = sorted({s["nfe"] for s in summary})
    bases = [b for b in dict.fromkeys(split_label(s["variant"])[0] for s in summary) if not is_baseline(b)]
    if not bases:  # a file of baselines only (a budget curve): nothing to set against the baseline
        return False
    baselines = [b for b in dict.fromkeys(split_label(s["variant"])[0] for s in summary) if is_baseline(b)]
    refs = {b: reference_baseline(b, baselines) for b in bases}
    fig, axes = plt.subplots(1, len(solvers), figsize=(1.1 * len(nfes) * len(solvers) + 3, 0.32 * len(bases) + 1.6),
                             squeeze=False, sharey=True)
    for ax, solver in zip(axes[0], solvers):
        suffix = "" if solver == "default" else f" @{solver}"
        grid = np.array([[mean.get((b + suffix, n), np.nan) / mean.get((f"{refs[b]}{suffix}", n), np.nan)
                          for n in nfes] for b in bases])
        im = ax.imshow(grid, cmap="RdBu_r", norm=LogNorm(vmin=0.5, vmax=2.0), aspect="auto")
        for i in range(len(bases)):
            for j in range(len(nfes)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        for j, n in enumerate(nfes):
            if (solver, n) in fails:
                ax.add_patch(Rectangle((j - 0.5, -0.5), 1, len(bases), fill=False, hatch="//", edgecolor="0.45", lw=0))
        ax.set_xticks(range(len(nfes)), [f"NFE {n}" + (" †" if (solver, n) in fails else "") for n in nfes],
                      fontsize=7)
        failing = any((solver, n) in fails for n in nfes)
        ax.set_title(f"{solver_name(d, solver)}: {metric.upper()} / baseline's"
                     + (f"\n† {FAILS_TITLE}" if failing else ""), fontsize=9)
    axes[0][0].set_yticks(range(len(bases)), [d["labels"].get(b, b) for b in bases], fontsize=7)
    bar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    bar.set_ticks([0.5, 0.7, 1.0, 1.4, 2.0], labels=["0.5", "0.7", "1", "1.4", "2"])
    bar.minorticks_off()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_vs_stride(d: dict, path: Path, metric: str = "fid", fails: Collection[tuple[str, int]] = ()) -> bool:
    """FID vs the TD(0) stride k (paper defaults otherwise), one line per NFE, the baseline as dashed lines, one
    panel per solver; an NFE where the solver fails (`fails`) drawn pale and dotted, its label saying so. False
    (nothing written) when the file has fewer than two TD(0) strides."""
    runs = {split_label(r["variant"])[0]: r for recs in d["runs"].values() for r in recs}
    td0 = {v: r["stride"] for v, r in runs.items() if re.fullmatch(r"td(:stride=[\d.]+)?", v)
           and r.get("estimator") == "td0"}
    if len(td0) < 2:
        return False
    plt = _pyplot()
    summary = [s for s in d["summary"] if s["metric"] == metric]
    solvers = solvers_of(summary)
    fig, axes = plt.subplots(1, len(solvers), figsize=(5.5 * len(solvers), 4.5), squeeze=False, sharey=True)
    for ax, solver in zip(axes[0], solvers):
        suffix = "" if solver == "default" else f" @{solver}"
        for i, nfe in enumerate(sorted({s["nfe"] for s in summary})):
            pts = sorted((td0[v], s["mean"], s["std"]) for v in td0 for s in summary
                         if s["variant"] == v + suffix and s["nfe"] == nfe)
            failing = (solver, nfe) in fails
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                               capsize=3, label=f"NFE {nfe}" + (" (solver fails here)" if failing else ""),
                               ls=":" if failing else "-", alpha=0.45 if failing else 1.0)
            base = [s for s in summary if s["variant"] == "baseline" + suffix and s["nfe"] == nfe]
            if base:
                ax.axhline(base[0]["mean"], ls="--", lw=1, color=line[0].get_color())
        ax.set(yscale="log", xlabel="TD(0) stride k (index units)", title=solver_name(d, solver))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"{metric.upper()} (dashed: the baseline)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_vs_steps(d: dict, path: Path, metric: str = "fid", fails: Collection[tuple[str, int]] = ()) -> bool:
    """FID vs training steps (a budget curve: is the baseline near its plateau, does a gap close?), one panel per
    solver, one colour per method and one marker per NFE, for files whose variants differ in `steps` (at least three
    budgets); an NFE where the solver fails (`fails`) drawn pale and dotted, its label saying so. False (nothing
    written) otherwise."""
    runs = {split_label(r["variant"])[0]: r for recs in d["runs"].values() for r in recs}
    steps = sorted({r["steps"] for r in runs.values()})
    if len(steps) < 3:
        return False
    plt = _pyplot()
    curves: dict[str, dict[tuple[str, int], list[tuple[int, float, float]]]] = {}  # solver -> (method, NFE) -> points
    for s in d["summary"]:
        if s["metric"] == metric:
            base, solver = split_label(s["variant"])
            curve = curves.setdefault(solver, {}).setdefault((Variant.parse(base).without("steps").base, s["nfe"]), [])
            curve.append((runs[base]["steps"], s["mean"], s["std"]))
    methods = list(dict.fromkeys(m for per in curves.values() for m, _ in per))
    nfes = sorted({n for per in curves.values() for _, n in per})
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (solver, per) in zip(axes[0], curves.items()):
        for (method, nfe), pts in sorted(per.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
            pts.sort()
            failing = (solver, nfe) in fails
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3,
                        color=f"C{methods.index(method)}", marker="osD^v<>"[nfes.index(nfe) % 7],
                        ls=":" if failing else "-", alpha=0.45 if failing else 1.0,
                        label=f"{method}, NFE {nfe}" + (" (solver fails here)" if failing else ""))
        ax.set(xscale="log", yscale="log", xlabel="training steps", ylabel=f"{metric.upper()} (mean ± std over seeds)",
               title=solver_name(d, solver))
        ax.set_xticks(steps, [str(x) for x in steps])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sample_montage(rows: list[tuple[str, list[Path | None]]], path: Path) -> None:
    """The sample grids of `sample_grid_rows` tiled, one row each (their PNGs carry their own titles)."""
    plt = _pyplot()
    cols = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 3 * len(rows)), squeeze=False)
    for ax_row, (_, pngs) in zip(axes, rows):
        for ax, png in zip(ax_row, pngs):
            if png is not None:
                ax.imshow(plt.imread(png))
            ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=70)
    plt.close(fig)
