"""The benchmark scripts' pure parts: variant parsing (one caster with the CLI), summaries and report tables."""
import json
from pathlib import Path

import pytest

from benchmarks.compare import parse_variant, summarise
from benchmarks.labels import describe
from benchmarks.paired import comparisons, few_step_verdicts, reference_baseline
from benchmarks.report import markdown_table, reach_controls, render_block, update_readme
from diffusion_rl.config import Args
from diffusion_rl.errors import ConfigError


def test_parse_variant_casts_with_the_cli_caster():
    variant, args = parse_variant("td:estimator=td_lambda,n_steps=3,lmbda=0.25,stride=6", Args())
    assert variant.label == "td:estimator=td_lambda,n_steps=3,lmbda=0.25,stride=6"
    assert (args.method, args.estimator, args.n_steps, args.lmbda, args.stride) == ("td", "td_lambda", 3, 0.25, "6")
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        parse_variant("td:bogus=1", Args())
    with pytest.raises(ConfigError, match="n_steps='x' must be of type int"):
        parse_variant("td:n_steps=x", Args())
    with pytest.raises(ConfigError, match="key=value"):
        parse_variant("td:n_steps", Args())
    for key in ("data=x.npz", "seed=3", "n_samples=10", "nfe_grid=3", "method=td"):  # the grid sets these
        with pytest.raises(ConfigError, match=f"sets {key.partition('=')[0]}, which the grid sets for every run"):
            parse_variant(f"baseline:width=8,{key}", Args())
    assert parse_variant("baseline:width=8,batch_size=8", Args())[1].batch_size == 8


def test_a_variant_label_round_trips_and_names_its_parts():
    from benchmarks.variant import Variant

    for label in ("baseline", "td:stride=6", "tdoff:stride=6 @dpmpp_2m", "td:estimator=nstep,n_steps=2,full_reach=true"):
        assert Variant.parse(label).label == label
    v = Variant.parse("td:stride=6,coupling=mixed:6 @ipndm")
    assert (v.method, v.given, v.solver, v.base) == ("td", {"stride": "6", "coupling": "mixed:6"}, "ipndm",
                                                     "td:stride=6,coupling=mixed:6")
    assert v.on_solver("default").label == "td:stride=6,coupling=mixed:6" and not v.is_baseline
    args = Variant.parse("tdoff:stride=3,full_reach=false").args(Args())
    assert (args.method, args.stride, args.full_reach) == ("tdoff", "3", False)


def test_summary_and_table_give_mean_and_spread_over_seeds():
    recs = [{"variant": v, "nfe": 3, "metric": "fid", "value": x} for v, x in
            [("baseline", 70.0), ("baseline", 80.0), ("td", 40.0), ("td", 42.0)]]
    summary = summarise(recs)
    by = {s["variant"]: s for s in summary}
    assert by["baseline"]["mean"] == 75.0 and by["td"]["std"] == pytest.approx(1.41421356)
    table = markdown_table(summary, "fid")
    assert "| baseline | 75.0 ± 7.07 |" in table and "| td | 41.0 ± 1.41 |" in table
    unfinished = summarise(recs + [{"variant": "baseline", "nfe": 3, "metric": "fid", "value": 75.0},
                                   {"variant": "td:stride=1", "nfe": 3, "metric": "fid", "value": 60.0}])
    rows = markdown_table(unfinished, "fid").splitlines()[2:]  # rows over fewer seeds than the most name their count
    assert rows == ["| baseline | 75.0 ± 5.00 |", "| td (2 seeds) | 41.0 ± 1.41 |", "| td:stride=1 | 60.0 (1 seed) |"]


def _summary(rows):
    return summarise([{"variant": v, "nfe": n, "metric": "fid", "value": x} for v, n, x in rows])


def _grid(rows, seeds=(0, 1, 2), spread=(0.0, 0.5, -0.5), code="abc123"):
    """A compare JSON's runs and summary from (variant, nfe, value) rows: each seed's value is the row's plus
    `spread[seed]`, shared by every variant (so paired differences are exact)."""
    runs: dict[str, list[dict]] = {}
    for v, n, x in rows:
        for s in seeds:
            runs.setdefault(f"{v.partition(' @')[0]}|seed={s}", []).append(
                {"variant": v, "nfe": n, "metric": "fid", "value": x + spread[s], "seed": s, "code": code})
    return {"runs": runs, "summary": summarise([r for recs in runs.values() for r in recs]), "labels": {}}


def test_a_variant_wins_at_every_few_step_nfe_only_when_its_paired_interval_is_below_zero():
    rows = [("baseline", 3, 50.0), ("baseline", 9, 5.0), ("baseline", 35, 1.0),
            ("td", 3, 30.0), ("td", 9, 4.0), ("td", 35, 2.0),          # wins at 3 and 9; 35 is not a few-step NFE
            ("td:stride=6", 3, 30.0), ("td:stride=6", 9, 6.0),          # loses at 9
            ("baseline @ipndm", 3, 10.0), ("td @ipndm", 3, 12.0)]
    v = few_step_verdicts(comparisons(_grid(rows)))
    assert v["default"]["td"]["wins"] and v["default"]["td"]["nfes"] == [3, 9]
    assert not v["default"]["td:stride=6"]["wins"]
    assert not v["ipndm"]["td"]["wins"]  # each solver against the baseline under the same solver
    failing = few_step_verdicts(comparisons(_grid(rows)), fails={("default", 3)})  # cells where the solver fails
    assert failing["default"]["td"] == {"wins": True, "nfes": [9], "excluded": [3]}  # are left out, and named
    assert few_step_verdicts(comparisons(_grid(rows)), fails={("default", 3)}, include_failing=True)[
        "default"]["td"]["nfes"] == [3, 9]
    noisy = _grid(rows, spread=(0.0, 3.0, -2.5))  # td's seeds scatter around the same means: the interval spans 0
    noisy["runs"]["td|seed=1"] = [{**r, "value": r["value"] - 3.0 if r["nfe"] == 9 else r["value"]}
                                  for r in noisy["runs"]["td|seed=1"]]
    noisy["runs"]["td|seed=2"] = [{**r, "value": r["value"] + 5.0 if r["nfe"] == 9 else r["value"]}
                                  for r in noisy["runs"]["td|seed=2"]]
    assert not few_step_verdicts(comparisons(noisy))["default"]["td"]["wins"]  # lower in mean, not shown lower


