"""Samplers with one call signature.

Every sampler is `fn(denoise, formulation, x, steps, labels=None, generator=None) -> (x0, nfe)`, where `denoise(x,
level, labels)` predicts x0, `x` is the starting sample at the noisiest level (in the dtype sampling runs in), and
`nfe` is the number of denoiser evaluations actually spent. `sample(...)` is the front door: it picks the steps
for an NFE budget, draws the start, and returns a `SampleResult`.

- "heun", "euler": EDM's deterministic ODE samplers on the rho grid with sigma = 0 appended (method.md §11);
  Heun NFE = 2 steps - 1 (its last step, to sigma = 0, is Euler), Euler NFE = steps (method.md §12.8).
- "dpmpp_2m" (DPM-Solver++(2M)) and "ipndm" (iPNDM): training-free multistep ODE solvers for few steps, on the
  same grid; NFE = steps; "dpmpp_2m_lof" takes a first-order step into sigma_min (lower order final). VP runs
  them and "euler" in its variance-exploding view (the rho grid of sigma~, method.md §9).
- "ddim" (eta = 0) and "ddpm" (ancestral, the posterior of method.md §9) for the VP formulation.
- "onestep" and "multistep" consistency sampling for CT.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError, check_choice, check_positive
from .limits import check_limit
from .formulations import CTFormulation, EDMFormulation, Formulation, VPFormulation, expand_as_image
from .schedules import edm_sampling_sigmas

__all__ = ["SampleResult", "SAMPLERS", "steps_for_nfe", "sample", "default_sampler", "sampler_for_nfe",
           "NonFiniteSampleError", "check_finite_samples"]

DenoiseFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass
class SampleResult:
    x: Tensor
    nfe: int
    sampler: str
    steps: int


class NonFiniteSampleError(RuntimeError):
    """Sampling produced NaN or infinite values (a diverged network, usually): a failure of the run, not of input."""


def check_finite_samples(x: Tensor, source: str) -> Tensor:
    """Return `x`, or raise NonFiniteSampleError naming the share of samples with a non-finite value and `source`."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1) if x.numel() else torch.zeros(0, dtype=torch.bool)
    if bool(bad.any()):
        raise NonFiniteSampleError(f"sampling from {source} produced non-finite values in {int(bad.sum())} of "
                                   f"{x.shape[0]} samples ({float(bad.float().mean()):.0%}): the network's weights or "
                                   f"outputs are not finite (a diverged run?); nothing was written")
    return x


def _levels(x: Tensor, level: Tensor) -> Tensor:
    return level.to(x).expand(x.shape[0])


def _edm_sigmas(formulation: Formulation, steps: int, dtype: torch.dtype) -> Tensor:
    f = formulation
    return edm_sampling_sigmas(steps, f.sigma_min, f.sigma_max, f.rho, dtype=dtype)


