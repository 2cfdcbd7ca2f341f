"""TD learning for diffusion models: the denoiser as the critic of the diffusion MRP (method.md §2-§10).

`TDEvaluator` trains the denoiser D_theta as the value function V_theta(s) = A D_theta(x) + kappa x of the
denoising Markov reward process (`envs.DiffusionMRP`), with the semi-gradient TD loss of method.md §5 plus the
formulation's own base loss: `TDLoss` (agents/td_loss.py), a TorchRL `LossModule` that owns the online and target
critics so that TorchRL's `SoftUpdate` / `HardUpdate` move the target network. `TDSettings` holds and checks the
agent's settings.

Target network: a deep copy of the denoiser, always in eval mode with requires_grad False, updated after every
optimizer step by EMA (tau = 0.999, `SoftUpdate(eps=tau)`) or by a hard copy every `hard_period` steps
(`HardUpdate`). The EMA's rate may instead follow a half-life in training images and/or a ramp-up (a half-life of
a fixed fraction of the images seen so far), so that the target's lag fits the run's length (method.md §5.4). It is
not the evaluation EMA (`Learner.ema`); both are kept and both are checkpointed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.objectives import HardUpdate, SoftUpdate
from torchrl.objectives.value import TD0Estimator, ValueEstimatorBase

from diffusion_rl.errors import ConfigError, check_choice, check_non_negative, check_positive, check_range
from diffusion_rl.formulations import Formulation
from diffusion_rl.networks import Denoiser
from diffusion_rl.schedules import adaptive_target_tau
from diffusion_rl.training import Learner, TrainConfig, halflife_decay, resolve_device

from .estimators import estimator_name, make_estimator
from .functional import REWEIGHTINGS
from .td_loss import CT_TARGETS, TDLoss

__all__ = ["TDEvaluator", "TDSettings", "TARGET_UPDATES"]

TARGET_UPDATES: tuple[str, ...] = ("soft", "hard")
# the largest base-loss weight accepted: far above any useful one (0.5 is the paper's), far below float32 overflow
BASE_LAMBDA_MAX = 1e6


class FastSoftUpdate(SoftUpdate):
    """TorchRL's `SoftUpdate` (target <- tau target + (1 - tau) online), its per-step lerp done by one foreach call
    over the parameter lists, gathered once. TorchRL's own step rebuilds TensorDicts of `.data` views at every
    call, which costs more than the rest of the RL layer on small networks; the update itself is the same."""

    _pairs: tuple[list[Tensor], list[Tensor]] | None = None

    def step(self) -> None:
        if self._pairs is None:
            sources, targets = [], []
            for key, src in self._sources.items():
                tgt = self._targets.get(f"target_{key}")
                for leaf in src.keys(include_nested=True, leaves_only=True):
                    sources.append(src.get(leaf).data)
                    targets.append(tgt.get(leaf).data)
            self._pairs = (sources, targets)
        torch._foreach_lerp_(self._pairs[1], self._pairs[0], 1 - self.eps)


def parse_tau_schedule(text: str) -> tuple[float, int]:
    """"adaptive:MU0:S0" -> (MU0, S0): the release's adaptive target EMA, tau(N) = MU0^(S0 / (N - 1)) on the current
    N-point grid (method.md §10.4), 0 < MU0 < 1, S0 >= 1. ConfigError otherwise."""
    kind, _, rest = str(text).partition(":")
    try:
        mu0, s0 = rest.split(":")
        mu0, s0 = float(mu0), int(s0)
        if kind == "adaptive" and 0 < mu0 < 1 and s0 >= 1:
            return mu0, s0
    except ValueError:
        pass
    raise ConfigError(f"target tau schedule {text!r}; accepted: adaptive:MU0:S0 with 0 < MU0 < 1 and S0 >= 1 (the "
                      f"release's: adaptive:0.9:2)")


@dataclass(frozen=True)
class TDSettings:
    """The TD agent's settings (method.md §4-§8), checked where they are made: `TDSettings(...)` checks what needs no
    MRP, `for_mrp(env or MRPSettings)` what depends on its grid, stride and coupling, and resolves the formulation's
    default reweighting. `TDEvaluator` builds one from its arguments; `diffusion_rl.build` builds one before any data
    loads. Fields: as `TDEvaluator`'s arguments of the same names."""

    estimator: str | ValueEstimatorBase = "td0"
    n_steps: int = 1
    lmbda: float = 0.95
    reweighting: str | None = None
    base_lambda: float = 0.5
    target_update: str = "soft"
    tau: float = 0.999
    hard_period: int = 100
    target_halflife_images: float | None = None
    target_rampup: float | None = None
    shared_until: float | None = None
    full_reach: bool = False
    td_term: bool = True
    ct_target: str = "train"
    tau_schedule: str | None = None

    def __post_init__(self) -> None:
        est = make_estimator(self.estimator, lmbda=self.lmbda)  # checks the name and lambda
        check_positive("n_steps", self.n_steps)
        if isinstance(est, TD0Estimator) and self.n_steps != 1:
            raise ConfigError(f"n_steps={self.n_steps} needs a multi-step estimator; td0 trains on single "
                              f"transitions (n_steps=1); accepted estimators for n_steps > 1: nstep, td_lambda")
        if self.full_reach and isinstance(est, TD0Estimator):
            raise ConfigError("full_reach=True applies to the multi-step estimators (nstep, td_lambda); td0's "
                              "return always reaches one stride")
        if self.reweighting is not None:
            check_choice("reweighting", self.reweighting, REWEIGHTINGS)
        check_non_negative("base_lambda", self.base_lambda)
        check_range("base_lambda", self.base_lambda, 0.0, BASE_LAMBDA_MAX)  # 1e308 overflows float32 losses
        check_choice("target_update", self.target_update, TARGET_UPDATES)
        check_choice("ct_target", self.ct_target, CT_TARGETS)
        if self.tau_schedule is not None:
            parse_tau_schedule(self.tau_schedule)
            if self.target_update != "soft" or self.target_halflife_images or self.target_rampup:
                raise ConfigError(f"tau_schedule={self.tau_schedule!r} sets the soft update's rate; it excludes "
                                  f"target_update='hard', target_halflife_images and target_rampup")
        if self.shared_until is not None:
            check_range("shared_until", self.shared_until, 0.0, 1.0)
        check_range("target_tau", self.tau, 0.0, 1.0)  # the command line's --target-tau
        for name in ("target_halflife_images", "target_rampup"):
            v = getattr(self, name)
            if v is not None:
                check_positive(name, v, integer=False)
                if self.target_update != "soft":
                    raise ConfigError(f"{name} sets the soft update's rate; target_update={self.target_update!r} "
                                      f"copies every hard_period steps instead")
        check_positive("hard_period", self.hard_period)
        for name, cast in (("n_steps", int), ("lmbda", float), ("base_lambda", float), ("tau", float),
                           ("hard_period", int), ("target_halflife_images", float), ("target_rampup", float),
                           ("shared_until", float)):
            v = getattr(self, name)
            object.__setattr__(self, name, None if v is None else cast(v))

    def for_mrp(self, mrp) -> "TDSettings":
        """These settings on an MRP (a DiffusionMRP or an envs.MRPSettings): checks the chain's reach on its grid, the
        coupling schedule and TD-CT's pairs; returns them with the formulation's default reweighting filled in."""
        form = mrp.formulation
        # the longest TD-valid chain: n strides from index 0 need n k + delta <= N-1 (method.md §5.2, §7), on the
        # final grid of a schedule
        steps = getattr(form, "max_steps", form.steps)
        horizon = math.floor((steps - 1 - mrp.one_step) / mrp.stride + 1e-9)
        if self.n_steps > horizon:
            raise ConfigError(f"n_steps={self.n_steps} exceeds the {horizon} TD-valid strides of {mrp.stride:g} "
                              f"index units (one-step {mrp.one_step:g}) on the {steps}-point grid; "
                              f"accepted: 1..{horizon}")
        if self.shared_until is not None and mrp.coupling == "shared":
            raise ConfigError("shared_until switches from shared to the env's coupling; this env's coupling is "
                              "already 'shared' (use coupling='markov')")
        if form.consistency:  # method.md §10: the consistency pair is (sigma(n), sigma(n+1)) with shared noise
            if mrp.coupling != "shared":
                raise ConfigError(f"TD-CT needs an env with coupling 'shared' (method.md §10), got {mrp.coupling!r}")
            if float(mrp.stride) != 1.0:
                raise ConfigError(f"TD-CT needs an env with stride 1 (adjacent grid points, method.md §10), "
                                  f"got {mrp.stride}")
        elif self.tau_schedule is not None:
            raise ConfigError(f"tau_schedule={self.tau_schedule!r} follows a consistency grid (method.md §10.4); "
                              f"{form.name!r} has a fixed grid: give tau")
        reweighting = form.default_reweighting if self.reweighting is None else self.reweighting
        return dataclasses.replace(self, reweighting=reweighting)

    def kwargs(self) -> dict:
        """The settings as `TDEvaluator` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class TDEvaluator(Learner):
    """Train a diffusion model by TD learning on the diffusion MRP (method.md §2-§10).

    Args:
        env: a `envs.DiffusionMRP`, the producer of every batch; its formulation, stride, one_step and coupling
            define the MRP and the value. Paper defaults (EDM): N = 18 grid points, stride 3, one_step 0.2, Markov.
        denoiser: the online network (default: `build_network` for the data, wrapped in a `Denoiser` with the env's
            formulation, initialised from `config.seed`). Its formulation must equal the env's.
        estimator: "td0" (paper; trains on `env.sample_pairs`), "nstep" or "td_lambda" (train on
            `env.sample_trajectories(n_steps)`, loss at the chains' start states, method.md §7), or a TorchRL
            `ValueEstimatorBase` instance (gamma should be 1).
        n_steps: chain length for "nstep" / "td_lambda" (must be 1 for "td0").
        lmbda: TD(lambda)'s lambda in [0, 1] (for "td_lambda").
        reweighting: TD weighting, "edm" | "pairwise" | "linear" | "none" (method.md §6); None picks the formulation's
            `default_reweighting`: "edm" (base_weight / A^2) for EDM and VP, "pairwise" for CT (method.md §10).
        base_lambda: the paper's lambda in [0, BASE_LAMBDA_MAX = 1e6] weighting the BASE loss (0.5).
        target_update: "soft" (EMA after each optimizer step, target <- tau target + (1 - tau) online) or "hard"
            (copy every `hard_period` optimizer steps).
        tau: EMA factor of the soft update in [0, 1] (0.999), used when neither of the next two is given.
        target_halflife_images: the soft update's half-life in training images (tau = 0.5 ** (batch / half-life)).
        target_rampup: cap the half-life at this fraction of the images seen so far (EDM's EMA ramp-up): the lag
            stays that fraction of the run, and the target follows the online network closely early on.
        shared_until: a coupling schedule (method.md §8): train with shared-noise coupling for this fraction of the
            run's steps, then with the env's own coupling (None: the env's coupling throughout).
        hard_period: steps between hard copies (100).
        full_reach: nstep / td_lambda: the TD term only on samples whose whole chain of n_steps is TD-valid, the
            equal-reach pair of TD(0) at stride n_steps * k (method.md §7).
        ct_target: TD-CT's target under dropout, "train" (the release) or "eval" (method.md §10.3).
        base_weights: "td" or "uniform" (every sample's base loss weighs 1: plain CT, `ConsistencyBaseline`).
        tau_schedule: "adaptive:MU0:S0", the soft update's rate MU0^(S0 / (N - 1)) on the consistency grid's current
            N points (the release's adaptive target EMA, method.md §10.4); None: `tau`.
        td_term: False trains the matched control "tdoff": this agent's batches, TD-valid mask and per-sample base
            weights without the TD term (method.md §5.5); its method is "tdoff-<formulation>".
        config, out_dir, device: as for `Learner` (the env's batch size is the batch).
        critic_factory: builds a critic TensorDictModule from (denoiser, formulation, one_step, coupling); default
            `envs.critic.make_critic`. It must not read "x0".

    Each optimizer step: collect a batch from the env, `loss`, Adam step, evaluation EMA, then the target update.
    """

    def __init__(self, env, *, denoiser: Denoiser | None = None, estimator: str | ValueEstimatorBase = "td0",
                 n_steps: int = 1, lmbda: float = 0.95, reweighting: str | None = None,
                 base_lambda: float = 0.5, target_update: str = "soft", tau: float = 0.999,
                 hard_period: int = 100, target_halflife_images: float | None = None,
                 target_rampup: float | None = None, shared_until: float | None = None, full_reach: bool = False,
                 td_term: bool = True, ct_target: str = "train", tau_schedule: str | None = None,
                 base_weights: str = "td", config: TrainConfig | None = None, out_dir: str | Path | None = None,
                 device: str | torch.device = "auto",
                 critic_factory: Callable[..., TensorDictModule] | None = None) -> None:
        for attr in ("formulation", "stride", "one_step", "coupling", "sample_pairs", "sample_trajectories"):
            if not hasattr(env, attr):
                raise ConfigError(f"env must be a DiffusionMRP (missing {attr!r}), got {type(env).__name__}")
        # every TD setting is checked in TDSettings, before any work
        settings = TDSettings(estimator=estimator, n_steps=n_steps, lmbda=lmbda, reweighting=reweighting,
                              base_lambda=base_lambda, target_update=target_update, tau=tau, hard_period=hard_period,
                              target_halflife_images=target_halflife_images, target_rampup=target_rampup,
                              shared_until=shared_until, full_reach=full_reach, td_term=td_term, ct_target=ct_target,
                              tau_schedule=tau_schedule).for_mrp(env)
        form: Formulation = env.formulation
        est = make_estimator(estimator, lmbda=lmbda, device=resolve_device(device))
        from envs.critic import check_critic_keys, make_critic

        critic_factory = critic_factory or make_critic
        super().__init__(env, denoiser=denoiser, config=config, out_dir=out_dir, device=device)

        self.settings = settings
        self.td_term = settings.td_term
        self.method = f"{'td' if settings.td_term else 'tdoff'}-{form.name}"
        self.estimator_name = estimator if isinstance(estimator, str) else estimator_name(estimator)
        self.n_steps, self.lmbda = settings.n_steps, settings.lmbda
        self.reweighting, self.base_lambda = settings.reweighting, settings.base_lambda
        self.target_update, self.tau, self.hard_period = settings.target_update, settings.tau, settings.hard_period
        self.target_halflife_images, self.target_rampup = settings.target_halflife_images, settings.target_rampup
        self.shared_until, self.final_coupling = settings.shared_until, env.coupling
        self.full_reach = settings.full_reach
        self.ct_target, self.tau_schedule = settings.ct_target, settings.tau_schedule

        # ---- critics: online over the denoiser, target over a frozen deep copy in eval mode ------------------------
        self.target = copy.deepcopy(self.denoiser).eval().requires_grad_(False)
        self.critic = critic_factory(self.denoiser, form, env.one_step, env.coupling)
        self.target_critic = critic_factory(self.target, form, env.one_step, env.coupling)
        for c in (self.critic, self.target_critic):
            check_critic_keys(getattr(c, "in_keys", []))
        self.uses_trajectories = not isinstance(est, TD0Estimator)
        self.loss_module = TDLoss(self.critic, self.target_critic, form, one_step=env.one_step,
                                  coupling=env.coupling, estimator=est, reweighting=settings.reweighting,
                                  base_lambda=settings.base_lambda, n_steps=settings.n_steps,
                                  full_reach=settings.full_reach, td_term=settings.td_term,
                                  ct_target=settings.ct_target, base_weights=base_weights)
        self.apply_speed()  # the target's forward in the online network's precision (and compiled alike)
        self._buffer_pairs = list(zip(self.target.buffers(), self.denoiser.buffers()))
        if settings.target_update == "soft":
            with warnings.catch_warnings():  # TorchRL warns about rates below 0.5, which ramp-ups and iCT use
                warnings.filterwarnings("ignore", message="Found an eps value")
                self.target_updater = FastSoftUpdate(self.loss_module, eps=self.tau)
        else:
            # HardUpdate copies when its counter reaches the interval, i.e. every interval + 1 steps
            self.target_updater = HardUpdate(self.loss_module, value_network_update_interval=self.hard_period - 1)

    # ---- Learner hooks ---------------------------------------------------------------------------------------------
    def collect(self) -> TensorDictBase:
        """td0: the paper's pairs, env.sample_pairs(batch_size) [B]; nstep / td_lambda: chains from the same
        start states, env.sample_trajectories(n_steps, batch_size) [B, n_steps]. Data and noise come from the
        env's generators, which checkpoints carry, so a resumed run draws exactly what the uninterrupted one would."""
        B = self.local_batch  # this process's share of the global batch
        batch = (self.env.sample_trajectories(self.n_steps, B) if self.uses_trajectories
                 else self.env.sample_pairs(B))
        return batch.to(self.device)

    def loss(self, batch: TensorDictBase) -> TensorDict:
        return self.loss_module(batch)

    @torch.no_grad()
    def after_update(self) -> None:
        """Move the target network after each optimizer step (method.md §5.4: EMA tau, or a hard copy every period)."""
        if self.target_update == "soft":
            self.target_updater.eps = self.current_tau()
        self.target_updater.step()
        for b_t, b in self._buffer_pairs:  # updaters move parameters only
            b_t.copy_(b)

    def apply_speed(self) -> None:
        super().apply_speed()
        if hasattr(self, "target"):  # the Learner calls this before the target exists
            self.target.set_speed(self.config.precision, self.config.compile, self.config.channels_last)
        if hasattr(self, "loss_module"):  # (a resume may switch compile on)
            if self.loss_module.replay_dropout and self.config.compile:
                raise ConfigError("ct_target='train' replays the online call's dropout masks in the target, which "
                                  "separately compiled graphs do not guarantee: with dropout and compile use "
                                  "ct_target='eval' (method.md §10.3)")
            # static shapes on an accelerator or under compile: no host sync, one shape (docs/scaling.md)
            self.loss_module.static_shapes = self.device.type != "cpu" or self.config.compile

    def before_step(self, total: int) -> None:
        super().before_step(total)
        if self.shared_until is not None:  # the coupling schedule: one coupling for the env, the critics and the loss
            self.set_coupling("shared" if self.step < self.shared_until * total else self.final_coupling)

    def use_grid(self, formulation: Formulation) -> None:
        """This step's grid for the env, both critics and the loss (they must agree, like the coupling)."""
        super().use_grid(formulation)
        self.loss_module.formulation = formulation
        for critic in (self.critic, self.target_critic):
            critic.module.formulation = formulation

    def set_coupling(self, coupling: str) -> None:
        """Use `coupling` from the next batch on: in the env's transitions and rewards, both critics' values and the
        loss's weights (they must agree, method.md §8)."""
        self.env.coupling = self.loss_module.coupling = coupling
        for critic in (self.critic, self.target_critic):
            critic.module.coupling = coupling

    def current_tau(self) -> float:
        """The soft update's rate at this step: `tau`, the decay of the half-life min(target_halflife_images,
        target_rampup * images seen) (method.md §5.4), or the adaptive rate on the current grid (§10.4)."""
        if self.tau_schedule is not None:
            return adaptive_target_tau(self.env.formulation.steps, *parse_tau_schedule(self.tau_schedule))
        halflives = [h for h in (self.target_halflife_images,
                                 None if self.target_rampup is None else self.target_rampup * self.images_seen)
                     if h is not None]
        return halflife_decay(self.config.batch_size, min(halflives)) if halflives else self.tau

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def method_config(self) -> dict:
        return {"estimator": self.estimator_name, "n_steps": self.n_steps,
                "lmbda": self.lmbda if self.estimator_name == "td_lambda" else None,
                "reweighting": self.reweighting, "base_lambda": self.base_lambda,
                "target_update": self.target_update,
                "tau": self.tau if self.target_update == "soft" and self.target_halflife_images is None
                and self.target_rampup is None and self.tau_schedule is None else None,
                "target_halflife_images": self.target_halflife_images, "target_rampup": self.target_rampup,
                "shared_until": self.shared_until,
                "hard_period": self.hard_period if self.target_update == "hard" else None,
                "stride": float(self.env.stride), "one_step": float(self.env.one_step),
                "coupling": self.final_coupling,
                **({"full_reach": True} if self.full_reach else {}),  # absent when off: older checkpoints still fit
                **({"td_term": False} if not self.td_term else {}),
                **({"ct_target": self.ct_target} if self.formulation.consistency else {}),
                **({"tau_schedule": self.tau_schedule} if self.tau_schedule is not None else {})}

    def load_state_dict(self, ckpt: dict, strict_config: bool = True, **kwargs) -> None:
        super().load_state_dict(ckpt, strict_config, **kwargs)
        if isinstance(self.target_updater, HardUpdate):
            self.target_updater.counter = self.step % self.hard_period
        self.target.eval()

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, nfe=None, **kwargs):
        """Sample at each NFE budget and score against the data (`diffusion_rl.evaluation.evaluate_learner`)."""
        from diffusion_rl.evaluation import evaluate_learner

        return evaluate_learner(self, nfe=nfe, **kwargs)
