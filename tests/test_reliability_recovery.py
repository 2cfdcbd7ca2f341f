"""Reliability, round three: --overwrite deletes only what the library wrote (a manifest per folder), a Python learner
refuses another run's folder, and crashes around results and logs (torn results.json, bytes that are not UTF-8 in
metrics.jsonl, SIGTERM, a full disk seen by torch.save) lose nothing and end in one line."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_rl.cli import main
from diffusion_rl.errors import ConfigError

MOONS = ["--data", "moons", "--batch-size", "16", "--no-progress"]
EVAL = ["--n-samples", "50", "--nfe-grid", "3"]  # a small evaluation: results.json, a plot and a sample grid


def train(out, *extra, steps=4, evaluate=False):
    return main(["train", *MOONS, "--steps", str(steps), *(EVAL if evaluate else ["--no-eval"]), "--out", str(out),
                 *extra])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- group 1: --overwrite deletes only what it owns ----------------------------------------------------------------
@pytest.mark.parametrize("into", ["run", "learner folder"])
def test_evaluate_overwrite_keeps_the_checkpoint_it_reads(tmp_path, into):
    run = tmp_path / "run"
    assert train(run, evaluate=True) == 0
    ckpt = run / "edm-baseline" / "checkpoint.pt"
    out = run if into == "run" else run / "edm-baseline"
    training = {p: p.read_bytes() for p in (ckpt, run / "edm-baseline" / "metrics.jsonl")}
    argv = ["evaluate", "--checkpoint", str(ckpt), "--n-samples", "50", "--out", str(out), "--overwrite"]
    assert main([*argv, "--nfe-grid", "3"]) == 0
    assert all(p.read_bytes() == data for p, data in training.items())  # the evaluated run is intact
    assert (out / "samples" / "edm-baseline_nfe003.png").exists()
    assert main([*argv, "--nfe-grid", "5"]) == 0  # replaces its own outputs: the NFE-3 grid goes
    assert not (out / "samples" / "edm-baseline_nfe003.png").exists()
    assert (out / "samples" / "edm-baseline_nfe005.png").exists()
    assert {r["nfe"] for r in json.loads((out / "results.json").read_text())["records"]} == {5}
    assert all(p.read_bytes() == data for p, data in training.items())


def test_overwrite_keeps_files_the_library_did_not_write(tmp_path):
    mine = {"samples/mine.png": b"my grid", "tensorboard/events.out.mine": b"my events", "fid_vs_nfe.png": b"my plot",
            "notes.txt": b"my notes", "edm-baseline/samples/x.png": b"mine too"}
    for rel, data in mine.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    assert train(tmp_path, "--overwrite", steps=2) == 0
    assert all((tmp_path / rel).read_bytes() == data for rel, data in mine.items())
    assert (tmp_path / "edm-baseline" / "checkpoint.pt").exists()


def test_overwrite_keeps_a_sibling_run_and_replaces_its_own(tmp_path):
    assert train(tmp_path / "runA", evaluate=True) == 0
    sibling = snapshot(tmp_path / "runA")
    assert {"results.json", "sw_vs_nfe.png"} & {p.name for p in sibling} and any(
        p.parts[0] == "samples" for p in sibling)
    assert train(tmp_path, "--overwrite", evaluate=True, steps=2) == 0  # P holds runA: --overwrite is needed
    own = {p for p in snapshot(tmp_path) if p.parts[0] != "runA"}
    assert train(tmp_path, "--overwrite", steps=3) == 0  # replaces its own run, results and grids
    assert snapshot(tmp_path / "runA") == sibling
    left = {p for p in snapshot(tmp_path) if p.parts[0] != "runA"}
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "samples").exists()
    assert not any(p.suffix == ".png" for p in left), left
    assert [json.loads(line)["step"] for line in (tmp_path / "edm-baseline" / "metrics.jsonl").read_text().splitlines()
            ] == [3]
    assert own  # (the earlier run did write there)


def test_overwrite_of_a_folder_without_a_manifest_replaces_only_its_run_files(tmp_path):
    """A run written before manifests existed: --overwrite deletes the run files the command replaces anyway."""
    assert train(tmp_path, evaluate=True) == 0
    for manifest in tmp_path.rglob(".diffusion-rl-manifest"):
        manifest.unlink()
    grids = snapshot(tmp_path / "samples")
    assert train(tmp_path, "--overwrite", steps=2) == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "edm-baseline" / "metrics.jsonl").read_text().splitlines()
            ] == [2]
    assert not (tmp_path / "results.json").exists()
    assert snapshot(tmp_path / "samples") == grids  # not known to be the library's: kept


def test_a_learner_refuses_another_runs_folder_unless_told(tmp_path):
    from diffusion_rl.build import make_learner
    from diffusion_rl.config import Args

    def learner():
        made = make_learner(Args(data="moons", batch_size=16, progress=False, eval=False), "baseline")
        made.out_dir = tmp_path
        return made

    first = learner()
    list(first.train(6, progress=False))
    list(first.train(8, progress=False))  # its own run: continues
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="holds another run's checkpoint .* resume\\(\\) .* overwrite"):
        list(learner().train(2, progress=False))
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert {json.loads(line)["run_id"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()} == {
        first.run_id}
    resumed = learner().resume()  # continuing it is allowed
    list(resumed.train(10, progress=False))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10
    second = learner()
    list(second.train(2, progress=False, overwrite=True))  # replacing it, when asked
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["run_id"] == second.run_id
    assert [(json.loads(line)["run_id"], json.loads(line)["step"])
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [(second.run_id, 2)]
    third = learner().overwrite()  # the same, as a method
    list(third.train(2, progress=False))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["run_id"] == third.run_id


def test_overwrite_refuses_a_checkpoint_the_library_did_not_write(tmp_path):
    from diffusion_rl.build import make_learner
    from diffusion_rl.config import Args
    from diffusion_rl.runs import record_written

    def learner(out):
        made = make_learner(Args(data="moons", batch_size=16, progress=False, eval=False), "baseline")
        made.out_dir = out
        return made

    list(learner(tmp_path / "a").train(2, progress=False))
    (tmp_path / "b").mkdir()
    record_written(tmp_path / "b", "notes.png", "eval")  # b has a manifest, which does not name the checkpoint
    (tmp_path / "b" / "checkpoint.pt").write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes())  # a copy
    with pytest.raises(ConfigError, match="did not record writing"):
        list(learner(tmp_path / "b").train(2, progress=False, overwrite=True))
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == (tmp_path / "a" / "checkpoint.pt").read_bytes()


# ---- group 3: crashes around results and logs --------------------------------------------------------------------
def test_results_json_is_written_atomically(tmp_path, monkeypatch):
    from diffusion_rl.evaluation import write_results

    write_results([{"method": "a", "value": 1.0}], tmp_path)
    good = (tmp_path / "results.json").read_bytes()
    real = Path.write_text

    def torn(self, text, *a, **k):  # a crash halfway through the write
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError):
        write_results([{"method": "b", "value": 2.0}] * 50, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_npz_is_written_atomically(tmp_path, monkeypatch, capsys):
    assert train(tmp_path / "run", steps=2) == 0
    out = tmp_path / "x.npz"
    out.write_bytes(b"the user's earlier samples")

    def full(file, *a, **k):  # half a zip, then the disk is full
        if isinstance(file, (str, Path)):
            Path(file).write_bytes(b"PK half a zip")
        else:
            file.write(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diffusion_rl.cli._write_npz_chunks", full)  # the .npz writer (chunk by chunk)
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tmp_path / "run" / "edm-baseline" / "checkpoint.pt"), "--n", "8",
                 "--out", str(out), "--overwrite"]) == 1
    assert capsys.readouterr().err.strip().startswith("diffusion-rl: error: disk full")
    assert out.read_bytes() == b"the user's earlier samples"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_torn_results_json_is_set_aside_on_resume(tmp_path, capsys):
    assert train(tmp_path, evaluate=True, steps=2) == 0
    results = tmp_path / "results.json"
    results.write_bytes(results.read_bytes()[:40])  # torn by a crash of an older version
    capsys.readouterr()
    with pytest.warns(UserWarning, match="results.json' is unreadable .* set aside"):
        assert train(tmp_path, "--resume", evaluate=True, steps=4) == 0
    records = json.loads(results.read_text())["records"]
    assert {r["training_steps"] for r in records} == {4}
    aside = list(tmp_path.glob("results.json.unreadable-*"))
    assert len(aside) == 1 and len(aside[0].read_bytes()) == 40  # kept, not deleted


def test_bytes_that_are_not_utf8_in_the_log_are_dropped_on_resume(tmp_path):
    assert train(tmp_path, steps=4) == 0
    log = tmp_path / "edm-baseline" / "metrics.jsonl"
    with open(log, "ab") as fh:
        fh.write(b"\xff\n")
    with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
        assert train(tmp_path, "--resume", steps=6) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [4, 6]


def test_torch_save_failing_on_a_full_disk_is_disk_full(tmp_path, monkeypatch, capsys):
    import diffusion_rl.training as training

    assert train(tmp_path, "--checkpoint-every", "2") == 0
    good = (tmp_path / "edm-baseline" / "checkpoint.pt").read_bytes()

    def full(obj, f, *a, **k):  # what torch raises when the disk fills during a save
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4242")

    monkeypatch.setattr(training.torch, "save", full)
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--checkpoint-every", "2", steps=8) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-rl: error: disk full writing") and "Traceback" not in "".join(err), err
    assert (tmp_path / "edm-baseline" / "checkpoint.pt").read_bytes() == good
    assert not list((tmp_path / "edm-baseline").glob("*.tmp"))


SIGTERM_SCRIPT = """
import os, signal, sys
import torch
from diffusion_rl.cli import main
torch.set_num_threads(int(sys.argv[3]))
where = sys.argv[2]
if where == "training":  # the signal arrives during step 3
    from diffusion_rl.training import Learner
    update = Learner.update
    def update_then_signal(self, batch, **kw):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(self, batch, **kw)
    Learner.update = update_then_signal