def test_each_td_variant_is_set_against_its_own_baseline():
    bases = ["baseline:formulation=ct", "baseline:formulation=ict,target_tau=0"]
    assert reference_baseline("td:formulation=ict,target_tau=0 @ipndm", bases) == bases[1]
    assert reference_baseline("td:formulation=ct", bases) == bases[0]
    assert reference_baseline("td:stride=2", ["baseline", "baseline:formulation=ct"]) == "baseline"
    assert reference_baseline("td:formulation=vp", bases) is None
    with pytest.raises(ValueError, match="several baselines"):
        reference_baseline("td:formulation=ct,steps=9", ["baseline:formulation=ct", "baseline:steps=9"])
    # the iCT pair wins against its own baseline even though it loses to CT's, whatever order the rows come in
    rows = [("baseline:formulation=ct", 3, 10.0), ("baseline:formulation=ict", 3, 50.0),
            ("td:formulation=ict", 3, 40.0), ("td:formulation=ct", 3, 12.0)]
    for order in (rows, rows[::-1]):
        v = few_step_verdicts(comparisons(_grid(order)))["default"]
        assert v["td:formulation=ict"]["wins"] and not v["td:formulation=ct"]["wins"]


def test_labels_come_from_the_record_settings():
    td = {"method": "td-edm", "formulation": "edm", "estimator": "td_lambda", "n_steps": 3, "lmbda": 0.5,
          "stride": 2.0, "one_step": 0.1, "coupling": "markov", "reweighting": "edm", "target_rampup": 0.05}
    assert describe(td) == "TD(λ=0.5, n=3) k=2, δ 0.1, target ramp-up 0.05"
    assert describe({"method": "edm-baseline", "formulation": "edm"}) == "EDM baseline"
    assert describe({**td, "estimator": "nstep", "n_steps": 2, "one_step": 0.2, "target_rampup": None,
                     "coupling": "shared"}) == "n-step(2) k=2, shared coupling"
    ict = {"method": "td-ict", "formulation": "ict", "estimator": "td0", "stride": 1.0, "one_step": 0.25,
           "coupling": "shared", "reweighting": "pairwise", "target_tau": 0.0}  # iCT's own defaults go unnamed
    assert describe(ict) == "TD-ICT TD(0) k=1, target τ 0"
    assert describe({"method": "ict-baseline", "formulation": "ict", "target_tau": 0.0}) == "ICT baseline, target τ 0"


def test_readme_blocks_are_regenerated_from_the_json():
    stale = "<!-- report digits_td_vs_edm.json nfe=3,35 -->\n| stale |\n<!-- /report -->"
    fresh = update_readme(stale)
    assert "stale" not in fresh and fresh.endswith("<!-- /report -->")
    assert render_block("digits_td_vs_edm.json", " nfe=3,35") in fresh
    assert "| EDM baseline | 77.1 ± 1.28 † | 1.16 ± 0.23 |" in fresh  # Heun fails at NFE 3 even with the exact
    assert "\n\n† solver fails here: with the exact denoiser of a Gaussian fitted to digits" in fresh  # denoiser
    assert "†" not in render_block("digits_td_vs_edm.json", " nfe=17,35")  # no flagged cell, no footnote


def test_reach_controls_pair_each_nstep_variant_with_td0_at_n_times_the_stride():
    rec = lambda v, est, n, k: {"variant": v, "estimator": est, "n_steps": n, "stride": k}  # noqa: E731
    runs = {"a": [rec("td:estimator=nstep,n_steps=2,stride=2", "nstep", 2, 2.0)],
            "b": [rec("td:stride=4", "td0", 1, 4.0)], "c": [rec("td:stride=2", "td0", 1, 2.0)]}
    summary = _summary([("td:estimator=nstep,n_steps=2,stride=2", 3, 41.0), ("td:stride=4", 3, 42.0),
                        ("td:stride=2", 3, 40.0)])
    d = {"runs": runs, "summary": summary, "labels": {"td:estimator=nstep,n_steps=2,stride=2": "n-step(2) k=2",
                                                      "td:stride=4": "TD(0) k=4", "td:stride=2": "TD(0) k=2"}}
    table = reach_controls(d)
    assert "| n-step(2) k=2 | TD(0) k=4 | 41.0 (1 seed) vs 42.0 (1 seed) |" in table and "k=2 | TD(0) k=2" not in table


def test_reach_controls_pair_td_lambda_with_both_its_ends():
    """TD(lambda) over n steps at stride k is TD(0) at k when lambda = 0 and at n k when lambda = 1 (method.md §7)."""
    v = "td:estimator=td_lambda,n_steps=3,stride=2,lmbda=0.5"
    runs = {"a": [{"variant": v, "estimator": "td_lambda", "n_steps": 3, "stride": 2.0}],
            "b": [{"variant": "td:stride=6", "estimator": "td0", "n_steps": 1, "stride": 6.0}],
            "c": [{"variant": "td:stride=2", "estimator": "td0", "n_steps": 1, "stride": 2.0}],
            "d": [{"variant": "td:stride=3", "estimator": "td0", "n_steps": 1, "stride": 3.0}]}
    summary = _summary([(v, 3, 41.0), ("td:stride=6", 3, 42.0), ("td:stride=2", 3, 40.0), ("td:stride=3", 3, 39.0)])
    labels = {v: "TD(λ=0.5, n=3) k=2", "td:stride=6": "TD(0) k=6", "td:stride=2": "TD(0) k=2",
              "td:stride=3": "TD(0) k=3"}
    table = reach_controls({"runs": runs, "summary": summary, "labels": labels})
    assert "| TD(λ=0.5, n=3) k=2 | TD(0) k=2 | 41.0 (1 seed) vs 40.0 (1 seed) |" in table
    assert "| TD(λ=0.5, n=3) k=2 | TD(0) k=6 | 41.0 (1 seed) vs 42.0 (1 seed) |" in table
    assert "TD(0) k=3 |" not in table


