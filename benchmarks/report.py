"""Render the committed benchmark JSON into docs/results.md, the tables quoted in the README and docs/, and plots.

    python -m benchmarks.report                    # docs/results.md + its plots, and every page's result blocks
    python -m benchmarks.report --blocks-only      # only the result blocks of README.md and docs/*.md
    python -m benchmarks.report FILE.json [--metric fid] [--nfe 3,5,9] [--plot out.png]   # one file's tables

Every table is mean ± std over seeds of a JSON written by `benchmarks.compare`, and every comparison is paired by
seed (`benchmarks.paired`: each TD variant against its baseline, its tdoff control and its equal-reach control;
mean difference, 95% interval, seeds won). A comparison of records made by different or unknown code versions is
refused unless allowed (`--mixed-code`, or `MIXED_CODE_FILES` for the committed files made before records carried
one); a (solver, NFE) cell where the solver fails with an exact denoiser (solver_check.json) is marked † and left
out of verdicts (`--include-failing-solvers` keeps it). README.md and the hand-written docs/*.md pages hold blocks

    <!-- report FILE.json [nfe=3,5,9] [variants=baseline;td:stride=2,n_steps=2;td+@dpmpp_2m] -->
    ...table...
    <!-- /report -->

(variants are separated by ';', since a variant holds commas; '+' stands for a space)

whose tables this script regenerates from FILE.json; tests/test_readme.py checks that every block equals what the
JSON gives, so no number quoted in the README or docs/ can drift from its JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from collections import Counter
from collections.abc import Collection
from pathlib import Path

from benchmarks.grid import run_seed
from benchmarks.labels import SOLVERS, describe, solver_name, solver_names, solvers_of, split_label
from benchmarks.paired import (FAILS_ABOVE, MixedCodeError, SolverRegime, UnfairPairError, block_footnote, code_note,
                               comparison_lines, fmt, md_table, nfe_header, regime_note, small_values, solver_regime)
from benchmarks.plots import plot_ratio_heatmap, plot_sample_montage, plot_vs_nfe, plot_vs_steps, plot_vs_stride
from benchmarks.variant import Variant

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"<!-- report (\S+)((?: \w+=\S+)*) -->\n(.*?)<!-- /report -->", re.S)
CALIBRATION = "metric_calibration"  # the "kind" of a benchmarks.metric_check JSON
SOLVER_CHECK = "solver_check"  # the "kind" of a benchmarks.solver_check JSON
GENERATED, GENERATED_PATH = "results.md", "docs/results.md"  # written whole by this script: it has no blocks
# committed grids whose records carry no code version, or several (filled before records named one, or across
# commits): their comparisons are rendered with a "code versions: mixed/unknown" note instead of being refused
MIXED_CODE_FILES = ("digits_ct_vs_td_ct.json", "digits_sweep.json", "digits_target_lag_4500.json",
                    "digits_td_vs_edm.json", "digits_td_vs_edm_solvers.json", "digits_vp_td_vs_ddpm.json",
                    "digits_vp_td_vs_ddpm_solvers.json", "mnist5k_sweep.json")


def cell_text(s: dict, small: bool = False) -> str:
    """'mean ± std' over seeds; one seed has no spread: 'value (1 seed)'."""
    if s.get("n_seeds", 2) == 1:
        return f"{fmt(s['mean'], small)} (1 seed)"
    return f"{fmt(s['mean'], small)} ± {fmt(s['std'], small)}"


def load(path: str | Path) -> dict:
    """A compare JSON with `labels`: base variant -> readable label (from its first record's settings)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = RESULTS / path
    d = json.loads(path.read_text())
    labels = {}
    records = [r for recs in d.get("runs", {}).values() for r in recs]
    budgets = {r.get("steps") for r in records} - {None}
    for r in records:  # where variants set their own budgets, every label names its budget
        label = describe(r) + (f", {r['steps']} steps" if len(budgets) > 1 else "")
        labels.setdefault(split_label(r["variant"])[0], label)
    d["labels"] = labels
    if len(budgets) > 1:
        _order_by_budget(d)
    return d


def _order_by_budget(d: dict) -> None:
    """A grid scored at several budgets lists its runs and summary rows budget by budget, each budget's variants in
    the order they first appear (records land in the order runs finish, which interleaves budgets and seeds)."""
    def key(label: str, first: dict[str, int]) -> tuple[int, int]:
        v = Variant.parse(label.partition("|")[0])
        return int(v.given.get("steps", 0)), first.setdefault(v.without("steps").base, len(first))

    first: dict[str, int] = {}
    d["runs"] = dict(sorted(d["runs"].items(), key=lambda kv: (*key(kv[0], first), run_seed(kv[0]))))
    d["summary"] = sorted(d["summary"], key=lambda s: key(s["variant"], first))  # stable: solvers keep their order


def markdown_table(summary: list[dict], metric: str = "fid", nfes: list[int] | None = None,
                   labels: dict[str, str] | None = None, variants: list[str] | None = None,
                   fails: Collection[tuple[str, int]] = ()) -> str:
    """One row per variant (in first-seen order, or `variants`' order), one column per NFE: 'mean ± std', with ' †'
    where (solver, NFE) is in `fails` (the solver fails there). A row over fewer seeds than the table's most (an
    unfinished grid) names its count: 'TD(0) k=1 (2 seeds)'."""
    rows = [s for s in summary if s["metric"] == metric]
    nfes = nfes or sorted({s["nfe"] for s in rows})
    lines = []
    most = max((s.get("n_seeds", 1) for s in rows), default=1)
    for v in variants or dict.fromkeys(s["variant"] for s in rows):
        base, solver = split_label(v)
        cell = {s["nfe"]: cell_text(s, small_values(metric)) + (" †" if (solver, s["nfe"]) in fails else "")
                for s in rows if s["variant"] == v}
        name = (labels or {}).get(base, base) + ("" if solver == "default" else f", {SOLVERS.get(solver, solver)}")
        seeds = max((s.get("n_seeds", 1) for s in rows if s["variant"] == v), default=most)
        name += f" ({seeds} seeds)" if 1 < seeds < most else ""  # one seed shows in every cell already
        lines.append([name] + [cell.get(n, "-") for n in nfes])
    return md_table(["variant"] + [nfe_header(n) for n in nfes], lines)


def reach_controls(d: dict, metric: str = "fid") -> str:
    """Markdown: each n-step(n) variant at stride k beside TD(0) at stride n k (the same reach, method.md §7), and
    each TD(lambda) over n steps at stride k beside both its ends, TD(0) at k (lambda = 0) and at n k (lambda = 1),
    under each solver; '' when the file has no such pair."""
    runs = {split_label(r["variant"])[0]: r for recs in d["runs"].values() for r in recs}
    td0 = {r["stride"]: v for v, r in runs.items() if r.get("estimator") == "td0"
           and re.fullmatch(r"td(:stride=[\d.]+)?", v)}
    ends = {"nstep": lambda r: [r["n_steps"] * r["stride"]],
            "td_lambda": lambda r: [r["stride"], r["n_steps"] * r["stride"]]}
    pairs = [(v, td0[k]) for v, r in runs.items() if r.get("estimator") in ends
             for k in ends[r["estimator"]](r) if k in td0]
    if not pairs:
        return ""
    rows = [s for s in d["summary"] if s["metric"] == metric]
    nfes = sorted({s["nfe"] for s in rows})
    cell = {(s["variant"], s["nfe"]): cell_text(s) for s in rows}
    lines = []
    for solver in solvers_of(d["summary"]):
        suffix = "" if solver == "default" else f" @{solver}"
        for v, ctrl in pairs:
            vals = [f"{cell.get((v + suffix, n), '-')} vs {cell.get((ctrl + suffix, n), '-')}" for n in nfes]
            lines.append([solver_name(d, solver), d["labels"][v], d["labels"][ctrl]] + vals)
    return md_table(["solver", "multi-step variant", "its control"] + [f"NFE {n}" for n in nfes], lines)


def command_option(command: str, option: str) -> str | None:
    """The value of `option` ('--sample-grids') in a command line ('--opt VALUE' or '--opt=VALUE'), or None."""
    tokens = shlex.split(command)
    for i, t in enumerate(tokens):
        if t == option and i + 1 < len(tokens):
            return tokens[i + 1]
        if t.startswith(option + "="):
            return t[len(option) + 1:]
    return None


def sample_grid_rows(d: dict, seed: int, nfes: tuple[int, ...] = (3, 5, 9),
                     variants: int = 2) -> tuple[list[tuple[str, list[Path | None]]], tuple[int, ...]]:
    """The PNGs that `compare --sample-grids` saved for one seed: one row (label, PNG per NFE) per solver of each of
    the file's first `variants` variants (the baseline and TD(0) in a compare grid) that has any, and the NFE columns
    that any row has."""
    folder = command_option(d["command"], "--sample-grids")
    if folder is None or not (ROOT / folder).is_dir():
        return [], ()

    rows = []
    for base in list(dict.fromkeys(split_label(s["variant"])[0] for s in d["summary"]))[:variants]:
        for solver in solvers_of(d["summary"]):
            pngs = [next((ROOT / folder / Variant.parse(base).folder() / f"seed{seed}" / solver / "samples").glob(
                f"*_nfe{n:03d}.png"), None) for n in nfes]
            if any(pngs):
                rows.append((d["labels"].get(base, base) + f", {solver_name(d, solver)}", pngs))
    keep = [j for j in range(len(nfes)) if any(pngs[j] for _, pngs in rows)]  # the budgets the grid evaluated
    return [(label, [pngs[j] for j in keep]) for label, pngs in rows], tuple(nfes[j] for j in keep)


def expected_runs(command: str) -> int | None:
    """The results a compare command line makes: variants x seeds, times 1 + the budgets of `--score-at` (each run
    is also scored on its way); None when it does not name both variants and seeds."""
    tokens, lists, key = shlex.split(command), {}, None
    for t in tokens:
        if t.startswith("--"):
            key = t
        elif key in ("--variants", "--seeds"):
            lists.setdefault(key, []).append(t)
    score_at = [x for x in (command_option(command, "--score-at") or "").split(",") if x.strip()]
    if len(lists) < 2:
        return None
    return len(lists["--variants"]) * len(lists["--seeds"]) * (1 + len(set(score_at)))


def exact_denoiser_check() -> list[dict] | None:
    """The records of benchmarks/results/solver_check.json (each solver's error with an exact denoiser), or None."""
    path = RESULTS / "solver_check.json"
    return json.loads(path.read_text())["records"] if path.is_file() else None


def regime(d: dict) -> SolverRegime:
    """Where the solvers of a compare JSON fail with an exact denoiser (`paired.solver_regime`)."""
    return solver_regime([r for recs in d.get("runs", {}).values() for r in recs], exact_denoiser_check())


def file_section(path: Path, plots: Path, mixed_code: bool = False, include_failing: bool = False) -> str:
    """docs/results.md's section for one compare JSON: provenance (code versions, solver regime), one table per
    solver, the paired comparisons and their verdict, plots. MixedCodeError when a comparison would mix code
    versions and `mixed_code` is False."""
    d = load(path)
    metric = "fid" if any(s["metric"] == "fid" for s in d["summary"]) else "sw2"
    name = str(path.relative_to(RESULTS) if path.is_relative_to(RESULTS) else path.name)
    reg = regime(d)
    fails = set(reg.fails)
    compared = comparison_lines(d, metric, solver_names(d), reg, name, mixed_code, include_failing)  # before plots
    first = next(iter(d["runs"].values()))[0]
    budgets = sorted({r.get("steps") for recs in d["runs"].values() for r in recs} - {None})
    seeds = sorted({run_seed(k) for k in d["runs"]})
    devices = Counter(recs[0].get("device") for recs in d["runs"].values())  # a grid filled on several says so
    device = (f"device {first.get('device')}" if len(devices) == 1
              else "devices " + ", ".join(f"{dev} ({n} run{'s' if n > 1 else ''})" for dev, n in devices.items()))
    out = [f"## {name}", "",
           f"`{d['command']}`", "",
           f"Data {first.get('data')}, {' / '.join(map(str, budgets)) or '?'} training steps of "
           f"{first.get('batch_size')} images, "
           f"width {first.get('width')}, {device}; {first.get('n_samples')} samples per NFE; "
           f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; {len(d['runs'])} "
           f"run{'s' if len(d['runs']) > 1 else ''}. {metric.upper()}, mean ± std over seeds.", "",
           code_note(d, compared=mixed_code and bool(compared)), "",
           regime_note(reg, SOLVERS, include_failing, verdicts=bool(compared)), ""]
    expected = expected_runs(d["command"])
    if expected and len(d["runs"]) < expected:  # a grid still being filled: say so, never pass it off as whole
        out[2:2] = [f"**Partial grid: {len(d['runs'])} of {expected} runs finished**; the same command resumes it.",
                    ""]
    if d.get("superseded_by"):  # kept for the record; a newer file holds the current code's numbers
        out[2:2] = [f"**Superseded by {d['superseded_by']}**: {d.get('superseded_note', '')}", ""]
    for solver in solvers_of(d["summary"]):
        variants = [v for v in dict.fromkeys(s["variant"] for s in d["summary"]) if split_label(v)[1] == solver]
        out += [f"**{solver_name(d, solver)}**", "", markdown_table(d["summary"], metric, None, d["labels"],
                                                                         variants, fails), ""]
    out += compared
    controls = reach_controls(d, metric)
    if controls:
        out += ["Multi-step estimators against their TD(0) controls (n-step(n) at stride k vs TD(0) at stride n k, "
                "the same reach; TD(lambda) over n steps vs both its ends, TD(0) at k and at n k; mean ± std):", "",
                controls, ""]
    plots.mkdir(parents=True, exist_ok=True)
    png = plots / f"{path.stem}_{metric}_vs_nfe.png"
    plot_vs_nfe(d, png, metric, fails)
    out += [f"![{metric} vs NFE]({png.relative_to(ROOT / 'docs').as_posix()})", ""]
    ratio_png = plots / f"{path.stem}_{metric}_over_baseline.png"
    if plot_ratio_heatmap(d, ratio_png, metric, fails):
        out += [f"![{metric} over the baseline's]({ratio_png.relative_to(ROOT / 'docs').as_posix()})", ""]
    stride_png = plots / f"{path.stem}_{metric}_vs_stride.png"
    if plot_vs_stride(d, stride_png, metric, fails):
        out += [f"![{metric} vs stride]({stride_png.relative_to(ROOT / 'docs').as_posix()})", ""]
    steps_png = plots / f"{path.stem}_{metric}_vs_steps.png"
    if plot_vs_steps(d, steps_png, metric, fails):
        out += [f"![{metric} vs training steps]({steps_png.relative_to(ROOT / 'docs').as_posix()})", ""]
    by_seed = {seed: sample_grid_rows(d, seed) for seed in seeds}
    seed = max(seeds, key=lambda s: (len(by_seed[s][0]), -s), default=None)  # the most rows, then the lowest seed
    if seed is not None and by_seed[seed][0]:
        rows, nfes = by_seed[seed]
        png = plots / f"{path.stem}_samples.png"
        plot_sample_montage(rows, png)
        out += [f"Samples of seed {seed}, the first 64 of those scored; columns: NFE {', '.join(map(str, nfes))}; "
                "rows: " + "; ".join(label for label, _ in rows) + ":", "",
                f"![samples, seed {seed}]({png.relative_to(ROOT / 'docs').as_posix()})", ""]
    return "\n".join(out)


def calibration_table(d: dict, metric: str = "fid") -> str:
    """A metric_check JSON as one row per corruption of real images, one column per data set: 'mean ± std'."""
    rows = [s for s in d["summary"] if s["metric"] == metric]
    sets = list(dict.fromkeys(s["data"] for s in rows))
    lines = []
    for name in dict.fromkeys(s["corruption"] for s in rows):
        cell = {s["data"]: cell_text(s) for s in rows if s["corruption"] == name}
        lines.append([name] + [cell.get(x, "-") for x in sets])
    return md_table(["real images scored as samples"] + sets, lines)


def appendix_head(path: Path) -> tuple[dict, list[str]]:
    """A metric_check or solver_check JSON and its docs/results.md section's heading (name and command); a file
    with no records raises ValueError."""
    d = load(path)
    if not d.get("records"):
        raise ValueError(f"{path} holds no records")
    return d, [f"## {path.name}", "", f"`{d['command']}`", ""]


def calibration_section(path: Path) -> str:
    """docs/results.md's section for a metric_check JSON."""
    d, head = appendix_head(path)
    first = d["records"][0]
    return "\n".join(head + [
        f"Real training images scored as if they were {first['n_samples']} generated samples (drawn with "
        f"replacement; every corruption and seed draws its own), with the evaluation protocol of the tables above; "
        f"{len({r['seed'] for r in d['records']})} seeds. FID, mean ± std:", "", calibration_table(d), ""])


def solver_check_table(d: dict, metric: str = "error") -> str:
    """A solver_check JSON as one row per (data set, sampler), one column per NFE: `metric` to 3 digits."""
    recs = d["records"]
    known = ["error"] + [f"{band}_amplitude" for band in d["bands"]]
    if metric not in known:
        raise ValueError(f"a solver_check table shows one of {known}, not {metric!r}")
    nfes = sorted({r["nfe"] for r in recs})
    lines = []
    for data, sampler in dict.fromkeys((r["data"], r["sampler"]) for r in recs):
        cell = {r["nfe"]: f"{r[metric]:.3g}" for r in recs if (r["data"], r["sampler"]) == (data, sampler)}
        lines.append([f"{data}, {SOLVERS.get(sampler, sampler)}"] + [cell.get(n, "-") for n in nfes])
    return md_table(["data, sampler"] + [f"NFE {n}" for n in nfes], lines)


def solver_check_section(path: Path) -> str:
    """docs/results.md's section for a solver_check JSON."""
    d, head = appendix_head(path)
    first = d["records"][0]
    grids: dict[tuple, list[str]] = {}  # each sigma grid of at most 10 points -> the (sampler, NFE) that use it
    for r in d["records"]:
        user = f"{SOLVERS.get(r['sampler'], r['sampler'])} NFE {r['nfe']}"
        if len(r["sigmas"]) <= 10 and user not in grids.setdefault(tuple(r["sigmas"]), []):
            grids[tuple(r["sigmas"])].append(user)
    out = head + [
        f"Each sampler with the exact denoiser of the Gaussian fitted to the data set, from {first['n_samples']} "
        "starts, against the exact solution of the probability-flow ODE (benchmarks/solver_check.py). Error: the RMS "
        "distance to the exact solution over the RMS distance of that solution from the data mean (0 = exact):", "",
        solver_check_table(d, "error"), ""]
    for band, (lo, hi) in d["bands"].items():
        upto = f"where they hold {hi * 100:g}%" if hi < 1 else "the last with more variance than sigma_min^2"
        out += [f"Amplitude of the {band} detail (eigen-directions ranked by variance, from where the larger ones hold "
                f"{lo * 100:g}% of the variance to {upto}): the samples' RMS size there over the exact solution's "
                "(1 = right; below 1 too smooth, above 1 too rough):", "", solver_check_table(d, f"{band}_amplitude"),
                ""]
    out += ["Sigma grids: " + "; ".join(f"{', '.join(f'{x:g}' for x in g)} ({', '.join(users)})"
                                        for g, users in grids.items()), ""]
    return "\n".join(out)


APPENDICES = {CALIBRATION: calibration_section, SOLVER_CHECK: solver_check_section}  # kind -> docs section
KIND_TABLES = {CALIBRATION: (calibration_table, "fid"), SOLVER_CHECK: (solver_check_table, "error")}


def results_page(files: list[Path], plots: Path, appendices: list[tuple[Path, str]] = (),
                 mixed_code: bool | Collection[Path] = (), include_failing: bool = False) -> str:
    """docs/results.md: a section per compare JSON in `files`, then one per (path, kind) in `appendices`
    (metric_check and solver_check JSON: how to read the numbers). `mixed_code`: the files whose comparisons may
    mix code versions (True: all of them)."""
    allowed = None if mixed_code is True else {Path(f).resolve() for f in mixed_code or ()}
    head = ["# Benchmark results", "",
            "Generated by `python -m benchmarks.report` from the JSON files in `benchmarks/results/` (do not edit by "
            "hand). Each file records the command that made it; each record carries its run's full settings. "
            "NFE 1-2 of the EDM family measure the untrained-at-that-budget regime, not quality (see \"Reading the "
            "results\" in [evaluation.md](evaluation.md#reading-the-results)). Comparisons are paired by seed: each TD "
            "variant against its baseline, its matched control (tdoff: the same batches, TD-valid mask and base-loss "
            "weights without the TD term) and, for a full-reach n-step variant, its equal-reach TD(0) control. The "
            "two sides of a comparison share the data and its split, the budget, batch, optimiser, network, "
            "precision and scoring (`SHARED_SETTINGS` in benchmarks/paired.py): a pair that differs is refused.", ""]
    return "\n".join(head + [file_section(f, plots, allowed is None or Path(f).resolve() in allowed, include_failing)
                             for f in files] + [APPENDICES[kind](f) for f, kind in appendices])


def render_block(spec: str, options: str) -> str:
    """The table of one README or docs block: `spec` the JSON file, options 'nfe=3,5 variants=baseline;td+@ipndm';
    a compare JSON's cells where the solver fails are marked †, with a footnote under the table."""
    opts = dict(o.split("=", 1) for o in options.split())
    d = load(spec)
    if d.get("kind") in KIND_TABLES:
        if set(opts) - {"metric"}:
            raise ValueError(f"report block for {spec} sets {sorted(set(opts) - {'metric'})}; a {d['kind']} table "
                             f"takes only metric=")
        table, default_metric = KIND_TABLES[d["kind"]]
        return table(d, opts.get("metric", default_metric)) + "\n"
    nfes = [int(n) for n in opts["nfe"].split(",")] if "nfe" in opts else None
    variants = [v.replace("+", " ") for v in opts["variants"].split(";")] if "variants" in opts else None
    metric = opts.get("metric", "fid")
    if "paired" in opts:  # 'paired=td;tdoff' (the A variants): their paired comparisons, optionally at nfe=
        return paired_block(d, metric, opts["paired"].split(";"), nfes)
    unknown = [v for v in variants or () if v not in {s["variant"] for s in d["summary"]}]
    if unknown:
        raise ValueError(f"report block for {spec} names variants {unknown} that the file does not hold")
    reg = regime(d)
    table = markdown_table(d["summary"], metric, nfes, d["labels"], variants, set(reg.fails))
    return table + "\n" + (f"\n{block_footnote(reg)}\n" if "†" in table else "")


def paired_block(d: dict, metric: str, a_variants: list[str], nfes: list[int] | None) -> str:
    """A block's table of the paired comparisons whose A is one of `a_variants` (at the NFEs `nfes`, default all),
    with the solver-regime footnote; comparisons mixing code versions are refused (MixedCodeError)."""
    from benchmarks.paired import comparisons, comparison_rows, md_table

    every = comparisons(d, metric)
    unknown = [v for v in a_variants if v not in {c.a for c in every}]
    if unknown:
        raise ValueError(f"report block: no paired comparison has A in {unknown}; the file's A variants are "
                         f"{sorted({c.a for c in every})}")
    comps = [c for c in every if c.a in a_variants]
    absent = [n for n in nfes or () if not any(n in c.cells for c in comps)]
    if absent:
        raise ValueError(f"report block: NFE {absent} not in these comparisons; they have "
                         f"{sorted({n for c in comps for n in c.cells if n is not None})}")
    if nfes is not None:
        comps = [dataclasses.replace(c, cells={n: p for n, p in c.cells.items() if n in nfes}) for c in comps]
    reg = regime(d)
    table = md_table(*comparison_rows(comps, d["labels"], solver_names(d), set(reg.fails), small_values(metric)))
    return table + "\n" + (f"\n{block_footnote(reg)}\n" if "†" in table else "")


def update_readme(text: str) -> str:
    """Every `<!-- report ... -->` block of a page's text regenerated from its JSON."""
    return BLOCK.sub(lambda m: f"<!-- report {m[1]}{m[2]} -->\n{render_block(m[1], m[2])}<!-- /report -->", text)


def block_pages() -> list[Path]:
    """README.md and every docs/*.md page except the generated results.md: the pages whose blocks are refreshed."""
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != GENERATED)]


