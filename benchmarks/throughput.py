"""Throughput: training images/s of the baseline and the TD step (measured interleaved) and sampling images/s, for any
network size, batch, precision, compile setting and device; JSON with the command and the device.

    python -m benchmarks.throughput --data digits --batch-size 128 --precisions fp32,bf16 --compile off,on
    python -m benchmarks.throughput --shape 3,32,32 --preset cifar10 --batch-size 256 --device cuda \
        --precisions fp32,bf16 --compile off,on --out benchmarks/results/gpu/throughput_cifar.json

`--shape C,H,W` trains on uniform random images of that shape (throughput does not depend on the pixels), so a
machine without data sets or a network can measure a CIFAR-sized model. For every (precision, compile) pair the
baseline step (`update(collect(), check=False)` of the EDM baseline: the training loop's step, without a host sync)
and the TD step (TD(0), paper defaults) are timed round-robin after a warm-up (compilation happens there, timed apart
as `warmup_s`, and `compile_warmup_s` for compiled rows), synchronising CUDA around each step; medians are reported.
Beside them, the target critic's no-grad forward at one batch's TD-valid partners, TD's one extra piece of work, is
timed in the same round-robin: `td_over_baseline_floor` = (baseline + that forward) / baseline is the ratio TD would
reach with no other overhead.
Sampling: one Heun pass at --nfe of the EMA network in the same precision and compile setting.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_rl.build import make_learner
from diffusion_rl.config import PRESETS, Args, add_dataclass_args, dataclass_from_args, opt
from diffusion_rl.data import Dataset, load_dataset
from diffusion_rl.errors import ConfigError, check_choice
from diffusion_rl.runs import atomic_write_text
from diffusion_rl.samplers import sample


@dataclass
class ThroughputArgs:
    data: str = opt("digits", "data set (ignored when --shape is given)")
    shape: str = opt("", "C,H,W: train on uniform random images of this shape instead of --data")
    preset: str = opt("", "network preset (cifar10: the DDPM++-class UNet); overrides --width and --depth")
    width: int = opt(32, "network width (base channels)")
    depth: int = opt(1, "residual blocks per resolution")
    batch_size: int = opt(128, "training batch")
    precisions: str = opt("fp32", "comma-separated: fp32, bf16, fp16 (CUDA)")
    compile: str = opt("off", "comma-separated: off, on")
    repeats: int = opt(20, "timed steps of each method (interleaved)")
    warmup: int = opt(3, "untimed steps of each method first (compilation happens here)")
    sample_batch: int = opt(256, "samples per timed sampling pass")
    nfe: int = opt(35, "NFE of the timed sampling pass (Heun)")
    device: str = opt("auto", "auto | cpu | cuda")
    out: str = opt("benchmarks/results/throughput.json", "the JSON written")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_images(shape: tuple[int, ...], n: int = 2048, seed: int = 0) -> Dataset:
    """n uniform random images in [-1, 1] of `shape` (C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return Dataset(f"random{'x'.join(map(str, shape))}", torch.rand(n, *shape, generator=g) * 2 - 1, None, 0, "image")


def preset_network(preset: str) -> dict:
    """The network settings of a preset (its batch, data and optimiser stay the benchmark's); {} for ''."""
    if not preset:
        return {}
    net_keys = ("width", "depth", "channel_mult", "attention", "dropout", "skip_scale")
    return {k: v for k, v in PRESETS[check_choice("preset", preset, tuple(PRESETS))].items() if k in net_keys}


def device_label(device: str) -> str:
    """The JSON's device: the CUDA card's name, or the CPU and its thread count."""
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"


def target_forward(td) -> tuple:
    """A callable running the TD learner's target critic (no grad) on the TD-valid partner states of one batch,
    as its loss does, and that batch's valid fraction."""
    batch = td.collect()
    valid = batch["valid"].reshape(-1).bool()
    partners = batch["next"][valid].select(*td.target_critic.in_keys, strict=False)

    def run() -> None:
        with torch.no_grad():
            td.target_critic(partners)

    return run, float(valid.float().mean())


def measure(a: ThroughputArgs, dataset: Dataset, precision: str, compiled: bool) -> dict:
    """Median step times of the baseline and TD (interleaved), and one timed sampling pass."""
    base = Args(data=dataset.name, width=a.width, depth=a.depth, batch_size=a.batch_size, precision=precision,
                compile=compiled, device=a.device, progress=False, warmup_steps=0)
    base = dataclasses.replace(base, **preset_network(a.preset))
    learners = {m: make_learner(dataclasses.replace(base, method=m), dataset=dataset) for m in ("baseline", "td")}
    for learner in learners.values():
        learner.out_dir = None
    device = learners["td"].device
    # the training loop's step: no per-step host sync (finiteness read at log lines and checkpoints)
    steps = {m: (lambda learner=learner: learner.update(learner.collect(), check=False))
             for m, learner in learners.items()}
    steps["target_forward"], valid_fraction = target_forward(learners["td"])
    times: dict[str, list[float]] = {m: [] for m in steps}
    warmup_s = 0.0  # the untimed first rounds, where compilation happens: reported apart from the steady state
    for i in range(a.warmup + a.repeats):
        for m, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= a.warmup:
                times[m].append(time.perf_counter() - t0)
            else:
                warmup_s += time.perf_counter() - t0
    for learner in learners.values():
        learner.check_finite()
    step = {m: statistics.median(t) for m, t in times.items()}
    ema = learners["td"].ema.set_speed(precision if precision != "fp16" or device.type == "cuda" else "fp32",
                                       compiled)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (a.sample_batch, *dataset.sample_shape)
    t0 = time.perf_counter()
    sample(ema, ema.formulation, shape, nfe=a.nfe, generator=g, device=device)  # warm-up (and compilation)
    _sync(device)
    warmup_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    sample(ema, ema.formulation, shape, nfe=a.nfe, generator=g, device=device)
    _sync(device)
    sample_s = time.perf_counter() - t0
    params = sum(p.numel() for p in learners["td"].denoiser.parameters())
    return {"precision": precision, "compile": compiled, "parameters": params,
            "warmup_s": warmup_s, "compile_warmup_s": warmup_s if compiled else None,
            "baseline_step_s": step["baseline"], "td_step_s": step["td"],
            "baseline_img_s": a.batch_size / step["baseline"], "td_img_s": a.batch_size / step["td"],
            "td_over_baseline": step["td"] / step["baseline"],
            # TD's one extra piece of work is the target's no-grad forward at the TD-valid partners: with no other
            # overhead, TD / baseline would be (baseline + that forward) / baseline
            "target_forward_s": step["target_forward"], "valid_fraction": valid_fraction,
            "td_over_baseline_floor": (step["baseline"] + step["target_forward"]) / step["baseline"],
            "sample_img_s": a.sample_batch / sample_s, "sample_nfe": a.nfe}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(p, ThroughputArgs)
    a = dataclass_from_args(ThroughputArgs, p.parse_args())
    precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    compiles = [x.strip() for x in a.compile.split(",") if x.strip()]
    for x in precisions:
        check_choice("precision", x, ("fp32", "bf16", "fp16"))
    for x in compiles:
        check_choice("compile", x, ("off", "on"))
    if a.shape:
        try:
            shape = tuple(int(v) for v in a.shape.split(","))
        except ValueError:
            raise ConfigError(f"--shape {a.shape!r} must be C,H,W integers, e.g. 3,32,32") from None
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"--shape {a.shape!r} must be three positive integers C,H,W")
        dataset = synthetic_images(shape)
    else:
        dataset = load_dataset(a.data)
    device = device_label(a.device)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(x) for x in ["python", "-m", "benchmarks.throughput", *sys.argv[1:]])
    rows = []
    for c in compiles:  # every uncompiled row first: compilation is the slow part, and a time limit may cut it
        for precision in precisions:
            row = measure(a, dataset, precision, c == "on")
            rows.append(row)
            print(f"{precision:>4} compile {c:>3}: baseline {row['baseline_img_s']:8.0f} img/s, TD "
                  f"{row['td_img_s']:8.0f} img/s (TD/baseline {row['td_over_baseline']:.2f}, floor "
                  f"{row['td_over_baseline_floor']:.2f}), sampling "
                  f"{row['sample_img_s']:8.0f} img/s at NFE {a.nfe}", file=sys.stderr, flush=True)
            # rewritten (atomically) after each configuration: a run stopped by a time limit keeps the rows it has
            atomic_write_text(out, json.dumps({"benchmark": "throughput", "command": command, "device": device,
                                               "torch": torch.__version__, "data": dataset.name,
                                               "sample_shape": list(dataset.sample_shape),
                                               "settings": dataclasses.asdict(a), "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"throughput: error: {e}")
