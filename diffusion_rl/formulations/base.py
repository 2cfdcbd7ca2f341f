"""The interface every formulation implements (`Formulation`) and the helpers they share: couplings of a pair
of states (method.md §8) and per-sample levels broadcast over images."""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError


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
    """The noise process of one diffusion family; see the package docstring (formulations/__init__.py)."""

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

    def posterior(self, level_t: Tensor, level_s: Tensor, coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        """(A, kappa) with E[x_s | x_t, x0] = A x0 + kappa x_t under the coupling (method.md §3, §8)."""
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level_t, lambda c: self.plain_posterior(level_t, level_s, c))
        return self.plain_posterior(level_t, level_s, coupling) if mixed is None else mixed

    @abstractmethod
    def plain_posterior(self, level_t: Tensor, level_s: Tensor, coupling: str) -> tuple[Tensor, Tensor]:
        """`posterior` under a plain coupling, "markov" or "shared" (a mixed one is `posterior`'s)."""

    def one_step_posterior(self, level: Tensor, one_step: float,
                           coupling: Coupling = "markov") -> tuple[Tensor, Tensor]:
        """(A, kappa) toward the level `one_step` index units less noisy: the value's coefficients (method.md §3)."""
        return self.posterior(level, self.shift(level, one_step), coupling)

    def one_step_mean(self, x0: Tensor, x: Tensor, level: Tensor, one_step: float,
                      coupling: Coupling = "markov") -> Tensor:
        """mu(x, level) = A x0 + kappa x (method.md §3): mu_true with the clean x0, mu_theta with D_theta(x) for x0."""
        A, kappa = self.one_step_posterior(level, one_step, coupling)
        return expand_as_image(A, x) * x0 + expand_as_image(kappa, x) * x

    def posterior_variance(self, level_t: Tensor, level_s: Tensor, coupling: Coupling = "markov") -> Tensor:
        """Var[x_s | x_t, x0] per pixel under the coupling (0 for shared noise: x_s is then determined)."""
        self.check_coupling(coupling)
        mixed = self.mix_couplings(coupling, level_t, lambda c: self.plain_posterior_variance(level_t, level_s, c))
        return self.plain_posterior_variance(level_t, level_s, coupling) if mixed is None else mixed

    @abstractmethod
    def plain_posterior_variance(self, level_t: Tensor, level_s: Tensor, coupling: str) -> Tensor:
        """`posterior_variance` under a plain coupling, "markov" or "shared"."""

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
