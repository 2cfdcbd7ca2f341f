"""TD learning for diffusion models: the denoiser as the critic of the diffusion MRP (method.md §2-§10).

`TDEvaluator` trains the denoiser D_theta as the value function V_theta(s) = A D_theta(x) + kappa x of the
denoising Markov reward process (`envs.DiffusionMRP`), with the semi-gradient TD loss of method.md §5 plus the
formulation's own base loss. `TDLoss` is that loss as a TorchRL `LossModule`; it owns the online and target
critics so that TorchRL's `SoftUpdate` / `HardUpdate` move the target network.

    TD-EDM (method.md §5), per sample:
        D = D_theta(x_t) once;  base = w(level_t) * mean_pixels (D - x0)^2           (formulation.base_loss)
        delta = G - V_theta(s_t),  G = r + V-(s_t') for td0                          (TorchRL estimator, gamma 1)
              = A_t (x0 - D) - A_t' (x0 - D-(x_t'))                                  (kappa x terms cancel)
        td = w_td * mean_pixels delta^2
        valid: td + lambda * base;   invalid: (1 + lambda) * base;   objective = batch mean
        = "loss_td" + "loss_base" (agents.functional.split_objective).
    Multi-step estimators (method.md §7): the same at the start state of each chain, with G the n-step or TD(lambda)
    return over the chain (target forwards at the later states).
    TD-CT (method.md §10): the same with f in place of D and the consistency loss
        loss_ct = w(t) * mean_pixels (f_theta(x_t, t) - f-(x_t2, t2))^2 in place of the base loss.

The same code runs for VP (method.md §9, derived posterior, A + kappa != 1): A and kappa always come from the
formulation; nothing here assumes A = 1 - kappa.

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
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictParams
from torch import Tensor, nn
from torchrl.objectives import HardUpdate, LossModule, SoftUpdate
from torchrl.objectives.value import TD0Estimator, ValueEstimatorBase

from diffusion_rl.errors import ConfigError, check_choice, check_non_negative, check_positive, check_range
from diffusion_rl.formulations import Formulation, expand_as_image
from diffusion_rl.networks import Denoiser
from diffusion_rl.schedules import adaptive_target_tau
from diffusion_rl.training import Learner, TrainConfig, halflife_decay, resolve_device

from .estimators import estimator_name, make_estimator, returns
from .functional import REWEIGHTINGS, chain_mask, combine_losses, mean_pixels, split_objective, td_weight

__all__ = ["TDLoss", "TDEvaluator", "TDSettings", "REWEIGHTINGS", "TARGET_UPDATES", "CT_TARGETS"]

TARGET_UPDATES: tuple[str, ...] = ("soft", "hard")
CT_TARGETS: tuple[str, ...] = ("train", "eval")  # method.md §10.3: the consistency target's mode under dropout
BASE_WEIGHTS: tuple[str, ...] = ("td", "uniform")  # method.md §5.5 (lambda / 1 + lambda) or plain CT's 1 (§10)
# the largest base-loss weight accepted: far above any useful one (0.5 is the paper's), far below float32 overflow
BASE_LAMBDA_MAX = 1e6


def has_dropout(module: nn.Module) -> bool:
    """True when a forward of `module` in train mode draws dropout masks (a Dropout with p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


class RngState:
    """The global random state (CPU, and the device's generator on an accelerator), captured to replay dropout
    masks: the release's consistency target draws the online call's masks again (method.md §10.3)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            torch.cuda.set_rng_state(self.accel, self.device)


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


class TDLoss(LossModule):
    """The semi-gradient TD loss of method.md §5 (and TD-CT, §10) as a TorchRL LossModule.

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
        one_step, coupling: the value's one-step posterior (method.md §3), as in the env.
        estimator: a TorchRL value estimator with gamma = 1 (see `agents.estimators`).
        reweighting: TD weighting, one of REWEIGHTINGS.
        base_lambda: lambda >= 0, the weight of the base (or consistency) loss.
        n_steps: the horizon of a multi-step estimator (1 for td0): chains are cut after n_steps transitions.
        full_reach: TD only on samples whose whole n_steps chain is TD-valid, so every TD sample's return reaches
            n_steps strides; the others train on (1 + lambda) base (method.md §7, the equal-reach pairing).
        td_term: False drops the TD term and its target forwards, keeping the TD-valid mask and the per-sample
            base weights (lambda or 1 + lambda): the matched control "tdoff" (method.md §5.5).
        base_weights: "td" (lambda on TD-valid samples, 1 + lambda on the others, method.md §5.5) or "uniform" (1 on
            every sample: plain consistency training, §10, with td_term False).
        ct_target: TD-CT's target network under dropout (method.md §10.3): "train" (the release: the consistency
            target replays the online call's dropout masks, the TD partner's forward draws fresh ones) or "eval"
            (one forward in eval mode for both). Without active dropout the two are the same single forward.

    Input: a batch [B] of transitions (`env.sample_pairs`), [B, T] of chains (`env.rollout`,
    `env.sample_trajectories`, a TorchRL collector's batch) or [T] (the rollout of an unbatched env, whose last
    dim is named "time"). It reads the critic's in_keys and, under names that
    `set_keys` may change, "level", "x0", "valid" at the root and "reward", "done" (plus the critic's keys) under
    "next". A batch missing any of them gets a ConfigError naming the missing keys.

    Multi-step chains (method.md §7): the loss is taken at each chain's START state only: one online forward and
    backward per sample, and no-grad target forwards at the later states the estimator bootstraps from. Every
    estimator so trains on TD(0)'s distribution of levels and TD-valid samples; the chain stops after its last
    TD-valid transition or at a "done" (a new episode follows in a rollout's later rows).

    Output (TorchRL's convention): scalar "loss_td" and "loss_base" whose SUM is the objective
    (mean over the batch of td + lambda base for TD-valid samples, (1 + lambda) base for the others, method.md §5.5);
    diagnostics under other names: "valid_fraction", "base_mean" (mean unweighted base loss), and per sample [B]
    "valid", "sample_td", "sample_base", "sample_loss" and the image-shaped TD error "td_error" (0 where invalid).
    """

    @dataclass
    class _AcceptedKeys:
        """Keys the loss reads besides the critics' own in_keys (rename them with `set_keys`).

        Attributes:
            level: noise level of the state [B] (the TD weights use it).
            x0: the clean sample, reward-only information (the critics never read it).
            valid: the TD-valid mask of the transition that starts at the state.
            reward: the image-valued reward, under "next".
            done: end of an episode, under "next" (truncation at the sigma_min end).
        """

        level: NestedKey = "level"
        x0: NestedKey = "x0"
        valid: NestedKey = "valid"
        reward: NestedKey = "reward"
        done: NestedKey = "done"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    value_network: TensorDictModule
    value_network_params: TensorDictParams
    target_value_network: TensorDictModule
    target_value_network_params: TensorDictParams

    def __init__(self, critic: TensorDictModule, target_critic: TensorDictModule, formulation: Formulation, *,
                 one_step: float, coupling: str, estimator: ValueEstimatorBase, reweighting: str = "edm",
                 base_lambda: float = 0.5, n_steps: int = 1, full_reach: bool = False,
                 td_term: bool = True, ct_target: str = "train", base_weights: str = "td") -> None:
        super().__init__()
        check_choice("reweighting", reweighting, REWEIGHTINGS)
        check_choice("ct_target", ct_target, CT_TARGETS)
        check_choice("base_weights", base_weights, BASE_WEIGHTS)
        if base_weights == "uniform" and td_term:
            raise ConfigError("base_weights='uniform' weighs every sample's base loss 1, which only plain consistency "
                              "training uses: it needs td_term=False")
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
        self.base_lambda = float(base_lambda)
        self.full_reach, self.td_term, self.base_weights = bool(full_reach), bool(td_term), base_weights
        # the estimator's horizon: td0 looks one transition ahead, nstep / td_lambda n_steps
        self.n_steps = 1 if isinstance(estimator, TD0Estimator) else int(check_positive("n_steps", n_steps))
        self.critic_keys = list(critic.in_keys)
        # method.md §10.3: the release's train-mode target matters only where dropout draws masks
        self.replay_dropout = ct_target == "train" and formulation.consistency and has_dropout(target_critic)
        # static shapes: the target runs on every row of the batch and the unused ones are masked, so the step has
        # no host sync and one shape (GPUs, torch.compile); False indexes the used rows (less work on a CPU)
        self.static_shapes = False

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """The estimator receives tensors (rewards, bootstrap values), not keys: nothing to forward."""

    # ---- pieces -------------------------------------------------------------------------------------------------
    def _target(self, states: TensorDictBase, train: bool = False) -> tuple[Tensor, Tensor]:
        """(denoised, value) of the target critic: no grad, eval mode (method.md §5.4, §12.5); `train` runs it in
        train mode (dropout active, TD-CT's release semantics, §10.3) and puts it back in eval mode."""
        net = self.target_value_network
        if train or net.training:  # kept in eval mode (restored if a caller switched it), train mode on request
            net.train(train)
        with torch.no_grad():
            out = net(states.select(*self.critic_keys, strict=False))
        if train:
            net.eval()
        return out["denoised"].detach(), out["state_value"].detach()

    def _online_and_base_target(self, start: TensorDictBase, partner: TensorDictBase,
                                x0: Tensor) -> tuple[TensorDictBase, Tensor, Tensor | None]:
        """(online critic output, the base loss's target, the partner's target value or None): x0 and no value for
        the diffusion formulations (method.md §5.3); for TD-CT the consistency target f-(x_t2, t2) and, with the
        TD term, V-(s') from the same forward, or from a fresh-mask forward under dropout replay (§10, §10.3)."""
        if not self.formulation.consistency:
            return self.value_network(start.select(*self.critic_keys, strict=False)), x0, None
        online, f_target, v_target = self.online_and_consistency_target(start, partner)
        if self.td_term and self.replay_dropout:  # §10.3: the TD partner's forward draws fresh dropout masks
            v_target = self._target(partner, train=True)[1]
        return online, f_target, v_target

    def online_and_consistency_target(self, start: TensorDictBase,
                                      partner: TensorDictBase) -> tuple[TensorDictBase, Tensor, Tensor]:
        """TD-CT's pair (method.md §10, §10.3): the online critic at `start` (with grad), then the target's f-(x_t2,
        t2) and V-(s') at `partner`. With `replay_dropout`, the target runs in train mode on the online call's
        dropout masks (the global random state is captured before the online call and restored before the target
        call); otherwise one eval-mode forward."""
        rng = RngState(self.tensor_device(start)) if self.replay_dropout else None
        online = self.value_network(start.select(*self.critic_keys, strict=False))
        if rng is not None:
            rng.restore()
        denoised, value = self._target(partner, train=rng is not None)
        return online, denoised, value

    @staticmethod
    def tensor_device(td: TensorDictBase) -> torch.device:
        return next(iter(td.values(include_nested=True, leaves_only=True))).device

    def _check_keys(self, batch: TensorDictBase) -> None:
        tk = self.tensor_keys
        need = [*self.critic_keys, tk.level, tk.x0, tk.valid,
                *[("next", *_as_tuple(k)) for k in (*self.critic_keys, tk.reward, tk.done)]]
        have = set(batch.keys(include_nested=True))
        missing = [k for k in need if (k if isinstance(k, str) or len(k) > 1 else k[0]) not in have]
        if missing:
            raise ConfigError(f"the TD loss needs the batch keys {missing}, which are missing; batches come from "
                              f"env.sample_pairs, env.sample_trajectories, env.rollout or a TorchRL collector")

    def forward(self, batch: TensorDictBase) -> TensorDict:
        shape = batch.batch_size
        if len(shape) not in (1, 2):
            raise ConfigError(f"TDLoss takes a batch [B] of transitions or [B, T] of chains, got {tuple(shape)}")
        self._check_keys(batch)
        tk = self.tensor_keys
        # only what the loss reads, viewed as chains [B, T]
        batch = batch.select(*self.critic_keys, tk.level, tk.x0, tk.valid,
                             *(("next", *_as_tuple(k)) for k in (*self.critic_keys, tk.reward, tk.done)))
        if len(shape) == 2:
            chains = batch
        elif _names(batch)[-1] == "time":  # one chain: the rollout of an unbatched env
            chains = batch.unsqueeze(0)
        else:  # transitions, one per sample
            chains = batch.unsqueeze(1)
        B, T = chains.batch_size
        start, nxt = chains[:, 0], chains.get("next")
        x0, level = start.get(tk.x0), start.get(tk.level).reshape(B)
        used = chain_mask(chains.get(tk.valid).reshape(B, T).bool(), nxt.get(tk.done).reshape(B, T).bool())
        used[:, self.n_steps:] = False  # the estimator's horizon: a longer rollout is cut, never looked through
        if self.full_reach:  # method.md §7: TD only where the whole n-step chain is TD-valid (equal reach)
            if T < self.n_steps:
                raise ConfigError(f"full_reach needs chains of n_steps={self.n_steps} transitions, got {T}")
            used &= used[:, self.n_steps - 1:self.n_steps].clone()
        valid = used[:, 0]  # 1-D even for batch size 1 (method.md §12.6)

        # method.md §5.3: D_theta(x_t) computed once, reused by the base and the TD terms; V_theta(s) = A D + kappa x.
        # The base loss's target is the formulation's: x0 (§5.3), or TD-CT's f-(x_t2, t2) (§10)
        online, base_target, partner_value = self._online_and_base_target(start, nxt[:, 0], x0)
        denoised, value = online["denoised"], online["state_value"]
        loss_base = self.formulation.base_loss(denoised, base_target, level)

        # bootstrap values V-(s_{j+1}) of the target network where the chain uses them (method.md §5.4: no grad, eval)
        next_value = value.new_zeros((B, T, *value.shape[1:]))
        rows = used.clone()
        if partner_value is not None:  # TD-CT: the first partner's value came with the consistency target
            next_value[:, 0] = torch.where(expand_as_image(valid, value).bool(), partner_value, 0.0)
            rows[:, 0] = False
        if not self.td_term:  # the tdoff control: the same mask and base weights, no TD term, no target forwards
            delta, sample_td = torch.zeros_like(value).detach(), torch.zeros_like(loss_base).detach()
        else:
            if self.static_shapes:  # every row through the target, unused ones masked: no host sync, one shape
                if not (self.formulation.consistency and T == 1):  # TD-CT's td0 rows are all taken above
                    every = self._target(nxt.reshape(B * T))[1].reshape(next_value.shape).to(next_value)
                    mask = rows.reshape(B, T, *[1] * (next_value.dim() - 2))
                    next_value = torch.where(mask, every, next_value)
            elif rows.any():  # only the rows the returns use (cheaper where a host sync is cheap: the CPU)
                next_value[rows] = self._target(nxt[rows])[1].to(next_value)
            delta, sample_td = self._td_term(value, loss_base, level, valid, used, nxt, next_value)
        # method.md §5.5: two scalar terms whose sum is the batch mean of the per-sample loss; "uniform" base weights
        # (plain CT, §10) weigh every sample's base loss 1: no TD-valid sample and lambda 0 in the same sum
        weigh_valid, lam = (valid, self.base_lambda) if self.base_weights == "td" else (torch.zeros_like(valid), 0.0)
        loss_td, loss_base_term = split_objective(sample_td, loss_base, weigh_valid, lam)
        return TensorDict({
            "loss_td": loss_td,
            "loss_base": loss_base_term,
            "valid_fraction": valid.float().mean(),
            "base_mean": loss_base.mean().detach(),
            "valid": valid,
            "sample_td": sample_td.detach(),
            "sample_base": loss_base.detach(),
            "sample_loss": combine_losses(sample_td, loss_base, weigh_valid, lam).detach(),
            "td_error": delta.detach(),
        }, batch_size=[])

    def _td_term(self, value: Tensor, loss_base: Tensor, level: Tensor, valid: Tensor, used: Tensor,
                 nxt: TensorDictBase, next_value: Tensor) -> tuple[Tensor, Tensor]:
        """(TD error delta, per-sample weighted TD loss) at the chains' start states, 0 where not TD-valid."""
        tk = self.tensor_keys
        B, T = used.shape
        # method.md §4, §7: delta = G - V_theta(s) with G the estimator's return at the start state (gamma 1, never
        # terminated, bootstrap from the target). td0: G = r + V-(s'), so delta = A_t (x0 - D) - A_t' (x0 - D-(x_t')).
        stop = ~torch.cat([used[:, 1:], used.new_zeros(B, 1)], dim=1)  # the chain ends after row j
        g = returns(self.value_estimator, nxt.get(tk.reward), next_value, stop, None, time_dim=1)[:, 0]
        delta = torch.where(expand_as_image(valid, value).bool(), g - value, torch.zeros_like(value))

        # method.md §6: td = w_td mean_pixels delta^2; the pairwise/linear weights take A_t' at the state the return
        # bootstraps from (the partner for TD(0), the chain's last used state for multi-step estimators)
        last = (used.sum(1) - 1).clamp(min=0)
        level_end = nxt.get(tk.level).reshape(B, T).gather(1, last[:, None]).squeeze(1)
        A_t, _ = self.formulation.one_step_posterior(level, self.one_step, self.coupling)
        A_n, _ = self.formulation.one_step_posterior(level_end, self.one_step, self.coupling)
        w_td = td_weight(self.reweighting, A_t, A_n, self.formulation.preconditioning(level)[1]).to(value)
        return delta, torch.where(valid, w_td * mean_pixels(delta.pow(2)), torch.zeros_like(loss_base))


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


def _names(td: TensorDictBase) -> list:
    try:
        return list(td.names)
    except (RuntimeError, ValueError):
        return [None] * td.batch_dims


def _as_tuple(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


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