def refresh_blocks(pages: list[Path] | None = None) -> list[Path]:
    """Regenerate the report blocks of `pages` (default: `block_pages()`) in place; the pages that changed."""
    changed = []
    for page in block_pages() if pages is None else pages:
        text = page.read_text()
        fresh = update_readme(text)
        if fresh != text:
            page.write_text(fresh)
            changed.append(page)
    return changed


def page_files(results: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The grids docs/results.md renders (the matched-control grids of trust/ first, GPU runs last; a grid still on
    its first run, with no finished run yet, left out) and its appendices with their kind (how to read the numbers)."""
    found = {f: json.loads(f.read_text()) for folder in ("trust/", "", "gpu/")
             for f in sorted(results.glob(f"{folder}*.json"))}
    return ([f for f, d in found.items() if d.get("runs")],
            [(f, d["kind"]) for f, d in found.items() if d.get("kind") in APPENDICES])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="JSON files written by benchmarks.compare (default: every committed "
                                            "one, into docs/results.md, and the blocks of README.md and docs/*.md)")
    p.add_argument("--metric", default="fid", help="fid | kid | sw2 | ...")
    p.add_argument("--nfe", default="", help="comma-separated NFE columns (default: all)")
    p.add_argument("--plot", default="", help="also write a plot of the (last) file's metric vs NFE here (.png)")
    p.add_argument("--mixed-code", action="store_true",
                   help="compare records of different or unknown code versions (refused by default, except in the "
                        "committed files of MIXED_CODE_FILES)")
    p.add_argument("--include-failing-solvers", action="store_true",
                   help=f"keep the (solver, NFE) cells where the solver's exact-denoiser error is above "
                        f"{FAILS_ABOVE:g} in the verdicts (left out by default)")
    p.add_argument("--blocks-only", action="store_true", help="only refresh the blocks of README.md and docs/*.md")
    a = p.parse_args()
    try:
        if a.files:
            nfes = [int(n) for n in a.nfe.split(",") if n] or None
            for f in a.files:
                d = load(f)
                reg = regime(d)
                table = markdown_table(d["summary"], a.metric, nfes, d["labels"], None, set(reg.fails))
                mixed = a.mixed_code or Path(f).resolve() in {(RESULTS / n).resolve() for n in MIXED_CODE_FILES}
                rest = comparison_lines(d, a.metric, solver_names(d), reg, str(f), mixed, a.include_failing_solvers)
                note = regime_note(reg, SOLVERS, a.include_failing_solvers, verdicts=bool(rest))
                print(f"{f} ({a.metric}, mean ± std over seeds)\n\n{table}\n\n{note}\n\n"
                      + "\n".join(rest))
                if a.plot:
                    plot_vs_nfe(d, Path(a.plot), a.metric, set(reg.fails))
            return
        if not a.blocks_only:
            files, appendices = page_files(RESULTS)
            allowed = True if a.mixed_code else [RESULTS / name for name in MIXED_CODE_FILES]
            (ROOT / GENERATED_PATH).write_text(results_page(files, ROOT / "docs" / "plots", appendices, allowed,
                                                            a.include_failing_solvers))
            print(f"wrote {GENERATED_PATH} ({len(files) + len(appendices)} files)")
        changed = refresh_blocks()
        print("refreshed the report blocks of " + (", ".join(str(c.relative_to(ROOT)) for c in changed) or
                                                   "no page (all were current)"))
    except (MixedCodeError, UnfairPairError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
