"""Runs that cannot lose work or silently do the wrong thing: every bad input is refused before work with one line
and the right exit code, and faults (a killed writer, a full disk, a concurrent run, swapped data) lose nothing."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import file_times
from diffusion_rl.cli import main

MOONS = ["--data", "moons", "--batch-size", "16", "--no-progress"]


def train(out, *extra, steps=4):
    return main(["train", *MOONS, "--steps", str(steps), "--no-eval", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step baseline run on moons and on an .npz of images (shared by the cases that need one)."""
    root = tmp_path_factory.mktemp("trained")
    assert train(root / "moons", steps=6) == 0
    npz = root / "lab.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
    assert main(["train", "--data", str(npz), "--batch-size", "8", "--steps", "2", "--no-eval", "--no-progress",
                 "--out", str(root / "img")]) == 0
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


_HELD: list = []  # lock files a case holds for the length of the test


def _case_setup(name: str, tmp: Path, trained: Path) -> list[str]:
    """Build what a case needs on disk; returns its argv."""
    out = str(tmp / "out")
    ckpt = str(trained / "moons" / "edm-baseline" / "checkpoint.pt")
    if name == "inception_mismatch":  # a state dict of another network, over a finished run: refused, run kept
        torch.save(torch.load(ckpt, weights_only=True)["ema"], tmp / "notinception.pth")
        return ["train", *MOONS, "--features", "inception", "--inception-weights", str(tmp / "notinception.pth"),
                "--out", str(trained / "moons"), "--overwrite"]
    if name == "out_is_a_file":
        (tmp / "out").write_text("not a folder")
        return ["train", *MOONS, "--out", out]
    if name == "out_under_a_file":
        (tmp / "f").write_text("x")
        return ["train", *MOONS, "--out", str(tmp / "f" / "run")]
    if name == "empty_npz":
        (tmp / "e.npz").write_bytes(b"")
        return ["train", "--data", str(tmp / "e.npz"), "--out", out]
    if name == "corrupt_npz":
        (tmp / "c.npz").write_bytes(b"PK\x03\x04 not really a zip")
        return ["train", "--data", str(tmp / "c.npz"), "--out", out]
    if name in ("bomb_image", "large_image"):
        folder = tmp / "imgs"
        folder.mkdir()
        side = 60000 if name == "bomb_image" else 5000
        (folder / "bomb.png").write_bytes(_png_header(side, side))
        return ["train", "--data", str(folder), "--out", out]
    if name == "million_classes":
        np.savez(tmp / "m.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 10 ** 6]))
        return ["train", "--data", str(tmp / "m.npz"), "--conditional", "--out", out]
    if name == "wrong_shapes":
        ck = torch.load(ckpt, weights_only=True)
        ck["ema"] = {k: v[..., :1] if v.dim() else v for k, v in ck["ema"].items()}
        torch.save(ck, tmp / "bad.pt")
        return ["sample", "--checkpoint", str(tmp / "bad.pt"), "--out", str(tmp / "s.png")]
    if name == "absurd_width":
        ck = torch.load(ckpt, weights_only=True)
        ck["config"]["network"]["width"] = 10 ** 7
        torch.save(ck, tmp / "wide.pt")
        return ["sample", "--checkpoint", str(tmp / "wide.pt"), "--out", str(tmp / "s.png")]
    if name == "second_run_same_out":
        return ["train", *MOONS, "--out", str(trained / "moons")]
    if name == "concurrent_run":  # another "process" holds the folder's lock (a separate open file, flocked)
        import fcntl

        (tmp / "out").mkdir()
        fh = open(tmp / "out" / ".lock", "w")
        fh.write(json.dumps({"pid": 4242, "host": "elsewhere", "started": "earlier"}))
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD.append(fh)
        return ["train", *MOONS, "--out", out]
    if name == "symlinked_lock":  # a .lock pointing at a file of the user's: refused, the file untouched
        (tmp / "out").mkdir()
        (tmp / "victim.txt").write_text("precious")
        (tmp / "out" / ".lock").symlink_to(tmp / "victim.txt")
        return ["train", *MOONS, "--out", out]
    if name == "other_method_same_out":
        return ["train", *MOONS, "--method", "td", "--out", str(trained / "moons")]
    if name == "resume_missing":
        return ["train", *MOONS, "--resume", "--out", out]
    if name == "resume_steps_below":
        return ["train", *MOONS, "--resume", "--steps", "3", "--out", str(trained / "moons")]
    if name == "resume_and_overwrite":
        return ["train", *MOONS, "--resume", "--overwrite", "--out", str(trained / "moons")]
    if name == "evaluate_swapped_data":
        npz = tmp / "lab.npz"
        np.savez(npz, images=np.random.default_rng(5).integers(0, 256, (64, 8, 8), dtype=np.uint8))
        ck = torch.load(trained / "img" / "edm-baseline" / "checkpoint.pt", weights_only=True)
        ck["config"]["dataset"] = str(npz)  # the same name, other images
        torch.save(ck, tmp / "moved.pt")
        return ["evaluate", "--checkpoint", str(tmp / "moved.pt"), "--out", str(tmp / "ev")]
    if name == "evaluate_heun_even":
        return ["evaluate", "--checkpoint", ckpt, "--sampler", "heun", "--nfe-grid", "3,4", "--out", str(tmp / "ev")]
    if name == "sample_unknown_suffix":
        return ["sample", "--checkpoint", ckpt, "--out", str(tmp / "s.jpg")]
    if name == "sample_existing":
        (tmp / "s.png").write_bytes(b"a picture")
        return ["sample", "--checkpoint", ckpt, "--out", str(tmp / "s.png")]
    if name == "sample_seed_overflow":
        return ["sample", "--checkpoint", ckpt, "--seed", str(10 ** 20), "--out", str(tmp / "s.png")]
    if name == "evaluate_into_run":
        return ["evaluate", "--checkpoint", ckpt, "--out", str(trained / "moons")]
    if name == "sample_zero":
        return ["sample", "--checkpoint", ckpt, "--n", "0", "--out", str(tmp / "s.png")]
    if name == "sample_huge_nfe":
        return ["sample", "--checkpoint", ckpt, "--nfe", "1000000001", "--n", "1", "--out", str(tmp / "s.png")]
    raise KeyError(name)


BAD = [  # (case, argv or a setup name, exit code, what the message must name)
    ("width 0", ["train", *MOONS, "--width", "0"], 2, "width must be a positive integer, got 0"),
    ("stride 0", ["train", *MOONS, "--method", "td", "--stride", "0"], 2, "stride must be a positive"),
    ("stride -5", ["train", *MOONS, "--method", "td", "--stride", "-5"], 2, "stride must be a positive"),
    ("one-step 0", ["train", *MOONS, "--method", "td", "--one-step", "0"], 2, "one_step must be a positive"),
    ("stride text", ["train", *MOONS, "--method", "td", "--stride", "big"], 2, "'auto' or a number"),
    ("n-steps with td0", ["train", *MOONS, "--method", "td", "--n-steps", "3"], 2, "--n-steps 3 applies"),
    ("lmbda with td0", ["train", *MOONS, "--method", "td", "--lmbda", "0.3"], 2, "--lmbda applies"),
    ("td option on baseline", ["train", *MOONS, "--estimator", "nstep"], 2, "applies to --method td only"),
    ("steps 0", ["train", *MOONS, "--steps", "0"], 2, "steps must be a positive integer"),
    ("steps huge", ["train", *MOONS, "--steps", "10000000000"], 2, "DIFFUSION_RL_MAX_STEPS"),
    ("lr 1e38", ["train", *MOONS, "--lr", "1e38"], 2, "lr must be in (0, 1]"),
    ("device gpu", ["train", *MOONS, "--device", "gpu"], 2, "unknown device 'gpu'"),
    ("device cuda", ["train", *MOONS, "--device", "cuda"], 2, "no CUDA device"),
    ("nfe grid huge", ["train", *MOONS, "--nfe-grid", "3,99999999"], 2, "DIFFUSION_RL_MAX_NFE"),
    ("read-only out", ["train", *MOONS, "--out", "/proc/diffusion-rl-test/run"], 2, "not writable"),
    ("out is a file", "out_is_a_file", 2, "is a file"),
    ("out under a file", "out_under_a_file", 2, "is a file"),
    ("empty npz", "empty_npz", 2, "is empty (0 bytes)"),
    ("corrupt npz", "corrupt_npz", 2, "cannot read"),
    ("decompression bomb", "bomb_image", 2, "decompression bomb"),
    ("image too large", "large_image", 2, "DIFFUSION_RL_MAX_IMAGE_SIDE"),
    ("a million classes", "million_classes", 2, "DIFFUSION_RL_MAX_CLASSES"),
    ("checkpoint of wrong shapes", "wrong_shapes", 2, "do not fit"),
    ("checkpoint of absurd width", "absurd_width", 2, "DIFFUSION_RL_MAX_PARAMETERS"),
    ("second run into one out", "second_run_same_out", 2, "already holds a run"),
    ("concurrent run", "concurrent_run", 2, "is in use by process 4242 on elsewhere"),
    ("symlinked lock", "symlinked_lock", 2, "is a symlink"),
    ("another method into a run's out", "other_method_same_out", 2, "already holds a run"),
    ("empty out", ["train", *MOONS, "--out", ""], 2, "--out is empty"),
    ("resume of nothing", "resume_missing", 2, "holds no run"),
    ("resume below the checkpoint", "resume_steps_below", 2, "below step 6"),
    ("resume and overwrite", "resume_and_overwrite", 2, "exclude each other"),
    ("evaluate on swapped data", "evaluate_swapped_data", 2, "content hash"),
    ("evaluate heun at even NFE", "evaluate_heun_even", 2, "unreachable by heun"),
    ("sample unknown suffix", "sample_unknown_suffix", 2, "accepted: .png, .npz"),
    ("sample n 0", "sample_zero", 2, "n must be a positive integer"),
    ("sample huge nfe", "sample_huge_nfe", 2, "DIFFUSION_RL_MAX_NFE"),
    ("seed -1", ["train", *MOONS, "--seed", "-1"], 2, "seed must be an integer in [0, 2^63)"),
    ("lr nan", ["train", *MOONS, "--lr", "nan"], 2, "lr must be a positive finite number"),
    ("dropout 1", ["train", *MOONS, "--dropout", "1"], 2, "dropout must be in [0, 1)"),
    ("tau 2", ["train", *MOONS, "--method", "td", "--target-tau", "2"], 2, "target_tau must be in [0.0, 1.0]"),
    ("unknown preset", ["train", *MOONS, "--preset", "cifar9"], 2, "unknown preset 'cifar9'; accepted: cifar10"),
    ("fp16 on CPU", ["train", *MOONS, "--precision", "fp16", "--device", "cpu"], 2,
     "precision fp16 needs a CUDA device"),
    ("precision fp8", ["train", *MOONS, "--precision", "fp8"], 2, "unknown precision 'fp8'"),
    ("tau with a ramp-up", ["train", *MOONS, "--method", "td", "--target-tau", "0.99", "--target-rampup", "0.05"], 2,
     "--target-tau and --target-rampup exclude each other"),
    ("negative half-life", ["train", *MOONS, "--method", "td", "--target-halflife-images", "-5"], 2,
     "target_halflife_images must be a finite number >= 0"),
    ("nfe grid with a hole", ["train", *MOONS, "--nfe-grid", "1,,2"], 2, "comma-separated positive integers"),
    ("nfe grid with a repeat", ["train", *MOONS, "--nfe-grid", "2,2"], 2, "repeats 2"),
    ("eval options with --no-eval", ["train", *MOONS, "--no-eval", "--n-samples", "50"], 2, "--no-eval skips"),
    ("demo --method", ["demo", *MOONS, "--method", "td"], 2, "demo trains both methods"),
    ("n-steps past the grid", ["train", *MOONS, "--method", "td", "--estimator", "nstep", "--n-steps", "1000"], 2,
     "exceeds the 5 TD-valid strides"),
    ("n-steps one past the chain", ["train", *MOONS, "--method", "td", "--estimator", "nstep", "--n-steps", "6"], 2,
     "n_steps=6 exceeds the 5 TD-valid strides of 3 index units (one-step 0.2)"),  # 6 k + delta > N-1 = 17
    ("unknown formulation", ["train", *MOONS, "--formulation", "foo"], 2, "unknown formulation 'foo'; accepted"),
    ("unknown estimator", ["train", *MOONS, "--method", "td", "--estimator", "foo"], 2,
     "unknown estimator 'foo'; accepted: td0, nstep, td_lambda"),
    ("unknown coupling", ["train", *MOONS, "--method", "td", "--coupling", "bogus"], 2, "unknown coupling 'bogus'"),
    ("unknown reweighting", ["train", *MOONS, "--method", "td", "--reweighting", "foo"], 2,
     "unknown reweighting 'foo'; accepted: edm"),
    ("stride past the grid", ["train", *MOONS, "--method", "td", "--stride", "50"], 2,
     "stride + one_step = 50.0 + 0.2 = 50.2 exceeds N-1 = 17"),
    ("sample over a file", "sample_existing", 2, "exists; pass --overwrite"),
    ("sample seed overflow", "sample_seed_overflow", 2, "seed must be an integer"),
    ("evaluate into a run", "evaluate_into_run", 2, "already holds a run"),
    ("inception weights missing", ["train", *MOONS, "--features", "inception", "--inception-weights", "/nonexistent.pth"],
     2, "Inception weights file '/nonexistent.pth' does not exist"),
    ("inception weights without inception", ["train", *MOONS, "--inception-weights", "/nonexistent.pth"], 2,
     "is only used with features 'inception'"),
    ("mismatched inception weights", "inception_mismatch", 2, "does not match the FID Inception-v3 (missing:"),
]


@pytest.mark.parametrize("case,argv,code,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_any_work(case, argv, code, needle, tmp_path, trained, cache, refused):
    if isinstance(argv, str):
        argv = _case_setup(argv, tmp_path, trained)
    elif "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    before = file_times(trained)
    refused(argv, code, needle)
    # no work: no checkpoint, log, results or samples written, no feature net fitted, the finished runs untouched
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".jsonl", ".json", ".png")
               and p.name not in ("bad.pt", "wide.pt", "moved.pt", "bomb.png", "s.png")]
    assert not written, written
    assert not cache.exists() or not any(cache.rglob("*.pt"))
    assert before == file_times(trained)
    if (tmp_path / "victim.txt").exists():
        assert (tmp_path / "victim.txt").read_text() == "precious"
    for fh in _HELD:
        fh.close()
    _HELD.clear()


