"""EDM / VE in continuous time on the rho grid (method.md §1, §3)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, check_positive
from ..schedules import edm_index_of_sigma, edm_sigma_of_index
from .base import Formulation, expand_as_image, ve_coupling


class EDMFormulation(Formulation):
    """EDM / VE, continuous time (Karras et al. 2022), on the rho grid of method.md §1."""

    name = "edm"
    samplers = ("heun", "euler", "dpmpp_2m", "dpmpp_2m_lof", "ipndm")

    def __init__(self, steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        check_positive("steps", steps)
        if steps < 2:
            raise ConfigError(f"steps must be >= 2 for the index grid, got {steps}")
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        check_positive("rho", rho, integer=False)
        check_positive("sigma_data", sigma_data, integer=False)
        self.steps, self.sigma_min, self.sigma_max, self.rho = int(steps), sigma_min, sigma_max, rho
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def config(self) -> dict:
        return {"name": self.name, "steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho, "sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std}

    def level(self, index: Tensor) -> Tensor:
        return edm_sigma_of_index(index, self.steps, self.sigma_min, self.sigma_max, self.rho)

    def index(self, level: Tensor) -> Tensor:
        return edm_index_of_sigma(level, self.steps, self.sigma_min, self.sigma_max, self.rho)

    def in_range(self, level: Tensor) -> Tensor:
        return (level >= self.sigma_min) & (level <= self.sigma_max)

    def add_noise(self, x0: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        return x0 + expand_as_image(level, x0) * noise

    def prior(self, shape, generator=None, device="cpu", dtype=torch.float32) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * self.sigma_max

    def plain_posterior(self, level_t, level_s, coupling):
        # method.md §3, §8: Markov kappa = (sigma_s/sigma_t)^2, shared kappa = sigma_s/sigma_t, A = 1 - kappa (VE).
        return ve_coupling(level_s / level_t, coupling)

    def plain_posterior_variance(self, level_t, level_s, coupling):
        # x_t = x_s + sqrt(st^2 - ss^2) n2 with x_s ~ N(x0, ss^2): Var = ss^2 (st^2 - ss^2) / st^2.
        if coupling == "shared":
            return torch.zeros_like(level_t)
        return (level_s.pow(2) * (1 - (level_s / level_t).pow(2))).clamp(min=0)

    def preconditioning(self, level):
        # EDM (Karras et al. 2022, Table 1)
        sd = self.sigma_data
        var = level.pow(2) + sd ** 2
        return sd ** 2 / var, level * sd / var.sqrt(), 1 / var.sqrt(), level.log() / 4

    def base_weight(self, level):
        # method.md §5.3: w_edm = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2
        return (level.pow(2) + self.sigma_data ** 2) / (level * self.sigma_data).pow(2)

    def sample_training_level(self, n, generator=None, device="cpu"):
        # method.md §5.1: log-normal sigma, ln sigma ~ N(P_mean, P_std^2)
        z = torch.randn(n, generator=generator, device=device)
        return (self.p_mean + self.p_std * z).exp()
