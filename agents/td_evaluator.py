"""TD learning for diffusion models: the denoiser as the critic of the diffusion MRP (spec sections 3-5).

`TDEvaluator` trains the denoiser D_theta as the value function V_theta(s) = A D_theta(x) + kappa x of the
denoising Markov reward process (`envs.DiffusionMRP`), with the semi-gradient TD loss of spec section 4 plus the
formulation's own base loss. `TDLoss` is that loss as a TorchRL `LossModule`; it owns the online and target
critics so that TorchRL's `SoftUpdate` / `HardUpdate` move the target network.

    TD-EDM (spec 4), per sample:
        D = D_theta(x_t) once;  base = w(level_t) * mean_pixels (D - x0)^2           (formulation.base_loss)
        delta = G - V_theta(s_t),  G = r + V-(s_t') for td0                          (TorchRL estimator, gamma 1)
              = A_t (x0 - D) - A_t' (x0 - D-(x_t'))                                  (kappa x terms cancel)
        td = w_td * mean_pixels delta^2
        valid: td + lambda * base;   invalid: (1 + lambda) * base;   loss = batch mean.
    TD-CT (spec 5): the same with f in place of D and the consistency loss
        loss_ct = w(t) * mean_pixels (f_theta(x_t, t) - f-(x_t2, t2))^2 in place of the base loss.

The same code runs for VP (spec 2, derived posterior, A + kappa != 1): A and kappa always come from the
formulation; nothing here assumes A = 1 - kappa.

Target network: a deep copy of the denoiser, always in eval mode with requires_grad False, updated after every
optimizer step by EMA (tau = 0.999, `SoftUpdate(eps=tau)`) or by a hard copy every `hard_period` steps
(`HardUpdate`). It is not the evaluation EMA (`Learner.ema`); both are kept and both are checkpointed.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictParams
from torch import Tensor, nn
from torchrl.objectives import HardUpdate, LossModule, SoftUpdate
from torchrl.objectives.value import TD0Estimator, ValueEstimatorBase

from diffusion_rl.errors import ConfigError, check_choice, check_positive, check_range
from diffusion_rl.formulations import Formulation, expand_as_image
from diffusion_rl.networks import Denoiser, build_network
from diffusion_rl.training import Learner, TrainConfig, resolve_device

from .estimators import estimator_name, make_estimator, returns

__all__ = ["TDLoss", "TDEvaluator", "REWEIGHTINGS", "TARGET_UPDATES", "td_weight", "combine_losses"]

REWEIGHTINGS: tuple[str, ...] = ("edm", "pairwise", "linear", "none")
TARGET_UPDATES: tuple[str, ...] = ("soft", "hard")


def default_reweighting(formulation: Formulation) -> str:
    """The release's TD weighting per family: "pairwise" for CT (spec 5), the EDM sample weighting otherwise (4.5)."""
    return "pairwise" if formulation.name == "ct" else "edm"


def td_weight(reweighting: str, A_t: Tensor, A_next: Tensor, c_out_t: Tensor) -> Tensor:
    """Per-sample weight w_td of the TD term (spec 4.5).

    "edm":      1 / max(A_t^2 c_out(level_t)^2, 1e-8) with the formulation's own preconditioning c_out (EDM: equals
                w_edm / A_t^2; VP: c_out^2 = (1 - abar)/abar, so it equals the eps-loss weight / A_t^2);
    "pairwise": 1 / max(A_t^2 + A_t'^2, 0.01);   "linear": 1 / max(A_t + A_t', 0.01);   "none": 1.
    """
    if reweighting == "edm":
        return 1.0 / (A_t.pow(2) * c_out_t.pow(2)).clamp(min=1e-8)
    if reweighting == "pairwise":
        return 1.0 / (A_t.pow(2) + A_next.pow(2)).clamp(min=0.01)
    if reweighting == "linear":
        return 1.0 / (A_t + A_next).clamp(min=0.01)
    if reweighting == "none":
        return torch.ones_like(A_t)
    raise ConfigError(f"unknown reweighting {reweighting!r}; accepted: {', '.join(REWEIGHTINGS)}")