def test_result_grid_shares_work_and_survives_killed_workers(tmp_path):
    import os
    import subprocess
    import sys

    from benchmarks.grid import ResultGrid

    path = tmp_path / "grid.json"
    a = ResultGrid(path, {"steps": 10}, "cmd")
    with pytest.raises(ConfigError, match="was made with settings"):  # refused before any run has finished
        ResultGrid(path, {"steps": 20}, "cmd")
    b = ResultGrid(path, {"steps": 10}, "cmd")
    assert a.claim("td|seed=0") and a.claim("td|seed=0")  # a worker may re-claim its own key
    assert not b.claim("td|seed=0")  # ... but no other worker may while it lives
    (path.parent / "grid.json.claims" / "td|seed=1").write_text(str(os.getppid()))  # a live PID, but no lock:
    assert b.claim("td|seed=1")  # a left-over claim file whose PID was reused by another process is no claim
    worker = ("import sys, time; from benchmarks.grid import ResultGrid; "
              "g = ResultGrid(sys.argv[1], {'steps': 10}, 'cmd'); assert g.claim('td|seed=2'); print('held', "
              "flush=True); time.sleep(60)")
    killed = subprocess.Popen([sys.executable, "-c", worker, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert killed.stdout.readline().strip() == "held"
    assert not b.claim("td|seed=2")  # a live worker runs it
    killed.kill()
    killed.wait()
    assert b.claim("td|seed=2")  # its worker was killed: taken over
    a.finish("td|seed=0", [{"variant": "td", "nfe": 3, "metric": "fid", "value": 1.0}])
    b.finish("td|seed=2", [{"variant": "td", "nfe": 3, "metric": "fid", "value": 3.0}])  # merged, not overwritten
    assert set(a.runs()) == {"td|seed=0", "td|seed=2"} and not a.claim("td|seed=0")
    summary = {(s["variant"], s["metric"]): s for s in json.loads(path.read_text())["summary"]}
    assert summary[("td", "fid")]["values"] == [1.0, 3.0]
    with pytest.raises(ConfigError, match="was made with settings"):
        ResultGrid(path, {"steps": 20}, "cmd")
    assert a.claim("td|seed=3") and not b.claim("td|seed=3")
    a.release("td|seed=3")  # its run failed: another worker may take it at once
    assert b.claim("td|seed=3") and not a.claim("td|seed=3")
    b.finish("td|seed=3", [])
    b.finish("td|seed=1", [])
    assert sorted(p.name for p in (path.parent / "grid.json.claims").iterdir()) == []  # every claim dropped


@pytest.mark.parametrize("variants,match", [
    (["td:stride=40"], "exceeds N-1 = 17 index units"),
    (["td:bogus=1"], "unknown option 'bogus'"),
    (["baseline:stride=3"], "applies to --method td only"),
])
def test_compare_refuses_bad_grids_before_any_training(tmp_path, variants, match):
    import subprocess
    import sys

    out = tmp_path / "grid.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--variants", "baseline", *variants,
                          "--steps", "5", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and match in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written: no results, lock or claims


def test_throughput_times_both_steps_and_the_target_forward_that_bounds_their_ratio():
    from benchmarks.throughput import ThroughputArgs, measure, synthetic_images

    a = ThroughputArgs(width=8, batch_size=16, repeats=2, warmup=1, sample_batch=4, nfe=3, device="cpu")
    row = measure(a, synthetic_images((1, 8, 8), n=64), "fp32", False)
    assert row["td_over_baseline"] == pytest.approx(row["td_step_s"] / row["baseline_step_s"])
    assert 0 < row["valid_fraction"] <= 1 and row["target_forward_s"] > 0
    assert row["td_over_baseline_floor"] == pytest.approx(1 + row["target_forward_s"] / row["baseline_step_s"])
    assert row["sample_nfe"] == 3 and row["sample_img_s"] > 0


def test_budget_curve_needs_three_budgets_and_the_default_solver_is_named_by_its_records(tmp_path):
    from benchmarks.labels import solver_name
    from benchmarks.plots import plot_vs_steps

    runs = {f"baseline:steps={n}|seed=0": [{"variant": f"baseline:steps={n}", "steps": n, "sampler": "ddim"}]
            for n in (100, 200, 400)}
    summary = _summary([(f"baseline:steps={n}", 35, 10.0 / n) for n in (100, 200, 400)])
    d = {"runs": runs, "summary": summary, "labels": {}}
    assert plot_vs_steps(d, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    assert solver_name(d, "default") == "DDIM" and solver_name(d, "dpmpp_2m") == "DPM-Solver++(2M)"
    del d["runs"]["baseline:steps=400|seed=0"]
    assert not plot_vs_steps(d, tmp_path / "b.png") and not (tmp_path / "b.png").exists()


def test_fid_speed_times_the_whole_inception_pipeline():
    from benchmarks.fid_speed import FIDSpeedArgs, run

    row = run(FIDSpeedArgs(shape="3,32,32", preset="cifar10", n_samples=2, nfe_grid="3", device="cpu"))  # gpu_check's
    assert set(row["sample_and_features_s"]) == {3} and row["reference_features_s"] > 0
    assert row["fid50k_total_s_scaled"] == pytest.approx(row["total_s"] * 25000)
    assert row["parameters"] > 50e6  # the cifar10 preset's network, not --width


def test_a_budget_curve_file_renders_with_its_budgets_in_the_labels(tmp_path, monkeypatch):
    from benchmarks import report

    monkeypatch.setattr(report, "ROOT", tmp_path)
    rec = lambda n, s, v: {"variant": f"baseline:steps={n}", "method": "edm-baseline", "steps": n, "seed": s,  # noqa
                           "nfe": 35, "metric": "fid", "value": v, "sampler": "heun", "data": "digits",
                           "device": "cuda (H200)" if n == 400 and s == 1 else "cpu"}
    runs = {f"baseline:steps={n}|seed={s}": [rec(n, s, 10.0 / n + s)] for n in (100, 200, 400) for s in (0, 1)}
    d = {"command": "compare --variants baseline:steps=100 baseline:steps=200 baseline:steps=400 --seeds 0 1 2 "
                    "--steps 200", "settings": {"steps": 200}, "runs": runs,
         "summary": summarise([r for recs in runs.values() for r in recs])}
    path = tmp_path / "plateau.json"
    path.write_text(json.dumps(d))
    text = report.file_section(path, tmp_path / "docs" / "plots")
    assert "100 / 200 / 400 training steps" in text
    assert "devices cpu (5 runs), cuda (H200) (1 run)" in text  # a grid filled on two devices says so
    assert "**Partial grid: 6 of 9 runs finished**" in text  # seed 2 is missing
    assert "| EDM baseline, 100 steps |" in text and "| EDM baseline, 200 steps |" in text
    assert (tmp_path / "docs" / "plots" / "plateau_fid_vs_steps.png").exists()
    assert not (tmp_path / "docs" / "plots" / "plateau_fid_over_baseline.png").exists()  # no TD rows to compare


def test_a_budget_grid_lists_its_rows_budget_by_budget_whatever_order_its_runs_finished_in(tmp_path):
    from benchmarks import report

    rec = lambda v, n, s: {"variant": f"{v}:steps={n}", "steps": n, "seed": s, "nfe": 3, "metric": "fid",  # noqa
                           "value": 1.0, "sampler": "heun", "data": "digits"}
    finished = [("td", 200, 0), ("baseline", 100, 1), ("baseline", 200, 0), ("td", 100, 10), ("td", 100, 2),
                ("baseline", 100, 0)]  # the order runs landed in: budgets and seeds interleaved
    runs = {f"{v}:steps={n}|seed={s}": [rec(v, n, s)] for v, n, s in finished}
    path = tmp_path / "budget.json"
    path.write_text(json.dumps({"command": "compare", "runs": runs,
                                "summary": summarise([r for recs in runs.values() for r in recs])}))
    d = report.load(path)
    assert list(d["runs"]) == ["td:steps=100|seed=2", "td:steps=100|seed=10", "baseline:steps=100|seed=0",
                               "baseline:steps=100|seed=1", "td:steps=200|seed=0", "baseline:steps=200|seed=0"]
    assert [s["variant"] for s in d["summary"]] == ["td:steps=100", "baseline:steps=100", "td:steps=200",
                                                     "baseline:steps=200"]


def test_one_seed_has_no_spread_to_show_or_to_win_beyond():
    from benchmarks.report import cell_text

    one = _grid([("baseline", 3, 50.0), ("td", 3, 30.0)], seeds=(0,))
    assert cell_text(one["summary"][0]) == "50.0 (1 seed)"
    (comp,) = comparisons(one)
    assert comp.cells[3].interval is None and comp.cells[3].a_lower == 1  # lower, but one seed shows no interval
    assert not few_step_verdicts([comp])["default"]["td"]["wins"]


def test_grid_order_and_sample_folders():
    from benchmarks.compare import run_order
    from benchmarks.variant import Variant

    def safe_name(label):
        return Variant.parse(label).folder()

    assert run_order([0, 1], ["a", "b"], "seed") == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert run_order([0, 1], ["a", "b"], "variant") == [(0, "a"), (1, "a"), (0, "b"), (1, "b")]
    assert safe_name("td:estimator=td_lambda,n_steps=3,lmbda=0.5") == "td@estimator=td_lambda+n_steps=3+lmbda=0.5"
    labels = ["td:coupling=mixed:6", "td:coupling=mixed_6", "td:a=1,b_c=2", "td:a=1_b_c=2", "td:x=a/b", "td@x", "td+x",
              "td%40x"]
    assert len({safe_name(v) for v in labels}) == len(labels)  # one folder per label
    assert all("/" not in safe_name(v) and ":" not in safe_name(v) for v in labels)


def test_gaussian_blur_keeps_mass_and_constants_and_spreads_by_sigma():
    import torch

    from benchmarks.metric_check import gaussian_blur

    flat = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)  # a constant image is unchanged (edges replicated)
    delta = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
    delta[..., 20, 20] = 1.0
    out = gaussian_blur(delta, 2.0)[0, 0]
    assert out.sum().item() == pytest.approx(1.0)
    var_rows = (out.sum(1) * (torch.arange(41) - 20.0) ** 2).sum().item()
    assert var_rows == pytest.approx(4.0, rel=0.02)  # the spread of a point is sigma^2 (truncated at 3 sigma)


def test_metric_calibration_renders_as_a_table_in_the_report_and_the_readme(tmp_path):
    from benchmarks.report import calibration_table, load

    rec = [{"data": d, "corruption": c, "seed": s, "n_samples": 10, "fid": v + s, "kid": 0.0}
           for d in ("digits", "mnist5k") for c, v in (("real images", 1.0), ("blur sigma 1 px", 30.0))
           for s in (0, 1)]
    summary = [{"data": d, "corruption": c, "metric": "fid", "n_seeds": 2, "mean": v + 0.5, "std": 0.7071}
               for d in ("digits", "mnist5k") for c, v in (("real images", 1.0), ("blur sigma 1 px", 30.0))]
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"command": "cmd", "kind": "metric_calibration", "summary": summary, "records": rec}))
    table = calibration_table(load(path))
    assert table.splitlines()[0] == "| real images scored as samples | digits | mnist5k |"
    assert "| blur sigma 1 px | 30.5 ± 0.71 | 30.5 ± 0.71 |" in table
    assert render_block(str(path), "") == table + "\n"


