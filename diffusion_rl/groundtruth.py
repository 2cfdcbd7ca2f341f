"""Metrics of a denoiser against a Gaussian mixture whose denoiser and probability-flow ODE are known exactly.

A denoiser is anything called as the library's `Denoiser`: `denoiser(x, level, labels) -> x0`, with EDM sigma
levels (other formulations are refused). When it has `conditional = True` it gets the class labels of its samples
and is compared with the class-conditional mixture. docs/groundtruth.md explains each metric (§5) and how to read
the report (§6). Every result is a plain float or a list of them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ConfigError, check_choice, check_positive
from .formulations import EDMFormulation, Formulation
from .gmm import ExactDenoiser, GaussianMixture
from .samplers import sample, steps_for_nfe

__all__ = ["denoiser_error_by_level", "consistency_error_by_level", "solver_split", "distribution_metrics",
           "frechet_distance", "ground_truth_report"]

CHUNK = 500  # samples per denoiser call


def _check_edm(formulation: Formulation | None) -> EDMFormulation:
    f = formulation if formulation is not None else EDMFormulation()
    if not isinstance(f, EDMFormulation) or f.name != "edm":
        raise ConfigError(f"ground-truth metrics take the EDM formulation (sigma levels); formulation "
                          f"{getattr(f, 'name', f)!r} is not accepted (accepted: edm)")
    return f


def _conditional(denoiser) -> bool:
    return bool(getattr(denoiser, "conditional", False))


def _device(denoiser) -> torch.device:
    try:
        return next(denoiser.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def _denoise(denoiser, gmm: GaussianMixture, x: Tensor, sigma: float, labels: Tensor | None) -> Tensor:
    """denoiser(x, sigma, labels) on flat float64 x [B, D], in chunks, back as float64 [B, D] on the CPU."""
    dev, out = _device(denoiser), []
    for i in range(0, x.shape[0], CHUNK):
        xb = x[i:i + CHUNK].reshape(-1, *gmm.sample_shape).to(dev)
        lb = None if labels is None else labels[i:i + CHUNK].to(dev)
        level = torch.full((xb.shape[0],), float(sigma), dtype=xb.dtype, device=dev)
        out.append(denoiser(xb, level, lb).reshape(xb.shape[0], -1).to("cpu", torch.float64))
    return torch.cat(out)


def _draw(gmm: GaussianMixture, n: int, generator: torch.Generator | None,
          conditional: bool) -> tuple[Tensor, Tensor | None]:
    check_positive("n", n)
    x0, comp = gmm.sample(int(n), generator)
    return x0, (gmm.classes[comp] if conditional and gmm.classes is not None else None)


def _mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean())


def denoiser_error_by_level(denoiser, gmm: GaussianMixture, sigmas: Sequence[float] | Tensor, n: int = 500,
                            generator: torch.Generator | None = None) -> dict:
    """Per sigma: "error", the mean squared distance per pixel between the denoiser and the exact posterior mean at
    x = x0 + sigma eps (x0 exact samples; one x0 and eps for all levels), and "posterior_variance", the exact
    denoiser's own mean squared error to x0 (the least any denoiser can reach) (groundtruth.md §5.1)."""
    cond = _conditional(denoiser)
    x0, labels = _draw(gmm, n, generator, cond)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    rec: dict[str, list[float]] = {"sigma": [], "error": [], "posterior_variance": []}
    for s in [float(s) for s in torch.as_tensor(sigmas).flatten()]:
        x = x0 + s * eps
        exact = gmm.posterior_mean(x, s, labels)
        rec["sigma"].append(s)
        rec["error"].append(_mse(_denoise(denoiser, gmm, x, s, labels), exact))
        rec["posterior_variance"].append(_mse(exact, x0))
    return rec


