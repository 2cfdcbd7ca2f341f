"""Where each sampler lands when the denoiser is exact: the Gaussian fitted to a data set, solved in closed form.

    python -m benchmarks.solver_check [--data digits mnist5k] [--samplers heun dpmpp_2m dpmpp_2m_lof ipndm]
                                      [--nfe-grid 3,5,9,17,35] [--n-samples 1000] [--seed 0]

A trained network's FID mixes two errors: the network's and the solver's. This isolates the solver's on each data
set's own scale. Fit x0 ~ N(mu, U diag(lam) U^T) to the training images (flattened, in [-1, 1]); its denoiser is
exact, D(x; sigma) = mu + U diag(lam / (lam + sigma^2)) U^T (x - mu), and so is the probability-flow ODE's solution
from a start x_T at sigma_max: x* = mu + U diag(sqrt(lam / (lam + sigma_max^2))) U^T (x_T - mu) (each eigen-
coordinate scales by sqrt(lam + sigma^2) along the ODE). Every sampler runs from the same starts on the EDM grid it
uses in the benchmarks, in float64, and is scored against x*:

- error: the RMS distance to x* over the RMS distance of x* from mu (0 = exact);
- amplitude of a band of eigen-directions: the RMS size of the sample's coordinates in the band over x*'s (1 =
  right; below 1 the samples are too smooth there, like a blur; above 1 too rough, like added pixel noise). The
  bands split the directions outside the top ones that hold 90% of the variance ("coarse") by the share of the
  variance above them: "fine" 90-99%, "finer" 99-99.9%, "finest" beyond 99.9% (directions with less variance than
  sigma_min^2, below what any sampler resolves, are left out). A band's RMS is dominated by its largest
  directions, hence three bands.

Written as JSON with its command; `benchmarks.report` renders it into docs/results.md and the tables quoted in the
README or docs/ (docs/evaluation.md), and flags the (solver, NFE) cells of the result tables where a solver fails here.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from diffusion_rl.data import Dataset, load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import EDMFormulation
from diffusion_rl.samplers import sample, steps_for_nfe
from diffusion_rl.schedules import edm_sampling_sigmas

# amplitude bands: the directions whose larger ones hold [lo, hi) of the variance (the top 90% are "coarse")
BANDS = {"fine": (0.9, 0.99), "finer": (0.99, 0.999), "finest": (0.999, 1.0)}


class GaussianFit:
    """The Gaussian with a data set's mean and covariance: its exact denoiser and exact ODE solution."""

    def __init__(self, ds: Dataset, resolved: float = EDMFormulation().sigma_min ** 2):
        x = ds.x.reshape(len(ds.x), -1).double()
        self.mean = x.mean(0)
        lam, self.basis = torch.linalg.eigh(torch.cov((x - self.mean).T))  # ascending eigenvalues
        self.lam = lam.clamp_min(0)
        above = (self.lam.flip(0).cumsum(0).flip(0) - self.lam) / self.lam.sum()  # share held by larger directions
        self.bands = {name: (above >= lo) & (above < hi) & (self.lam > resolved) for name, (lo, hi) in BANDS.items()}

    def coords(self, x: Tensor) -> Tensor:
        """Eigen-coordinates of x - mean, [B, D]."""
        return (x.reshape(len(x), -1) - self.mean) @ self.basis

    def denoiser(self) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """The exact denoiser E[x0 | x_sigma] of this Gaussian, with the samplers' signature."""
        def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
            shrink = self.lam / (self.lam + sigma.reshape(-1, 1).to(x) ** 2)
            return (self.mean + (self.coords(x) * shrink) @ self.basis.T).reshape(x.shape)
        return denoise

    def ode_solution_coords(self, x_start: Tensor, sigma_max: float) -> Tensor:
        """Eigen-coordinates of the exact probability-flow ODE solution at sigma = 0 from x_start at sigma_max."""
        return self.coords(x_start) * (self.lam / (self.lam + sigma_max ** 2)).sqrt()


