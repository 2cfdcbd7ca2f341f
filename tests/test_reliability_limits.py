"""Reliability, round three, group 2: limits that bound memory, not only sizes on disk. A .png of samples holds at
most DIFFUSION_RL_MAX_GRID of them and an .npz is written chunk by chunk; a .npz is checked unpacked (from its .npy
headers) before it loads; labels meet the class limit whenever data loads; batch size and depth have limits and the
parameter limit is arithmetic, before any allocation; DIFFUSION_RL_MAX_SAMPLES counts per command; running out of
memory is one line, exit 1, with advice that fits the cause."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import file_times
from diffusion_rl.cli import main

MOONS = ["--data", "moons", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step baseline on moons and a 1-step one on 16x16 images with a narrow UNet (cheap to sample from)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", *MOONS, "--steps", "2", "--no-eval", "--out", str(root / "moons")]) == 0
    np.savez(root / "img.npz", images=np.random.default_rng(0).integers(0, 256, (32, 16, 16), dtype=np.uint8))
    assert main(["train", "--data", str(root / "img.npz"), "--batch-size", "8", "--width", "8", "--steps", "1",
                 "--no-eval", "--no-progress", "--out", str(root / "img")]) == 0
    return root


def _npz_claiming(path: Path, shape: tuple[int, ...]) -> None:
    """A tiny .npz whose 'images' header claims `shape` (uint8); the data never comes."""
    with zipfile.ZipFile(path, "w") as z, z.open("images.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
        fh.write(b"\0" * 64)


def _edited_checkpoint(ckpt: Path, out: Path, **network) -> str:
    ck = torch.load(ckpt, weights_only=True)
    ck["config"]["network"].update(network)
    torch.save(ck, out)
    return str(out)


def _case_setup(name: str, tmp: Path, trained: Path) -> list[str]:
    """Build what a case needs on disk; returns its argv."""
    out = str(tmp / "out")
    moons = trained / "moons" / "edm-baseline" / "checkpoint.pt"
    img = trained / "img" / "edm-baseline" / "checkpoint.pt"
    if name == "npz_header_bomb":  # 100 bytes on disk, 10^12 bytes unpacked
        _npz_claiming(tmp / "bomb.npz", (10 ** 6, 1024, 1024))
        return ["train", "--data", str(tmp / "bomb.npz"), "--out", out]
    if name == "npz_compressed_zeros":  # a few hundred bytes on disk, 1 MiB as float32
        np.savez_compressed(tmp / "zeros.npz", images=np.zeros((64, 64, 64), np.uint8))
        assert (tmp / "zeros.npz").stat().st_size < 100_000
        return ["train", "--data", str(tmp / "zeros.npz"), "--out", out]
    if name == "folder_past_the_data_limit":
        from PIL import Image

        (tmp / "imgs").mkdir()
        for i in range(3):  # 16 KiB each as float32: the second passes 20,000 bytes
            Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(tmp / "imgs" / f"{i}.png")
        return ["train", "--data", str(tmp / "imgs"), "--out", out]
    if name in ("huge_label", "huge_label_conditional"):
        labels = np.zeros(64, np.int64)
        labels[-1] = 50_000_000
        np.savez(tmp / "lab.npz", images=np.zeros((64, 8, 8), np.uint8), labels=labels)
        return ["train", "--data", str(tmp / "lab.npz"), "--out", out,
                *(["--conditional"] if name.endswith("conditional") else [])]
    if name == "image_width_1e12":
        np.savez(tmp / "i.npz", images=np.zeros((8, 8, 8), np.uint8))
        return ["train", "--data", str(tmp / "i.npz"), "--width", str(10 ** 12), "--out", out]
    if name == "checkpoint_width_1e12":
        return ["sample", "--checkpoint", _edited_checkpoint(img, tmp / "wide.pt", width=10 ** 12),
                "--out", str(tmp / "s.png")]
    if name == "checkpoint_depth_1e5":
        return ["sample", "--checkpoint", _edited_checkpoint(img, tmp / "deep.pt", depth=10 ** 5),
                "--out", str(tmp / "s.png")]
    if name == "mlp_checkpoint_depth_1e5":
        return ["sample", "--checkpoint", _edited_checkpoint(moons, tmp / "deep.pt", depth=10 ** 5),
                "--out", str(tmp / "s.png")]
    if name == "evaluate_samples_per_command":  # 10 samples x 5 budgets x 3 checkpoints = 150
        return ["evaluate", "--checkpoint", str(moons), str(moons), str(moons), "--nfe-grid", "1,2,3,5,9",
                "--n-samples", "10", "--out", str(tmp / "ev")]
    if name == "sample_grid_limit_not_a_number":
        return ["sample", "--checkpoint", str(moons), "--out", str(tmp / "s.png")]
    raise KeyError(name)


LIMITS = "DIFFUSION_RL_MAX_"
BAD = [  # (case, argv or a setup name, environment, exit code, what the message must name)
    ("npz header claims 10^6 x 1024 x 1024", "npz_header_bomb", {}, 2,
     "unpacked in memory (images of shape (1000000, 1024, 1024) as float32"),
    ("compressed zeros past the data limit", "npz_compressed_zeros", {"DIFFUSION_RL_MAX_DATA_BYTES": "100000"}, 2,
     "= 1,048,576 exceeds the limit of 100,000 bytes"),
    ("image folder past the data limit", "folder_past_the_data_limit", {"DIFFUSION_RL_MAX_DATA_BYTES": "20000"}, 2,
     "unpacked in memory (as float32) = 32,768 exceeds the limit of 20,000"),
    ("label 50,000,000 without --conditional", "huge_label", {}, 2,
     "classes (labels 0..50,000,000) = 50,000,001 exceeds the limit of 100,000"),
    ("label 50,000,000 with --conditional", "huge_label_conditional", {}, 2, f"{LIMITS}CLASSES"),
    ("batch size 5,000,000", ["train", *MOONS, "--batch-size", "5000000"], {}, 2,
     f"batch_size = 5,000,000 exceeds the limit of 65,536 samples per training batch; if you mean it, raise it "
     f"with {LIMITS}BATCH_SIZE=5000000"),
    ("depth 100,000", ["train", *MOONS, "--depth", "100000"], {}, 2, f"{LIMITS}DEPTH=100000"),
    ("depth 100,000, its limit raised: the parameter count refuses it",
     ["train", *MOONS, "--width", "128", "--depth", "100000"], {"DIFFUSION_RL_MAX_DEPTH": "1000000"}, 2,
     "network parameters (width 128, depth 100,000) = 3,328,"),
    ("MLP width 10^12", ["train", *MOONS, "--width", str(10 ** 12)], {}, 2, f"{LIMITS}PARAMETERS"),
    ("UNet width 10^12", "image_width_1e12", {}, 2, "network parameters (width 1,000,000,000,000, depth 1)"),
    ("checkpoint of width 10^12", "checkpoint_width_1e12", {}, 2, f"{LIMITS}PARAMETERS"),
    ("checkpoint of depth 10^5", "checkpoint_depth_1e5", {}, 2, f"{LIMITS}DEPTH"),
    ("MLP checkpoint of depth 10^5", "mlp_checkpoint_depth_1e5", {}, 2, f"{LIMITS}DEPTH"),
    ("evaluate: samples count per command", "evaluate_samples_per_command", {"DIFFUSION_RL_MAX_SAMPLES": "100"}, 2,
     "samples drawn (10 x 5 NFE budgets x 3 networks) = 150 exceeds the limit of 100 samples per command"),
    ("train: samples count per command", ["train", *MOONS, "--n-samples", "40", "--nfe-grid", "1,3,5"],
     {"DIFFUSION_RL_MAX_SAMPLES": "100"}, 2, "(40 x 3 NFE budgets x 1 networks) = 120"),
    ("demo: the untrained sweep counts too", ["demo", *MOONS, "--n-samples", "20", "--nfe-grid", "1,3"],
     {"DIFFUSION_RL_MAX_SAMPLES": "100"}, 2, "(20 x 2 NFE budgets x 3 networks) = 120"),
    ("grid limit not a number", "sample_grid_limit_not_a_number", {"DIFFUSION_RL_MAX_GRID": "many"}, 2,
     "DIFFUSION_RL_MAX_GRID='many' must be a positive integer"),
]


@pytest.mark.parametrize("case,argv,env,code,needle", BAD, ids=[b[0] for b in BAD])
def test_limits_refuse_before_any_allocation(case, argv, env, code, needle, tmp_path, trained, cache, refused,
                                             monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if isinstance(argv, str):
        argv = _case_setup(argv, tmp_path, trained)
    elif "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    before = file_times(trained)
    refused(argv, code, needle)
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".jsonl", ".json", ".png", ".npz")
               and p.parent.name not in ("imgs",) and p.name not in ("wide.pt", "deep.pt", "bomb.npz", "zeros.npz",
                                                                    "lab.npz", "i.npz")]
    assert not written, written
    assert not (tmp_path / "out").exists()
    assert not cache.exists() or not any(cache.rglob("*.pt"))
    assert before == file_times(trained)


def _allocator_error() -> RuntimeError:
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                        "tried to allocate 6710886400 bytes. Error code 12 (Cannot allocate memory)")


def _numpy_memory_error() -> MemoryError:
    return MemoryError("Unable to allocate 3.73 GiB for an array with shape (400, 1024, 1024) and data type float32")


OUT_OF_MEMORY = [  # (case, what fails (module, attribute), the failure, argv, the advice the message must give)
    ("data load, numpy", ("diffusion_rl.data", "load_dataset"), _numpy_memory_error,
     ["train", *MOONS, "--no-eval"], "out of memory (Unable to allocate 3.73 GiB for an array with shape (400, 1024, "
                                     "1024) and data type float32); the data set does not fit in memory"),
    ("training step, CPU allocator", ("diffusion_rl.training", "Learner.train"), _allocator_error,
     ["train", *MOONS, "--no-eval"], "DefaultCPUAllocator: can't allocate memory: you tried to allocate 6710886400 "
                                     "bytes. Error code 12 (Cannot allocate memory)); lower --batch-size"),
    ("training step, MemoryError", ("diffusion_rl.training", "Learner.train"), MemoryError,
     ["train", *MOONS, "--no-eval"], "out of memory (MemoryError); lower --batch-size, --width or --depth"),
    ("evaluation sweep", ("diffusion_rl.evaluation", "Evaluator.sweep"), _allocator_error,
     ["train", *MOONS, "--steps", "2", "--n-samples", "50", "--nfe-grid", "1"], "; lower --n-samples"),
    ("sampling", ("diffusion_rl.samplers", "sample"), _allocator_error, "sample", "; lower --n"),
    ("evaluate", ("diffusion_rl.evaluation", "Evaluator.sweep"), MemoryError, "evaluate",
     "out of memory (MemoryError); lower --n-samples or evaluate fewer checkpoints"),
]


@pytest.mark.parametrize("case,where,failure,argv,needle", OUT_OF_MEMORY, ids=[o[0] for o in OUT_OF_MEMORY])
def test_out_of_memory_is_one_line_with_fitting_advice(case, where, failure, argv, needle, tmp_path, trained,
                                                       monkeypatch, capsys):
    import importlib

    module, attribute = where
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)

    def fail(*_a, **_k):
        raise failure()

    monkeypatch.setattr(owner, name, fail)
    ckpt = str(trained / "moons" / "edm-baseline" / "checkpoint.pt")
    if argv == "sample":
        argv = ["sample", "--checkpoint", ckpt, "--out", str(tmp_path / "s.npz")]
    elif argv == "evaluate":
        argv = ["evaluate", "--checkpoint", ckpt, "--nfe-grid", "1", "--n-samples", "50"]
    argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-rl: error: out of memory (") and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)


# ---- the samples a command writes ------------------------------------------------------------------------------------
def test_a_png_holds_at_most_the_grid_limit_and_draws_no_more(tmp_path, trained, monkeypatch, capsys):
    import diffusion_rl.evaluation as evaluation
    import diffusion_rl.samplers as samplers

    drawn, shown = [], []
    real_sample, real_grid = samplers.sample, evaluation.save_sample_grid
    monkeypatch.setattr(samplers, "sample", lambda d, f, shape, **k: drawn.append(shape[0]) or real_sample(
        d, f, shape, **k))
    monkeypatch.setattr(evaluation, "save_sample_grid", lambda x, *a, **k: shown.append(x.shape[0]) or real_grid(
        x, *a, **k))
    monkeypatch.setenv("DIFFUSION_RL_MAX_GRID", "16")
    ckpt = str(trained / "img" / "edm-baseline" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", ckpt, "--nfe", "1", "--n", "40", "--out", str(tmp_path / "s.png")]) == 0
    assert shown == [16] and sum(drawn) == 16
    err = capsys.readouterr().err
    assert "a .png shows at most 16 samples (DIFFUSION_RL_MAX_GRID): drawing the first 16 of --n 40" in err
    drawn.clear()
    assert main(["sample", "--checkpoint", ckpt, "--nfe", "1", "--n", "40", "--out", str(tmp_path / "s.npz")]) == 0
    assert sum(drawn) == 40 and np.load(tmp_path / "s.npz")["samples"].shape == (40, 1, 16, 16)
    assert "at most" not in capsys.readouterr().err  # an .npz holds them all


def test_npz_written_in_chunks_reads_as_np_savez(tmp_path):
    from diffusion_rl.cli import _write_npz_chunks

    x = np.random.default_rng(0).standard_normal((7, 2, 3)).astype(np.float32)
    with open(tmp_path / "a.npz", "wb") as fh:
        _write_npz_chunks(fh, "samples", x.shape, (x[i:i + 3] for i in range(0, 7, 3)))
    with np.load(tmp_path / "a.npz") as f:
        assert f.files == ["samples"] and f["samples"].dtype == np.float32
        np.testing.assert_array_equal(f["samples"], x)
    with open(tmp_path / "b.npz", "wb") as fh, pytest.raises(RuntimeError, match="wrote 3 rows"):
        _write_npz_chunks(fh, "samples", x.shape, [x[:3]])


MEMORY_CHILD = """
import resource, sys
import torch
import diffusion_rl.samplers as samplers
from diffusion_rl.cli import main


