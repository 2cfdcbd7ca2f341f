"""TorchRL value estimators for the diffusion MRP, with gamma = 1 and image-valued rewards and values.

The MRP of method.md §4 has discount gamma = 1, a finite horizon, and rewards and values that are images. Three
estimators are offered by name (any `torchrl.objectives.value.ValueEstimatorBase` instance is accepted as well):

- "td0"       `TD0Estimator`:       G_t = r_t + V-(s_{t+1}).
- "nstep"     `TD1Estimator`:       over a length-n trajectory truncated at its end, G_t = sum_{j >= t} r_j + V-(s_n),
                                    the n-step return at t = 0 (an (n - t)-step return at step t).
- "td_lambda" `TDLambdaEstimator`:  the TD(lambda) return, lambda in [0, 1] (0 is td0, 1 is nstep).

Layout of image-valued signals (method.md §12.7). Rewards and values arrive as [*B, T, *F] (F the sample shape, e.g.
C, H, W). We flatten the pixels to one feature dimension, [*B, T, P] with P = prod(F), and expand done/terminated
to [*B, T, P] before calling the estimator. TorchRL's functionals are documented for [*B, T, F]; with one feature
dimension every estimator (and both TD(lambda) code paths) is on its documented ground. The result is reshaped back
to [*B, T, *F]. Because every functional is pixel-wise, this equals the image-shaped call with `time_dim` (pinned in
tests/test_estimators.py).

Truncation, not termination (method.md §2): the episode ends at the sigma_min end of the grid by truncation, so
`terminated` is always False and the estimators bootstrap from V(s_T) there; otherwise the telescoping of rewards
(n-step with stride k = 1-step with stride n k) breaks.

Bootstrap values come from the TARGET network and are passed in precomputed (`next_value`), already detached; the
estimators are built with `value_network=None` and `differentiable=False`, so the return G carries no gradient.
The TD error delta = G - V(s) then takes its gradient through V(s) only: semi-gradient TD (method.md §4).
"""
from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor
from torchrl.objectives.value import TD0Estimator, TD1Estimator, TDLambdaEstimator, ValueEstimatorBase

from diffusion_rl.errors import ConfigError, check_choice, check_range

__all__ = ["ESTIMATORS", "make_estimator", "estimator_name", "returns", "td_errors"]

ESTIMATORS: tuple[str, ...] = ("td0", "nstep", "td_lambda")
GAMMA = 1.0  # method.md §4: discount gamma = 1, finite horizon


def make_estimator(estimator: str | ValueEstimatorBase = "td0", *, lmbda: float = 0.95,
                   device: torch.device | str | None = None) -> ValueEstimatorBase:
    """A TorchRL value estimator with gamma = 1 from its name (see ESTIMATORS), or an instance returned as is.

    Args:
        estimator: "td0", "nstep" or "td_lambda", or a `ValueEstimatorBase` instance.
        lmbda: TD(lambda)'s lambda in [0, 1] (used by "td_lambda" only).
        device: where the estimator's buffers (gamma, lambda) live.
    """
    if isinstance(estimator, ValueEstimatorBase):
        return estimator
    if not isinstance(estimator, str):
        raise ConfigError(f"estimator must be a name or a torchrl ValueEstimatorBase, got {estimator!r}; "
                          f"accepted names: {', '.join(ESTIMATORS)}")
    check_choice("estimator", estimator, ESTIMATORS)
    common = dict(gamma=GAMMA, value_network=None, differentiable=False, device=device)
    if estimator == "td0":
        est = TD0Estimator(**common)
    elif estimator == "nstep":
        # TD(1) over a truncated length-n trajectory: sum of rewards plus the bootstrap at the truncation end.
        est = TD1Estimator(**common)
    else:
        check_range("td_lambda lmbda", lmbda, 0.0, 1.0)
        # vectorized=False: the exact recursion G_t = r_t + (1 - lambda) V(s_{t+1}) + lambda G_{t+1}. TorchRL
        # 0.14's vectorized path truncates lambda^k below 1e-7 and fails outright for lambda < 1e-7 (lambda = 0
        # included); trajectories here are a few steps long, so the loop costs nothing.
        est = TDLambdaEstimator(**common, lmbda=float(lmbda), vectorized=False)
    # gamma / lambda buffers in float64 (TorchRL makes float32 ones): exact coefficients for float64 data; `returns`
    # casts G back to the reward's dtype, so float32 training stays float32.
    est.gamma = torch.tensor(GAMMA, dtype=torch.float64, device=est.gamma.device)
    if estimator == "td_lambda":
        est.lmbda = torch.tensor(float(lmbda), dtype=torch.float64, device=est.lmbda.device)
    return est