else:  # it arrives during the evaluation
    from diffusion_rl.evaluation import Evaluator
    def sweep(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the evaluation")
    Evaluator.sweep = sweep
sys.exit(main(["train", "--data", "moons", "--batch-size", "16", "--no-progress", "--steps", "50",
               *(["--no-eval"] if where == "training" else ["--n-samples", "50", "--nfe-grid", "3"]),
               "--out", sys.argv[1]]))
"""


@pytest.mark.parametrize("where", ["training", "evaluation"])
def test_sigterm_checkpoints_releases_the_lock_and_exits_143(tmp_path, where):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out), where, str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("diffusion-rl: terminated by SIGTERM") and "Traceback" not in proc.stderr, err
    assert len(err) == 1 if where == "training" else err[0].startswith("edm-baseline: 50 steps")
    ckpt = torch.load(out / "edm-baseline" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == (3 if where == "training" else 50)
    assert ("checkpoint written at step 3" in err[-1]) == (where == "training")
    assert not (out / ".lock").exists()
    if where == "training":  # the checkpoint is a whole step: the resumed run ends where an uninterrupted one does
        assert train(out, "--resume", steps=6) == 0
        assert train(tmp_path / "ref", steps=6) == 0
        a = torch.load(out / "edm-baseline" / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "ref" / "edm-baseline" / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_log_after_a_resume(tmp_path):
    """A record averages the steps since the previous record or since the resume: resumed from a checkpoint at a log
    step, the log equals the uninterrupted run's (but for wall-clock seconds); resumed between log steps, the first
    record after the resume averages fewer steps and says so (`steps_averaged`)."""
    from agents import DiffusionBaseline
    from diffusion_rl.training import TrainConfig
    from envs import DiffusionMRP

    def make(out, **kw):
        env = DiffusionMRP("moons", batch_size=[16], seed=0)
        return DiffusionBaseline(env, config=TrainConfig(seed=0, log_every=5, **kw), out_dir=out, device="cpu")

    def log(out):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "run_id")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    list(make(tmp_path / "full").train(15, progress=False))
    list(make(tmp_path / "at5").train(5, progress=False))  # killed after the checkpoint at log step 5
    list(make(tmp_path / "at5").resume().train(15, progress=False))
    assert log(tmp_path / "at5") == log(tmp_path / "full")
    assert [r["steps_averaged"] for r in log(tmp_path / "full")] == [5, 5, 5]
    list(make(tmp_path / "at7").train(7, progress=False))  # a checkpoint between log steps
    list(make(tmp_path / "at7").resume().train(15, progress=False))
    resumed = log(tmp_path / "at7")
    assert [(r["step"], r["steps_averaged"]) for r in resumed] == [(5, 5), (7, 2), (10, 3), (15, 5)]
    assert resumed[-1] == log(tmp_path / "full")[-1]  # from the next whole interval on, the same records
