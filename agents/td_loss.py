"""The semi-gradient TD loss of method.md §5 (and TD-CT, §10) as a TorchRL `LossModule`: `TDLoss`.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictParams
from torch import Tensor, nn
from torchrl.objectives import LossModule
from torchrl.objectives.value import TD0Estimator, ValueEstimatorBase

from diffusion_rl.errors import ConfigError, check_choice, check_positive
from diffusion_rl.formulations import Formulation, expand_as_image

from .estimators import returns
from .functional import REWEIGHTINGS, chain_mask, combine_losses, mean_pixels, split_objective, td_weight

__all__ = ["TDLoss", "CT_TARGETS", "BASE_WEIGHTS"]

CT_TARGETS: tuple[str, ...] = ("train", "eval")  # method.md §10.3: the consistency target's mode under dropout
BASE_WEIGHTS: tuple[str, ...] = ("td", "uniform")  # method.md §5.5 (lambda / 1 + lambda) or plain CT's 1 (§10)


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


def _names(td: TensorDictBase) -> list:
    try:
        return list(td.names)
    except (RuntimeError, ValueError):
        return [None] * td.batch_dims


def _as_tuple(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)