def test_sample_montage_tiles_the_saved_grids_of_one_seed(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np

    from benchmarks.plots import plot_sample_montage
    from benchmarks.report import sample_grid_rows

    grids = [("baseline", "default", 3), ("td@stride=6", "default", 3), ("td@stride=6", "ipndm", 5)]
    for variant, solver, nfe in grids:
        folder = tmp_path / "sg" / variant / "seed1" / solver / "samples"
        folder.mkdir(parents=True)
        plt.imsave(folder / f"m_nfe{nfe:03d}.png", np.zeros((8, 8)))
    summary = [{"variant": v, "nfe": 3, "metric": "fid"} for v in ("baseline", "td:stride=6", "td:stride=6 @ipndm")]
    d = {"command": f"compare --sample-grids {tmp_path / 'sg'} --out x.json", "summary": summary,
         "labels": {"baseline": "EDM baseline"}}
    rows, nfes = sample_grid_rows(d, seed=1)
    assert nfes == (3, 5) and [label for label, _ in rows] == [
        "EDM baseline, Heun (Euler at even NFE)", "td:stride=6, Heun (Euler at even NFE)", "td:stride=6, iPNDM"]
    assert rows[0][1][1] is None and rows[2][1][0] is None  # a budget a row lacks stays an empty panel
    plot_sample_montage(rows, tmp_path / "m.png")
    assert plt.imread(tmp_path / "m.png").shape[:2] == (630, 420)  # 3 rows x 2 NFE columns, 3 inches at 70 dpi
    assert sample_grid_rows(d, seed=0) == ([], ())  # no grids for that seed
    assert sample_grid_rows({**d, "command": "compare --out x.json"}, seed=1) == ([], ())
    assert len(sample_grid_rows({**d, "command": f"compare --sample-grids={tmp_path / 'sg'}"}, seed=1)[0]) == 3


def _gaussian_images(n: int = 400, side: int = 4, seed: int = 0):
    import torch

    from diffusion_rl.data import Dataset

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(side * side, side * side, generator=g, dtype=torch.float64) / side
    x = (torch.randn(n, side * side, generator=g, dtype=torch.float64) @ mix * 0.3).float()
    return Dataset(name="toy-images", x=x.reshape(n, 1, side, side), labels=None, num_classes=0, kind="image")


def test_gaussian_fit_denoiser_is_the_posterior_mean_and_its_bands_split_the_variance():
    import torch

    from benchmarks.solver_check import BANDS, GaussianFit

    ds = _gaussian_images()
    fit = GaussianFit(ds)
    cov = fit.basis @ torch.diag(fit.lam) @ fit.basis.T
    assert torch.allclose(cov, torch.cov(ds.x.reshape(len(ds.x), -1).double().T), atol=1e-10)  # the data's covariance
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64)
    flat = x.reshape(5, -1) - fit.mean
    # E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), solved directly
    expected = torch.stack([fit.mean + cov @ torch.linalg.solve(cov + s ** 2 * torch.eye(16, dtype=torch.float64), v)
                            for v, s in zip(flat, sigma)])
    assert torch.allclose(fit.denoiser()(x, sigma).reshape(5, -1), expected, atol=1e-10)
    total, above = fit.lam.sum().item(), 0.0  # walk the directions from the largest variance down
    for i in fit.lam.argsort(descending=True).tolist():
        for band, (lo, hi) in BANDS.items():
            expected = lo <= above / total < hi and fit.lam[i] > 0.002 ** 2
            assert bool(fit.bands[band][i]) == expected, (band, i)
        above += fit.lam[i].item()
    assert sum(int(m.sum()) for m in fit.bands.values()) > 0