def consistency_error_by_level(denoiser, gmm: GaussianMixture, formulation: Formulation | None = None,
                               stride: int | None = None, n: int = 500,
                               generator: torch.Generator | None = None) -> dict:
    """Multi-step consistency along exact probability-flow trajectories on the formulation's N-point grid
    (groundtruth.md §5.2). Trajectories start at x0 + sigma_max eps (so each state has its level's exact marginal)
    and the states x_i at the grid levels come from the exact ODE. Per level i (with i + stride on the grid):
    "error" = mean per pixel of |(D(x_i) - D(x_i+k)) - (D*(x_i) - D*(x_i+k))|^2, the error of the denoiser's progress
    over k steps against the exact denoiser's progress (0 for the exact denoiser); "network_gap" =
    |D(x_i) - D(x_i+k)|^2 and "exact_gap" = |D*(x_i) - D*(x_i+k)|^2 (not 0: the posterior mean moves along the
    ODE)."""
    f = _check_edm(formulation)
    k = round(f.default_stride) if stride is None else stride
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= f.steps - 1:
        raise ConfigError(f"stride must be an integer number of grid steps in [1, {f.steps - 1}], got {stride!r}")
    cond = _conditional(denoiser)
    x0, labels = _draw(gmm, n, generator, cond)
    grid = f.grid(torch.float64).tolist()
    start = x0 + grid[0] * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    states = gmm.ode_trajectory(start, grid, labels=labels)
    net = [_denoise(denoiser, gmm, x, s, labels) for x, s in zip(states, grid)]
    exact = [gmm.posterior_mean(x, s, labels) for x, s in zip(states, grid)]
    rec: dict = {"stride": k, "sigma": grid[:-k], "sigma_next": grid[k:], "error": [], "network_gap": [],
                 "exact_gap": []}
    for i in range(len(grid) - k):
        rec["error"].append(_mse(net[i] - net[i + k], exact[i] - exact[i + k]))
        rec["network_gap"].append(_mse(net[i], net[i + k]))
        rec["exact_gap"].append(_mse(exact[i], exact[i + k]))
    return rec


