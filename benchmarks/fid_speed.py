"""FID-at-scale timing: the whole FID pipeline (reference features, then sampling and the metric at several NFE
budgets) of a network of any preset, sampling and metric timed apart; JSON with the command and the device.

    python -m benchmarks.fid_speed --preset cifar10 --n-samples 50000 --nfe-grid 3,5,9,17,35,79 --precision bf16 \
        --device cuda --out benchmarks/results/gpu/fid50k_speed.json

No weights or data are needed: with `--features inception` (the default) the Inception-v3 gets a random state dict
written to a temporary file (loaded through `--inception-weights` as a real file would be); with `--features
classifier` the small classifier is trained on random labels first (timed apart, `feature_net_s`). The reference set is
uniform random images of --shape and the network is untrained, so the FID values are meaningless and only the times
count. The metric runs on --device (`EvalConfig.device`), the network samples there too.

The JSON gives, per NFE, the sampling time and the metric time (features, FID/KID, precision/recall, class coverage,
memorisation), `metric_share` (all metric time over all sampling time) and two FID-50k estimates from the measured
sample count: `fid50k_total_s_scaled` (the measured grid, scaled linearly to 50,000 samples) and
`fid50k_six_budgets_s` (FID-50k at the budgets 3, 5, 9, 17, 35, 79: sampling time per network evaluation times their
NFEs, plus the mean metric time per budget for each, plus the reference, all scaled linearly to 50,000 images; the
capped parts of the metric, KID's subsets and the k-NN work, do not grow with the count, so that part is an upper
bound). A first, untimed pass of one batch (`warmup_s`) takes lazy initialisation and compilation out of the times.
Target (a benchmark, not a test): `metric_share` at most 0.10 at 10,000 samples with the small network (`--preset ''`)
and `--features classifier` on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_rl.build import make_learner
from diffusion_rl.config import Args, add_dataclass_args, dataclass_from_args, opt
from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError, check_choice
from diffusion_rl.evaluation import EvalConfig, Evaluator
from diffusion_rl.feature_net import get_feature_net
from diffusion_rl.inception import InceptionV3FID
from diffusion_rl.training import resolve_device

from .throughput import device_label, preset_network, synthetic_images

SIX_BUDGETS = (3, 5, 9, 17, 35, 79)  # the FID-50k budgets of the GPU issue
FID50K = 50000
METRIC_SHARE_TARGET = 0.10  # at 10,000 samples, the small network, classifier features, CPU


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
    features: str = opt("inception", "FID features: inception (random weights) | classifier (trained on random "
                                     "labels)")
    compile: bool = opt(False, "torch.compile the network for sampling (EvalConfig.compile)")


def metric_share(sampling_s: dict[int, float], metric_s: dict[int, float]) -> float:
    """All metric time over all sampling time."""
    return sum(metric_s.values()) / sum(sampling_s.values())


def fid50k_estimate(n_samples: int, reference_s: float, sampling_s: dict[int, float], metric_s: dict[int, float],
                    budgets: Sequence[int] = SIX_BUDGETS, target: int = FID50K) -> dict[str, float]:
    """Seconds for FID at `target` samples at each of `budgets`, from times measured at `n_samples` per NFE:
    sampling = (seconds per network evaluation, sum(sampling_s) / sum(NFE)) x sum(budgets) x target / n_samples;
    metric = mean(metric_s) x len(budgets) x target / n_samples; reference = reference_s x target / n_samples."""
    scale = target / n_samples
    per_evaluation = sum(sampling_s.values()) / sum(sampling_s)
    sampling = per_evaluation * sum(budgets) * scale
    metric = sum(metric_s.values()) / len(metric_s) * len(budgets) * scale
    reference = reference_s * scale
    return {"fid50k_six_budgets_s": reference + sampling + metric, "fid50k_six_budgets_sampling_s": sampling,
            "fid50k_six_budgets_metric_s": metric, "fid50k_reference_s": reference}


def _labelled(data: Dataset, num_classes: int = 10) -> Dataset:
    """`data` with seeded random labels (the classifier features need some)."""
    labels = torch.randint(0, num_classes, (len(data),), generator=torch.Generator().manual_seed(1))
    return Dataset(f"{data.name}-labelled", data.x, labels, num_classes, "image")


def run(a: FIDSpeedArgs) -> dict:
    """Times of one FID sweep: the reference, then each NFE's sampling and metric apart."""
    check_choice("precision", a.precision, ("fp32", "bf16", "fp16"))
    check_choice("features", a.features, ("inception", "classifier"))
    shape = tuple(int(v) for v in a.shape.split(","))
    nfes = tuple(int(v) for v in a.nfe_grid.split(","))
    data = synthetic_images(shape, n=a.n_samples)
    if a.features == "classifier":
        data = _labelled(data)
    net = {"width": a.width, **preset_network(a.preset)}
    learner = make_learner(Args(data=data.name, device=a.device, progress=False, **net), dataset=data)
    ema = learner.ema
    feature_net_s = None
    with tempfile.TemporaryDirectory() as tmp:  # the random Inception weights, the classifier's cache
        config = EvalConfig(nfe_grid=nfes, n_samples=a.n_samples, features=a.features, batch_size=a.batch_size,
                            device=a.device, precision=a.precision, compile=a.compile, cache_dir=tmp)
        if a.features == "inception":
            weights = Path(tmp) / "random_inception.pth"
            torch.save(InceptionV3FID().state_dict(), weights)
            config = dataclasses.replace(config, inception_weights=str(weights))
        else:
            t0 = time.perf_counter()
            get_feature_net(data, cache_dir=tmp)  # trained once and cached; the Evaluator loads it
            feature_net_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = Evaluator(data, config)
        reference_s = time.perf_counter() - t0

        t0 = time.perf_counter()  # one untimed batch: lazy initialisation, autotuning, compilation
        ev.config = dataclasses.replace(config, n_samples=max(2, min(a.batch_size, a.n_samples)))
        ev.score(ev.generate(ema, nfes[0], learner.device)[0])
        ev.config = config
        warmup_s = time.perf_counter() - t0

    sampling_s, metric_s = {}, {}
    for nfe in nfes:
        t0 = time.perf_counter()
        x, _ = ev.generate(ema, nfe, learner.device)  # on the host when it returns: the device is done
        t1 = time.perf_counter()
        ev.score(x)  # floats: the device is done
        sampling_s[nfe], metric_s[nfe] = t1 - t0, time.perf_counter() - t1
    per_nfe = {nfe: sampling_s[nfe] + metric_s[nfe] for nfe in nfes}
    total = reference_s + sum(per_nfe.values())
    share = metric_share(sampling_s, metric_s)
    return {"reference_features_s": reference_s, "feature_net_s": feature_net_s, "warmup_s": warmup_s,
            "sampling_s": sampling_s, "metric_s": metric_s, "sample_and_features_s": per_nfe,
            "metric_share": share, "metric_share_target": METRIC_SHARE_TARGET,
            **fid50k_estimate(a.n_samples, reference_s, sampling_s, metric_s),
            "total_s": total, "fid50k_total_s_scaled": total * FID50K / a.n_samples,
            "metric_device": str(resolve_device(a.device)), "parameters": sum(p.numel() for p in ema.parameters())}


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
    print(f"FID over {len(row['sample_and_features_s'])} NFE budgets, {a.n_samples} samples each: sampling "
          f"{sum(row['sampling_s'].values()):.1f} s, metric {sum(row['metric_s'].values()):.1f} s (share "
          f"{row['metric_share']:.3f}, target <= {METRIC_SHARE_TARGET}); FID-50k at NFE "
          f"{','.join(map(str, SIX_BUDGETS))}: about {row['fid50k_six_budgets_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"fid_speed: error: {e}")