def drawn(denoiser, formulation, shape, *, sampler=None, nfe=None, **_):  # the command's data path, not the network
    return samplers.SampleResult(torch.full(shape, 0.5, dtype=torch.float64), nfe, sampler, nfe)


samplers.sample = drawn
ckpt, out = sys.argv[1], sys.argv[2]
for n, suffix in ((1000, "npz"), (1000, "npz"), (100000, "npz"), (1024, "png"), (1024, "png"), (1000000, "png")):
    assert main(["sample", "--checkpoint", ckpt, "--nfe", "1", "--n", str(n), "--overwrite",
                 "--out", f"{out}/s.{suffix}"]) == 0
    print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)  # the peak so far, KiB
"""


def test_sample_memory_does_not_grow_with_n(tmp_path, trained):
    """The peak memory of one process writing 1,000 then 100,000 samples of 16x16 to an .npz (written chunk by chunk;
    before, all of them and a copy were held: +200 MB), then 1,024 then 1,000,000 to a .png (at most
    DIFFUSION_RL_MAX_GRID = 1,024 drawn; before, all of them and the grid: gigabytes). Each size runs after a warm-up
    run; the sampler is replaced by a constant, so the test measures the command's data path in a few seconds."""
    ckpt = trained / "img" / "edm-baseline" / "checkpoint.pt"
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ckpt), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    peaks = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak ")]
    assert len(peaks) == 6, done.stdout
    assert peaks[2] - peaks[1] < 32 * 1024, peaks  # KiB: 100x the samples, not 100x the memory
    assert peaks[5] - peaks[4] < 32 * 1024, peaks
    with np.load(tmp_path / "s.npz") as f:
        assert f["samples"].shape == (100000, 1, 16, 16) and float(f["samples"][-1].min()) == 0.5