def _exact_end(gmm: GaussianMixture, f: EDMFormulation, n: int, seed: int,
               conditional: bool) -> tuple[Tensor, Tensor | None]:
    """(y* [n, D], labels or None): the exact ODE end point from the start noise `sample()` draws with `seed`."""
    check_positive("n", n)
    cond = conditional and gmm.classes is not None
    labels = (gmm.classes[torch.multinomial(gmm.weights, n, True, generator=torch.Generator().manual_seed(seed + 1))]
              if cond else None)
    start = f.prior((int(n), *gmm.sample_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return gmm.ode_solution(start, f.sigma_max, f.sigma_min, labels=labels), labels


def _solver_pair(denoiser, gmm: GaussianMixture, f: EDMFormulation, sampler: str, nfe: int, n: int, seed: int,
                 labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """(y_exact, y_net) [n, D]: the sampler with the exact denoiser and with `denoiser`, from y*'s start noise."""
    out = []
    for d in (ExactDenoiser(gmm, f, conditional=labels is not None), denoiser):
        res = sample(_on_cpu(d), f, (int(n), *gmm.sample_shape), sampler=sampler, nfe=nfe, labels=labels,
                     generator=torch.Generator().manual_seed(seed))  # on the CPU: the start noise is y*'s
        out.append(res.x.reshape(n, -1).to(torch.float64))
    return out[0], out[1]


def _on_cpu(denoiser):
    """`denoiser` with CPU inputs and outputs (the samplers' call signature), run on its own device."""
    dev = _device(denoiser)
    if dev.type == "cpu":
        return denoiser

    def denoise(x: Tensor, level: Tensor, labels: Tensor | None = None) -> Tensor:
        return denoiser(x.to(dev), level.to(dev), None if labels is None else labels.to(dev)).to(x.device)
    return denoise


def solver_split(denoiser, gmm: GaussianMixture, formulation: Formulation | None = None, sampler: str = "heun",
                 nfe: int = 35, n: int = 500, seed: int = 0) -> dict:
    """Mean squared distances per pixel from one start noise (groundtruth.md §5.3): "total" = |y_net - y*|^2,
    "solver" = |y_exact - y*|^2 (the sampler's own error), "network" = |y_net - y_exact|^2."""
    f = _check_sampler(_check_edm(formulation), sampler, [nfe])
    y_star, labels = _exact_end(gmm, f, n, seed, _conditional(denoiser))
    return _split(y_star, *_solver_pair(denoiser, gmm, f, sampler, nfe, n, seed, labels), sampler, nfe)


def _split(y_star: Tensor, y_exact: Tensor, y_net: Tensor, sampler: str, nfe: int) -> dict:
    return {"sampler": sampler, "nfe": int(nfe), "total": _mse(y_net, y_star), "solver": _mse(y_exact, y_star),
            "network": _mse(y_net, y_exact)}


def _check_sampler(f: EDMFormulation, sampler: str, nfe_grid: Sequence[int]) -> EDMFormulation:
    check_choice(f"sampler for formulation {f.name!r}", sampler, f.samplers)
    for nfe in nfe_grid:
        steps_for_nfe(sampler, nfe)
    return f


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to the rows of a [N, D] and b [M, D] (torchmetrics' FID maths on
    the raw values, through the library's passthrough feature net)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .metrics import _Passthrough

    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ConfigError(f"a Frechet distance needs at least 2 points per set, got {a.shape[0]} and {b.shape[0]}")
    fid = FrechetInceptionDistance(feature=_Passthrough(a.shape[1]))
    fid.update(b, real=True)
    fid.update(a, real=False)
    return float(fid.compute())


def distribution_metrics(samples: Tensor, gmm: GaussianMixture, n_ref: int = 1000,
                         generator: torch.Generator | None = None) -> dict:
    """Samples [M, ...] against the mixture (groundtruth.md §5.4): mean log-likelihood per pixel and its gap to
    n_ref exact samples'; "mode_tv", the total-variation distance between the samples' mean responsibilities and
    the mixture weights; "frechet", the pixel-space Frechet distance to n_ref exact samples. Each "*_ref" is the
    same quantity for exact samples (M of them for the Frechet distance): the finite-sample floor."""
    check_positive("n_ref", n_ref)
    s = samples.reshape(samples.shape[0], -1).to("cpu", torch.float64)
    if not bool(torch.isfinite(s).all()):  # a diverged sampler: report it rather than a meaningless number
        return dict.fromkeys(("loglik", "loglik_ref", "loglik_gap", "mode_tv", "mode_tv_ref", "frechet",
                              "frechet_ref"), math.nan)
    ref = gmm.sample(int(n_ref), generator)[0]
    twin = gmm.sample(s.shape[0], generator)[0]
    ll, ll_ref = float(gmm.log_prob(s).mean()) / gmm.dim, float(gmm.log_prob(ref).mean()) / gmm.dim

    def tv(x: Tensor) -> float:
        return 0.5 * float((gmm.responsibilities(x, 0.0).mean(0) - gmm.weights).abs().sum())

    return {"loglik": ll, "loglik_ref": ll_ref, "loglik_gap": ll - ll_ref, "mode_tv": tv(s), "mode_tv_ref": tv(ref),
            "frechet": frechet_distance(s, ref), "frechet_ref": frechet_distance(twin, ref)}


def ground_truth_report(denoiser, dataset, samplers: Sequence[str] = ("heun",), nfe_grid: Sequence[int] = (5, 35),
                        n: int = 500, seed: int = 0, cells: Sequence[tuple[str, int]] | None = None) -> dict:
    """All of the above for a denoiser trained on a gmm: data set (its `truth`), as JSON-able plain values
    (groundtruth.md §6). Levels: the formulation's grid; the consistency stride: its default. The solver cells are
    every (sampler, NFE) of `samplers` x `nfe_grid`, or the (sampler, NFE) pairs `cells` where given."""
    gmm = getattr(dataset, "truth", None)
    if not isinstance(gmm, GaussianMixture):
        raise ConfigError(f"data set {getattr(dataset, 'name', dataset)!r} has no known ground truth; accepted: "
                          f"the gmm: data sets (gmm:digits, gmm:mnist5k)")
    f = _check_edm(getattr(denoiser, "formulation", None))
    cells = [(sampler, int(nfe)) for sampler in samplers for nfe in nfe_grid] if cells is None else list(cells)
    for sampler, nfe in cells:  # every bad name or budget fails before any work
        _check_sampler(f, sampler, (nfe,))
    grid = f.grid(torch.float64)
    report = {"dataset": dataset.name, "truth": gmm.describe(), "formulation": f.config(), "n": int(n),
              "seed": int(seed),
              "denoiser_error": denoiser_error_by_level(denoiser, gmm, grid, n, torch.Generator().manual_seed(seed)),
              "consistency_error": consistency_error_by_level(denoiser, gmm, f, None, n,
                                                              torch.Generator().manual_seed(seed)),
              "solvers": []}
    y_star, labels = _exact_end(gmm, f, n, seed, _conditional(denoiser))  # one ODE solve for every budget
    for sampler, nfe in cells:
        y_exact, y_net = _solver_pair(denoiser, gmm, f, sampler, nfe, n, seed, labels)
        report["solvers"].append({**_split(y_star, y_exact, y_net, sampler, nfe), "distribution":
                                  distribution_metrics(y_net, gmm, n, torch.Generator().manual_seed(seed + 2))})
    return report