def test_solver_check_converges_to_the_exact_ode_solution_and_catches_heuns_few_step_failure():
    from benchmarks.solver_check import score_solvers

    recs = {(r["sampler"], r["nfe"]): r for r in score_solvers(_gaussian_images(), ["ipndm", "heun"], [3, 5, 201],
                                                               n_samples=200, seed=0)}
    for sampler, tol in (("ipndm", 1e-3), ("heun", 5e-3)):  # Heun's last step, to sigma = 0, is Euler
        assert recs[sampler, 201]["error"] < tol
        assert recs[sampler, 201]["fine_amplitude"] == pytest.approx(1.0, abs=tol)
    assert recs["ipndm", 5]["error"] < recs["ipndm", 3]["error"] < 1.0
    assert recs["heun", 3]["error"] > 10  # the trapezoid from sigma 80 to 0.002 keeps about half the start noise
    assert recs["heun", 3]["sigmas"] == [80.0, 0.002, 0.0]


@pytest.mark.parametrize("samplers,nfe,n,match", [
    (["ddim"], "3", 10, "'ddim' is not an EDM-family sampler"),
    (["heun"], "3,4", 10, "nfe 4 is unreachable by heun"),
    (["ipndm"], "3,x", 10, "--nfe-grid '3,x' must be comma-separated integers"),
    (["ipndm"], "3", 1, "--n-samples 1 must be >= 2")])
def test_solver_check_refuses_bad_grids(samplers, nfe, n, match):
    from benchmarks.solver_check import check_grid

    with pytest.raises(ConfigError, match=match):
        check_grid(samplers, nfe, n)
    assert check_grid(["heun", "dpmpp_2m"], "3,5", 10) == [3, 5]


def test_solver_check_renders_one_row_per_data_set_and_sampler(tmp_path):
    from benchmarks.report import SOLVER_CHECK, load, results_page, solver_check_table

    recs = [{"data": d, "sampler": s, "nfe": n, "error": 0.5 / n, "fine_amplitude": 1.0 + n / 1000, "n_samples": 10,
             "sigmas": [80.0, 0.002, 0.0]} for d in ("digits", "mnist5k") for s in ("heun", "ipndm") for n in (3, 5)]
    path = tmp_path / "solver.json"
    path.write_text(json.dumps({"command": "cmd", "kind": SOLVER_CHECK, "bands": {"fine": [0.9, 0.99]},
                                "records": recs}))
    table = solver_check_table(load(path), "error").splitlines()
    assert table[0] == "| data, sampler | NFE 3 | NFE 5 |" and len(table) == 2 + 4
    assert table[2] == "| digits, Heun | 0.167 | 0.1 |"
    assert render_block(str(path), "metric=fine_amplitude").splitlines()[-1] == "| mnist5k, iPNDM | 1 | 1 |"
    with pytest.raises(ValueError, match=r"one of \['error', 'fine_amplitude'\], not 'finest_amplitude'"):
        render_block(str(path), "metric=finest_amplitude")
    page = results_page([], tmp_path, [(path, SOLVER_CHECK)])  # the appendix dispatch by kind
    assert "## solver.json" in page and "Amplitude of the fine detail" in page
    assert "80, 0.002, 0 (Heun NFE 3, Heun NFE 5, iPNDM NFE 3, iPNDM NFE 5)" in page


def test_expected_runs_counts_variants_seeds_and_the_budgets_scored_on_the_way():
    from benchmarks.report import expected_runs

    assert expected_runs("python -m benchmarks.compare --variants baseline td --seeds 0 1 2 --steps 5") == 6
    assert expected_runs("compare --variants baseline --seeds 0 1 2 --steps 6000 --score-at 750,1500,3000") == 12
    assert expected_runs("compare --variants baseline --seeds 0 --score-at=750") == 2
    assert expected_runs("compare --steps 5") is None


def test_scoring_a_run_on_its_way_leaves_its_training_unchanged():
    import torch

    from benchmarks.compare import score_run
    from benchmarks.variant import Variant
    from diffusion_rl.build import make_learner

    class Drawing:  # an evaluator whose scoring draws from the global random state, as KID's subsets do
        def sweep(self, net, method, step, out, device, progress):
            torch.randn(1000)
            return [{"nfe": 1, "metric": "sw2", "value": float(step)}]

    args = Args(data="8gaussians", method="baseline", steps=20, batch_size=32, dropout=0.1, progress=False)
    straight = make_learner(args)  # each learner seeds the global state as it is made: make, then train
    straight.out_dir = None
    list(straight.train(20, progress=False))
    scored = make_learner(args)
    scored.out_dir = None
    list(scored.train(10, progress=False))
    recs = score_run(scored, args, {"default": Drawing(), "ipndm": Drawing()}, Variant.parse("baseline").at_steps(10), None)
    list(scored.train(20, progress=False))
    assert [r["variant"] for r in recs] == ["baseline:steps=10", "baseline:steps=10 @ipndm"]
    assert recs[0]["steps"] == 10 and recs[0]["method"] == "edm-baseline"
    for a, b in zip(straight.denoiser.state_dict().values(), scored.denoiser.state_dict().values()):
        assert torch.equal(a, b)  # dropout drew the same masks after the scoring as without it


def test_a_run_key_round_trips_its_seed_and_a_variant_drops_one_option():
    from benchmarks.grid import run_key, run_seed
    from benchmarks.variant import Variant

    assert run_key("td:stride=6 @dpmpp_2m", 12) == "td:stride=6 @dpmpp_2m|seed=12"
    assert run_seed(run_key("td:stride=6", 12)) == 12
    v = Variant.parse("td:steps=750,stride=6 @ipndm")
    assert v.without("steps").label == "td:stride=6 @ipndm" and v.without("lmbda") == v
    assert Variant.parse("baseline:steps=750").without("steps").base == "baseline"


