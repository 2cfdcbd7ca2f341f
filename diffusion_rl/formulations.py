"""Diffusion formulations behind one interface.

A formulation owns the noise process: its index grid (index grows toward the data), noising, coupled pairs of
states, posterior coefficients, the preconditioning that turns a raw network into an x0-predicting denoiser, and
the base loss weight. The TD layer (envs/, agents/) asks nothing else of it.

- `EDMFormulation` ("edm"): VE, continuous time, the rho grid (method.md §1, §3).
- `VPFormulation`  ("vp", alias "ddpm"): DDPM discrete time; the network predicts eps (method.md §9).
- `CTFormulation`  ("ct"): the EDM grid with the consistency boundary parametrisation (method.md §10).
- `ICTFormulation` ("ict"): CT as improved consistency training has it: a curriculum of grid sizes, log-normal
  levels, the pseudo-Huber loss with 1 / (sigma_n - sigma_n+1) weights (method.md §10).

Levels are noise levels: sigma for EDM/CT, the (possibly fractional) timestep t for VP. Per-sample levels are
1-D tensors of shape [B]; `expand_as_image` broadcasts them over image dimensions.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, check_choice, check_positive
from .schedules import (
    alpha_bar_from_betas,
    cosine_betas,
    edm_index_of_sigma,
    edm_sigma_of_index,
    ict_grid_size,
    ict_index_probs,
    linear_betas,
    progressive_grid_size,
)

__all__ = [
    "COUPLINGS",
    "Coupling",
    "parse_coupling",
    "ve_coupling",
    "mean_pixels",
    "Formulation",
    "EDMFormulation",
    "VPFormulation",
    "CTFormulation",
    "ICTFormulation",
    "CT_KAPPAS",
    "CT_BOUNDARIES",
    "CT_WEIGHTS",
    "parse_ct_grid",
    "make_distance",
    "FORMULATIONS",
    "pseudo_huber",
    "make_formulation",
    "expand_as_image",
]

Coupling = str  # "markov", "shared", or "mixed:m" (method.md §8)
COUPLINGS: tuple[str, ...] = ("markov", "shared")


def parse_coupling(coupling: str) -> tuple[str, float | None]:
    """"markov" | "shared" -> (name, None); "mixed:m" -> ("mixed", m): a per-level mixture, shared noise from the
    states whose grid index is below m (the noisy part), Markov from the others (method.md §8). ConfigError
    naming the accepted forms otherwise."""
    if coupling in COUPLINGS:
        return coupling, None
    name, sep, m = str(coupling).partition(":")
    try:
        value = float(m) if name == "mixed" and sep else None
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ConfigError(f"unknown coupling {coupling!r}; accepted: markov, shared, mixed:M (shared noise below "
                          f"grid index M > 0, Markov from M on)")
    return "mixed", value


def ve_coupling(ratio: Tensor, coupling: str) -> tuple[Tensor, Tensor]:
    """(A, kappa) of the variance-exploding one-step posterior mean A x0 + kappa x_t from ratio = sigma_s / sigma_t
    (method.md §3, §8): Markov kappa = ratio^2 (the true reverse kernel), shared noise kappa = ratio; A = 1 - kappa.
    A plain coupling only; "mixed:m" is split per sample by `Formulation.mix_couplings` first."""
    kappa = ratio.pow(2) if coupling == "markov" else ratio
    return 1 - kappa, kappa


def mean_pixels(t: Tensor) -> Tensor:
    """Mean over every dimension after the first: [B, *F] -> [B] (the per-sample losses of method.md §5.3)."""
    return t.reshape(t.shape[0], -1).mean(-1)


def expand_as_image(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor [B] (or a scalar) so it broadcasts against x [B, *F]."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class Formulation(ABC):
    """The noise process of one diffusion family; see the module docstring."""

    name: str = ""
    level_name: str = "sigma"  # what a "level" is in this family: sigma (EDM, CT) or the timestep t (VP), method.md §1
    samplers: tuple[str, ...] = ()
    steps: int  # N, points of the index grid; index 0 is the noisiest level, N-1 the cleanest

    # ---- family policy: the defaults the env and the TD agent take from the formulation ----------------------------
    consistency: bool = False           # consistency-style training (CT, method.md §10): the base term is the CT loss
    default_coupling: str = "markov"    # method.md §8: the true reverse kernel, whose fixed point is the true denoiser
    default_reweighting: str = "edm"    # method.md §6: the EDM sample weighting (base weight / A^2)

    @property
    def default_stride(self) -> float:
        """k in index units: 3 on EDM's 18-point grid, i.e. 3/17 of the grid span N-1 on any grid (method.md §2)."""
        return 3.0 * (self.steps - 1) / 17.0

    @property
    def default_one_step(self) -> float:
        """delta in index units: 0.2 on the 18-point grid, the same fraction of any grid (method.md §3)."""
        return 0.2 * (self.steps - 1) / 17.0

    # ---- grid -------------------------------------------------------------------------------------------
    @abstractmethod
    def level(self, index: Tensor) -> Tensor:
        """Noise level at a continuous grid index (clamped to the grid)."""

    @abstractmethod
    def index(self, level: Tensor) -> Tensor:
        """Continuous grid index of a noise level (levels are clamped to the grid first)."""

    @abstractmethod
    def in_range(self, level: Tensor) -> Tensor:
        """Boolean mask: the level lies inside [min level, max level] of the grid."""

    def grid(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Levels at the integer indices 0..N-1 (noisiest first)."""
        return self.level(torch.arange(self.steps, dtype=dtype))

    # ---- the grid over training: fixed here; a consistency curriculum overrides (method.md §10.4) -----------------
    scheduled: bool = False  # True when the grid follows training progress

    def steps_at(self, step: int, total: int) -> int:
        """Grid points at training step `step` of `total`: `steps` for a fixed grid."""
        return self.steps

    def with_steps(self, steps: int) -> "Formulation":
        """This formulation on an N-point grid: a copy (cached, one per N), this object unchanged. A schedule's grids
        are values handed to their users, never edits of a shared object."""
        if steps == self.steps:
            return self
        grids = self.__dict__.setdefault("_grids", {})  # shared by the copies, which copy.copy passes on
        if steps not in grids:
            grid = copy.copy(self)
            grid.steps = int(steps)
            grids[steps] = grid
        return grids[steps]

    def at_step(self, step: int, total: int) -> "Formulation":
        """The formulation of training step `step` of `total`: `with_steps(steps_at(step, total))` (method.md §10.4)."""
        return self.with_steps(self.steps_at(step, total))

    def last_td_start(self, stride: float, one_step: float) -> float:
        """The last index a TD-valid transition may start from: (N-1) - (k + delta) for stride k and one-step shift
        delta, so that the partner's one-step level lies on the grid (method.md §5.2)."""
        return (self.steps - 1) - stride - one_step

    def shift(self, level: Tensor, delta: float) -> Tensor:
        """The level `delta` index units toward the data: level(index(level) + delta) (method.md §3)."""
        return self.level(self.index(level) + delta)

    # ---- forward process ----------------------------------------------------------------------------------
    @abstractmethod
    def add_noise(self, x0: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        """A sample of q(x_level | x0) built from standard normal `noise`."""

    @abstractmethod
    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """A sample at the noisiest level, from which samplers start."""

    @abstractmethod
    def posterior(self, level_t: Tensor, level_s: Tensor, coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        """(A, kappa) with E[x_s | x_t, x0] = A x0 + kappa x_t under the coupling (method.md §3)."""

    def one_step_posterior(self, level: Tensor, one_step: float,
                           coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        """(A, kappa) toward the level `one_step` index units less noisy: the value's coefficients (method.md §3)."""
        return self.posterior(level, self.shift(level, one_step), coupling)

    def one_step_mean(self, x0: Tensor, x: Tensor, level: Tensor, one_step: float,
                      coupling: Coupling = "markov") -> Tensor:
        """mu(x, level) = A x0 + kappa x (method.md §3): mu_true with the clean x0, mu_theta with D_theta(x) for x0."""
        A, kappa = self.one_step_posterior(level, one_step, coupling)
        return expand_as_image(A, x) * x0 + expand_as_image(kappa, x) * x

    @abstractmethod
    def posterior_variance(self, level_t: Tensor, level_s: Tensor, coupling: Coupling = "markov") -> Tensor:
        """Var[x_s | x_t, x0] per pixel under the coupling (0 for shared noise: x_s is then determined)."""

    def reverse_step(self, x0: Tensor, x_t: Tensor, level_t: Tensor, level_s: Tensor, coupling: Coupling = "markov",
                     generator: torch.Generator | None = None) -> Tensor:
        """Draw x_s from the true x0-conditioned reverse kernel q(x_s | x_t, x0) (method.md §2)."""
        A, kappa = self.posterior(level_t, level_s, coupling)
        std = self.posterior_variance(level_t, level_s, coupling).clamp(min=0).sqrt()
        noise = _randn_like(x_t, generator)
        return (expand_as_image(A, x_t) * x0 + expand_as_image(kappa, x_t) * x_t
                + expand_as_image(std, x_t) * noise)

    # ---- network and loss ---------------------------------------------------------------------------------
    @abstractmethod
    def preconditioning(self, level: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise): D(x) = c_skip x + c_out F(c_in x, c_noise)."""

    @abstractmethod
    def base_weight(self, level: Tensor) -> Tensor:
        """Weight of the base loss w(level) * mean_pixels (D(x_level) - x0)^2."""

    @abstractmethod
    def sample_training_level(self, n: int, generator: torch.Generator | None = None,
                              device: torch.device | str = "cpu") -> Tensor:
        """Training noise levels [n], from the family's own distribution."""

    def base_loss(self, denoised: Tensor, x0: Tensor, level: Tensor) -> Tensor:
        """Per-sample base loss w(level) * mean over pixels of (D - x0)^2 (method.md §5.3; eps loss for VP)."""
        err = mean_pixels((denoised - x0).pow(2))
        return self.base_weight(level).to(err) * err

    def check_coupling(self, coupling: str) -> None:
        name, m = parse_coupling(coupling)
        last = getattr(self, "max_steps", self.steps) - 1  # a schedule's final grid
        if name == "mixed" and m > last:
            raise ConfigError(f"coupling {coupling!r}: the switch index {m:g} lies past the grid's last index "
                              f"{last}; accepted: 0 < M <= {last}")

    def mix_couplings(self, coupling: str, level_t: Tensor, fn: Callable[[str], Any]):
        """For "mixed:m": fn("shared") where index(level_t) < m, else fn("markov"), per sample (tensors or tuples of
        tensors); None for a plain coupling, which the caller then handles itself (method.md §8)."""
        name, m = parse_coupling(coupling)
        if name != "mixed":
            return None
        shared = torch.as_tensor(self.index(torch.as_tensor(level_t)) < m)
        a, b = fn("shared"), fn("markov")
        if isinstance(a, tuple):
            return tuple(torch.where(shared.to(x.device), x, y) for x, y in zip(a, b))
        return torch.where(shared.to(a.device), a, b)

    def config(self) -> dict:
        """Constructor arguments, for checkpoints and results records."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


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

    def posterior(self, level_t, level_s, coupling="markov"):
        # method.md §3, §8: Markov kappa = (sigma_s/sigma_t)^2, shared kappa = sigma_s/sigma_t, A = 1 - kappa (VE).
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level_t, lambda c: self.posterior(level_t, level_s, c))
        if mixed is not None:
            return mixed
        return ve_coupling(level_s / level_t, coupling)

    def posterior_variance(self, level_t, level_s, coupling="markov"):
        # x_t = x_s + sqrt(st^2 - ss^2) n2 with x_s ~ N(x0, ss^2): Var = ss^2 (st^2 - ss^2) / st^2.
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level_t, lambda c: self.posterior_variance(level_t, level_s, c))
        if mixed is not None:
            return mixed
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
        from .lpips import LPIPSDistance

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
        return t.to(sigma.dtype) if sigma.is_floating_point() else t

    def alpha_bar(self, t: Tensor) -> Tensor:
        """abar at (possibly fractional) timesteps t in [0, T]."""
        t = torch.as_tensor(t).clamp(0, self.timesteps)
        table = self._log_abar.to(device=t.device)
        lo = t.floor().long().clamp(max=self.timesteps - 1)
        frac = (t - lo).to(table.dtype)
        out = (table[lo] * (1 - frac) + table[lo + 1] * frac).exp()
        return out.to(t.dtype) if t.is_floating_point() else out

    def level(self, index: Tensor) -> Tensor:
        sigma = edm_sigma_of_index(index, self.steps, self.sigma_ve_min, self.sigma_ve_max, self.rho)
        return self.timestep_of_sigma_ve(sigma)

    def index(self, level: Tensor) -> Tensor:
        sigma = self.sigma_ve(torch.as_tensor(level).clamp(1, self.timesteps))
        return edm_index_of_sigma(sigma, self.steps, self.sigma_ve_min, self.sigma_ve_max, self.rho).to(level.dtype)

    def one_step_posterior(self, level: Tensor, one_step: float,
                           coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        """The value's (A, kappa) in variance-exploding units (method.md §9): EDM's coefficients of sigma~."""
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level, lambda c: self.one_step_posterior(level, one_step, c))
        if mixed is not None:
            return mixed
        A, kappa = ve_coupling(self.sigma_ve(self.shift(level, one_step)) / self.sigma_ve(level), coupling)
        return A.to(level.dtype), kappa.to(level.dtype)

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

    def posterior(self, level_t, level_s, coupling="markov"):
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level_t, lambda c: self.posterior(level_t, level_s, c))
        if mixed is not None:
            return mixed
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

    def posterior_variance(self, level_t, level_s, coupling="markov"):
        # DDPM's beta-tilde between any s < t: (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s); 0 for shared noise.
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level_t, lambda c: self.posterior_variance(level_t, level_s, c))
        if mixed is not None:
            return mixed
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


FORMULATIONS: dict[str, type[Formulation]] = {
    "edm": EDMFormulation, "ve": EDMFormulation, "vp": VPFormulation, "ddpm": VPFormulation, "ct": CTFormulation,
    "ict": ICTFormulation,
}


def make_formulation(spec: str | Formulation, **kwargs) -> Formulation:
    """A formulation from its name ("edm", "vp"/"ddpm", "ct", "ict") or an instance (returned as is)."""
    if isinstance(spec, Formulation):
        return spec
    check_choice("formulation", spec, FORMULATIONS)
    return FORMULATIONS[spec](**kwargs)