def test_debug_shows_the_traceback(tmp_path):
    from diffusion_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="width"):
        main(["--debug", "train", *MOONS, "--width", "0", "--out", str(tmp_path)])


def test_help_does_not_import_torch():
    """--help and argument errors answer at once: the command line defers torch, tensordict and torchrl."""
    code = "import sys, diffusion_rl.cli; print(sorted(m for m in ('torch', 'torchrl', 'tensordict') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_sampler_help_names_every_sampler():
    """config's --sampler help is written out (config imports no torch): it must name exactly samplers.SAMPLERS."""
    from diffusion_rl.config import SAMPLER_HELP
    from diffusion_rl.samplers import SAMPLERS

    named = [w.strip() for w in SAMPLER_HELP.split("(")[0].split("|")]
    assert named == list(SAMPLERS)


# ---- faults ----------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_and_stale_lock_is_reported(tmp_path, capsys):
    assert train(tmp_path) == 0
    lock = tmp_path / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "earlier"}))
    with pytest.warns(UserWarning, match=f"stale lock .* process {dead.pid}"):  # no flock holds it any more
        assert train(tmp_path, "--overwrite", steps=2) == 0
    lines = (tmp_path / "edm-baseline" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]  # the old run's records are gone
    assert not lock.exists()


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    import diffusion_rl.training as training

    assert train(tmp_path, "--checkpoint-every", "2") == 0
    good = (tmp_path / "edm-baseline" / "checkpoint.pt").read_bytes()

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(training.torch, "save", full)
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--checkpoint-every", "2", steps=8) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-rl: error: disk full") and "Traceback" not in "".join(err)
    assert (tmp_path / "edm-baseline" / "checkpoint.pt").read_bytes() == good
    assert not list((tmp_path / "edm-baseline").glob("*.tmp"))