def test_score_at_labels_and_refusals():
    from benchmarks.compare import check_score_at
    from benchmarks.variant import Variant

    assert Variant.parse("td").at_steps(750).label == "td:steps=750"
    assert Variant.parse("td:stride=6").at_steps(750).label == "td:stride=6,steps=750"
    variants = [parse_variant(v, Args(steps=3000)) for v in ("baseline", "td:stride=6")]
    assert check_score_at("1500,750,750", 3000, variants) == [750, 1500]
    assert check_score_at("", 3000, variants + [parse_variant("td:shared_until=0.5", Args())]) == []
    with pytest.raises(ConfigError, match=r"--score-at \[3000\] must lie in \[1, 2999\]"):
        check_score_at("750,3000", 3000, variants)
    with pytest.raises(ConfigError, match="comma-separated step counts"):
        check_score_at("7a", 3000, variants)
    for bad, match in [("baseline:steps=100", "sets its own steps"),
                       ("td:formulation=ict", "follows a curriculum over the run's total steps"),
                       ("td:shared_until=0.5", "switches coupling at a fraction of the run's total steps")]:
        with pytest.raises(ConfigError, match=match):
            check_score_at("750", 3000, [parse_variant(bad, Args(steps=3000))])


def _compare(monkeypatch, *argv: str) -> dict:
    """Run benchmarks.compare in this process with `argv`; returns the grid file's runs."""
    import sys

    from benchmarks import compare

    out = argv[argv.index("--out") + 1]
    monkeypatch.setattr(sys, "argv", ["compare", *argv])
    compare.main()
    return json.loads(open(out).read())["runs"]


@pytest.mark.parametrize("argv,match", [
    (["--nfe-grid", "3,x"], "nfe grid '3,x' must be comma-separated positive integers"),
    (["--nfe-grid", "3,5,3"], r"nfe grid \[3, 5, 3\] repeats 3; give each value once"),
    (["--seeds", "0", "-1"], r"seed must be an integer in \[0, 2\^63\), got -1"),
    (["--samplers", "ddim"], "unknown sampler for formulation 'edm' 'ddim'"),
    (["--variants", "td:estimator=nstep,n_steps=6"], "n_steps=6 exceeds the 5 TD-valid strides")])
def test_compare_refuses_a_bad_grid_before_writing_anything(argv, match, tmp_path, monkeypatch):
    out = tmp_path / "grid.json"
    with pytest.raises(ConfigError, match=match):
        _compare(monkeypatch, "--data", "moons", "--steps", "2", "--n-samples", "8", *argv, "--out", str(out))
    assert not out.exists()


def test_score_at_restarts_without_losing_a_result_and_equals_separate_runs(tmp_path, monkeypatch):
    """A run scored on its way and killed after its first budget resumes: the budget already scored is kept (not
    scored twice), the rest is scored, and every result equals the separately trained run it is labelled as."""
    common = ["--data", "8gaussians", "--variants", "baseline", "--seeds", "0", "--n-samples", "64",
              "--nfe-grid", "2"]
    curve = tmp_path / "curve.json"
    full = _compare(monkeypatch, *common, "--steps", "8", "--score-at", "4", "--out", str(curve))
    assert set(full) == {"baseline:steps=4|seed=0", "baseline:steps=8|seed=0"}
    d = json.loads(curve.read_text())  # the kill: the run's last result never written
    kept = d["runs"].pop("baseline:steps=8|seed=0")
    d["runs"]["baseline:steps=4|seed=0"][0]["value"] = -1.0  # a mark that scoring it again would overwrite
    curve.write_text(json.dumps(d))
    resumed = _compare(monkeypatch, *common, "--steps", "8", "--score-at", "4", "--out", str(curve))
    assert resumed["baseline:steps=4|seed=0"][0]["value"] == -1.0  # kept, not scored again
    assert len(resumed) == 2
    assert [r["value"] for r in resumed["baseline:steps=8|seed=0"]] == [r["value"] for r in kept]
    for steps in (4, 8):  # each budget equals a plain run of that many steps
        plain = _compare(monkeypatch, *common, "--steps", str(steps), "--out", str(tmp_path / f"plain{steps}.json"))
        assert [r["value"] for r in plain["baseline|seed=0"]] == \
            [r["value"] for r in full[f"baseline:steps={steps}|seed=0"]]


def test_a_kept_model_rescored_by_evaluate_gives_the_grid_records(tmp_path, monkeypatch):
    """compare --keep-models saves each run's checkpoint; `diffusion-rl evaluate` on it, with the run's seed, sample
    count and solver, gives the grid's numbers, so new solvers can be scored later without retraining."""
    from benchmarks.variant import Variant
    from diffusion_rl.cli import main as cli

    (tmp_path / "file").write_text("")
    common = ["--data", "8gaussians", "--variants", "td:stride=2", "--seeds", "0", "--steps", "6",
              "--n-samples", "64", "--nfe-grid", "2,3", "--samplers", "default,ipndm"]
    with pytest.raises(ConfigError, match="--keep-models .* is a file, not a folder"):
        _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "file"), "--out", str(tmp_path / "g.json"))
    runs = _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "models"), "--out", str(tmp_path / "g.json"))
    checkpoint = tmp_path / "models" / Variant.parse("td:stride=2").folder() / "seed0" / "checkpoint.pt"
    for sampler, variant in (("", "td:stride=2"), ("ipndm", "td:stride=2 @ipndm")):  # '': Euler at 2, Heun at 3
        out = tmp_path / f"eval_{sampler}"
        assert cli(["evaluate", "--checkpoint", str(checkpoint), "--seed", "0", "--n-samples", "64", "--nfe-grid",
                    "2,3", "--sampler", sampler, "--out", str(out)]) == 0
        rescored = {(r["nfe"], r["metric"]): r["value"]
                    for r in json.loads((out / "results.json").read_text())["records"]}
        grid = {(r["nfe"], r["metric"]): r["value"] for r in runs["td:stride=2|seed=0"] if r["variant"] == variant}
        assert rescored == grid and {nfe for nfe, _ in grid} == {2, 3}


