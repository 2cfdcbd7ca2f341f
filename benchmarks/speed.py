"""Speed benchmark: seconds per training step (baseline and TD agent) and per sampling pass.

    python benchmarks/speed.py [--data digits] [--batch-size 128] [--width 32] [--repeats 30] [--out benchmarks/results/speed.json]

Writes a JSON record with the command that made it, the device and torch's thread count. Timings are
medians over `repeats` after `warmup` untimed calls.
"""
from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_rl.cli import Args, make_learner  # noqa: E402
from diffusion_rl.data import load_dataset  # noqa: E402
from diffusion_rl.samplers import sample  # noqa: E402


@dataclass
class BenchArgs:
    data: str = "digits"        # data set
    batch_size: int = 128       # training batch
    width: int = 32             # network width
    repeats: int = 30           # timed calls per measurement
    warmup: int = 5             # untimed calls first
    sample_batch: int = 500     # samples per sampling pass
    nfe: int = 35               # NFE of the timed sampling pass (Heun)
    device: str = "auto"
    out: str = "benchmarks/results/speed.json"


def _median_seconds(fn, repeats: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in asdict(BenchArgs()).items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = BenchArgs(**vars(p.parse_args()))
    dataset = load_dataset(a.data)
    results = {}
    for method in ("baseline", "td"):
        args = Args(data=a.data, method=method, batch_size=a.batch_size, width=a.width, device=a.device,
                    out="/tmp/diffusion_rl_bench")
        learner = make_learner(args, dataset=dataset)
        learner.out_dir = None
        dev = learner.device
        sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
        results[f"train_step_s_{method}"] = _median_seconds(lambda: learner.update(learner.collect()),
                                                            a.repeats, a.warmup, sync)
    den = learner.ema
    shape = (a.sample_batch, *dataset.sample_shape)
    results[f"sample_pass_s_heun_nfe{a.nfe}_batch{a.sample_batch}"] = _median_seconds(
        lambda: sample(den, den.formulation, shape, nfe=a.nfe, device=dev), max(3, a.repeats // 10), 1, sync)
    record = {"benchmark": "speed", **results, "config": asdict(a), "device": str(dev),
              "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "command": " ".join(shlex.quote(x) for x in ["python", *sys.argv])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