def rms(z: Tensor) -> float:
    """Root mean over samples of the squared norm of each row."""
    return z.pow(2).sum(1).mean().sqrt().item()


def score_solvers(ds: Dataset, samplers: list[str], nfe_grid: list[int], n_samples: int, seed: int) -> list[dict]:
    """One record per (sampler, NFE): error and each band's amplitude against the exact ODE solution."""
    fit, f = GaussianFit(ds), EDMFormulation()
    shape = (n_samples, *ds.sample_shape)
    start = f.prior(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # what sample() draws
    exact = fit.ode_solution_coords(start, f.sigma_max)
    records = []
    for sampler in samplers:
        for nfe in nfe_grid:
            res = sample(fit.denoiser(), f, shape, sampler=sampler, nfe=nfe,
                         generator=torch.Generator().manual_seed(seed))
            z = fit.coords(res.x)
            grid = edm_sampling_sigmas(res.steps, f.sigma_min, f.sigma_max, f.rho, dtype=torch.float64)
            records.append({"data": ds.name, "sampler": sampler, "nfe": nfe, "seed": seed, "n_samples": n_samples,
                            "error": round(rms(z - exact) / rms(exact), 5),
                            **{f"{band}_amplitude": round(rms(z[:, m]) / rms(exact[:, m]), 5)
                               for band, m in fit.bands.items()},
                            **{f"{band}_directions": int(m.sum()) for band, m in fit.bands.items()},
                            "sigmas": [round(s, 4) for s in grid.tolist()]})
            print(f"{ds.name} {sampler} NFE {nfe}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in records[-1].items() if k == "error" or k.endswith("_amplitude")),
                file=sys.stderr, flush=True)
    return records


def check_grid(samplers: list[str], nfe_text: str, n_samples: int) -> list[int]:
    """The NFE budgets of `nfe_text`; ConfigError, before any work, for an unknown sampler, a budget a sampler
    cannot reach, or fewer than 2 samples."""
    try:
        nfe_grid = [int(n) for n in nfe_text.split(",")]
    except ValueError:
        raise ConfigError(f"--nfe-grid {nfe_text!r} must be comma-separated integers, e.g. 3,5,9") from None
    edm_samplers = EDMFormulation().samplers
    for sampler in samplers:
        if sampler not in edm_samplers:
            raise ConfigError(f"--samplers {sampler!r} is not an EDM-family sampler; accepted: "
                              f"{', '.join(edm_samplers)}")
        for nfe in nfe_grid:
            steps_for_nfe(sampler, nfe)
    if n_samples < 2:
        raise ConfigError(f"--n-samples {n_samples} must be >= 2")
    return nfe_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "mnist5k"], help="image data sets")
    p.add_argument("--samplers", nargs="+", default=["heun", "dpmpp_2m", "dpmpp_2m_lof", "ipndm"],
                   help="EDM-family samplers")
    p.add_argument("--nfe-grid", default="3,5,9,17,35", help="comma-separated NFE budgets")
    p.add_argument("--n-samples", type=int, default=1000, help="starts per budget (compare's default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the starts")
    p.add_argument("--out", default="benchmarks/results/solver_check.json", help="the JSON written")
    a = p.parse_args()
    nfe_grid = check_grid(a.samplers, a.nfe_grid, a.n_samples)
    sets = [load_dataset(name) for name in a.data]
    for ds in sets:
        if ds.kind != "image":
            raise ConfigError(f"--data {ds.name!r} is not an image data set")
    records = [r for ds in sets for r in score_solvers(ds, a.samplers, nfe_grid, a.n_samples, a.seed)]
    command = " ".join(shlex.quote(x) for x in ["python", "-m", "benchmarks.solver_check", *sys.argv[1:]])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "kind": "solver_check", "bands": BANDS, "records": records},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"solver_check: error: {e}")