def test_from_models_scores_kept_models_as_the_grid_did_and_refuses_another_runs_model(tmp_path, monkeypatch):
    """compare --from-models: the kept models of a grid scored under its solvers give its records bit for bit, a new
    solver adds rows, a run with no kept model is skipped, and a checkpoint of another variant is refused."""
    import shutil

    from benchmarks.compare import kept_model as kept
    from benchmarks.variant import Variant

    def kept_model(folder, label, seed):
        return kept(folder, Variant.parse(label), seed)

    common = ["--data", "8gaussians", "--variants", "baseline", "td:stride=2", "--seeds", "0", "--steps", "6",
              "--n-samples", "64", "--nfe-grid", "3"]
    models = tmp_path / "models"
    grid = _compare(monkeypatch, *common, "--samplers", "default,dpmpp_2m", "--keep-models", str(models),
                    "--out", str(tmp_path / "grid.json"))
    kept_model(models, "baseline", 0).unlink()  # as if that run had been trained without --keep-models
    scored = _compare(monkeypatch, *common, "--samplers", "default,dpmpp_2m,dpmpp_2m_lof", "--from-models",
                      str(models), "--out", str(tmp_path / "rescored.json"))
    assert set(scored) == {"td:stride=2|seed=0"}
    value = lambda recs, v: {(r["nfe"], r["metric"]): r["value"] for r in recs if r["variant"] == v}  # noqa: E731
    for variant in ("td:stride=2", "td:stride=2 @dpmpp_2m"):
        assert value(scored["td:stride=2|seed=0"], variant) == value(grid["td:stride=2|seed=0"], variant)
    assert value(scored["td:stride=2|seed=0"], "td:stride=2 @dpmpp_2m_lof")
    assert all(r["train_seconds"] is None for r in scored["td:stride=2|seed=0"])
    assert {r["trained_code"] for r in scored["td:stride=2|seed=0"]} == {grid["td:stride=2|seed=0"][0]["code"]}
    shutil.copy(kept_model(models, "td:stride=2", 0), kept_model(models, "baseline", 0))  # the wrong run's model
    with pytest.raises(ConfigError, match="checkpoint config does not match"):
        _compare(monkeypatch, *common, "--from-models", str(models), "--out", str(tmp_path / "wrong.json"))
    with pytest.raises(ConfigError, match="holds none of this grid's finished models"):
        _compare(monkeypatch, *common, "--from-models", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match="takes neither --score-at nor --keep-models"):
        _compare(monkeypatch, *common, "--from-models", str(models), "--score-at", "3",
                 "--out", str(tmp_path / "y.json"))
    assert not (tmp_path / "wrong.json").exists() and not (tmp_path / "x.json").exists()


class _DiesAt6:
    """compare.make_learner wrapped: each learner checkpoints every 4 steps and, while `kill` is set, dies at step 6
    (KeyboardInterrupt); `trained` lists the steps it trained."""

    def __init__(self, make):
        self.make, self.kill, self.trained = make, False, []

    def __call__(self, args, **kw):
        learner = self.make(args, **kw)
        learner.config.checkpoint_every = 4
        update = learner.update

        def dies_at_6(batch, **kw):
            if learner.step == 6 and self.kill:
                raise KeyboardInterrupt
            self.trained.append(learner.step)
            return update(batch, **kw)
        learner.update = dies_at_6
        return learner


def test_a_run_killed_midway_resumes_from_its_kept_checkpoint_exactly(tmp_path, monkeypatch):
    """With --keep-models a run checkpoints on its way; killed midway, the same command resumes it from the last
    checkpoint, and its records equal those of an uninterrupted run."""
    from benchmarks import compare

    common = ["--data", "8gaussians", "--variants", "td:stride=2", "--seeds", "0", "--steps", "8",
              "--n-samples", "64", "--nfe-grid", "3"]
    learners = _DiesAt6(compare.make_learner)
    monkeypatch.setattr(compare, "make_learner", learners)
    whole = _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "a"), "--out", str(tmp_path / "a.json"))
    learners.kill = True
    with pytest.raises(KeyboardInterrupt):
        _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "b.json"))
    assert not (tmp_path / "b.json").exists() or not json.loads((tmp_path / "b.json").read_text())["runs"]
    learners.kill = False
    resumed = _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "b.json"))
    value = lambda runs: [(r["variant"], r["nfe"], r["metric"], r["value"]) for r in runs["td:stride=2|seed=0"]]  # noqa: E731
    assert value(resumed) == value(whole)
    assert {r["resumed_at_step"] for r in resumed["td:stride=2|seed=0"]} == {4}
    assert all("resumed_at_step" not in r for r in whole["td:stride=2|seed=0"])
    # a kept checkpoint is continued only by the code and budget that began it, refused before any training
    from benchmarks.variant import Variant

    folder = compare.kept_model(tmp_path / "b", Variant.parse("td:stride=2"), 0).parent
    made = json.loads((folder / compare.RUN_FILE).read_text())
    assert made == {"code": resumed["td:stride=2|seed=0"][0]["code"], "steps": 8, "variant": "td:stride=2", "seed": 0}
    longer = [x if x != "8" else "12" for x in common]
    with pytest.raises(ConfigError, match=r"trained by code .* for 8 steps"):
        _compare(monkeypatch, *longer, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "c.json"))
    monkeypatch.setattr(compare, "code_version", lambda: "0123456789ab")
    with pytest.raises(ConfigError, match=r"this command \(code 0123456789ab\) would continue"):
        _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "d.json"))
    (folder / compare.RUN_FILE).unlink()  # kept by an older version of the script
    with pytest.raises(ConfigError, match="no run.json: which code trained it is unknown"):
        _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "e.json"))
    assert not any((tmp_path / f).exists() for f in ("c.json", "d.json", "e.json"))


def test_a_run_scored_on_its_way_and_killed_resumes_past_its_scored_budgets(tmp_path, monkeypatch, capsys):
    """With --score-at and --keep-models a run checkpoints on its way too: killed after its first budget was scored,
    it resumes from its last checkpoint (past that budget, which it neither retrains nor rescores) and every record
    equals the uninterrupted run's. --from-models skips the unfinished model; a new --out on the same folder, which
    has no result for the budget the checkpoint passed, retrains the run from step 0."""
    from benchmarks import compare

    common = ["--data", "8gaussians", "--variants", "baseline", "--seeds", "0", "--steps", "8", "--score-at", "2",
              "--n-samples", "64", "--nfe-grid", "3"]
    learners = _DiesAt6(compare.make_learner)
    trained = learners.trained
    monkeypatch.setattr(compare, "make_learner", learners)
    whole = _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "a"), "--out", str(tmp_path / "a.json"))
    learners.kill = True
    with pytest.raises(KeyboardInterrupt):
        _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "b.json"))
    assert set(json.loads((tmp_path / "b.json").read_text())["runs"]) == {"baseline:steps=2|seed=0"}
    with pytest.raises(ConfigError, match="holds none of this grid's finished models"):  # step 4 of 8: not scored
        _compare(monkeypatch, *common[:8], *common[10:], "--from-models", str(tmp_path / "b"),  # no --score-at
                 "--out", str(tmp_path / "f.json"))
    assert "is at step 4 of 8: its run has not finished" in capsys.readouterr().err
    learners.kill, trained[:] = False, []
    resumed = _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "b.json"))
    assert trained == [4, 5, 6, 7]  # from the step-4 checkpoint, not from 0
    value = lambda recs: [(r["variant"], r["nfe"], r["metric"], r["value"]) for r in recs]  # noqa: E731
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert value(resumed[key]) == value(whole[key])
    assert {r["resumed_at_step"] for r in resumed["baseline:steps=8|seed=0"]} == {4}
    trained[:] = []  # the same kept folder, a new --out: its step-8 checkpoint is past budget 2, with no result
    again = _compare(monkeypatch, *common, "--keep-models", str(tmp_path / "b"), "--out", str(tmp_path / "c.json"))
    assert trained == list(range(8))  # retrained from step 0
    for key in whole:
        assert value(again[key]) == value(whole[key])


