"""Noise schedules as pure functions.

EDM / VE: the rho grid in continuous index space (method.md §1).
DDPM / VP: linear and cosine beta schedules and their cumulative products alpha-bar.
Improved consistency training: the curriculum of grid sizes and the discretised log-normal level distribution
(method.md §10).
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


def ict_index_probs(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """Probabilities of the consistency pairs (sigma_n, sigma_n+1), n = 0..N-2, of a grid ordered noisiest first:
    the log-normal N(p_mean, p_std^2) mass of ln sigma between the pair's two levels (improved CT, method.md §10)."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = (cdf[:-1] - cdf[1:]).clamp(min=0)
    return mass / mass.sum()
