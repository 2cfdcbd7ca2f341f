"""DDPM / VP in discrete time; the raw network predicts eps (method.md §9)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, check_choice, check_positive
from ..schedules import alpha_bar_from_betas, cosine_betas, edm_index_of_sigma, edm_sigma_of_index, linear_betas
from .base import Coupling, Formulation, expand_as_image, ve_coupling


def _float_like(x: Tensor, ref: Tensor) -> Tensor:
    """`x` (a float result) in the dtype of the input `ref`, or as it is when `ref` holds integer timesteps."""
    return x.to(ref.dtype) if ref.is_floating_point() else x


class VPFormulation(Formulation):
    """DDPM / VP, discrete time (Ho et al. 2020); the raw network predicts eps.

    Levels are timesteps t in [1, T] (t = 0 is clean data). Fractional t interpolates log abar linearly, which is
    exact at integer t. For TD (method.md §9) the MRP lives in variance-exploding units: x~ = x / sqrt(abar) =
    x0 + sigma~ eps with sigma~ = sqrt((1 - abar) / abar). The index grid is EDM's rho grid (`steps` points,
    default 18) of sigma~ between sigma~(T) (index 0) and sigma~(1) (index N-1), so strides mean what they mean for
    EDM; values are one-step posterior means of x~, with EDM's coefficients A = 1 - sigma~_d^2 / sigma~^2 (Markov).
    The sampling kernels (`posterior`, `reverse_step`, DDIM, DDPM) stay the true VP ones in x units.
    """

    name = "vp"
    level_name = "t"
    samplers = ("ddim", "ddpm", "euler", "dpmpp_2m", "dpmpp_2m_lof", "ipndm")
    SCHEDULES = ("linear", "cosine")

    def __init__(self, timesteps: int = 1000, schedule: str = "linear", steps: int = 18, rho: float = 7.0) -> None:
        check_positive("timesteps", timesteps)
        if timesteps < 2:
            raise ConfigError(f"timesteps must be >= 2, got {timesteps}")
        check_choice("beta schedule", schedule, self.SCHEDULES)
        check_positive("steps", steps)
        if steps < 2:
            raise ConfigError(f"steps must be >= 2 for the index grid, got {steps}")
        check_positive("rho", rho, integer=False)
        self.timesteps, self.schedule, self.steps, self.rho = int(timesteps), schedule, int(steps), float(rho)
        betas = linear_betas(timesteps) if schedule == "linear" else cosine_betas(timesteps)
        self.betas = betas
        self.alpha_bars = alpha_bar_from_betas(betas)  # [T + 1], abar_0 = 1
        self._log_abar = self.alpha_bars.log()
        # the sigma~ range of the TD grid: sigma~(T) at index 0, sigma~(1) at index N-1 (method.md §9)
        ends = self.sigma_ve(torch.tensor([float(timesteps), 1.0], dtype=torch.float64))
        self.sigma_ve_max, self.sigma_ve_min = float(ends[0]), float(ends[1])

    def config(self) -> dict:
        return {"name": self.name, "timesteps": self.timesteps, "schedule": self.schedule, "steps": self.steps,
                "rho": self.rho}

    # ---- variance-exploding view (method.md §9) ------------------------------------------------------------------
    def sigma_ve(self, t: Tensor) -> Tensor:
        """sigma~(t) = sqrt((1 - abar(t)) / abar(t)): x / sqrt(abar) = x0 + sigma~ eps."""
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt()

    def timestep_of_sigma_ve(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep whose sigma~ is `sigma`: the inverse of `sigma_ve` on [1, T]."""
        sigma = torch.as_tensor(sigma)
        table = self._log_abar.to(sigma.device)  # decreasing in t
        target = -torch.log1p(sigma.to(table.dtype).pow(2))  # log abar
        lo = (torch.searchsorted(-table, -target) - 1).clamp(0, self.timesteps - 1)
        frac = (table[lo] - target) / (table[lo] - table[lo + 1])
        t = (lo.to(table.dtype) + frac).clamp(1, self.timesteps)
        return _float_like(t, sigma)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """abar at (possibly fractional) timesteps t in [0, T]."""
        t = torch.as_tensor(t).clamp(0, self.timesteps)
        table = self._log_abar.to(device=t.device)
        lo = t.floor().long().clamp(max=self.timesteps - 1)
        frac = (t - lo).to(table.dtype)
        out = (table[lo] * (1 - frac) + table[lo + 1] * frac).exp()
        return _float_like(out, t)

    def level(self, index: Tensor) -> Tensor:
        sigma = edm_sigma_of_index(index, self.steps, self.sigma_ve_min, self.sigma_ve_max, self.rho)
        return self.timestep_of_sigma_ve(sigma)

    def index(self, level: Tensor) -> Tensor:
        sigma = self.sigma_ve(torch.as_tensor(level).clamp(1, self.timesteps))
        index = edm_index_of_sigma(sigma, self.steps, self.sigma_ve_min, self.sigma_ve_max, self.rho)
        return _float_like(index, level)

    def one_step_posterior(self, level: Tensor, one_step: float,
                           coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        """The value's (A, kappa) in variance-exploding units (method.md §9): EDM's coefficients of sigma~."""
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level, lambda c: self.one_step_posterior(level, one_step, c))
        if mixed is not None:
            return mixed
        A, kappa = ve_coupling(self.sigma_ve(self.shift(level, one_step)) / self.sigma_ve(level), coupling)
        return _float_like(A, level), _float_like(kappa, level)

    def one_step_mean(self, x0: Tensor, x: Tensor, level: Tensor, one_step: float,
                      coupling: Coupling = "markov") -> Tensor:
        """mu~(x, level) = A x0 + kappa x / sqrt(abar(level)): the one-step posterior mean of x~ (method.md §9)."""
        A, kappa = self.one_step_posterior(level, one_step, coupling)
        scale = expand_as_image(self.alpha_bar(level).rsqrt().to(x.dtype), x)
        return expand_as_image(A, x) * x0 + expand_as_image(kappa, x) * (x * scale)

    def in_range(self, level: Tensor) -> Tensor:
        return (level >= 1) & (level <= self.timesteps)

    def add_noise(self, x0, level, noise):
        ab = expand_as_image(self.alpha_bar(level), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def prior(self, shape, generator=None, device="cpu", dtype=torch.float32):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def plain_posterior(self, level_t, level_s, coupling):
        ab_t, ab_s = self.alpha_bar(level_t), self.alpha_bar(level_s)
        if coupling == "markov":
            # method.md §9 (derived): the DDPM posterior q(x_s | x_t, x0); here A + kappa != 1.
            A = ab_s.sqrt() * (1 - ab_t / ab_s) / (1 - ab_t)
            kappa = (ab_t / ab_s).sqrt() * (1 - ab_s) / (1 - ab_t)
        else:
            # shared noise: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) n with n recovered from x_t.
            kappa = ((1 - ab_s) / (1 - ab_t)).sqrt()
            A = ab_s.sqrt() - kappa * ab_t.sqrt()
        return A, kappa

    def plain_posterior_variance(self, level_t, level_s, coupling):
        # DDPM's beta-tilde between any s < t: (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s); 0 for shared noise.
        if coupling == "shared":
            return torch.zeros_like(torch.as_tensor(level_t, dtype=torch.float32))
        ab_t, ab_s = self.alpha_bar(level_t), self.alpha_bar(level_s)
        return ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0)

    def preconditioning(self, level):
        # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); c_noise is log of the VE-equivalent sigma, / 4 as in EDM.
        ab = self.alpha_bar(level)
        c_skip = 1 / ab.sqrt()
        c_out = -(1 - ab).sqrt() / ab.sqrt()
        return c_skip, c_out, torch.ones_like(ab), self.sigma_ve(level).log() / 4

    def base_weight(self, level):
        # |eps_hat - eps|^2 = abar / (1 - abar) |D - x0|^2: the standard eps loss in x0 terms.
        ab = self.alpha_bar(level)
        return ab / (1 - ab)

    def eps_from_x0(self, x: Tensor, x0: Tensor, level: Tensor) -> Tensor:
        ab = expand_as_image(self.alpha_bar(level), x)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    def sample_training_level(self, n, generator=None, device="cpu"):
        return torch.randint(1, self.timesteps + 1, (n,), generator=generator, device=device).float()