def test_code_version_names_the_commit_and_tells_two_uncommitted_trees_apart(tmp_path, monkeypatch):
    """A clean checkout is its commit; an edit to tracked code adds '+dirty-<hash>', different for different edits
    and equal for equal ones whatever the git diff settings; results files and untracked files do not count."""
    import subprocess

    from benchmarks.compare import code_version

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path is in no other checkout
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert code_version(tmp_path) == "unknown (no git checkout)"
    git = lambda *cmd: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t",  # noqa: E731
                                       "-c", "commit.gpgsign=false", *cmd], cwd=tmp_path, check=True,
                                      capture_output=True)
    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "grid.json").write_text("{}")
    git("add", ".")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short=12", "HEAD").stdout.decode().strip()
    (tmp_path / "benchmarks" / "results" / "grid.json").write_text('{"runs": {}}')
    (tmp_path / "new.py").write_text("untracked\n")
    assert code_version(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    two = code_version(tmp_path)
    (tmp_path / "code.py").write_text("a = 3\n")
    three = code_version(tmp_path)
    assert two.startswith(head + "+dirty-") and three.startswith(head + "+dirty-") and two != three
    (tmp_path / "code.py").write_text("a = 2\n")
    git("config", "diff.noprefix", "true")
    git("config", "diff.algorithm", "patience")
    assert code_version(tmp_path) == two
    (tmp_path / "code.py").unlink()
    assert code_version(tmp_path) not in (head, two, three)


def test_a_run_that_diverges_is_recorded_as_nan_and_the_grid_moves_on(tmp_path, monkeypatch):
    """A diverged run would diverge again from the same checkpoint on every restart and block the grid: it is
    recorded (nan at every solver and NFE, with the step and the error) and the next run goes on."""
    import math

    from benchmarks import compare
    from benchmarks.paired import comparisons, difference_text
    from diffusion_rl.training import NonFiniteLossError

    make = compare.make_learner

    def td_diverges(args, **kw):
        learner = make(args, **kw)
        if args.method == "td":
            def update(batch, **kw):
                raise NonFiniteLossError(f"non-finite loss at step {learner.step}")
            learner.update = update
        return learner

    monkeypatch.setattr(compare, "make_learner", td_diverges)
    runs = _compare(monkeypatch, "--data", "8gaussians", "--variants", "baseline", "td", "--seeds", "0", "1",
                    "--steps", "4", "--n-samples", "64", "--nfe-grid", "3,5", "--samplers", "default,dpmpp_2m",
                    "--out", str(tmp_path / "g.json"))
    assert set(runs) == {"baseline|seed=0", "td|seed=0", "baseline|seed=1", "td|seed=1"}
    td = runs["td|seed=1"]
    assert {(r["variant"], r["nfe"]) for r in td} == {(v, n) for v in ("td", "td @dpmpp_2m") for n in (3, 5)}
    assert all(math.isnan(r["value"]) and r["metric"] == "sw2" and r["diverged_at_step"] == 0 for r in td)
    assert all(math.isfinite(r["value"]) for r in runs["baseline|seed=1"] if r["metric"] == "sw2")
    d = json.loads((tmp_path / "g.json").read_text())
    d["labels"] = {}
    cell = comparisons(d, "sw2")[0].cells[3]
    assert cell.interval is None and difference_text(cell) == "nan (not finite), 0/2"


def test_ground_truth_records_split_the_error_and_are_refused_without_a_truth(tmp_path, monkeypatch):
    """compare --ground-truth on a gmm: data set adds, per solver and NFE, the error to the exact ODE solution and
    its solver and network parts, and per-level curves; a data set without a known distribution is refused first."""
    from benchmarks import compare

    monkeypatch.setattr(compare, "GT_SAMPLES", 32)
    common = ["--variants", "td", "--seeds", "0", "--steps", "4", "--n-samples", "64", "--nfe-grid", "3",
              "--samplers", "default,dpmpp_2m", "--ground-truth"]
    with pytest.raises(ConfigError, match="--ground-truth needs a data set with a known distribution, got 'digits'"):
        _compare(monkeypatch, "--data", "digits", *common, "--out", str(tmp_path / "no.json"))
    assert not (tmp_path / "no.json").exists()
    runs = _compare(monkeypatch, "--data", "gmm:digits", *common, "--out", str(tmp_path / "gt.json"))
    recs = {(r["variant"], r["metric"]): r for r in runs["td|seed=0"]}
    for variant, sampler in (("td", "heun"), ("td @dpmpp_2m", "dpmpp_2m")):
        total, solver, net = (recs[(variant, m)] for m in ("gt_error", "gt_solver_error", "gt_network_error"))
        assert total["sampler"] == sampler and total["nfe"] == 3 and total["method"] == "td-edm"
        assert min(total["value"], solver["value"], net["value"]) >= 0
        assert (variant, "gt_mode_tv") in recs and (variant, "gt_frechet") in recs
    curve = recs[("td", "gt_consistency_error")]["by_level"]
    assert len(curve["error"]) == len(curve["sigma"]) > 0
    assert recs[("td", "gt_denoiser_error")]["value"] > 0


@pytest.mark.parametrize("formulation", ["edm", "ct"])
def test_a_baselines_records_carry_no_td_settings(formulation):
    # the CT baseline has a target network but no TD term: its records must not claim TD's base-loss weight
    from benchmarks.compare import run_settings
    from diffusion_rl.build import make_learner

    args = Args(data="moons", formulation=formulation, progress=False)
    base, td = (run_settings(make_learner(args, method=m), args) for m in ("baseline", "td"))
    assert base["base_lambda"] is None and base["shared_until"] is None and base["estimator"] is None
    assert td["base_lambda"] == args.base_lambda and td["estimator"] == "td0"
    assert (base["target_tau"] is not None) == (formulation == "ct")
