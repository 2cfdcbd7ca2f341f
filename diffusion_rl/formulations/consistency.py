"""Consistency training: `CTFormulation` on the EDM grid with the boundary parametrisation, and `ICTFormulation`
with improved consistency training's curriculum, levels and loss (method.md §10, §10.1-§10.5); the consistency
distances."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, check_choice, check_positive
from ..schedules import ict_grid_size, ict_index_probs, progressive_grid_size
from .base import Coupling, mean_pixels
from .edm import EDMFormulation


CT_KAPPAS: tuple[str, ...] = ("posterior", "shared-path")
CT_BOUNDARIES: tuple[str, ...] = ("clamp", "mask")
CT_WEIGHTS: tuple[str, ...] = ("uniform", "karras")


def parse_ct_grid(text: str) -> tuple[str, int, int]:
    """A consistency grid: "N" (a fixed N-point grid, N >= 2) -> ("fixed", N, N); "progressive:S0:S1" (the release's
    schedule from S0 to S1 + 1 points, 2 <= S0 <= S1) -> ("progressive", S0, S1). ConfigError otherwise."""
    kind, _, rest = str(text).partition(":")
    try:
        if kind == "progressive":
            s0, s1 = (int(v) for v in rest.split(":"))
            if 2 <= s0 <= s1:
                return "progressive", s0, s1
        elif not rest and int(kind) >= 2:
            return "fixed", int(kind), int(kind)
    except ValueError:
        pass
    raise ConfigError(f"consistency grid {text!r}; accepted: N (a fixed grid of N >= 2 points) or progressive:S0:S1 "
                      f"(the release's schedule from S0 to S1 + 1 points, 2 <= S0 <= S1)")


class CTFormulation(EDMFormulation):
    """Consistency training on the EDM grid with the boundary parametrisation of method.md §10.

    f(x, sigma_min) = x exactly. Training levels are grid points sigma(n), n ~ U{0..N-2}; the partner of the
    consistency pair is sigma(n + 1), drawn with shared noise by the agent.

    The TD-CT choices, each the consistency-model release's by default (method.md §10.1-§10.4):
        kappa: "posterior" (the value's coefficients are the Markov posterior's, kappa = (sigma(n + delta) /
            sigma(n))^2, although the pair shares its noise) | "shared-path" (kappa = sigma(n + delta) / sigma(n)).
        boundary: "clamp" (a pair whose partner is the grid's last point is a boundary sample; one-step levels are
            clamped to the grid) | "mask" (TD-valid only where the partner's one-step level lies on the grid).
        weight: the consistency loss's weight, "uniform" (1) | "karras" (1 / sigma^2 + 1 / sigma_data^2).
        distance: "l2" | "pseudo_huber" | "lpips:<file>" (a TorchScript LPIPS module, `diffusion_rl.lpips`).
        grid: "" (fixed at `steps`) | "N" | "progressive:S0:S1" (`parse_ct_grid`; the grid then follows training
            progress, `steps_at`).
    """

    name = "ct"
    samplers = ("onestep", "multistep", "heun", "euler", "dpmpp_2m", "dpmpp_2m_lof", "ipndm")
    consistency = True
    default_coupling = "shared"      # method.md §10: the consistency pair shares its noise
    default_reweighting = "pairwise"  # method.md §10: the release's CT weighting
    # plain values in place of the base class's grid-scaled properties: CT's pair and delta do not scale with N
    default_stride = 1.0             # method.md §10: adjacent grid points
    default_one_step = 0.25

    def __init__(self, steps: int = 18, *, kappa: str = "posterior", boundary: str = "clamp", weight: str = "uniform",
                 distance: str = "l2", grid: str = "", **edm) -> None:
        check_choice("ct_kappa", kappa, CT_KAPPAS)
        check_choice("ct_boundary", boundary, CT_BOUNDARIES)
        check_choice("ct_weight", weight, self.weights)
        self.grid_kind, s0, s1 = parse_ct_grid(grid or str(steps))
        super().__init__(steps=s0, **edm)
        self.max_steps = s1 + 1 if self.grid_kind == "progressive" else s1
        self.kappa, self.boundary, self.weight, self.grid_spec = kappa, boundary, weight, grid
        self.s0, self.s1 = s0, s1
        self.distance = make_distance(distance)

    weights: tuple[str, ...] = CT_WEIGHTS

    @property
    def scheduled(self) -> bool:
        """True when the grid follows training progress (`steps_at`)."""
        return self.grid_kind != "fixed"

    def steps_at(self, step: int, total: int) -> int:
        """Grid points at training step `step` of `total` (method.md §10.4): fixed, or the release's progressive
        schedule."""
        if self.grid_kind == "progressive":
            return progressive_grid_size(step, total, self.s0, self.s1)
        return self.steps

    def config(self) -> dict:
        cfg = super().config()
        if self.scheduled:
            del cfg["steps"]  # the schedule's current N is training state, not identity
        return {**cfg, "kappa": self.kappa, "boundary": self.boundary, "weight": self.weight,
                "distance": self.distance.name, **({"grid": self.grid_spec} if self.scheduled else {})}

    def preconditioning(self, level):
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd ** 2 / ((level - smin).pow(2) + sd ** 2)
        c_out = (level - smin) * sd / (level.pow(2) + sd ** 2).sqrt()
        return c_skip, c_out, 1 / (level.pow(2) + sd ** 2).sqrt(), level.log() / 4

    def one_step_posterior(self, level: Tensor, one_step: float,
                           coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        # method.md §10.1: "posterior" takes the Markov posterior's kappa = ratio^2 for the value even though the
        # pair shares its noise (the release); "shared-path" the shared-noise path's kappa = ratio
        return super().one_step_posterior(level, one_step, "markov" if self.kappa == "posterior" else coupling)

    def last_td_start(self, stride: float, one_step: float) -> float:
        # method.md §10.2: "clamp": TD-valid unless the partner is the grid's last point (n + stride <= N - 2 on the
        # integer grid; half an index of margin absorbs the float index of a grid point), its one-step level clamped
        # to the grid; "mask": the general rule, the one-step level on the grid
        if self.boundary == "clamp":
            return (self.steps - 1.5) - stride
        return super().last_td_start(stride, one_step)

    def base_weight(self, level):
        # method.md §10.3: uniform (original CT, lambda = 1) or "karras", 1/sigma^2 + 1/sigma_data^2 (the release's
        # PyTorch default, 1/sigma^2 + 4 at sigma_data = 0.5)
        if self.weight == "karras":
            return level.pow(-2) + self.sigma_data ** -2
        return torch.ones_like(level)

    def base_loss(self, denoised: Tensor, target: Tensor, level: Tensor) -> Tensor:
        """Per-sample consistency loss w(level) d(f_theta, f-) (method.md §10)."""
        d = self.distance(denoised, target)
        return self.base_weight(level).to(d) * d

    def sample_training_level(self, n, generator=None, device="cpu"):
        idx = torch.randint(0, self.steps - 1, (n,), generator=generator, device=device)
        return self.level(idx.to(torch.float32))


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(d) for d values per sample
    (improved CT, method.md §10): l2-like for small errors, l1-like for large ones, no learned metric needed."""
    c = 0.00054 * a[0].numel() ** 0.5
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c


class _Distance:
    """A named per-sample distance [B, *F] x [B, *F] -> [B]."""

    def __init__(self, name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.name, self.fn = name, fn

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fn(a, b)

    def load(self) -> "_Distance":
        """Load what the distance needs (an LPIPS module's file): ConfigError now rather than at the first step."""
        if hasattr(self.fn, "load"):
            self.fn.load()
        return self


def make_distance(spec: str) -> _Distance:
    """The consistency loss's distance: "l2" (mean over pixels of the squared difference), "pseudo_huber" or
    "lpips:<file>" (a TorchScript LPIPS module, checked and loaded now). ConfigError names the accepted forms."""
    if spec == "l2":
        return _Distance("l2", lambda a, b: mean_pixels((a - b).pow(2)))
    if spec == "pseudo_huber":
        return _Distance("pseudo_huber", pseudo_huber)
    if str(spec).startswith("lpips:"):
        from ..lpips import LPIPSDistance

        return _Distance(spec, LPIPSDistance(spec[len("lpips:"):]))  # loaded when training starts (build.plan)
    raise ConfigError(f"unknown consistency distance {spec!r}; accepted: l2, pseudo_huber, lpips:<file> (a "
                      f"TorchScript LPIPS module)")


class ICTFormulation(CTFormulation):
    """Improved consistency training (Song & Dhariwal 2023) on the CT parametrisation (method.md §10).

    - Curriculum: the grid has N = min(s0 2^floor(k / K'), s1) + 1 points at training step k of K (`steps_at`; the
      learner hands `at_step(k, K)`, this formulation on that grid, to the env, the critics and the loss before each
      step), so strides and one-step shifts in index units refer to the current grid.
    - Levels: the pair index n is drawn with the log-normal mass of ln sigma between sigma(n) and sigma(n+1)
      (p_mean = -1.1, p_std = 2.0).
    - Loss: 1 / (sigma(n) - sigma(n+1)) times the pseudo-Huber distance between f_theta(x_t) and the target's
      f-(x_t2).
    """

    name = "ict"
    weights = ("ict",)

    def __init__(self, s0: int = 10, s1: int = 1280, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, sigma_data: float = 0.5, p_mean: float = -1.1, p_std: float = 2.0, *,
                 kappa: str = "posterior", boundary: str = "clamp", distance: str = "pseudo_huber") -> None:
        check_positive("s0", s0)
        check_positive("s1", s1)
        if s0 < 2 or s1 < s0:
            raise ConfigError(f"the curriculum needs 2 <= s0 <= s1 (grid sizes s0 + 1 .. s1 + 1), got s0={s0}, "
                              f"s1={s1}")
        super().__init__(steps=s0 + 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, sigma_data=sigma_data,
                         p_mean=p_mean, p_std=p_std, kappa=kappa, boundary=boundary, weight="ict", distance=distance)
        self.s0, self.s1 = int(s0), int(s1)
        self.max_steps = self.s1 + 1

    @property
    def scheduled(self) -> bool:
        return True

    def steps_at(self, step: int, total: int) -> int:
        return ict_grid_size(step, total, self.s0, self.s1)

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("steps", None)  # the curriculum's current N is training state, not identity
        for k in ("weight", "grid"):  # its own: the inverse-gap weight and the doubling curriculum
            cfg.pop(k, None)
        return {**cfg, "s0": self.s0, "s1": self.s1}

    def base_weight(self, level):
        # improved CT: lambda(sigma_n) = 1 / (sigma_n - sigma_n+1), the partner one grid point toward the data
        return 1.0 / (level - self.shift(level, 1.0)).clamp(min=1e-12)

    def sample_training_level(self, n, generator=None, device="cpu"):
        probs = ict_index_probs(self.grid(), self.p_mean, self.p_std)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator).to(device)
        return self.level(idx.to(torch.float32))
