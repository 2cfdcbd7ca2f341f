"""Noise schedules as pure functions.

EDM / VE: the rho grid in continuous index space (method.md §1).
DDPM / VP: linear and cosine beta schedules and their cumulative products alpha-bar.
Consistency training: the grid-size schedules of improved CT (doubling) and of the consistency-model release
(progressive), the release's adaptive target EMA, and improved CT's discretised log-normal level distribution
(method.md §10, §10.4).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "edm_sigma_of_index",
    "edm_index_of_sigma",
    "edm_sampling_sigmas",
    "linear_betas",
    "cosine_betas",
    "alpha_bar_from_betas",
    "ict_grid_size",
    "progressive_grid_size",
    "adaptive_target_tau",
    "ict_index_probs",
]


def _rho_ends(sigma_min: float, sigma_max: float, rho: float) -> tuple[float, float]:
    # method.md §1: a = sigma_max^(1/rho), b = sigma_min^(1/rho)
    return sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)


def edm_sigma_of_index(index: Tensor, steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """sigma(i) = (a + i/(N-1) (b - a))^rho, base clamped to [b, a] (method.md §1). Index 0 is sigma_max."""
    a, b = _rho_ends(sigma_min, sigma_max, rho)
    base = a + index / max(steps - 1, 1) * (b - a)
    return base.clamp(min=b, max=a) ** rho


def edm_index_of_sigma(sigma: Tensor, steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Inverse of `edm_sigma_of_index`: i(sigma) = (clamp(sigma)^(1/rho) - a) / (b - a) (N-1) (method.md §1)."""
    a, b = _rho_ends(sigma_min, sigma_max, rho)
    return (sigma.clamp(min=sigma_min, max=sigma_max) ** (1.0 / rho) - a) / (b - a) * (steps - 1)


def edm_sampling_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """The N-point sampling grid with sigma = 0 appended (method.md §11); one point means [sigma_max, 0]."""
    idx = torch.arange(steps, dtype=dtype)
    sig = edm_sigma_of_index(idx, steps, sigma_min, sigma_max, rho)
    return torch.cat([sig, sig.new_zeros(1)])


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020), betas for t = 1..T, scaled to T = 1000 end points."""
    scale = 1000.0 / timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """abar_t = prod_{u<=t} (1 - beta_u), returned for t = 0..T with abar_0 = 1 (clean data)."""
    return torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, dim=0)])


def ict_grid_size(step: int, total: int, s0: int, s1: int) -> int:
    """Grid points N at training step `step` of `total` (improved CT, method.md §10): N = min(s0 2^floor(k / K'),
    s1) + 1 with K' = floor(total / (floor(log2(s1 / s0)) + 1)), so N doubles in equal stages from s0 + 1 to s1 + 1."""
    stage = max(total // (int(math.log2(s1 // s0)) + 1), 1)
    return min(s0 * 2 ** (step // stage), s1) + 1


def progressive_grid_size(step: int, total: int, start: int, end: int) -> int:
    """Grid points N at training step `step` of `total` on the consistency-model release's progressive schedule
    (method.md §10.4): N = max(ceil(sqrt(step / total ((end + 1)^2 - start^2) + start^2) - 1), 1) + 1, which grows
    like the square root of progress from `start` points (start >= 2) to end + 1 at the last step."""
    inner = math.sqrt(min(step / max(total, 1), 1.0) * ((end + 1) ** 2 - start ** 2) + start ** 2) - 1
    return max(math.ceil(inner), 1) + 1  # capped at end + 1 past the last step (a resume with more steps)


def adaptive_target_tau(steps: int, start_tau: float, start_steps: int) -> float:
    """The release's adaptive target EMA on an N-point grid (method.md §10.4): tau(N) = start_tau^(start_steps /
    (N - 1)), i.e. exp(-c / (N - 1)) with c = -ln(start_tau) start_steps: 0.81 at N = 2 and 0.9986 at N = 151 for
    (0.9, 2). A finer grid gets a slower target."""
    return float(start_tau) ** (start_steps / max(steps - 1, 1))


def ict_index_probs(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """Probabilities of the consistency pairs (sigma_n, sigma_n+1), n = 0..N-2, of a grid ordered noisiest first:
    the log-normal N(p_mean, p_std^2) mass of ln sigma between the pair's two levels (improved CT, method.md §10)."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = (cdf[:-1] - cdf[1:]).clamp(min=0)
    return mass / mass.sum()