def combine_losses(loss_td: Tensor, loss_base: Tensor, valid: Tensor, lam: float) -> Tensor:
    """Per-sample loss of spec 4.6: valid -> td + lambda * base; invalid -> (1 + lambda) * base."""
    return torch.where(valid, loss_td + lam * loss_base, (1.0 + lam) * loss_base)


def _mean_pixels(t: Tensor, batch_dims: int) -> Tensor:
    return t.reshape(*t.shape[:batch_dims], -1).mean(-1)


class TDLoss(LossModule):
    """The semi-gradient TD loss of spec section 4 (and TD-CT, section 5) as a TorchRL LossModule.

    The online critic's parameters are registered as `value_network_params` and the target critic's as
    `target_value_network_params`, TorchRL's naming contract for target networks, so that
    `SoftUpdate(loss, eps=tau)` / `HardUpdate(loss, ...)` update the target in place. Unlike
    `convert_to_functional(..., create_target_params=True)`, which keeps detached clones inside the loss, the target
    parameters here ARE the parameters of a real module (a deep copy of the denoiser): it can be called directly,
    kept in eval mode, and checkpointed with `state_dict()`.

    Args:
        critic: online critic, a TensorDictModule ("x", "level", "label") -> ("denoised", "state_value").
        target_critic: the same over the target denoiser (requires_grad False).
        formulation: gives (A, kappa), the base loss and its weight.
        one_step, coupling: the value's one-step posterior (spec 2), as in the env.
        estimator: a TorchRL value estimator with gamma = 1 (see `agents.estimators`).
        reweighting: TD weighting, one of REWEIGHTINGS.
        base_weight_lambda: lambda >= 0, the weight of the base (or consistency) loss.

    Input: a TensorDict [B] of transitions (`DiffusionMRP.sample_pairs`) or [B, T] of trajectories
    (`DiffusionMRP.sample_trajectories`), with root "x", "level", "label", "x0", "valid" and "next" with "x",
    "level", "label", "reward" (and "done" for trajectories).

    Output: a TensorDict with scalar "loss" (plus scalar summaries "loss_td_mean", "loss_base_mean",
    "valid_fraction") and per-sample entries shaped like the input batch: "loss_td", "loss_base", "loss_sample",
    "valid" and the image-shaped TD error "td_error" (0 where invalid).
    """

    value_network: TensorDictModule
    value_network_params: TensorDictParams
    target_value_network: TensorDictModule
    target_value_network_params: TensorDictParams

    def __init__(self, critic: TensorDictModule, target_critic: TensorDictModule, formulation: Formulation, *,
                 one_step: float, coupling: str, estimator: ValueEstimatorBase, reweighting: str = "edm",
                 base_weight_lambda: float = 0.5) -> None:
        super().__init__()
        check_choice("reweighting", reweighting, REWEIGHTINGS)
        # Modules live in __dict__ (not as submodules): their parameters are registered once, below.
        self.__dict__["value_network"] = critic
        self.__dict__["target_value_network"] = target_critic
        self.value_network_params = TensorDict.from_module(critic, as_module=True)
        self.target_value_network_params = TensorDict.from_module(target_critic, as_module=True)
        self._has_update_associated["value_network"] = False  # set True by the SoftUpdate / HardUpdate built on us
        self.make_value_estimator(estimator)
        self.formulation = formulation
        self.one_step, self.coupling = float(one_step), coupling
        self.reweighting = reweighting
        self.base_weight_lambda = float(base_weight_lambda)
        self.consistency = formulation.name == "ct"
        self.critic_keys = list(critic.in_keys)

    # ---- pieces -------------------------------------------------------------------------------------------------
    def _target(self, states: TensorDictBase) -> tuple[Tensor, Tensor]:
        """(denoised, value) of the target critic: no grad, eval mode (spec 4.4, pitfall 7.5)."""
        self.target_value_network.eval()
        with torch.no_grad():
            out = self.target_value_network(states.select(*self.critic_keys, strict=False))
        return out["denoised"].detach(), out["state_value"].detach()

    def forward(self, batch: TensorDictBase) -> TensorDict:
        shape = batch.batch_size
        if len(shape) not in (1, 2):
            raise ValueError(f"TDLoss takes a batch [B] of transitions or [B, T] of trajectories, got {tuple(shape)}")
        M = shape.numel()
        flat = batch.reshape(M)
        nxt = flat.get("next")
        x0, level, level_next = flat.get("x0"), flat.get("level"), nxt.get("level")
        valid = flat.get("valid").reshape(M).to(torch.bool)  # 1-D even for batch size 1 (pitfall 7.6)

        # spec 4.3: D_theta(x_t) computed once, reused by the base and the TD terms; V_theta(s) = A D + kappa x.
        online = self.value_network(flat.select(*self.critic_keys, strict=False))
        denoised, value = online["denoised"], online["state_value"]

        next_value = torch.zeros_like(value).detach()
        if self.consistency:
            # spec 5: the consistency pair (t, t2) uses f-(x_t2, t2) for every sample, boundary ones included.
            next_denoised, next_value_all = self._target(nxt)
            # l2 loss_ct with the CT weighting: w(t) mean_pixels (f_theta(x_t, t) - f-(x_t2, t2))^2
            loss_base = self.formulation.base_loss(denoised, next_denoised, level)
            next_value = torch.where(expand_as_image(valid, value).bool(), next_value_all, next_value)
        else:
            loss_base = self.formulation.base_loss(denoised, x0, level)  # spec 4.3: w(level) mean (D - x0)^2
            if valid.any():  # spec 4.4: target forward only on TD-valid samples
                next_value[valid] = self._target(nxt[valid])[1].to(next_value)

        # spec 3: delta = G - V_theta(s) with G the estimator's return (gamma 1, never terminated, bootstrap from
        # the target). td0 on pairs: G = r + V-(s'), so delta = A_t (x0 - D) - A_t' (x0 - D-(x_t')).
        reward = nxt.get("reward")
        if len(shape) == 1:
            g = returns(self.value_estimator, reward, next_value)
        else:
            B, T = shape
            feat = reward.shape[1:]
            valid_bt = valid.reshape(B, T)
            # a chain is truncated after its last TD-valid transition: the next one must not be looked through
            done = nxt.get("done").reshape(B, T).to(torch.bool)
            done = done | ~torch.cat([valid_bt[:, 1:], valid_bt.new_zeros(B, 1)], dim=1)
            g = returns(self.value_estimator, reward.reshape(B, T, *feat), next_value.reshape(B, T, *feat), done,
                        None, time_dim=1).reshape(M, *feat)
        mask = expand_as_image(valid, value).bool()
        delta = torch.where(mask, g - value, torch.zeros_like(value))

        # spec 4.5: td = w_td mean_pixels delta^2 (partner A_t' = one stride ahead for the pairwise/linear weights)
        A_t, _ = self.formulation.one_step_posterior(level, self.one_step, self.coupling)
        A_n, _ = self.formulation.one_step_posterior(level_next, self.one_step, self.coupling)
        c_out = self.formulation.preconditioning(level)[1]
        w_td = td_weight(self.reweighting, A_t, A_n, c_out).to(value)
        loss_td = torch.where(valid, w_td * _mean_pixels(delta.pow(2), 1), torch.zeros_like(loss_base))
        loss_sample = combine_losses(loss_td, loss_base, valid, self.base_weight_lambda)  # spec 4.6

        out = TensorDict({
            "loss": loss_sample.mean(),
            "loss_td_mean": loss_td.mean().detach(),
            "loss_base_mean": loss_base.mean().detach(),
            "valid_fraction": valid.float().mean(),
            "loss_sample": loss_sample.reshape(shape),
            "loss_td": loss_td.reshape(shape),
            "loss_base": loss_base.reshape(shape),
            "valid": valid.reshape(shape),
            "td_error": delta.reshape(*shape, *delta.shape[1:]),
        }, batch_size=[])
        return out


