"""The command line: bad input exits 2 with a one-line message; train -> sample -> evaluate works end to end."""
import json
import re
from pathlib import Path

import pytest

from diffusion_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "imagenet"], "imagenet"),
    (["train", "--formulation", "flow"], "flow"),
    (["train", "--method", "ppo"], "ppo"),
    (["train", "--steps", "0"], "steps"),
    (["train", "--batch-size", "-4"], "batch_size"),
    (["train", "--nfe-grid", "1,x"], "1,x"),
    (["train", "--data", "8gaussians", "--conditional"], "labelled"),
    (["sample", "--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, refused, tmp_path):
    refused(argv + ["--out", str(tmp_path)] if argv[0] == "train" else argv, 2, needle)


def test_train_sample_evaluate_on_points(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "8gaussians", "--steps", "30", "--batch-size", "64", "--n-samples", "300",
                 "--nfe-grid", "2,5", "--out", str(out), "--no-progress"]) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert {(r["nfe"], r["metric"]) for r in recs} == {(2, "sw2"), (2, "energy"), (5, "sw2"), (5, "energy")}
    assert {r["sampler"] for r in recs} == {"euler", "heun"}
    for key in ("dataset", "data_hash", "n_samples", "reference", "feature_net", "seed", "training_steps",
                "wall_time_s", "command"):
        assert key in recs[0]
    assert (out / "sw2_vs_nfe.png").exists() and (out / "samples" / "edm-baseline_nfe005.png").exists()
    ckpt = out / "edm-baseline" / "checkpoint.pt"  # each method and formulation in its own folder
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(ckpt), "--nfe", "4", "--sampler", "heun",
                 "--out", str(tmp_path / "s.png")]) == 2  # a named sampler is never swapped for another
    assert "nfe 4 is unreachable by heun" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
    assert main(["sample", "--checkpoint", str(ckpt), "--nfe", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert "(euler, NFE 4)" in capsys.readouterr().out  # the default: Heun, Euler where Heun cannot land
    assert main(["sample", "--checkpoint", str(ckpt), "--nfe", "4", "--sampler", "euler", "--n", "16",
                 "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    assert np.load(tmp_path / "s.npz")["samples"].shape == (16, 2)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--nfe-grid", "3", "--n-samples", "100",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["records"][0]["training_steps"] == 30


def test_resume_continues_a_cli_run(tmp_path):
    args = ["train", "--data", "moons", "--steps", "10", "--batch-size", "32", "--no-eval", "--no-progress",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args[:4] + ["20"] + args[5:] + ["--resume"]) == 0
    assert not (tmp_path / "results.json").exists()  # --no-eval skipped the sweep
    lines = (tmp_path / "edm-baseline" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20
    assert main(args[:4] + ["20"] + args[5:] + ["--resume", "--batch-size", "16"]) == 2  # changes the run
    with pytest.warns(UserWarning, match="lr 0.01"):  # the learning rate may change on resume
        assert main(args[:4] + ["25"] + args[5:] + ["--resume", "--lr", "0.01"]) == 0


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    test_cmd = blocks[1].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    assert "diffusion-rl demo" in blocks[0]


def test_td_ct_from_the_command_line_uses_family_defaults(tmp_path):
    """--formulation ct --method td picks shared coupling, stride 1 and the pairwise weight (method.md §10)."""
    from diffusion_rl.build import make_learner
    from diffusion_rl.config import Args

    learner = make_learner(Args(data="moons", formulation="ct", method="td", out=str(tmp_path), device="cpu"))
    assert (learner.env.coupling, learner.env.stride, learner.reweighting) == ("shared", 1.0, "pairwise")
    assert main(["train", "--data", "moons", "--formulation", "ct", "--method", "td", "--steps", "5",
                 "--batch-size", "16", "--no-eval", "--no-progress", "--out", str(tmp_path)]) == 0
