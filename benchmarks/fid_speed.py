"""FID-at-scale timing: the whole Inception FID pipeline (reference features, then sampling and features at several
NFE budgets) of a network of any preset, timed end to end; JSON with the command and the device.

    python -m benchmarks.fid_speed --preset cifar10 --n-samples 50000 --nfe-grid 3,5,9,17,35,79 --precision bf16 \
        --device cuda --out benchmarks/results/gpu/fid50k_speed.json

No weights or data are needed: the Inception-v3 gets a random state dict written to a temporary file (loaded through
`--inception-weights` as a real file would be), the reference set is uniform random images of --shape and the
network is untrained, so the FID values are meaningless and only the times count. With fewer samples than 50,000 the
JSON also gives the time scaled to FID-50k (sampling and features grow linearly in the number of images).
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_rl.build import make_learner
from diffusion_rl.config import Args, add_dataclass_args, dataclass_from_args, opt
from diffusion_rl.errors import ConfigError, check_choice
from diffusion_rl.evaluation import EvalConfig, Evaluator
from diffusion_rl.inception import InceptionV3FID

from .throughput import device_label, preset_network, synthetic_images


@dataclass
class FIDSpeedArgs:
    shape: str = opt("3,32,32", "C,H,W of the (random) images")
    preset: str = opt("cifar10", "network preset ('' for --width)")
    width: int = opt(32, "network width when no preset is given")
    n_samples: int = opt(50000, "samples per NFE (and reference images)")
    nfe_grid: str = opt("3,5,9,17,35,79", "NFE budgets, comma-separated (Heun; Euler at even NFE)")
    precision: str = opt("fp32", "the network's sampling precision: fp32 | bf16 | fp16 (CUDA)")
    batch_size: int = opt(500, "samples per sampling batch")
    device: str = opt("auto", "auto | cpu | cuda")
    out: str = opt("benchmarks/results/fid_speed.json", "the JSON written")


def run(a: FIDSpeedArgs) -> dict:
    """Times of one FID sweep: the reference features, then each NFE's sampling + features."""
    check_choice("precision", a.precision, ("fp32", "bf16", "fp16"))
    shape = tuple(int(v) for v in a.shape.split(","))
    nfes = tuple(int(v) for v in a.nfe_grid.split(","))
    data = synthetic_images(shape, n=a.n_samples)
    net = {"width": a.width, **preset_network(a.preset)}
    learner = make_learner(Args(data=data.name, device=a.device, progress=False, **net), dataset=data)
    ema = learner.ema.set_speed(a.precision)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random_inception.pth"
        torch.save(InceptionV3FID().state_dict(), weights)
        t0 = time.perf_counter()
        ev = Evaluator(data, EvalConfig(nfe_grid=nfes, n_samples=a.n_samples, features="inception",
                                        inception_weights=str(weights), batch_size=a.batch_size, device=a.device))
        reference_s = time.perf_counter() - t0
    per_nfe = {}
    for nfe in nfes:
        t0 = time.perf_counter()
        x, _ = ev.generate(ema, nfe, learner.device)
        ev.score(x)
        per_nfe[nfe] = time.perf_counter() - t0
    total = reference_s + sum(per_nfe.values())
    scale = 50000 / a.n_samples
    return {"reference_features_s": reference_s, "sample_and_features_s": per_nfe, "total_s": total,
            "fid50k_total_s_scaled": total * scale, "parameters": sum(p.numel() for p in ema.parameters())}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(p, FIDSpeedArgs)
    a = dataclass_from_args(FIDSpeedArgs, p.parse_args())
    row = run(a)
    device = device_label(a.device)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(x) for x in ["python", "-m", "benchmarks.fid_speed", *sys.argv[1:]])
    out.write_text(json.dumps({"benchmark": "fid_speed", "command": command, "device": device,
                               "torch": torch.__version__, "settings": dataclasses.asdict(a), **row}, indent=1))
    print(f"FID over {len(row['sample_and_features_s'])} NFE budgets, {a.n_samples} samples each: "
          f"{row['total_s']:.0f} s (scaled to 50k: {row['fid50k_total_s_scaled']:.0f} s); wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"fid_speed: error: {e}")
