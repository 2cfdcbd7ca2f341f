"""Per-level diagnostics: the training curves' binning, a closed-form oracle for the data error, trajectory invariants,
and the `diagnose` command."""
import json

import pytest
import torch
from tensordict import TensorDict

from diffusion_rl.cli import main
from diffusion_rl.data import Dataset
from diffusion_rl.diagnostics import LevelStats, data_error_per_level, trajectory_diagnostics
from diffusion_rl.formulations import EDMFormulation


def test_level_stats_bin_by_start_index_and_average_td_over_valid_samples():
    stats = LevelStats()
    out = TensorDict({"sample_base": torch.tensor([1.0, 3.0, 5.0, 7.0]),
                      "sample_td": torch.tensor([2.0, 0.0, 4.0, 0.0]),
                      "valid": torch.tensor([True, False, True, False]), "loss_td": torch.tensor(1.0)}, [])
    stats.add(torch.tensor([2.1, 1.9, 5.0, 5.2]), out)
    s = stats.summary()
    assert s == {"index": [2, 5], "count": [2, 2], "base": [2.0, 6.0], "valid": [0.5, 0.5], "td": [2.0, 4.0]}
    stats.add(torch.tensor([0.0]), TensorDict({"sample_base": torch.tensor([1.0]), "sample_td": torch.tensor([0.0]),
                                               "valid": torch.tensor([False])}, []))
    assert stats.summary()["td"] == [None]  # no valid sample in the bin: no TD mean; the first summary was reset


class GaussianDenoiser:
    """The exact denoiser of N(0, s^2 I) data under VE noise: D(x, sigma) = s^2 / (s^2 + sigma^2) x."""

    def __init__(self, s: float, formulation) -> None:
        self.s, self.formulation, self.sample_shape, self.conditional = s, formulation, (4,), False

    def __call__(self, x, level, labels=None):
        lv = level.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return self.s ** 2 / (self.s ** 2 + lv ** 2) * x


def test_data_error_matches_the_gaussian_posterior_variance():
    """With the exact denoiser, E (D - x0)^2 per pixel = s^2 sigma^2 / (s^2 + sigma^2) at every grid level."""
    s, form = 0.5, EDMFormulation()
    data = Dataset("gauss", s * torch.randn(20_000, 4, generator=torch.Generator().manual_seed(1)), None, 0, "points")
    rep = data_error_per_level(GaussianDenoiser(s, form), data, n=8000, seed=0)
    levels = torch.tensor(rep["level"], dtype=torch.float64)
    expected = s ** 2 * levels ** 2 / (s ** 2 + levels ** 2)
    torch.testing.assert_close(torch.tensor(rep["error"], dtype=torch.float64), expected, rtol=0.06, atol=0)


def test_trajectory_diagnostics_on_the_sampler_grid():
    form = EDMFormulation()
    rep = trajectory_diagnostics(GaussianDenoiser(0.5, form), n=64, strides=(1, 3))
    assert rep["level"] == pytest.approx(form.grid().tolist())  # one Euler evaluation per grid level
    assert rep["error_to_end"][-1] == 0.0  # Euler's last step to sigma = 0 returns D(x_N-1)
    assert len(rep["self_consistency"]["1"]) == 17 and len(rep["self_consistency"]["3"]) == 15
    assert all(v >= 0 for v in rep["self_consistency"]["3"])


def test_training_logs_per_level_curves_and_diagnose_plots_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "moons", "--method", "td", "--steps", "30", "--no-eval", "--no-progress",
                 "--width", "16", "--batch-size", "32", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "td-edm" / "metrics.jsonl").read_text().splitlines()]
    pl = lines[-1]["per_level"]
    assert sum(pl["count"]) == 32 * 5  # the 5 steps since the previous log line (log_every 25)
    assert all(0 <= v <= 1 for v in pl["valid"]) and len(pl["td"]) == len(pl["index"])
    assert main(["diagnose", "--checkpoint", str(out / "td-edm" / "checkpoint.pt"), "--n", "32"]) == 0
    rep = json.loads((out / "td-edm" / "diagnose.json").read_text())
    assert (out / "td-edm" / "diagnose.png").stat().st_size > 10_000
    assert len(rep["data"]["error"]) == 18 and rep["training"][-1]["per_level"] == pl
    assert main(["diagnose", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_diagnose_runs_on_vp_on_its_training_grid(tmp_path):
    out = tmp_path / "vp"
    assert main(["train", "--data", "moons", "--formulation", "vp", "--method", "baseline", "--steps", "4",
                 "--no-eval", "--no-progress", "--width", "16", "--batch-size", "16", "--out", str(out)]) == 0
    ckpt = next(out.rglob("checkpoint.pt"))
    assert main(["diagnose", "--checkpoint", str(ckpt), "--n", "16"]) == 0  # Euler runs in VP's VE view
    rep = json.loads((ckpt.parent / "diagnose.json").read_text())
    assert rep["trajectory"]["level"] == pytest.approx(rep["data"]["level"], rel=1e-5)  # VP's 18 training levels


def test_trajectory_diagnostics_condition_a_conditional_denoiser():
    seen = []

    class Conditional(GaussianDenoiser):
        def __call__(self, x, level, labels=None):
            seen.append(labels)
            return super().__call__(x, level, labels)

    den = Conditional(0.5, EDMFormulation())
    den.conditional = True
    trajectory_diagnostics(den, n=4, labels=torch.tensor([0, 1, 1, 0]))
    assert len(seen) == 18 and all(y is not None and y.tolist() == [0, 1, 1, 0] for y in seen)
