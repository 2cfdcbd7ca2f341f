"""The diffusion denoising chain as an RL Markov reward process.

- `DiffusionMRP`: a batched TorchRL environment (method.md §2), the one producer of training data:
  `sample_pairs` (the paper's training draw, method.md §5) and `sample_trajectories` (n-step chains) are a reset
  at the training levels plus env steps.
- `ValueNet` / `make_critic`: the critic V(s) = A D(x) + kappa x as a TensorDictModule (method.md §2-§4).
- `DiffusionMRPGym`: a single-sample Gymnasium adapter, registered as "diffusion_rl/DiffusionMRP-v0".
"""
from __future__ import annotations

from .critic import CRITIC_IN_KEYS, CRITIC_OUT_KEYS, ValueNet, make_critic
from .diffusion_mrp import (OBSERVATION_KEYS, STARTS, STATE_KEYS, DiffusionMRP, MRPSettings, check_stride_one_step,
                            single_action_policy)
from .gym_env import ENV_ID, DiffusionMRPGym, register_envs

__all__ = [
    "DiffusionMRP", "MRPSettings", "DiffusionMRPGym", "ENV_ID", "ValueNet", "make_critic", "single_action_policy",
    "check_stride_one_step", "STARTS", "OBSERVATION_KEYS", "STATE_KEYS", "CRITIC_IN_KEYS", "CRITIC_OUT_KEYS",
]

register_envs()  # importing twice (or reloading) does not re-register
