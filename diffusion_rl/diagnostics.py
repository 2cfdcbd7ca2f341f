"""Per-noise-level diagnostics of TD training and of a trained denoiser (method.md §11).

- `LevelStats` bins per-sample training outputs by the start state's grid index (rounded) and averages them between
  log lines: the TD error, the base error and the TD-valid fraction per level. The learner writes them to
  metrics.jsonl under "per_level".
- `data_error_per_level`: mean over pixels of (D(x0 + sigma eps) - x0)^2 at each grid level, on the data.
- `trajectory_diagnostics`: on the sampler's own trajectories (Euler on the training grid), per level, the distance of
  D(x_i) to the point the trajectory lands on, and the self-consistency |D(x_i) - D(x_i+k)|^2 across strides k: how
  far the prediction of x0 moves over k steps of the model's own path (not zero even for the exact denoiser: the
  posterior mean sharpens as the noise falls; compare checkpoints, not against zero).
- `diagnose(checkpoint)` computes both on a checkpoint and plots them with the per-level training curves
  (`diffusion-rl diagnose CHECKPOINT`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .formulations import mean_pixels
from .level_stats import LevelStats  # re-exported: the per-level training curves

__all__ = ["LevelStats", "data_error_per_level", "trajectory_diagnostics", "diagnose", "plot_diagnostics",
           "check_finite_weights"]


@torch.no_grad()
def data_error_per_level(denoiser, dataset, n: int = 256, seed: int = 0,
                         device: str | torch.device = "cpu") -> dict[str, list]:
    """mean_pixels (D(x_level) - x0)^2 at every grid level, x_level ~ q(x | x0), on n data samples."""
    form = denoiser.formulation
    g = torch.Generator().manual_seed(seed)
    x0, labels = dataset.draw(n, g)
    x0 = x0.to(device, torch.float32)
    labels = None if labels is None or not denoiser.conditional else labels.to(device)
    levels = form.grid(torch.float32)
    errors = []
    for level in levels:
        lv = level.expand(n).to(device)
        x = form.add_noise(x0, lv, torch.randn(x0.shape, generator=g).to(device))
        errors.append(float(mean_pixels((denoiser(x, lv, labels) - x0).pow(2)).mean()))
    return {"level": levels.tolist(), "error": errors}


@torch.no_grad()
def trajectory_diagnostics(denoiser, n: int = 256, strides: tuple[int, ...] = (1, 2, 3), seed: int = 0,
                           device: str | torch.device = "cpu", labels: Tensor | None = None) -> dict:
    """On n trajectories of the Euler sampler on the training grid (one evaluation per grid level, float64; VP in
    its variance-exploding view): per level, mean_pixels (D(x_i) - x_end)^2 with x_end the sample the trajectory
    returns, and, per stride k, mean_pixels (D(x_i) - D(x_i+k))^2, how far the x0 prediction moves over k steps of
    the path. `labels` [n] condition a class-conditional denoiser."""
    from .samplers import sample

    form = denoiser.formulation
    calls: list[tuple[float, Tensor]] = []

    def recording(x, level, labels):
        d = denoiser(x, level, labels)
        calls.append((float(level.reshape(-1)[0]), d.double().cpu()))
        return d

    g = torch.Generator(device=device).manual_seed(seed)
    res = sample(recording, form, (n, *denoiser.sample_shape), sampler="euler", steps=getattr(form, "max_steps", form.steps), generator=g,
                 device=device, labels=None if labels is None else labels.to(device))
    end = res.x.double().cpu()
    levels = [lv for lv, _ in calls]
    outs = torch.stack([d for _, d in calls])  # [L, n, *F]

    def msd(a: Tensor, b: Tensor) -> float:
        return float(mean_pixels((a - b).pow(2)).mean())

    report = {"level": levels, "error_to_end": [msd(o, end) for o in outs], "self_consistency": {}}
    for k in strides:
        report["self_consistency"][str(k)] = [msd(outs[i], outs[i + k]) for i in range(len(calls) - k)]
    return report


def _per_level_curves(metrics_path: Path) -> list[dict]:
    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("per_level")]


def plot_diagnostics(report: dict, path: str | Path) -> None:
    """Four panels against the noise level: the data error, the error to the trajectory's end, self-consistency
    across strides, and the per-level training curves (TD error, base error, valid fraction) at a few steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    d, t = report["data"], report["trajectory"]
    axes[0].plot(d["level"], d["error"], marker="o")
    axes[0].set(title="denoiser error vs x0 (data)", ylabel="mean (D - x0)^2")
    axes[1].plot(t["level"], t["error_to_end"], marker="o")
    axes[1].set(title="error vs the trajectory's end (sampler)")
    for k, v in t["self_consistency"].items():
        axes[2].plot(t["level"][:len(v)], v, marker="o", label=f"stride {k}")
    axes[2].set(title="self-consistency |D(x_i) - D(x_i+k)|^2")
    axes[2].legend(fontsize=8)
    for ax in axes[:3]:
        ax.set(xscale="log", yscale="log", xlabel="noise level")
        ax.grid(alpha=0.3, which="both")
    curves = report.get("training", [])
    ax = axes[3]
    if curves:
        picks = [curves[0], curves[len(curves) // 2], curves[-1]] if len(curves) > 2 else curves
        for row in picks:
            pl = row["per_level"]
            for key, style in (("td", "-"), ("base", "--")):
                if key in pl:
                    ax.plot(pl["index"], pl[key], style, marker=".", label=f"{key}, step {row['step']}")
        ax.set(yscale="log", xlabel="grid index of the start state (0: noisiest)",
               title="training: TD (solid) and base (dashed) per level")
        ax.legend(fontsize=6)
        if "valid" in curves[-1]["per_level"]:
            twin = ax.twinx()
            pl = curves[-1]["per_level"]
            twin.plot(pl["index"], pl["valid"], color="gray", alpha=0.5)
            twin.set(ylabel="valid fraction (last log line)", ylim=(0, 1.05))
    else:
        ax.text(0.5, 0.5, "no per-level training curves\n(metrics.jsonl beside the checkpoint)", ha="center",
                va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_finite_weights(denoiser, checkpoint: str | Path) -> None:
    """Raise ConfigError when the denoiser loaded from `checkpoint` holds a NaN or infinite weight."""
    bad = [name for name, t in denoiser.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        from .errors import ConfigError

        raise ConfigError(f"checkpoint {str(checkpoint)!r} holds non-finite weights ({len(bad)} tensors, e.g. "
                          f"{bad[0]}): its run diverged or the file is corrupt; there is nothing to evaluate")


def diagnose(checkpoint: str | Path, out: str | Path, n: int = 256, seed: int = 0, device="cpu",
             data: str | None = None) -> dict:
    """Compute the per-level diagnostics of a checkpoint's EMA denoiser; write diagnose.json and diagnose.png.
    `data` overrides the data set named in the checkpoint (a path data set that moved): its content must be the
    data the checkpoint was trained on. Every check (finite weights, the data's shape and content hash, a writable
    `out`) passes before `out` is created and anything is computed."""
    from .data import load_dataset
    from .checkpoints import check_data_hash, load_denoiser
    from .errors import ConfigError
    from .runs import atomic_write_text, check_writable_folder, record_written

    checkpoint = Path(checkpoint)
    denoiser, cfg = load_denoiser(checkpoint, device)
    check_finite_weights(denoiser, checkpoint)
    dataset = load_dataset(data or cfg["dataset"], seed=cfg.get("train", {}).get("seed", 0))
    if tuple(dataset.sample_shape) != tuple(denoiser.sample_shape):
        raise ConfigError(f"the data set {dataset.name!r} has samples of shape {tuple(dataset.sample_shape)}, the "
                          f"checkpoint's network {tuple(denoiser.sample_shape)}; pass the data it was trained on")
    check_data_hash(dataset, cfg, checkpoint)
    out = check_writable_folder(out)
    labels = None
    if denoiser.conditional and dataset.labels is not None:  # the trajectories get labels drawn from the data
        labels = dataset.labels[torch.randint(len(dataset.labels), (n,), generator=torch.Generator().manual_seed(seed))]
    report = {"checkpoint": str(checkpoint), "method": cfg.get("method"),
              "data": data_error_per_level(denoiser, dataset, n, seed, device),
              "trajectory": trajectory_diagnostics(denoiser, n, seed=seed, device=device, labels=labels),
              "training": _per_level_curves(checkpoint.parent / "metrics.jsonl")}
    for name in ("diagnose.json", "diagnose.png"):
        record_written(out, name, "diagnose")
    atomic_write_text(out / "diagnose.json", json.dumps(report, indent=1))
    plot_diagnostics(report, out / "diagnose.png")
    return report