# ---- the arithmetic behind the limits ------------------------------------------------------------------------------
NETWORKS = [  # UNet(resolution, channels, width, depth, channel_mult, num_classes, attn_resolutions) / MLP(...)
    ("unet", (8, 1, 32, 1, (1, 2), 0, ())),
    ("unet", (16, 3, 16, 2, (1, 2, 2), 10, (8,))),
    ("unet", (32, 3, 8, 1, (2, 2, 2), 0, (16,))),
    ("unet", (8, 1, 4, 3, (1,), 5, (8,))),
    ("mlp", (2, 128, 3, 0)),
    ("mlp", (5, 16, 2, 7)),
]


@pytest.mark.parametrize("kind,settings", NETWORKS)
def test_parameter_count_by_arithmetic_is_exact(kind, settings):
    from diffusion_rl.networks import MLP, UNet, mlp_parameters, unet_parameters

    with torch.device("meta"):
        if kind == "unet":
            res, ch, width, depth, mult, classes, attn = settings
            net = UNet(res, ch, width, depth, mult, classes, attn_resolutions=attn)
            counted = unet_parameters(res, ch, width, depth, mult, classes, attn)
        else:
            net, counted = MLP(*settings), mlp_parameters(*settings)
    assert counted == sum(p.numel() for p in net.parameters())