KILL_SCRIPT = """
import sys
import torch
from diffusion_rl.cli import main
torch.set_num_threads(int(sys.argv[3]))  # the test process's thread count: the same arithmetic, bit for bit
resume = ["--resume"] if sys.argv[2] == "1" else []
sys.exit(main(["train", "--data", "moons", "--batch-size", "16", "--width", "16", "--no-progress", "--no-eval",
               "--steps", "400", "--checkpoint-every", "1", "--out", sys.argv[1], *resume]))
"""


def test_sigkill_during_checkpoint_writes_resumes_bit_identically(tmp_path):
    """Kill a run at random moments while it checkpoints every step; the resumed run ends where an uninterrupted
    run ends, bit for bit."""
    from diffusion_rl.build import make_learner
    from diffusion_rl.config import Args

    args = dict(data="moons", batch_size=16, width=16, progress=False, eval=False, steps=400, checkpoint_every=1)
    ref = make_learner(Args(out=str(tmp_path / "ref"), **args), "baseline")
    ref.out_dir = None
    list(ref.train(400, progress=False))
    rng = random.Random(0)
    out = tmp_path / "killed"
    ckpt = out / "edm-baseline" / "checkpoint.pt"
    for attempt in range(2):  # the second attempt resumes the killed run and is killed in turn
        step_before = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else -1
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(int(attempt > 0)),
                                 str(torch.get_num_threads())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait until it writes checkpoints of its own
            if ckpt.exists() and os.path.getmtime(ckpt) > time.time() - 0.5 and (
                    step_before < 0 or torch.load(ckpt, weights_only=True)["step"] > step_before):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = make_learner(Args(out=str(out), **args), "baseline").resume()
    assert 0 < resumed.step < 400, resumed.step  # killed midway
    list(resumed.train(400, progress=False))
    for a, b in zip(ref.denoiser.state_dict().values(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ref.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_evaluate_regenerates_toy_data_from_the_checkpoints_seed(tmp_path):
    assert train(tmp_path / "run", "--seed", "1", steps=2) == 0
    ckpt = tmp_path / "run" / "edm-baseline" / "checkpoint.pt"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--nfe-grid", "3", "--n-samples", "50",
                 "--out", str(tmp_path / "ev")]) == 0


def test_resume_keeps_the_checkpoints_learning_rate_unless_given(tmp_path):
    assert train(tmp_path, "--lr", "0.01", steps=2) == 0
    assert train(tmp_path, "--resume", steps=4) == 0  # no --lr: the run's own 0.01, not the default
    ckpt = torch.load(tmp_path / "edm-baseline" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["train"]["lr"] == 0.01 and ckpt["step"] == 4


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from diffusion_rl.training import Learner

    assert train(tmp_path, steps=2) == 0
    good = (tmp_path / "edm-baseline" / "checkpoint.pt").read_bytes()

    def interrupted(self, steps, progress=True):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Learner, "train", interrupted)
    capsys.readouterr()
    assert train(tmp_path, "--resume", steps=4) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-rl: interrupted") and "Traceback" not in "".join(err)
    assert (tmp_path / "edm-baseline" / "checkpoint.pt").read_bytes() == good
    assert not (tmp_path / ".lock").exists()
