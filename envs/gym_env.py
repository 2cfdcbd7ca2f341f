"""A single-sample Gymnasium view of the diffusion MRP ("diffusion_rl/DiffusionMRP-v0").

Observations are numpy dicts {"x": Box(*F), "level": Box((1,)), "index": Box((1,)), "label": Discrete(C)}; the
clean sample x0 is not observable and travels in `info["x0"]`. There is one action (Discrete(1), ignored).

Reward: Gymnasium wants a scalar, so `step` returns the MEAN over sample elements of the image-valued reward
mu_true(s) - mu_true(s') (a mean of telescoping rewards still telescopes); the full image-valued reward is in
`info["reward_image"]`. Episodes are never terminated, only truncated at the sigma_min end (method.md §2).
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from diffusion_rl.errors import ConfigError, check_choice

from .diffusion_mrp import STARTS, STATE_KEYS, DiffusionMRP

__all__ = ["DiffusionMRPGym", "ENV_ID", "register_envs"]

ENV_ID = "diffusion_rl/DiffusionMRP-v0"


def register_envs() -> None:
    """Register ENV_ID with Gymnasium (idempotent). Called on `import envs`, by Gymnasium < 1.0 through the
    "gymnasium.envs" plugin entry point in pyproject.toml, and by `gymnasium.make("envs:" + ENV_ID)` on any version."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="envs.gym_env:DiffusionMRPGym")


class DiffusionMRPGym(gym.Env):
    """Gymnasium adapter around an unbatched `DiffusionMRP` (CPU, float32); arguments as for DiffusionMRP."""

    metadata = {"render_modes": []}

    def __init__(self, dataset="digits", formulation="edm", *, stride: float | None = None,
                 one_step: float | None = None, coupling: str | None = None, start: str = "max",
                 seed: int | None = None, render_mode: str | None = None) -> None:
        super().__init__()
        if render_mode is not None:
            raise ConfigError(f"render_mode {render_mode!r} is not supported; accepted: None")
        self.mrp = DiffusionMRP(dataset, formulation, batch_size=(), stride=stride, one_step=one_step,
                                coupling=coupling, start=start, device="cpu", seed=seed)
        shape = tuple(self.mrp.sample_shape)
        n_last = float(self.mrp.last_index)
        form = self.mrp.formulation
        max_level = float(form.level(torch.zeros((), dtype=torch.float64))) * (1 + 1e-3)  # the noisiest level
        self.observation_space = spaces.Dict({
            "x": spaces.Box(-np.inf, np.inf, shape=shape, dtype=np.float32),
            # training levels are unbounded above (log-normal sigma): only max/random starts stay on the grid
            "level": spaces.Box(0.0, np.inf if start == "train" else max_level, shape=(1,), dtype=np.float32),
            "index": spaces.Box(0.0, n_last, shape=(1,), dtype=np.float32),
            "label": spaces.Discrete(max(self.mrp.num_classes, 1)),
        })
        self.action_space = spaces.Discrete(1)
        self._state = None
        self._truncated = False

    def _obs(self, td) -> dict:
        return {
            "x": td["x"].detach().cpu().numpy().astype(np.float32),
            "level": td["level"].detach().cpu().reshape(1).numpy().astype(np.float32),
            "index": td["index"].detach().cpu().reshape(1).numpy().astype(np.float32),
            "label": np.int64(td["label"].item()),
        }

    def reset_starts(self) -> tuple[str, ...]:
        """The starts `reset(options={"start": ...})` accepts: those whose levels fit the observation space (the
        training levels only on an env made with start="train")."""
        return STARTS if self.mrp.start == "train" else tuple(s for s in STARTS if s != "train")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode; `options` may hold {"start": one of `reset_starts()`} (default: the env's start)."""
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise ConfigError(f"reset options must be a dict or None, got {type(options).__name__}")
        for key in options:
            check_choice("reset option", key, ("start",))
        start = check_choice("reset option start", options.get("start", self.mrp.start), self.reset_starts())
        super().reset(seed=seed)
        if seed is not None:
            self.mrp.set_seed(seed)
        td = self.mrp.reset(start=start)
        self._state = td.select(*STATE_KEYS, "x", "level", "index", "label")
        self._truncated = False
        return self._obs(td), {"x0": td["x0"].cpu().numpy()}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._truncated:
            raise RuntimeError("the episode is truncated at the sigma_min end; call reset() to start a new one")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        td = self._state.clone()
        td.set("action", torch.zeros((), dtype=torch.int64))
        nxt = self.mrp.step(td)["next"]
        x0 = self._state["x0"]  # hidden state: constant along the episode
        self._state = nxt.select("x", "level", "index", "label").set(STATE_KEYS[0], x0)
        reward_image = nxt["reward"]
        reward = float(reward_image.mean())
        truncated = self._truncated = bool(nxt["truncated"].item())
        info = {"x0": x0.cpu().numpy().copy(), "reward_image": reward_image.cpu().numpy()}
        return self._obs(nxt), reward, False, truncated, info
