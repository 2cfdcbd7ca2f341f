"""Which runs of a grid the report sets against which, seed by seed, and what may be read from that.

A compare JSON's runs share their seeds (data order, initialisation, sampling noise), so two variants are compared
by their per-seed differences (`benchmarks.stats.paired`), never by two means and two stds. For each TD variant
(`td:...`, every solver, every NFE) the report pairs:

- its reference baseline (`reference_baseline`: the most specific `baseline` whose options it shares);
- its matched control `tdoff:<the same options>` (same batches, TD-valid mask and base-loss weights, no TD term),
  where the file holds one;
- for `td:estimator=nstep,n_steps=N,full_reach=true[,stride=K]`, its equal-reach control TD(0) at stride N K with
  the same other options (the same TD samples, the same reach; method.md §7).

Three guards keep a comparison honest:

- **one code version**: the records of a comparison must carry one known `code` (the commit `compare` ran);
  records of several or unknown versions are refused (`MixedCodeError`) unless the caller allows it (`mixed_code`);
- **shared settings**: A and B must agree on every setting of `SHARED_SETTINGS` that both name (data and its split,
  budget, batch, optimiser, network, precision, scoring); a pair that differs is refused (`UnfairPairError`), so a
  `td:lr=0.001` is never silently set against a `baseline` trained at another rate;
- **the solver's own regime**: a (solver, NFE) cell where the solver, given the exact denoiser of a Gaussian fitted
  to the data (`benchmarks/results/solver_check.json`), is more than `FAILS_ABOVE` off the ODE's solution is marked
  "solver fails here" and left out of verdicts unless asked (`include_failing`).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from benchmarks.stats import A_LOWER, NO_DIFFERENCE, PairedDifference, paired
from benchmarks.variant import Variant

__all__ = ["BASELINE", "FAILS_ABOVE", "FEW_STEP", "REACH", "SHARED_SETTINGS", "TDOFF", "Comparison",
           "MixedCodeError", "SolverRegime", "UnfairPairError", "block_footnote", "check_shared_settings",
           "code_note", "code_of", "comparison_lines", "comparison_rows", "comparisons", "difference_text",
           "few_step_verdicts", "fmt", "md_table", "nfe_header", "pairs", "per_seed", "reach_control",
           "reference_baseline", "regime_note", "small_values", "solver_regime"]

FEW_STEP = 9  # "wins everywhere" means at every NFE in [3, 9] (NFE 1-2: see docs/evaluation.md, "Reading the results")
FAILS_ABOVE = 0.5  # exact-denoiser error (solver_check.json) above which a (solver, NFE) cell is "solver fails here"
BASELINE, TDOFF, REACH = "baseline", "matched control", "equal-reach control"  # what B is to A
REWEIGHTED = "baseline (A: the reweighting alone)"  # a tdoff control against the baseline: the base-loss reweighting


# what both sides of a comparison must share wherever both records name it; what TD adds (stride, base-loss weights,
# target network) may differ, and the matched control shares those too by construction (`pairs`)
SHARED_SETTINGS = ("data", "data_hash", "split_key", "formulation", "preset", "training_steps", "batch_size", "lr",
                   "optimizer", "warmup_steps", "ema_halflife_images", "width", "depth", "dropout", "channel_mult",
                   "attention", "skip_scale", "hflip", "conditional", "train_precision", "float64", "precision",
                   "n_samples", "ct_steps", "lpips_substitute")


class MixedCodeError(ValueError):
    """A comparison would set records of different (or unknown) code versions against each other."""


class UnfairPairError(ValueError):
    """A comparison would set runs trained or scored with different shared settings against each other."""


@dataclass(frozen=True)
class Comparison:
    """A (TD variant) against B (its baseline or control) under one solver: the paired difference per NFE."""

    a: str
    b: str
    kind: str
    solver: str
    cells: dict[int, PairedDifference]


@dataclass(frozen=True)
class SolverRegime:
    """Where the solvers of a file fail with an exact denoiser: (solver, NFE) -> (sampler, its error); the
    (sampler, NFE) that solver_check.json has no entry for; and why nothing was checked, where nothing was."""

    data: str | None
    fails: dict[tuple[str, int], tuple[str, float]]
    unchecked: tuple[tuple[str, int], ...] = ()
    reason: str | None = None


def reference_baseline(variant: str, baselines: list[str]) -> str | None:
    """The baseline a TD variant is measured against: the most specific baseline whose options the variant shares
    (a grid of CT and iCT pairs 'td:formulation=ict' with 'baseline:formulation=ict', never with CT's); None when
    none matches. Two equally specific matches are an error, not a silent pick."""
    def options(v: str) -> dict[str, str]:
        return Variant.parse(v).given

    opts = options(variant)
    fits = [b for b in baselines if options(b).items() <= opts.items()]
    if not fits:
        return None
    most = max(len(options(b)) for b in fits)
    best = [b for b in fits if len(options(b)) == most]
    if len(best) > 1:
        raise ValueError(f"{variant!r} matches several baselines equally well: {best}; name the options that differ")
    return best[0]


def _first_records(d: dict) -> dict[str, dict]:
    """Base variant -> its first record (the run's settings)."""
    runs: dict[str, dict] = {}
    for recs in d.get("runs", {}).values():
        for r in recs:
            runs.setdefault(Variant.parse(r["variant"]).base, r)
    return runs


def reach_control(variant: str, runs: dict[str, dict]) -> str | None:
    """The equal-reach TD(0) control of a full-reach n-step variant (n steps at stride k: TD(0) at stride n k with
    the variant's other options), among `runs` (base variant -> a record); None for other variants or when the file
    has no such run. Two candidates are an error, not a silent pick."""
    r = runs[variant]
    if r.get("estimator") != "nstep" or not r.get("full_reach"):
        return None
    reach = r["n_steps"] * r["stride"]
    rest = {k: v for k, v in Variant.parse(variant).given.items()
            if k not in ("estimator", "n_steps", "full_reach", "stride")}
    found = []
    for u, s in runs.items():
        v = Variant.parse(u)
        if v.method != "td" or s.get("estimator") != "td0" or s.get("stride") is None:
            continue
        others = {k: x for k, x in v.given.items() if k not in ("stride", "estimator")}
        if math.isclose(s["stride"], reach) and others == rest:
            found.append(u)
    if len(found) > 1:
        raise ValueError(f"{variant!r} has several equal-reach TD(0) controls: {found}")
    return found[0] if found else None


def pairs(d: dict) -> list[tuple[str, str, str]]:
    """(A, B, what B is) for every TD variant of a compare JSON: its baseline, its tdoff control, its equal-reach
    control, each where the file holds it; and every tdoff control against its baseline (what the base-loss
    reweighting alone does). Base variants, without the solver."""
    runs = _first_records(d)
    parsed = {b: Variant.parse(b) for b in runs}
    baselines = [b for b, v in parsed.items() if v.is_baseline]
    out = []
    for b, v in parsed.items():
        if v.method == "tdoff":
            ref = reference_baseline(b, baselines)
            if ref is not None:
                out.append((b, ref, REWEIGHTED))
        if v.method != "td":
            continue
        ref = reference_baseline(b, baselines)
        if ref is not None:
            out.append((b, ref, BASELINE))
        out += [(b, u, TDOFF) for u, w in parsed.items() if w.method == "tdoff" and w.given == v.given]
        ctrl = reach_control(b, runs)
        if ctrl is not None:
            out.append((b, ctrl, REACH))
    return out


def per_seed(d: dict, metric: str) -> dict[tuple[str, int], dict[int, float]]:
    """(variant label with its solver, NFE) -> {seed: value} of `metric`; two records of one cell and seed are an
    error."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for recs in d.get("runs", {}).values():
        for r in recs:
            if r["metric"] != metric:
                continue
            cell = out.setdefault((r["variant"], r["nfe"]), {})
            if r["seed"] in cell:
                raise ValueError(f"two {metric} records of {r['variant']!r} at NFE {r['nfe']}, seed {r['seed']}")
            cell[r["seed"]] = r["value"]
    return out


def code_of(record: dict) -> str | None:
    """The commit a record was made by; None where it is unknown (older records, or made outside git). A record
    scored from a kept model (`trained_code`, compare --from-models) is of the code that trained it as much as of
    the one that scored it: 'T (scored by S)' when they differ, None when the training code is unknown."""
    def known(c: object) -> str | None:
        return None if not c or str(c).startswith("unknown") else str(c)

    code = known(record.get("code"))
    if code is None or "trained_code" not in record:
        return code
    trained = known(record["trained_code"])
    return None if trained is None else code if trained == code else f"{trained} (scored by {code})"


def _versions(counts: Counter) -> str:
    return ", ".join(f"{code or 'not recorded'} ({n} {unit})" for (code, unit), n in
                     sorted(counts.items(), key=lambda kv: (kv[0][0] is not None, kv[0][0] or "")))


def check_one_code(records: Iterable[dict], what: str) -> None:
    """MixedCodeError unless every record carries one and the same known code version."""
    counts = Counter((code_of(r), "records") for r in records)
    if len(counts) > 1 or (None, "records") in counts:
        raise MixedCodeError(f"{what} would compare records of code versions {_versions(counts)}; pass "
                             "mixed_code=True (--mixed-code on the command line) to compare them anyway")


def check_shared_settings(a: Iterable[dict], b: Iterable[dict], what: str) -> None:
    """UnfairPairError naming the settings of `SHARED_SETTINGS` where A's records and B's records, both naming the
    setting, hold different values."""
    def values(records: Iterable[dict]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for r in records:
            for k in SHARED_SETTINGS:
                if r.get(k) is not None:
                    out.setdefault(k, set()).add(repr(r[k]))
        return out

    va, vb = values(a), values(b)
    differ = [f"{k} {' / '.join(sorted(va[k]))} against {' / '.join(sorted(vb[k]))}"
              for k in SHARED_SETTINGS if k in va and k in vb and va[k] != vb[k]]
    if differ:
        raise UnfairPairError(f"{what} would compare runs that differ in {'; '.join(differ)}; add the control with "
                              "the same settings (e.g. baseline:lr=0.001 beside td:lr=0.001)")


def comparisons(d: dict, metric: str = "fid", mixed_code: bool = False, where: str = "") -> list[Comparison]:
    """Every pair of `pairs(d)` under every solver both ran, with the paired difference A - B at every NFE where
    they share a seed; ordered by solver, then pair. MixedCodeError (naming `where`, e.g. the file) when a
    comparison's records are of several or unknown code versions and `mixed_code` is False; UnfairPairError when
    its two sides differ in a shared setting (`check_shared_settings`)."""
    values = per_seed(d, metric)
    records: dict[str, list[dict]] = {}
    for recs in d.get("runs", {}).values():
        for r in recs:
            if r["metric"] == metric:
                records.setdefault(Variant.parse(r["variant"]).base, []).append(r)
    solvers = list(dict.fromkeys(Variant.parse(v).solver for v, _ in values))
    nfes = sorted({n for _, n in values})
    found: dict[tuple[str, str, str], list[Comparison]] = {}
    for solver in solvers:
        for a, b, kind in pairs(d):
            la, lb = Variant.parse(a).on_solver(solver).label, Variant.parse(b).on_solver(solver).label
            cells = {n: paired(values[la, n], values[lb, n]) for n in nfes
                     if (la, n) in values and (lb, n) in values and set(values[la, n]) & set(values[lb, n])}
            if cells:
                found.setdefault((a, b, kind), []).append(Comparison(a, b, kind, solver, cells))
    for a, b, _ in found:
        what = f"{where + ': ' if where else ''}{a} against {b}"
        check_shared_settings(records[a], records[b], what)
        if not mixed_code:
            check_one_code(records[a] + records[b], what)
    return sorted((c for cs in found.values() for c in cs), key=lambda c: solvers.index(c.solver))


def code_note(d: dict, compared: bool = False) -> str:
    """A sentence on the code versions of a file's runs: the one commit, or '**Code versions: mixed/unknown**' with
    the runs of each; a '+dirty' version is said to be uncommitted code. `compared`: the file's comparisons were
    allowed to mix them."""
    counts = _run_versions(d)
    codes = {c for c, _ in counts}
    dirty = sorted(c for c in codes if c and "+dirty" in c)
    dirty_text = (f" {', '.join(dirty)} {'is' if len(dirty) == 1 else 'are'} uncommitted code (+dirty): that commit "
                  "alone does not reproduce those runs." if dirty else "")
    if len(codes) == 1 and None not in codes:
        return f"Code version {next(iter(codes))} for every run.{dirty_text}"
    return (f"**Code versions: mixed/unknown**: {_versions(counts)}; "
            + ("the comparisons below set them against each other (allowed explicitly for this file)."
               if compared else "no comparison below mixes them.") + dirty_text)


def _run_versions(d: dict) -> Counter:
    """(code, 'run'/'runs') -> number of runs, one code per run (its first record's)."""
    per_run = Counter(code_of(recs[0]) for recs in d.get("runs", {}).values() if recs)
    return Counter({(code, "runs" if n > 1 else "run"): n for code, n in per_run.items()})


def solver_regime(records: Iterable[dict], check: list[dict] | None, threshold: float = FAILS_ABOVE,
                  source: str = "solver_check.json") -> SolverRegime:
    """Which (solver, NFE) cells of a file's `records` have a solver whose exact-denoiser error (the `check`
    records of a solver_check JSON, for the records' data set and sampler) is above `threshold`. solver_check runs
    EDM's grids, so only EDM-formulation records are looked up; `reason` says why none was, where none was."""
    records = list(records)
    data = sorted({str(r.get("data") or r.get("dataset")) for r in records})
    name = ", ".join(data) or None
    if check is None:
        return SolverRegime(name, {}, reason=f"{source} is missing: no cell is checked")
    errors = {(c["data"], c["sampler"], c["nfe"]): c["error"] for c in check}
    known = {k[0] for k in errors}
    if not set(data) & known:
        return SolverRegime(name, {}, reason=f"{source} has no exact-denoiser check for data {name}: no cell is "
                                             "flagged")
    forms = sorted({r.get("formulation") or "edm" for r in records} - {"edm"})
    if forms and all((r.get("formulation") or "edm") != "edm" for r in records):
        return SolverRegime(name, {}, reason=f"{source} checks the EDM formulation's grids only: this file's "
                                             f"{', '.join(forms)} solvers are not flagged")
    fails, unchecked = {}, []
    for r in records:
        if (r.get("formulation") or "edm") != "edm":
            continue
        key = (str(r.get("data") or r.get("dataset")), r.get("sampler"), r["nfe"])
        if key not in errors:
            unchecked.append((r.get("sampler"), r["nfe"]))
        elif errors[key] > threshold:
            fails[Variant.parse(r["variant"]).solver, r["nfe"]] = (r.get("sampler"), errors[key])
    return SolverRegime(name, dict(sorted(fails.items())), tuple(sorted(set(unchecked), key=str)))


def nfe_header(nfe: int | None) -> str:
    """A table's column name: 'NFE 5', or 'per run' for a metric of the network itself (the ground truth's
    denoiser and consistency errors carry no NFE)."""
    return "per run" if nfe is None else f"NFE {nfe}"


def few_step_verdicts(comps: list[Comparison], fails: Collection[tuple[str, int]] = (), max_nfe: int = FEW_STEP,
                      include_failing: bool = False) -> dict[str, dict[str, dict]]:
    """Per solver, each TD variant against its baseline at every NFE in [3, max_nfe]: 'wins' only when the paired
    interval lies below 0 at each such NFE it has ('nfes'), the cells in `fails` (solver fails here) left out and
    named ('excluded') unless `include_failing`; no NFE left is no win. A comparison with no NFE in [3, max_nfe]
    gets no verdict."""
    out: dict[str, dict[str, dict]] = {}
    for c in comps:
        if c.kind != BASELINE:
            continue
        few = [n for n in sorted(c.cells) if n is not None and 3 <= n <= max_nfe]  # (None: a per-run metric)
        if not few:  # a file scored at other budgets only (consistency models at NFE 1-2): no verdict to give
            continue
        excluded = [] if include_failing else [n for n in few if (c.solver, n) in fails]
        judged = [n for n in few if n not in excluded]
        out.setdefault(c.solver, {})[c.a] = {"wins": bool(judged) and all(c.cells[n].verdict == A_LOWER
                                                                           for n in judged),
                                             "nfes": judged, "excluded": excluded}
    return out


def small_values(metric: str) -> bool:
    """Whether a metric's values are small enough to need 3 significant digits below 1: the ground truth's errors
    (a consistency error of 0.0112) and the samples' RMS distance from the data mean (0.643); FID and the like keep
    2 decimals."""
    return metric.startswith("gt_") or metric in ("rms_from_mean", "sw2", "energy", "class_tv")


def fmt(x: float, small: bool = False) -> str:
    """A table's number: 3 significant digits with at most 2 decimals (12.3, 4.56, 0.43); with `small`, 3
    significant digits below 1 too (0.0112, 0.643)."""
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if small and 0 < abs(x) < 1 else f"{x:.2f}"


def difference_text(p: PairedDifference, small: bool = False) -> str:
    """'-3.10 [-5.20, -1.00], 3/3': the mean of A - B, its interval ('(1 seed)' without one, '(not finite)' when a
    seed's value is nan or infinite), and the seeds where A is lower out of those compared (ties named); bold when
    the interval excludes 0. `small`: see `fmt`."""
    f = lambda x: fmt(x, small)  # noqa: E731
    missing = " (1 seed)" if p.finite else " (not finite)"
    head = f(p.mean) + (f" [{f(p.interval[0])}, {f(p.interval[1])}]" if p.interval else missing)
    text = f"{head}, {p.a_lower}/{p.n}" + (f" ({p.ties} tied)" if p.ties else "")
    return text if p.verdict == NO_DIFFERENCE else f"**{text}**"


def comparison_rows(comps: list[Comparison], labels: dict[str, str], solver_names: dict[str, str],
                    fails: Collection[tuple[str, int]] = (), small: bool = False) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a table of `comps`: solver, A, B, what B is, then per NFE `difference_text` (with
    ' †' where the solver fails; `small`: see `fmt`)."""
    nfes = sorted({n for c in comps for n in c.cells})
    rows = [["none (the network alone)" if set(c.cells) == {None} else solver_names.get(c.solver, c.solver),
             labels.get(c.a, c.a), labels.get(c.b, c.b), c.kind]
            + [difference_text(c.cells[n], small) + (" †" if (c.solver, n) in fails else "") if n in c.cells else "-"
               for n in nfes] for c in comps]
    return ["solver", "A", "B", "B is A's"] + [nfe_header(n) for n in nfes], rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: a header row, its separator, then one line per row of cells."""
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
                     + ["| " + " | ".join(cells) + " |" for cells in rows])


def comparison_lines(d: dict, metric: str, solver_names: dict[str, str], regime: SolverRegime, where: str = "",
                     mixed_code: bool = False, include_failing: bool = False) -> list[str]:
    """Markdown lines: the paired comparisons of a compare JSON (with its `labels`) as a table, then the few-step
    verdict against the baselines; [] without comparisons. MixedCodeError when they would mix code versions and
    `mixed_code` is False."""
    comps = comparisons(d, metric, mixed_code, where)
    if not comps:
        return []
    fails = set(regime.fails)
    out = [f"Paired comparisons: A - B per seed over the seeds both ran ({metric.upper()}; below 0: A lower), mean "
           "[95% Student-t interval], seeds where A is lower / seeds compared; bold where the interval excludes 0; "
           "† the solver fails here:", "",
           md_table(*comparison_rows(comps, d["labels"], solver_names, fails, small_values(metric))), ""]
    verdict = few_step_verdicts(comps, fails, FEW_STEP, include_failing)
    if verdict:
        out += [f"TD variants whose paired 95% interval against their baseline lies below 0 at every NFE in "
                f"[3, {FEW_STEP}] (cells where the solver fails {'kept' if include_failing else 'left out'}):", ""]
        for solver, per in verdict.items():
            win = [d["labels"].get(v, v) for v, r in per.items() if r["wins"]]
            excluded = sorted({n for r in per.values() for n in r["excluded"]})
            left = ("" if not excluded else f" (NFE {', '.join(map(str, excluded))} left out: the solver fails there"
                    + ("; no NFE left to judge" if not any(r["nfes"] for r in per.values()) else "") + ")")
            out.append(f"- {solver_names.get(solver, solver)}: " + ("; ".join(win) if win else "**none**") + left)
        out.append("")
    return out


def regime_note(regime: SolverRegime, sampler_names: dict[str, str], include_failing: bool = False,
                verdicts: bool = True) -> str:
    """A file's sentence on its solvers' regime: the cells marked † (sampler, NFE, error), or why none is; whether
    those cells count in the file's verdicts, where it has any (`verdicts`)."""
    if regime.reason:
        return f"Solver regime: {regime.reason}."

    def cells(found: Iterable[tuple[str, int, str]]) -> str:  # (sampler, NFE, text) -> 'Heun at NFE 3 (69.3), 5 ...'
        by: dict[str, list[str]] = {}
        for sampler, nfe, text in sorted(found, key=lambda x: x[1]):
            by.setdefault(sampler_names.get(sampler, sampler), []).append(f"{nfe}{text}")
        return "; ".join(f"{name} at NFE {', '.join(ns)}" for name, ns in by.items())

    unchecked = ("" if not regime.unchecked else " Not checked (solver_check.json has no entry): "
                 + cells((s, n, "") for s, n in regime.unchecked) + ".")
    if not regime.fails:
        return (f"Solver regime: with the exact denoiser of a Gaussian fitted to {regime.data}, no solver here is more "
                f"than {FAILS_ABOVE:g} off the ODE's solution at these budgets (solver_check.json).{unchecked}")
    counted = ("" if not verdicts else " Those cells are kept in the verdicts (asked for)." if include_failing
               else " Those cells are left out of the verdicts.")
    failing = cells((sampler, nfe, f" ({error:.3g})") for (_, nfe), (sampler, error) in regime.fails.items())
    return (f"† solver fails here: with the exact denoiser of a Gaussian fitted to {regime.data}, the solver's own "
            f"error (solver_check.json, see [evaluation.md](evaluation.md)) is above {FAILS_ABOVE:g}: {failing}."
            + counted + unchecked)


def block_footnote(regime: SolverRegime) -> str:
    """The lines under a README or docs block whose table marks cells † (one paragraph, wrapped like the pages)."""
    return (f"† solver fails here: with the exact denoiser of a Gaussian fitted to {regime.data}, the solver's own "
            f"error at that NFE\nis above {FAILS_ABOVE:g} (benchmarks/results/solver_check.json).")