def test_networks_refuse_huge_settings_before_allocating(monkeypatch):
    from diffusion_rl.errors import ConfigError
    from diffusion_rl.networks import MLP, UNet, build_network

    def no_layers(*_a, **_k):
        raise AssertionError("a layer was allocated")

    monkeypatch.setattr(torch.nn.Linear, "__init__", no_layers)
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", no_layers)
    for make, needle in ((lambda: UNet(8, width=10 ** 12), "DIFFUSION_RL_MAX_PARAMETERS"),
                         (lambda: MLP(width=10 ** 12), "DIFFUSION_RL_MAX_PARAMETERS"),
                         (lambda: UNet(8, depth=10 ** 5), "DIFFUSION_RL_MAX_DEPTH"),
                         (lambda: build_network((2,), depth=10 ** 5), "DIFFUSION_RL_MAX_DEPTH"),
                         (lambda: MLP(num_classes=10 ** 6), "DIFFUSION_RL_MAX_CLASSES")):
        with pytest.raises(ConfigError, match=needle):
            make()


def test_checked_size_counts_a_custom_network_on_meta_before_building_it(monkeypatch):
    from diffusion_rl.errors import ConfigError
    from diffusion_rl.networks import checked_size

    monkeypatch.setenv("DIFFUSION_RL_MAX_PARAMETERS", "1000")
    built = []

    def linear(n: int) -> torch.nn.Module:
        built.append(torch.empty(0).device.type)  # the default device the factory runs under
        return torch.nn.Linear(n, n)

    with pytest.raises(ConfigError, match="network parameters = 1,001,000 exceeds the limit of 1,000"):
        checked_size(lambda: linear(1000))
    assert built == ["meta"]  # counted without memory, never built for real
    net = checked_size(lambda: linear(3))
    assert built == ["meta", "meta", "cpu"] and net.weight.device.type == "cpu" and net.weight.shape == (3, 3)


def test_npz_headers_are_read_without_unpacking(tmp_path):
    from diffusion_rl.data import _npz_headers

    _npz_claiming(tmp_path / "a.npz", (10 ** 6, 1024, 1024))
    np.savez_compressed(tmp_path / "b.npz", images=np.zeros((3, 4, 5), np.float32), labels=np.arange(3))
    assert _npz_headers(str(tmp_path / "a.npz")) == {"images": ((10 ** 6, 1024, 1024), np.dtype(np.uint8))}
    headers = _npz_headers(str(tmp_path / "b.npz"))
    assert headers["images"] == ((3, 4, 5), np.dtype(np.float32)) and headers["labels"][0] == (3,)