def _check_lambda(what: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


class TDEvaluator(Learner):
    """Train a diffusion model by TD learning on the diffusion MRP (spec sections 3-5).

    Args:
        env: a `envs.DiffusionMRP`; its formulation, stride, one_step and coupling define the MRP and the value.
            Paper defaults (EDM): N = 18 grid points, stride 3, one_step 0.2, Markov coupling.
        denoiser: the online network (default: `build_network` for the data, wrapped in a `Denoiser` with the env's
            formulation). Its formulation must equal the env's.
        estimator: "td0" (paper; trains on `env.sample_pairs`), "nstep" or "td_lambda" (train on
            `env.sample_trajectories(n_steps)`), or a TorchRL `ValueEstimatorBase` instance (gamma should be 1).
        n_steps: trajectory length for "nstep" / "td_lambda" (must be 1 for "td0").
        lmbda: TD(lambda)'s lambda in [0, 1] (for "td_lambda").
        reweighting: TD weighting, "edm" | "pairwise" | "linear" | "none" (spec 4.5); None picks the family's
            default: "edm" (and its generalisation base_weight / A^2) for EDM and VP, "pairwise" for CT (spec 5).
        base_weight_lambda: the paper's lambda >= 0 weighting the BASE loss (0.5).
        target_update: "soft" (EMA after each optimizer step, target <- tau target + (1 - tau) online) or "hard"
            (copy every `hard_period` optimizer steps).
        tau: EMA factor of the soft update in [0, 1] (0.999).
        hard_period: steps between hard copies (100).
        config, out_dir, device: as for `Learner`.
        critic_factory: builds a critic TensorDictModule from (denoiser, formulation, one_step, coupling); default
            `envs.critic.make_critic`. It must not read "x0".

    Each optimizer step: collect a batch, `loss`, Adam step, evaluation EMA, then the target update.
    """

    def __init__(self, env, *, denoiser: Denoiser | None = None, estimator: str | ValueEstimatorBase = "td0",
                 n_steps: int = 1, lmbda: float = 0.95, reweighting: str | None = None,
                 base_weight_lambda: float = 0.5, target_update: str = "soft", tau: float = 0.999,
                 hard_period: int = 100, config: TrainConfig | None = None, out_dir: str | Path | None = None,
                 device: str | torch.device = "auto",
                 critic_factory: Callable[..., TensorDictModule] | None = None) -> None:
        # ---- validate everything before any work -----------------------------------------------------------------
        for attr in ("formulation", "stride", "one_step", "coupling", "dataset", "sample_pairs"):
            if not hasattr(env, attr):
                raise ConfigError(f"env must be a DiffusionMRP (missing {attr!r}), got {type(env).__name__}")
        form: Formulation = env.formulation
        est = make_estimator(estimator, lmbda=lmbda, device=resolve_device(device))  # checks name and lambda
        check_positive("n_steps", n_steps)
        if isinstance(est, TD0Estimator) and n_steps != 1:
            raise ConfigError(f"n_steps={n_steps} needs a multi-step estimator; td0 trains on single transitions "
                              f"(n_steps=1); accepted estimators for n_steps > 1: nstep, td_lambda")
        reweighting = default_reweighting(form) if reweighting is None else reweighting
        check_choice("reweighting", reweighting, REWEIGHTINGS)
        base_weight_lambda = _check_lambda("base_weight_lambda", base_weight_lambda)
        check_choice("target_update", target_update, TARGET_UPDATES)
        check_range("tau", tau, 0.0, 1.0)
        check_positive("hard_period", hard_period)
        if denoiser is not None:
            mine, theirs = denoiser.formulation.config(), form.config()
            if mine != theirs:
                raise ConfigError(f"the denoiser's formulation {mine} differs from the env's {theirs}; "
                                  "accepted: the same formulation and settings")
        if form.name == "ct":
            # spec 5: the consistency pair is (sigma(n), sigma(n+1)) with shared noise
            if env.coupling != "shared":
                raise ConfigError(f"TD-CT needs an env with coupling 'shared' (spec 5), got {env.coupling!r}")
            if float(env.stride) != 1.0:
                raise ConfigError(f"TD-CT needs an env with stride 1 (adjacent grid points, spec 5), "
                                  f"got {env.stride}")
        from envs.critic import check_critic_keys, make_critic

        critic_factory = critic_factory or make_critic

        if denoiser is None:
            net = build_network(env.dataset.sample_shape, num_classes=int(getattr(env.dataset, "num_classes", 0)))
            denoiser = Denoiser(net, form)
        super().__init__(denoiser, env.dataset, config, out_dir, device)

        self.env = env
        self.method = f"td-{form.name}"
        self.estimator_name = estimator if isinstance(estimator, str) else estimator_name(estimator)
        self.n_steps, self.lmbda = int(n_steps), float(lmbda)
        self.reweighting, self.base_weight_lambda = reweighting, base_weight_lambda
        self.target_update, self.tau, self.hard_period = target_update, float(tau), int(hard_period)

        # ---- critics: online over the denoiser, target over a frozen deep copy in eval mode ------------------------
        self.target = copy.deepcopy(self.denoiser).eval().requires_grad_(False)
        self.critic = critic_factory(self.denoiser, form, env.one_step, env.coupling)
        self.target_critic = critic_factory(self.target, form, env.one_step, env.coupling)
        for c in (self.critic, self.target_critic):
            check_critic_keys(getattr(c, "in_keys", []))
        self.uses_trajectories = not isinstance(est, TD0Estimator)
        self.loss_module = TDLoss(self.critic, self.target_critic, form, one_step=env.one_step,
                                  coupling=env.coupling, estimator=est, reweighting=reweighting,
                                  base_weight_lambda=base_weight_lambda)
        if target_update == "soft":
            self.target_updater = SoftUpdate(self.loss_module, eps=self.tau)
        else:
            # HardUpdate copies when its counter reaches the interval, i.e. every interval + 1 steps
            self.target_updater = HardUpdate(self.loss_module, value_network_update_interval=self.hard_period - 1)

    # ---- Learner hooks ---------------------------------------------------------------------------------------------
    def collect(self) -> TensorDict:
        """td0: the paper's sampled pairs, env.sample_pairs(batch_size) [B]; nstep / td_lambda:
        env.sample_trajectories(n_steps, batch_size) [B, n_steps]. Noise and data come from the env's generators,
        which checkpoints carry, so a resumed run draws exactly what the uninterrupted one would."""
        B = self.config.batch_size
        batch = (self.env.sample_trajectories(self.n_steps, B) if self.uses_trajectories
                 else self.env.sample_pairs(B))
        return batch.to(self.device)

    def loss(self, batch: TensorDictBase) -> TensorDict:
        return self.loss_module(batch)

    @torch.no_grad()
    def after_update(self) -> None:
        """Move the target network after each optimizer step (spec 4: EMA tau, or a hard copy every period)."""
        self.target_updater.step()
        for b_t, b in zip(self.target.buffers(), self.denoiser.buffers()):  # updaters move parameters only
            b_t.copy_(b)
        self.target.eval()

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def method_config(self) -> dict:
        return {"estimator": self.estimator_name, "n_steps": self.n_steps,
                "lmbda": self.lmbda if self.estimator_name == "td_lambda" else None,
                "reweighting": self.reweighting, "lambda": self.base_weight_lambda,
                "target_update": self.target_update,
                "tau": self.tau if self.target_update == "soft" else None,
                "hard_period": self.hard_period if self.target_update == "hard" else None,
                "stride": float(self.env.stride), "one_step": float(self.env.one_step),
                "coupling": self.env.coupling}

    # ---- checkpoints: add the env's generators and the hard-update counter -----------------------------------------
    def _env_generators(self) -> dict[str, torch.Generator]:
        gens = {"generator": getattr(self.env, "generator", None),
                "data_generator": getattr(self.env, "data_generator", None)}
        return {k: g for k, g in gens.items() if isinstance(g, torch.Generator)}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rng"]["env"] = {k: g.get_state() for k, g in self._env_generators().items()}
        return sd

    def load_state_dict(self, ckpt: dict, strict_config: bool = True) -> None:
        super().load_state_dict(ckpt, strict_config)
        for k, g in self._env_generators().items():
            if k in ckpt["rng"].get("env", {}):
                g.set_state(ckpt["rng"]["env"][k])
        if isinstance(self.target_updater, HardUpdate):
            self.target_updater.counter = self.step % self.hard_period
        self.target.eval()

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, nfe=None, **kwargs):
        """Sample at each NFE budget and score against the data (`diffusion_rl.evaluation.evaluate_learner`)."""
        from diffusion_rl.evaluation import evaluate_learner

        return evaluate_learner(self, nfe=nfe, **kwargs)