def heun(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """EDM Algorithm 1 (deterministic, no churn): Heun steps, Euler on the last step to sigma = 0."""
    sigmas, nfe = _edm_sigmas(formulation, steps, x.dtype).to(x.device), 0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, _levels(x, s), labels)) / s
        x_next = x + (s_next - s) * d
        nfe += 1
        if s_next > 0:
            d_next = (x_next - denoise(x_next, _levels(x, s_next), labels)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
            nfe += 1
        x = x_next
    return x, nfe


def euler(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma on the rho grid (for VP, in
    the variance-exploding view of `_ve_view`: one evaluation at each level of VP's training grid)."""
    denoise, x, sigmas = _ve_view(denoise, formulation, x, steps)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * (x - denoise(x, _levels(x, s), labels)) / s
    return x, steps


def _ve_view(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int) -> tuple[DenoiseFn, Tensor, Tensor]:
    """(denoiser, start, sigma grid) of the variance-exploding ODE a formulation's sampling follows.

    EDM / CT: themselves, on the rho grid. VP: x~ = x / sqrt(abar(t)) = x0 + sigma~ eps follows EDM's ODE in
    sigma~ = sqrt((1 - abar) / abar) (method.md §9), so the sigma-space solvers run on the rho grid of sigma~ between
    sigma~(T) and sigma~(1), calling the VP denoiser at the timestep of each sigma~ on x~ sqrt(abar)."""
    if not isinstance(formulation, VPFormulation):
        return denoise, x, _edm_sigmas(formulation, steps, x.dtype).to(x.device)
    f = formulation
    sigmas = edm_sampling_sigmas(steps, f.sigma_ve_min, f.sigma_ve_max, f.rho, dtype=x.dtype).to(x.device)

    def ve_denoise(x_ve: Tensor, sigma: Tensor, labels=None) -> Tensor:
        t = f.timestep_of_sigma_ve(sigma)
        scale = expand_as_image(f.alpha_bar(t).sqrt().to(x_ve.dtype), x_ve)
        return denoise(x_ve * scale, t.to(x_ve.dtype), labels)

    start = x / f.alpha_bar(torch.tensor(float(f.timesteps))).sqrt().to(x.dtype)
    return ve_denoise, start, sigmas


def dpmpp_2m(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None,
             lower_order_final: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022): the data-prediction multistep solver of order 2, in sigma space
    (for VP, in the variance-exploding view of `_ve_view`).

    With lambda = -log sigma and h = lambda_next - lambda, the exact solution of the probability-flow ODE for a
    denoiser output D held fixed over the step is x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D.
    The first step takes D = D(x; sigma); later steps extrapolate linearly in lambda from the last two outputs,
    D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_{i-1} / h_i. The last step, to sigma = 0, returns D_i.
    With `lower_order_final` the step into the smallest nonzero sigma also takes D = D_i (first order), as the
    reference implementations do below 10-15 steps (here at every budget); it leaves the order at 2. One evaluation
    per step: NFE = steps.
    """
    denoise, x, sigmas = _ve_view(denoise, formulation, x, steps)
    d_prev, h_prev = None, None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = denoise(x, _levels(x, s), labels)
        if s_next == 0:
            x = d
            break
        h = s.log() - s_next.log()
        first_order = d_prev is None or (lower_order_final and i == steps - 2)  # step steps - 2: into sigma_min
        target = d if first_order else d + (d - d_prev) * (h / (2 * h_prev))
        ratio = s_next / s
        x = ratio * x + (1 - ratio) * target
        d_prev, h_prev = d, h
    return x, steps


def dpmpp_2m_lof(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None,
                 generator=None):
    """DPM-Solver++(2M) with a first-order step into the smallest nonzero sigma ("lower order final"): the
    extrapolation's last use, over the grid's widest step in lambda, is left out. NFE = steps."""
    return dpmpp_2m(denoise, formulation, x, steps, labels, generator, lower_order_final=True)


# Adams-Bashforth coefficients of orders 1-4, newest derivative first (iPNDM uses them on any grid)
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """iPNDM (Zhang & Chen 2022): explicit Adams-Bashforth steps of the probability-flow ODE
    dx/dsigma = (x - D(x; sigma)) / sigma, of order min(i + 1, 4) at step i (lower orders warm it up), with the
    fixed coefficients of a uniform grid. One evaluation per step: NFE = steps.

    On the rho grid the fixed coefficients leave a global order of 2 (measured against the exact Gaussian ODE
    solution in tests/test_samplers.py), with the smallest error of the samplers here at few steps. VP runs in the
    variance-exploding view of `_ve_view`."""
    denoise, x, sigmas = _ve_view(denoise, formulation, x, steps)
    history: list[Tensor] = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        history.insert(0, (x - denoise(x, _levels(x, s), labels)) / s)
        del history[4:]
        coeffs = _AB[len(history) - 1]
        x = x + (s_next - s) * sum(c * d for c, d in zip(coeffs, history))
    return x, steps


def _vp_timesteps(formulation: VPFormulation, steps: int, dtype: torch.dtype) -> Tensor:
    """`steps` evenly spaced integer timesteps from T down to 1, then 0 (clean)."""
    ts = torch.linspace(formulation.timesteps, 1, steps, dtype=torch.float64).round().to(dtype)
    return torch.cat([ts, ts.new_zeros(1)])


def ddim(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """Deterministic DDIM (eta = 0): x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat."""
    ts = _vp_timesteps(formulation, steps, x.dtype).to(x.device)
    for t, s in zip(ts[:-1], ts[1:]):
        lt = _levels(x, t)
        x0 = denoise(x, lt, labels)
        eps = formulation.eps_from_x0(x, x0, lt)
        x = formulation.add_noise(x0, _levels(x, s), eps)
    return x, steps


def ddpm(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """Ancestral sampling: x_s ~ q(x_s | x_t, x0_hat), the DDPM posterior between strided timesteps (method.md §9)."""
    ts = _vp_timesteps(formulation, steps, x.dtype).to(x.device)
    for t, s in zip(ts[:-1], ts[1:]):
        lt, ls = _levels(x, t), _levels(x, s)
        x0 = denoise(x, lt, labels)
        x = formulation.reverse_step(x0, x, lt, ls, "markov", generator=generator)
    return x, steps


def onestep(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """Consistency one-step sampling: x0 = f(x_T, sigma_max)."""
    return denoise(x, _levels(x, torch.tensor(formulation.sigma_max)), labels), 1


def multistep(denoise: DenoiseFn, formulation: Formulation, x: Tensor, steps: int, labels=None, generator=None):
    """Consistency multistep sampling: denoise, re-noise to the next level, repeat (`steps` evaluations).

    The levels are the first `steps` points of the (steps + 1)-point rho grid: sigma_max, then levels strictly above
    sigma_min (re-noising to sigma_min itself would spend an evaluation on a no-op; two steps use sigma ~ 2.5)."""
    sigmas = _edm_sigmas(formulation, steps + 1, x.dtype)[:-2].to(x.device)
    x = denoise(x, _levels(x, sigmas[0]), labels)
    for s in sigmas[1:]:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_s = x + (s ** 2 - formulation.sigma_min ** 2).clamp(min=0).sqrt() * z
        x = denoise(x_s, _levels(x, s), labels)
    return x, steps


SAMPLERS: dict[str, Callable] = {
    "heun": heun, "euler": euler, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_lof": dpmpp_2m_lof, "ipndm": ipndm, "ddim": ddim,
    "ddpm": ddpm,
    "onestep": onestep, "multistep": multistep,
}


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps that spend exactly `nfe` evaluations; ConfigError if the sampler cannot reach that budget."""
    check_choice("sampler", sampler, SAMPLERS)
    check_positive("nfe", nfe)
    check_limit("nfe", nfe, "nfe")
    if sampler == "heun":
        if nfe % 2 == 0:
            raise ConfigError(f"nfe {nfe} is unreachable by heun (NFE = 2 steps - 1: odd budgets 1, 3, 5, ...); "
                              "use euler for even budgets")
        return (nfe + 1) // 2
    if sampler == "onestep" and nfe != 1:
        raise ConfigError(f"nfe {nfe} is unreachable by onestep (NFE = 1 only)")
    return nfe


def default_sampler(formulation: Formulation) -> str:
    """The family's main sampler: heun (EDM), ddim (VP), multistep (CT)."""
    if isinstance(formulation, CTFormulation):
        return "multistep"
    return "heun" if isinstance(formulation, EDMFormulation) else "ddim"


def sampler_for_nfe(formulation: Formulation, nfe: int, preferred: str | None = None) -> str:
    """`preferred`, or (None) the family's main sampler with Euler where Heun cannot reach the budget.

    A sampler asked for by name is never replaced: one of another family, or one that cannot reach `nfe`, raises
    ConfigError.
    """
    if preferred:
        check_choice(f"sampler for formulation {formulation.name!r}", preferred, formulation.samplers)
        steps_for_nfe(preferred, nfe)
        return preferred
    name = default_sampler(formulation)
    name = "euler" if name == "heun" and nfe % 2 == 0 else name
    steps_for_nfe(name, nfe)  # a budget past the limits fails here too
    return name


def sample(denoise: DenoiseFn, formulation: Formulation, shape: tuple[int, ...], *, sampler: str | None = None,
           nfe: int | None = None, steps: int | None = None, labels: Tensor | None = None,
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
           device: torch.device | str = "cpu") -> SampleResult:
    """Draw `shape[0]` samples with `sampler`, given either an NFE budget or a number of steps.

    Seeded by `generator` (the start noise and any ancestral noise); `dtype` is the sampling precision.
    """
    sampler = sampler or default_sampler(formulation)
    check_choice(f"sampler for formulation {formulation.name!r}", sampler, formulation.samplers)
    if (nfe is None) == (steps is None):
        raise ConfigError("give exactly one of nfe or steps")
    steps = steps_for_nfe(sampler, nfe) if nfe is not None else check_positive("steps", steps)
    x = formulation.prior(tuple(shape), generator=generator, device=device, dtype=dtype)
    with torch.no_grad():
        x, spent = SAMPLERS[sampler](denoise, formulation, x, int(steps), labels=labels, generator=generator)
    if nfe is not None and spent != nfe:
        raise RuntimeError(f"sampler {sampler} spent {spent} evaluations for a budget of {nfe}")
    return SampleResult(x=x, nfe=spent, sampler=sampler, steps=int(steps))