def estimator_name(estimator: ValueEstimatorBase) -> str:
    """Short name of an estimator instance, for configs and logs."""
    return {TD0Estimator: "td0", TD1Estimator: "nstep", TDLambdaEstimator: "td_lambda"}.get(
        type(estimator), type(estimator).__name__)


def _as_trajectory(t: Tensor, batch_dims: int) -> Tensor:
    # [*B, T, *F] -> [*B, T, P]
    return t.reshape(*t.shape[: batch_dims + 1], -1)


@torch.no_grad()
def returns(estimator: ValueEstimatorBase, reward: Tensor, next_value: Tensor, done: Tensor | None = None,
            terminated: Tensor | None = None, *, time_dim: int | None = None) -> Tensor:
    """The estimator's return G (the value target) for image-valued rewards, without gradient.

    Args:
        estimator: a TorchRL value estimator (see `make_estimator`).
        reward: [*B, T, *F] rewards r_t of the transitions s_t -> s_{t+1}; a single transition per sample may be
            given as [B, *F] with `time_dim=None` and T = 1 is added.
        next_value: V-(s_{t+1}), same shape as reward (the target network's values).
        done: [*B, T] (or [*B, T, 1]) end-of-trajectory flags; None means only the last step ends a trajectory.
            The last step is always treated as the end of its (truncated) trajectory.
        terminated: [*B, T] flags; None (the MRP's case, method.md §2) means never terminated, so every end bootstraps.
        time_dim: index of the time dimension in reward (= len(B)); None for single transitions [B, *F].

    Returns:
        G with the shape of reward.
    """
    if reward.shape != next_value.shape:
        raise ValueError(f"reward {tuple(reward.shape)} and next_value {tuple(next_value.shape)} differ in shape")
    single = time_dim is None
    if single:
        reward, next_value, time_dim = reward.unsqueeze(1), next_value.unsqueeze(1), 1
        done = None if done is None else done.reshape(done.shape[0], 1)
        terminated = None if terminated is None else terminated.reshape(terminated.shape[0], 1)
    batch_shape = reward.shape[: time_dim + 1]  # [*B, T]
    r, v = _as_trajectory(reward, time_dim), _as_trajectory(next_value, time_dim)
    if done is None:
        done = torch.zeros(batch_shape, dtype=torch.bool, device=reward.device)
    done = done.reshape(batch_shape).clone()
    done[..., -1] = True  # the trajectory is truncated at its last step
    terminated = (torch.zeros(batch_shape, dtype=torch.bool, device=reward.device) if terminated is None
                  else terminated.reshape(batch_shape))
    # method.md §12.7: done / terminated expanded to the value's (flattened) shape [*B, T, P]
    data = TensorDict({"next": {"reward": r, "done": done.unsqueeze(-1).expand_as(r),
                                "terminated": terminated.unsqueeze(-1).expand_as(r)}},
                      batch_size=batch_shape)
    g = estimator.value_estimate(data, next_value=v)
    g = g.reshape(reward.shape).to(reward.dtype)
    return g.squeeze(1) if single else g


def td_errors(estimator: ValueEstimatorBase, value: Tensor, reward: Tensor, next_value: Tensor,
              done: Tensor | None = None, terminated: Tensor | None = None, *,
              time_dim: int | None = None) -> Tensor:
    """delta = G - V(s) with G from `returns` (no gradient) and V(s) from the online critic (gradient kept).

    With td0 and gamma = 1 this is the TD error delta = r + V-(s') - V(s) of method.md §4.
    """
    g = returns(estimator, reward, next_value.detach(), done, terminated, time_dim=time_dim)
    return g - value

