"""Paired comparisons in the report: the statistics by hand, who is set against whom, one code version per
comparison, the solver's own regime, and the blocks of README.md and docs/*.md."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.grid import summarise
from benchmarks.paired import (BASELINE, REACH, REWEIGHTED, TDOFF, MixedCodeError, UnfairPairError, code_note,
                               comparison_rows, comparisons, difference_text, pairs, regime_note, solver_regime)
from benchmarks.stats import A_LOWER, B_LOWER, NO_DIFFERENCE, paired

ROOT = Path(__file__).resolve().parents[1]
T_975_2 = 4.302652729911275  # Student t quantile 0.975 at 2 degrees of freedom (tables: 4.303)
T_975_1 = 12.706204736174696  # ... at 1 degree of freedom (tables: 12.71)


def test_paired_differences_mean_interval_and_counts_by_hand():
    p = paired({0: 11.0, 1: 22.0, 2: 33.0}, {0: 10.0, 1: 20.0, 2: 30.0})  # A - B = [1, 2, 3]: mean 2, sd 1
    assert p.seeds == (0, 1, 2) and p.differences == (1.0, 2.0, 3.0) and p.mean == 2.0
    half = T_975_2 * 1 / math.sqrt(3)
    assert p.interval == pytest.approx((2 - half, 2 + half))  # [-0.484, 4.484]: spans 0
    assert (p.a_lower, p.b_lower, p.ties, p.verdict) == (0, 3, 0, NO_DIFFERENCE)
    lower = paired({0: 7.0, 1: 8.0, 2: 6.0}, {0: 10.0, 1: 10.0, 2: 10.0})  # [-3, -2, -4]: mean -3, sd 1
    assert lower.interval == pytest.approx((-3 - half, -3 + half)) and lower.verdict == A_LOWER
    higher = paired({0: 13.0, 1: 12.0, 2: 14.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert higher.verdict == B_LOWER and higher.b_lower == 3
    two = paired({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})  # [1, 3]: mean 2, sd sqrt(2), half-width t(0.975, 1)
    assert two.interval == pytest.approx((2 - T_975_1, 2 + T_975_1))


def test_paired_uses_only_shared_seeds_counts_ties_and_has_no_interval_from_one_seed():
    p = paired({0: 1.0, 1: 5.0, 2: 3.0, 7: 0.0}, {0: 2.0, 1: 4.0, 2: 3.0, 3: 9.0})  # seeds 0, 1, 2: [-1, 1, 0]
    assert p.seeds == (0, 1, 2) and (p.a_lower, p.b_lower, p.ties) == (1, 1, 1) and p.mean == 0.0
    one = paired({4: 1.0}, {4: 3.0})
    assert one.interval is None and one.mean == -2.0 and one.a_lower == 1 and one.verdict == NO_DIFFERENCE
    with pytest.raises(ValueError, match="no seed in both"):
        paired({0: 1.0}, {1: 1.0})
    with pytest.raises(ValueError, match="confidence"):
        paired({0: 1.0}, {0: 1.0}, confidence=1.0)


def test_difference_text_bolds_a_shown_difference_and_names_the_seeds_won():
    assert difference_text(paired({0: 7.0, 1: 8.0, 2: 6.0}, {0: 10.0, 1: 10.0, 2: 10.0})) == \
        "**-3.00 [-5.48, -0.52], 3/3**"
    assert difference_text(paired({0: 11.0, 1: 22.0, 2: 33.0}, {0: 10.0, 1: 20.0, 2: 30.0})) == \
        "2.00 [-0.48, 4.48], 0/3"
    assert difference_text(paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 3.0})) == "-0.50 [-6.85, 5.85], 1/2 (1 tied)"
    assert difference_text(paired({0: 40.0}, {0: 77.0})) == "-37.0 (1 seed), 1/1"


def test_a_nan_or_infinite_value_gives_no_interval_instead_of_crashing_the_report():
    """A diverged sampler records nan FID; `statistics.stdev` raises on nan, which stopped the whole report."""
    nan, inf = float("nan"), float("inf")
    p = paired({0: nan, 1: 3.0, 2: 4.0}, {0: 2.0, 1: 2.0, 2: 2.0})
    assert p.interval is None and not p.finite and p.verdict == NO_DIFFERENCE
    assert (p.a_lower, p.b_lower, p.ties) == (0, 2, 0)  # the nan seed is none of them
    assert difference_text(p) == "nan (not finite), 0/3"
    assert paired({0: inf, 1: 3.0}, {0: 2.0, 1: 2.0}).interval is None
    assert paired({0: 3.0, 1: 4.0}, {0: 2.0, 1: 2.0}).finite
    rows = summarise([{"variant": "td", "nfe": 3, "metric": "fid", "value": v} for v in (nan, 3.0)]
                     + [{"variant": "td", "nfe": 5, "metric": "fid", "value": v} for v in (1.0, 3.0)])
    by_nfe = {r["nfe"]: r for r in rows}
    assert math.isnan(by_nfe[3]["std"]) and math.isnan(by_nfe[3]["mean"]) and by_nfe[3]["n_seeds"] == 2
    assert by_nfe[5]["std"] == pytest.approx(math.sqrt(2))


def _record(variant, seed, nfe, value, code="abc123", **settings):
    return {"variant": variant, "seed": seed, "nfe": nfe, "metric": "fid", "value": value, "code": code,
            "data": "digits", "formulation": "edm", "sampler": "ipndm", **settings}


def _file(runs):
    return {"runs": runs, "summary": summarise([r for recs in runs.values() for r in recs]), "labels": {}}


def test_each_td_variant_meets_its_baseline_its_tdoff_control_and_its_equal_reach_td0():
    nstep = "td:estimator=nstep,n_steps=2,full_reach=true"  # stride 3 by default: reach 6
    settings = {"baseline": {}, "td:stride=6": {"estimator": "td0", "stride": 6.0},
                "tdoff:stride=6": {"estimator": "td0", "stride": 6.0},
                "td:stride=2": {"estimator": "td0", "stride": 2.0},
                nstep: {"estimator": "nstep", "n_steps": 2, "stride": 3.0, "full_reach": True},
                "td:estimator=nstep,n_steps=2": {"estimator": "nstep", "n_steps": 2, "stride": 3.0,
                                                 "full_reach": False},
                "td:estimator=nstep,n_steps=3,full_reach=true,stride=2": {"estimator": "nstep", "n_steps": 3,
                                                                          "stride": 2.0, "full_reach": True}}
    runs = {f"{v}|seed={s}": [_record(v + " @ipndm", s, 3, 10.0 + s, **kw)] for v, kw in settings.items()
            for s in (0, 1)}
    found = pairs(_file(runs))
    assert ("td:stride=6", "tdoff:stride=6", TDOFF) in found and ("td:stride=2", "tdoff:stride=6", TDOFF) not in found
    assert (nstep, "td:stride=6", REACH) in found  # 2 steps at stride 3 against TD(0) at stride 6
    assert ("td:estimator=nstep,n_steps=3,full_reach=true,stride=2", "td:stride=6", REACH) in found  # 3 x 2
    assert not any(a == "td:estimator=nstep,n_steps=2" and kind == REACH for a, _, kind in found)  # not full reach
    assert all((a, "baseline", BASELINE) in found for a in settings if a.startswith("td:"))
    # a control is A only against the baseline, as "the reweighting alone", and never in a TD verdict
    assert [(a, b, kind) for a, b, kind in found if a.startswith("tdoff")] == [("tdoff:stride=6", "baseline",
                                                                                REWEIGHTED)]
    comps = comparisons(_file(runs))
    assert {c.solver for c in comps} == {"ipndm"} and all(c.cells[3].mean == 0.0 for c in comps)
    header, rows = comparison_rows(comps, {"td:stride=6": "TD(0) k=6"}, {"ipndm": "iPNDM"}, fails={("ipndm", 3)})
    assert header == ["solver", "A", "B", "B is A's", "NFE 3"]
    assert ["iPNDM", "TD(0) k=6", "tdoff:stride=6", TDOFF, "0.00 [0.00, 0.00], 0/2 (2 tied) †"] in rows


def test_a_pair_whose_runs_differ_in_a_shared_setting_is_refused_naming_the_setting():
    """td:lr=0.001 would otherwise be set against the plain baseline trained at another rate (the most specific
    baseline whose options it shares); what TD adds (stride, base-loss weights) may differ."""
    def grid(td_settings):
        runs = {f"baseline|seed={s}": [_record("baseline", s, 3, 1.0, lr=0.002, steps=1500)] for s in (0, 1)}
        runs |= {f"td:lr=0.001|seed={s}": [_record("td:lr=0.001", s, 3, 2.0, **td_settings)] for s in (0, 1)}
        return _file(runs)

    fair = {"lr": 0.002, "steps": 1500, "stride": 3.0, "base_lambda": 0.5}
    assert len(comparisons(grid(fair))) == 1
    with pytest.raises(UnfairPairError, match=r"td:lr=0.001 against baseline would compare runs that differ in lr "
                                              r"0.001 against 0.002"):
        comparisons(grid({**fair, "lr": 0.001}), where="grid.json")
    with pytest.raises(UnfairPairError, match="data 'mnist5k' against 'digits'"):
        comparisons(grid({**fair, "data": "mnist5k"}), mixed_code=True)  # allowing mixed code does not allow this
    assert len(comparisons(grid({**fair, "data": None}))) == 1  # a setting only one side names is not compared


def test_a_comparison_of_records_of_several_or_unknown_code_versions_is_refused_unless_allowed():
    def runs(codes):
        return {f"{v}|seed={s}": [_record(v, s, 3, 1.0 + s, code=codes[v, s])] for v in ("baseline", "td")
                for s in (0, 1)}

    one = {(v, s): "abc123" for v in ("baseline", "td") for s in (0, 1)}
    assert len(comparisons(_file(runs(one)))) == 1
    assert code_note(_file(runs(one))) == "Code version abc123 for every run."
    mixed = {**one, ("td", 1): "def456"}
    with pytest.raises(MixedCodeError, match=r"grid.json: td against baseline would compare records of code "
                                             r"versions abc123 \(3 records\), def456 \(1 records\).*--mixed-code"):
        comparisons(_file(runs(mixed)), where="grid.json")
    assert len(comparisons(_file(runs(mixed)), mixed_code=True)) == 1
    unknown = {**one, ("baseline", 0): None}  # older records carry no code: not known to be the same
    with pytest.raises(MixedCodeError, match=r"not recorded \(1 records\)"):
        comparisons(_file(runs(unknown)))
    note = code_note(_file(runs({**unknown, ("td", 0): "abc123+dirty"})), compared=True)
    assert note.startswith("**Code versions: mixed/unknown**: not recorded (1 run), abc123 (2 runs), abc123+dirty "
                           "(1 run); the comparisons below set them against each other")
    assert "abc123+dirty is uncommitted code (+dirty)" in note
    dirty = code_note(_file(runs({k: "abc123+dirty" for k in one})))
    assert dirty.startswith("Code version abc123+dirty for every run.") and "uncommitted" in dirty
    # rescored kept models (compare --from-models): the code that trained them counts too
    rescored = _file(runs(one))
    for key, recs in rescored["runs"].items():
        recs[0]["trained_code"] = "old999" if key == "td|seed=1" else "abc123"
    with pytest.raises(MixedCodeError, match=r"abc123 \(3 records\), old999 \(scored by abc123\) \(1 records\)"):
        comparisons(rescored)
    rescored["runs"]["td|seed=1"][0]["trained_code"] = None  # a model kept before run.json: training code unknown
    with pytest.raises(MixedCodeError, match=r"not recorded \(1 records\)"):
        comparisons(rescored)


def test_the_solver_regime_flags_cells_of_the_files_own_data_set_above_the_threshold():
    check = [{"data": data, "sampler": sampler, "nfe": nfe, "error": error}
             for data, sampler, nfe, error in [("digits", "heun", 3, 69.3), ("digits", "heun", 9, 0.4),
                                               ("digits", "ipndm", 3, 0.51), ("mnist5k", "ipndm", 3, 0.42),
                                               ("mnist5k", "heun", 9, 1.02)]]
    recs = [_record("td", 0, 3, 1.0, sampler="heun"), _record("td", 0, 9, 1.0, sampler="heun"),
            _record("td", 0, 2, 1.0, sampler="euler"), _record("td @ipndm", 0, 3, 1.0)]
    reg = solver_regime(recs, check)
    assert reg.fails == {("default", 3): ("heun", 69.3), ("ipndm", 3): ("ipndm", 0.51)}
    assert reg.unchecked == (("euler", 2),)  # the default solver at an even NFE is Euler: no exact-denoiser check
    names = {"heun": "Heun", "ipndm": "iPNDM", "euler": "Euler"}
    assert regime_note(reg, names) == (
        "† solver fails here: with the exact denoiser of a Gaussian fitted to digits, the solver's own error "
        "(solver_check.json, see [evaluation.md](evaluation.md)) is above 0.5: Heun at NFE 3 (69.3); iPNDM at NFE 3 "
        "(0.51). Those cells are left out of the verdicts. Not checked (solver_check.json has no entry): Euler at NFE 2.")
    assert "kept in the verdicts" in regime_note(reg, names, include_failing=True)
    assert "verdicts" not in regime_note(reg, names, verdicts=False)  # a file with no comparison has none
    mnist = solver_regime([{**r, "data": "mnist5k"} for r in recs], check)
    assert set(mnist.fails) == {("default", 9)}  # mnist5k's own check: iPNDM at NFE 3 is 0.42 off there
    none = solver_regime([{**r, "data": "cifar10"} for r in recs], check)
    assert none.fails == {} and "no exact-denoiser check for data cifar10" in none.reason
    vp = solver_regime([{**r, "formulation": "vp"} for r in recs], check)
    assert vp.fails == {} and "EDM formulation's grids only" in vp.reason
    assert "missing" in solver_regime(recs, None).reason


def test_committed_files_that_mix_code_versions_are_exactly_the_ones_allowed_to():
    """MIXED_CODE_FILES names every committed grid whose comparisons mix code versions, and no other: a new grid
    (one code version, which compare enforces) is compared without any allowance."""
    from benchmarks.report import MIXED_CODE_FILES, RESULTS, load

    refused = []
    for path in [*sorted(RESULTS.glob("*.json")), *sorted(RESULTS.glob("gpu/*.json"))]:
        d = load(path)
        if "runs" not in d:
            continue
        try:
            comparisons(d)
        except MixedCodeError:
            refused.append(str(path.relative_to(RESULTS)))
    assert sorted(refused) == sorted(MIXED_CODE_FILES)


def test_a_file_section_names_its_code_versions_and_refuses_to_mix_them_unless_allowed(tmp_path, monkeypatch):
    from benchmarks import report

    monkeypatch.setattr(report, "ROOT", tmp_path)
    runs = {f"{v}|seed={s}": [_record(v, s, n, x + s, code="abc123" if s else None, sampler="heun", batch_size=8,
                                      width=8, n_samples=10, steps=5, device="cpu",
                                      method="edm-baseline" if v == "baseline" else "td-edm",
                                      estimator="td0" if v == "td" else None, stride=3.0 if v == "td" else None)
                              for n, x in ((3, 50.0 if v == "baseline" else 30.0), (17, 2.0))]
            for v in ("baseline", "td") for s in (0, 1, 2)}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"command": "compare --variants baseline td --seeds 0 1 2", **_file(runs)}))
    with pytest.raises(MixedCodeError, match="grid.json: td against baseline"):
        report.file_section(path, tmp_path / "docs" / "plots")
    assert not (tmp_path / "docs" / "plots").exists()  # refused before any plot is drawn
    text = report.file_section(path, tmp_path / "docs" / "plots", mixed_code=True)
    assert "**Code versions: mixed/unknown**: not recorded (2 runs), abc123 (4 runs)" in text
    assert ("| Heun (Euler at even NFE) | TD(0) k=3 | EDM baseline | baseline | **-20.0 [-20.0, -20.0], 3/3** † |"
            in text)  # identical differences over seeds: an interval of width 0
    assert "- Heun (Euler at even NFE): **none** (NFE 3 left out: the solver fails there; no NFE left to judge)" in text
    assert "| EDM baseline | 51.0 ± 1.00 † | 3.00 ± 1.00 |" in text and "† solver fails here" in text
    kept = report.file_section(path, tmp_path / "docs" / "plots", mixed_code=True, include_failing=True)
    assert "- Heun (Euler at even NFE): TD(0) k=3\n" in kept  # asked to keep the failing cell: it wins there
    page = report.results_page([path], tmp_path / "docs" / "plots", mixed_code=[path])  # allowed by name
    assert "mixed/unknown" in page and "[evaluation.md](evaluation.md#reading-the-results)" in page


def test_blocks_are_refreshed_in_the_readme_and_the_docs_pages_but_not_the_generated_page(tmp_path, monkeypatch):
    from benchmarks import report

    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    stale = "intro\n<!-- report solver_check.json metric=error -->\n| stale |\n<!-- /report -->\nend\n"
    for name in ("README.md", "docs/findings.md", "docs/results.md"):
        (tmp_path / name).write_text(stale)
    (tmp_path / "docs" / "usage.md").write_text("no blocks\n")
    assert report.block_pages() == [tmp_path / "README.md", tmp_path / "docs" / "findings.md",
                                    tmp_path / "docs" / "usage.md"]
    changed = report.refresh_blocks()
    assert changed == [tmp_path / "README.md", tmp_path / "docs" / "findings.md"]
    assert "| digits, Heun | 69.3 |" in (tmp_path / "docs" / "findings.md").read_text()
    assert (tmp_path / "docs" / "results.md").read_text() == stale  # generated whole, never block-refreshed
    assert report.refresh_blocks() == []  # current pages are left untouched


def test_the_results_page_leaves_out_a_grid_with_no_finished_run(tmp_path):
    """A grid names its settings in its file when it opens: hours before its first run finishes, the page skips it."""
    from benchmarks.grid import ResultGrid
    from benchmarks.report import page_files

    (tmp_path / "trust").mkdir()
    ResultGrid(tmp_path / "trust" / "running.json", {"steps": 3000}, "cmd")
    done = ResultGrid(tmp_path / "done.json", {"steps": 10}, "cmd")
    done.finish("baseline|seed=0", [_record("baseline", 0, 3, 1.0)])
    (tmp_path / "solver_check.json").write_text(json.dumps({"kind": "solver_check"}))
    assert page_files(tmp_path) == ([tmp_path / "done.json"], [(tmp_path / "solver_check.json", "solver_check")])


def test_the_command_line_refuses_mixed_code_with_a_clear_error_and_takes_mixed_code(tmp_path):
    runs = {f"{v}|seed={s}": [_record(v, s, 3, 1.0 + s, code=f"c{s}")] for v in ("baseline", "td") for s in (0, 1)}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"command": "compare", **_file(runs)}))
    cmd = [sys.executable, "-m", "benchmarks.report", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "td against baseline would compare records of code versions c0" in res.stderr
    res = subprocess.run(cmd + ["--mixed-code"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "Paired comparisons" in res.stdout
    assert "0.00 [0.00, 0.00], 0/2 (2 tied)" in res.stdout
    committed = ROOT / "benchmarks" / "results" / "digits_td_vs_edm.json"  # in MIXED_CODE_FILES: code versions unknown
    res = subprocess.run([sys.executable, "-m", "benchmarks.report", str(committed)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "Paired comparisons" in res.stdout, res.stderr  # the files the page renders


def test_labels_name_the_matched_control_and_full_reach():
    from benchmarks.labels import describe

    td = {"method": "td-edm", "formulation": "edm", "estimator": "td0", "stride": 6.0, "one_step": 0.2,
          "coupling": "markov", "reweighting": "edm"}
    assert describe(td) == "TD(0) k=6"
    assert describe({**td, "method": "tdoff-edm"}) == "TD(0) k=6, TD term off"  # never the TD run's own label
    nstep = {**td, "estimator": "nstep", "n_steps": 2, "stride": 3.0}
    assert describe({**nstep, "full_reach": True}) == "n-step(2) k=3, full reach"
    assert describe({**nstep, "full_reach": False}) == "n-step(2) k=3"


def test_a_paired_block_renders_the_chosen_comparisons_at_the_chosen_nfes(tmp_path):
    """`<!-- report FILE paired=td nfe=5 -->` renders the paired table of the comparisons whose A is `td`, at NFE 5
    only: the README's paired numbers are checked against the JSON like its other tables."""
    import json

    from benchmarks.report import render_block

    td0 = {"estimator": "td0", "stride": 3.0}
    settings = {"baseline": {}, "td": td0, "tdoff": td0}
    values = {"baseline": 10.0, "td": 8.0, "tdoff": 10.5}
    runs = {f"{v}|seed={s}": [_record(v + " @ipndm", s, nfe, values[v] + s + nfe, **kw) for nfe in (5, 9)]
            for v, kw in settings.items() for s in (0, 1, 2)}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(_file(runs)))
    table = render_block(str(path), "paired=td nfe=5")
    lines = table.strip().splitlines()
    assert lines[0] == "| solver | A | B | B is A's | NFE 5 |" and len(lines) == 4  # header, rule, 2 comparisons
    assert "matched control" in table and "baseline" in lines[2] and "**-2.00 [-2.00, -2.00], 3/3**" in lines[2]
    assert "TD term off" not in lines[2]  # A is td; tdoff appears only as td's B
    with pytest.raises(ValueError, match="no paired comparison has A in"):
        render_block(str(path), "paired=td:stride=9")
    with pytest.raises(ValueError, match=r"no paired comparison has A in \['td:stride=9'\]"):
        render_block(str(path), "paired=td;td:stride=9")  # a misspelt name beside a good one is not dropped
    with pytest.raises(ValueError, match=r"NFE \[7\] not in these comparisons; they have \[5, 9\]"):
        render_block(str(path), "paired=td nfe=5,7")
