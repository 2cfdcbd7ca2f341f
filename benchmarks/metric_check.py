"""What the library's FID calls good: real images, and known corruptions of them, scored like generated samples.

    python -m benchmarks.metric_check [--data digits mnist5k] [--seeds 0 1 2] [--n-samples 1000]

The FIDs in the result tables use a classifier trained on each data set, not Inception, so their scale is the
library's own. To read them, this scores sets of real training images with the evaluation protocol of
`benchmarks.compare` (the same `Evaluator`, n_samples and reference, the whole training set): unchanged (what a
model that samples training images uniformly would score), blurred (Gaussian, sigma in pixels), with added Gaussian
noise (std in the [-1, 1] data units, clamped), and with half the classes missing (mode dropping). Each seed draws
other images (and noise). Written as JSON with its command; `benchmarks.report` renders it into docs/results.md and
the tables quoted in the README or docs/ (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_rl.data import Dataset, load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.evaluation import EvalConfig, Evaluator


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Images [B, C, H, W] blurred by a separable Gaussian of `sigma` pixels (radius 3 sigma, edges replicated)."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# name -> (data set, generator, n) -> n corrupted real images
Corruption = Callable[[Dataset, torch.Generator, int], Tensor]


def _draw(ds: Dataset, g: torch.Generator, n: int, pool: Tensor | None = None) -> Tensor:
    """n training images drawn uniformly with replacement (from `pool`, indices, if given): a perfect memoriser."""
    idx = torch.arange(len(ds.x)) if pool is None else pool
    return ds.x[idx[torch.randint(len(idx), (n,), generator=g)]]


def corruptions() -> dict[str, Corruption]:
    """The corruptions scored, in table order."""
    out: dict[str, Corruption] = {"real images": _draw}
    for s in (0.5, 1.0, 2.0):
        out[f"blur sigma {s:g} px"] = lambda ds, g, n, s=s: gaussian_blur(_draw(ds, g, n), s)
    for std in (0.1, 0.2, 0.4):
        out[f"noise std {std:g}"] = lambda ds, g, n, std=std: (
            _draw(ds, g, n) + std * torch.randn(n, *ds.sample_shape, generator=g)).clamp(-1, 1)
    out["half the classes"] = lambda ds, g, n: _draw(ds, g, n, pool=torch.nonzero(
        ds.labels < (int(ds.labels.max()) + 1) // 2).flatten())
    return out


def score_corruptions(ds: Dataset, seeds: list[int], n_samples: int) -> list[dict]:
    """One record per (corruption, seed): FID, KID and the protocol's fields, scored by compare's Evaluator."""
    evaluator = Evaluator(ds, EvalConfig(n_samples=n_samples))
    records = []
    for name, corrupt in corruptions().items():
        for seed in seeds:
            scores = evaluator.score(corrupt(ds, torch.Generator().manual_seed(seed), n_samples))
            records.append({"data": ds.name, "corruption": name, "seed": seed, "n_samples": n_samples,
                            **{k: round(v, 4) for k, v in scores.items()}, **evaluator.feature_info})
            print(f"{ds.name} {name} seed {seed}: FID {scores['fid']:.2f}", file=sys.stderr, flush=True)
    return records


def summarise_calibration(records: list[dict]) -> list[dict]:
    """Mean and std over seeds of FID and KID per (data set, corruption), in the records' order."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        for metric in ("fid", "kid"):
            groups.setdefault((r["data"], r["corruption"], metric), []).append(r[metric])
    return [{"data": d, "corruption": c, "metric": m, "n_seeds": len(v), "mean": statistics.fmean(v),
             "std": statistics.stdev(v) if len(v) > 1 else 0.0} for (d, c, m), v in groups.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "mnist5k"], help="image data sets with class labels")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="each seed draws other images and noise")
    p.add_argument("--n-samples", type=int, default=1000, help="images per scored set (compare's default)")
    p.add_argument("--out", default="benchmarks/results/metric_calibration.json", help="the JSON written")
    a = p.parse_args()
    if a.n_samples < 2:
        raise ConfigError(f"--n-samples {a.n_samples} must be >= 2 (FID needs two images)")
    if len(set(a.seeds)) < len(a.seeds):
        raise ConfigError(f"--seeds {a.seeds} repeats a seed; each seed must be given once")
    sets = [load_dataset(name) for name in a.data]  # every data set checked before any scoring
    for ds in sets:
        if ds.kind != "image" or ds.labels is None:
            raise ConfigError(f"--data {ds.name!r} is not an image data set with class labels")
    records = [r for ds in sets for r in score_corruptions(ds, a.seeds, a.n_samples)]
    command = " ".join(shlex.quote(x) for x in ["python", "-m", "benchmarks.metric_check", *sys.argv[1:]])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "kind": "metric_calibration",
                               "summary": summarise_calibration(records), "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"metric_check: error: {e}")
