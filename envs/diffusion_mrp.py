"""The denoising chain as a TorchRL Markov reward process (method.md §2).

State s = (x, level, index, label) plus the clean sample x0, which the environment keeps as hidden state to compute
rewards: x0 lives in `state_spec`, not in `observation_spec`, so no policy or critic built from the observation specs
can read it. MRP time runs in the denoising direction: one step moves `stride` index units toward the data, drawing
x' from the true x0-conditioned reverse kernel q(x' | x, x0) of the formulation. The reward is image-valued,
r = mu_true(s) - mu_true(s'), with mu_true(x, level) = A x0 + kappa x the one-step posterior mean `one_step` index
units ahead (method.md §3), so rewards telescope along any trajectory.

This env is the one producer of training data. Every batch is a reset plus env steps:

    start="train"  reset at the formulation's training levels (EDM: log-normal sigma; VP, CT: their own);
    sample_pairs   = reset(start="train") + one step        -> [B]     (the paper's draw, TD(0));
    sample_trajectories(n) = reset(start="train") + n steps -> [B, n]  (the env's own rollout, multi-step critics);
    the baseline   = reset(start="train") alone             -> [B]     (same x0 and levels as the TD agent).

Keys (batch dims [*B], sample dims [*F]):

    root:   observations "x" [*B,*F] float, "level" [*B] float (sigma for EDM/CT, timestep t for VP), "index" [*B]
            float (continuous grid index, 0 = noisiest), "label" [*B] int64 (0 without labels), "valid" [*B] bool
            (a full stride from this state is TD-valid, method.md §5.2); hidden state "x0" [*B,*F]; "action" [*B] int64
            (a single-action MRP: always 0); "done"/"terminated"/"truncated" [*B,1]
    "next": the observations at the next level, "reward" [*B,*F], "done"/"terminated"/"truncated" [*B,1].

Episodes are never terminated. A step moves min(stride, N-1 - index) index units, so rollouts from sigma_max reach
the sigma_min end (index N-1), where the episode is truncated; estimators still bootstrap from V(s_T) (method.md §7).

Random streams: the env owns one pair of generators. The CPU "data generator" draws the data order (x0, labels) and
the start levels; the "noise generator" on the env's device draws every Gaussian (the start noise and the
transition noise). A baseline and a TD agent built on envs with one seed therefore draw identical x0 and levels at
every step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.utils import step_mdp

from diffusion_rl.data import Dataset, load_dataset
from diffusion_rl.errors import ConfigError, check_choice, check_positive
from diffusion_rl.formulations import Formulation, make_formulation
from diffusion_rl.training import resolve_device

__all__ = ["DiffusionMRP", "MRPSettings", "check_stride_one_step", "single_action_policy", "STARTS", "OBSERVATION_KEYS",
           "STATE_KEYS"]

STARTS: tuple[str, ...] = ("max", "random", "train")
OBSERVATION_KEYS: tuple[str, ...] = ("x", "level", "index", "label", "valid")
STATE_KEYS: tuple[str, ...] = ("x0",)  # hidden environment state: rewards only, never observed
DONE_KEYS: tuple[str, ...] = ("done", "terminated", "truncated")


def check_stride_one_step(stride, one_step, steps: int) -> tuple[float, float]:
    """Validate stride > 0, one_step > 0 and stride + one_step <= N-1; return them as floats."""
    check_positive("stride", stride, integer=False)
    check_positive("one_step", one_step, integer=False)
    if stride + one_step > steps - 1:
        raise ConfigError(f"stride + one_step = {stride} + {one_step} = {stride + one_step} exceeds N-1 = {steps - 1} "
                          f"index units of the {steps}-point grid; need stride + one_step <= {steps - 1}")
    return float(stride), float(one_step)


@dataclass(frozen=True)
class MRPSettings:
    """What defines the MRP apart from its data (method.md §2, §3, §8): the formulation, the stride k, the one-step
    shift delta and the coupling, resolved to the formulation's defaults and checked. `resolve` is the one place
    these checks live: the env calls it, and `diffusion_rl.build` calls it before any data loads."""

    formulation: Formulation
    stride: float
    one_step: float
    coupling: str

    @classmethod
    def resolve(cls, formulation: str | Formulation = "edm", stride: float | None = None,
                one_step: float | None = None, coupling: str | None = None) -> "MRPSettings":
        """None picks the formulation's default; bad values raise ConfigError naming the accepted range."""
        form = make_formulation(formulation)
        if coupling is not None:
            form.check_coupling(coupling)  # markov | shared | mixed:M with M on the grid
        stride, one_step = check_stride_one_step(form.default_stride if stride is None else stride,
                                                 form.default_one_step if one_step is None else one_step,
                                                 getattr(form, "max_steps", form.steps))  # a schedule's final grid
        return cls(form, stride, one_step, coupling or form.default_coupling)


def single_action_policy(td: TensorDictBase) -> TensorDictBase:
    """The MRP's only policy: action 0 everywhere (for `env.rollout` and TorchRL collectors)."""
    return td.set("action", torch.zeros(td.batch_size, dtype=torch.int64, device=td.device))


def _as_batch_size(batch_size) -> torch.Size:
    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
        batch_size = (batch_size,)
    try:
        dims = tuple(batch_size)
    except TypeError:
        raise ConfigError(f"batch_size must be an int or a tuple of non-negative ints, got {batch_size!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"batch_size must be an int or a tuple of non-negative ints, got {batch_size!r}")
    return torch.Size(dims)


def stream_seeds(seed: int) -> tuple[int, int]:
    """The seeds of an env's noise and data generators, drawn from `seed` by numpy's SeedSequence: unrelated to
    each other and to those of any other seed (seeding them with seed and seed + 1 made one seed's data stream the
    next seed's noise stream)."""
    noise, data = np.random.SeedSequence(int(seed) % (2 ** 63)).generate_state(2, dtype=np.uint64)
    return int(noise) % (2 ** 63), int(data) % (2 ** 63)


class DiffusionMRP(EnvBase):
    """The diffusion denoising chain as a batched TorchRL environment (method.md §2).

    Args:
        dataset: a data set name for `diffusion_rl.data.load_dataset` ("digits", "8gaussians", ...) or a Dataset.
        formulation: "edm", "vp"/"ddpm", "ct", "ict" or a Formulation instance.
        batch_size: env batch dims [*B] (an int means (B,)). Not batch-locked: with batch_size=() the batch of a
            rollout comes from the tensordict passed to `reset`.
        stride: k, index units per MRP step (None: the formulation's `default_stride`, 3 on EDM's 18-point grid).
        one_step: delta, index units of the one-step posterior mean that defines values and rewards (None: the
            formulation's `default_one_step`, 0.2 for EDM).
        coupling: "markov" (the true reverse kernel), "shared" (shared noise: x' deterministic given x, x0) or
            "mixed:M" (shared from states with grid index < M, Markov from the others; method.md §8); None picks
            the formulation's `default_coupling` (markov; shared for CT, method.md §10).
        start: where `reset` starts episodes: "max" at index 0 (the noisiest level); "random" at a uniform index
            in [0, N-1-(stride+one_step)], so at least one TD-valid step is possible; "train" at the formulation's
            training levels (method.md §5.1), the start of every training batch. `reset(start=...)` overrides it.
        device: where states live; the noise generator lives there too (auto, cpu, cuda, cuda:N or mps, checked
            by `diffusion_rl.training.resolve_device`).
        seed: seed of the env's generators (None: drawn from torch's global RNG).
        dtype: float dtype of states and rewards (float32; float64 makes reward sums telescope to rounding error).
        hflip: augment images by horizontal flips: each drawn x0 is mirrored with probability 1/2 (data generator).
    """

    batch_locked = False  # TorchRL idiom (pendulum tutorial): the batch may come from the reset tensordict

    def __init__(self, dataset: str | Dataset = "digits", formulation: str | Formulation = "edm", *,
                 batch_size: int | Sequence[int] = (), stride: float | None = None,
                 one_step: float | None = None, coupling: str | None = None, start: str = "max",
                 device: str | torch.device = "cpu", seed: int | None = None,
                 dtype: torch.dtype = torch.float32, hflip: bool = False) -> None:
        # --- validate everything cheap before loading data ---
        settings = MRPSettings.resolve(formulation, stride, one_step, coupling)
        check_choice("start", start, STARTS)
        batch_size = _as_batch_size(batch_size)
        if not isinstance(dataset, str) and not callable(getattr(dataset, "draw", None)):
            raise ConfigError(f"dataset must be a data set name or a Dataset, got {type(dataset).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an int or None, got {seed!r}")
        check_choice("dtype", dtype, (torch.float32, torch.float64))
        device = resolve_device(device)  # "gpu", or "cuda" without a GPU: a ConfigError naming the accepted devices

        super().__init__(device=device, batch_size=batch_size)
        self.formulation = settings.formulation
        self.stride, self.one_step = settings.stride, settings.one_step
        self.coupling, self.start = settings.coupling, start
        self.dataset = load_dataset(dataset, seed=0 if seed is None else seed) if isinstance(dataset, str) else dataset
        self.sample_shape = tuple(self.dataset.sample_shape)
        self.num_classes = int(getattr(self.dataset, "num_classes", 0) or 0)
        self.dtype = dtype
        if hflip and len(self.sample_shape) != 3:
            raise ConfigError(f"hflip mirrors images; samples of shape {self.sample_shape} are not images")
        self.hflip = bool(hflip)
        self._source = self._data_source()
        self._make_spec()
        self.set_seed(seed)  # None: drawn from torch's global RNG

    def _data_source(self):
        """Where batches are gathered: on a CUDA device, a copy of the data set there (shared by every env on it) when
        it takes at most a quarter of the device's free memory (no host-to-device copy of images per step, which a
        DataLoader with workers and pinned memory would otherwise hide); else the data set itself. The draws are the
        same either way."""
        if self.device.type != "cuda" or not hasattr(self.dataset, "on"):
            return self.dataset
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.dataset.on(self.device) if self.dataset.nbytes() <= free // 4 else self.dataset

    # ---- specs -------------------------------------------------------------------------------------------------
    def _make_spec(self) -> None:
        B, F, dev, dt = self.batch_size, self.sample_shape, self.device, self.dtype
        self.observation_spec = Composite(
            x=Unbounded(shape=(*B, *F), dtype=dt, device=dev),
            level=Unbounded(shape=B, dtype=dt, device=dev),
            # a curriculum (improved CT) grows the grid up to max_steps points
            index=Bounded(low=0.0, high=float(getattr(self.formulation, "max_steps", self.formulation.steps) - 1),
                          shape=B, dtype=dt, device=dev),
            label=Categorical(n=max(self.num_classes, 1), shape=B, dtype=torch.int64, device=dev),
            valid=Categorical(n=2, shape=B, dtype=torch.bool, device=dev),
            shape=B, device=dev,
        )
        # x0 is hidden state (as the pendulum example keeps its physical parameters): reset writes it, step reads
        # it, and TorchRL carries it from one root to the next; it is never an observation.
        self.state_spec = Composite(x0=Unbounded(shape=(*B, *F), dtype=dt, device=dev), shape=B, device=dev)
        self.action_spec = Categorical(n=1, shape=B, dtype=torch.int64, device=dev)
        self.reward_spec = Unbounded(shape=(*B, *F), dtype=dt, device=dev)
        self.done_spec = Composite(
            {k: Categorical(n=2, shape=(*B, 1), dtype=torch.bool, device=dev) for k in DONE_KEYS},
            shape=B, device=dev,
        )

    # ---- seeding -----------------------------------------------------------------------------------------------
    def _set_seed(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        noise_seed, data_seed = stream_seeds(seed)
        self._generator = torch.Generator(device=self.device).manual_seed(noise_seed)
        # data order and start levels index CPU tensors: their own CPU generator
        self._data_generator = torch.Generator().manual_seed(data_seed)

    @property
    def generator(self) -> torch.Generator:
        """The noise generator (on the env's device): every Gaussian draw. `set_seed` replaces it."""
        return self._generator

    @property
    def data_generator(self) -> torch.Generator:
        """The CPU generator of the data order (`Dataset.draw`) and of start levels. `set_seed` replaces it."""
        return self._data_generator

    def generators(self) -> dict[str, torch.Generator]:
        """The env's pair of generators by name, for checkpoints."""
        return {"generator": self._generator, "data_generator": self._data_generator}

    # ---- the maths of one transition (the only copy) --------------------------------------------------------------
    def true_value(self, x0: Tensor, x: Tensor, level: Tensor) -> Tensor:
        """mu_true(x, level) = A x0 + kappa x, the one-step posterior mean `one_step` index units ahead (method.md §3).

        Flat inputs: x0, x [n, *F], level [n].
        """
        return self.formulation.one_step_mean(x0, x, level, self.one_step, self.coupling)

    @property
    def last_index(self) -> float:
        """N-1, the grid's cleanest index (read each time: a curriculum may grow the grid during training)."""
        return float(self.formulation.steps - 1)

    @property
    def max_valid_index(self) -> float:
        """The last index a TD-valid transition may start from, the formulation's rule: (N-1) - (stride + one_step)
        (method.md §5.2); TD-CT's default boundary rule, (N-2) - stride (method.md §10.2)."""
        return self.formulation.last_td_start(self.stride, self.one_step)

    def td_valid(self, level: Tensor, index: Tensor) -> Tensor:
        """TD-valid mask of method.md §5.2: in_range(level) & index <= `max_valid_index`."""
        return self.formulation.in_range(level) & (index <= self.max_valid_index)

    def _transition(self, x: Tensor, level: Tensor, index: Tensor, x0: Tensor) -> dict[str, Tensor]:
        """One MRP step on flat tensors: x' ~ q(x' | x, x0) at min(index + stride, N-1), and the reward.

        The next level is never noisier than `level`: a training level below the grid's end (sigma_t < sigma_min,
        an invalid sample) keeps its own level instead of being paired with the noisier grid end.
        """
        index_next = torch.clamp(index + self.stride, max=self.last_index)
        level_next = torch.minimum(self.formulation.level(index_next).to(self.dtype), level)
        x_next = self.formulation.reverse_step(x0, x, level, level_next, self.coupling, self._generator)
        x_next = x_next.to(self.dtype)
        reward = self.true_value(x0, x, level) - self.true_value(x0, x_next, level_next)
        return {"x": x_next, "level": level_next, "index": index_next, "reward": reward,
                "valid": self.td_valid(level_next, index_next), "truncated": index_next >= self.last_index}

    def _start(self, n: int, start: str) -> dict[str, Tensor]:
        """n fresh start states: x0 and labels (data generator), the start level, x ~ q(x | x0) (noise generator)."""
        x0, label = self._source.draw(n, self._data_generator)
        if self.hflip:  # augmentation: mirror half the images, decided by the data generator
            flip = (torch.rand(n, generator=self._data_generator) < 0.5).to(x0.device)
            x0 = torch.where(flip.reshape(n, 1, 1, 1), x0.flip(-1), x0)
        x0 = x0.to(device=self.device, dtype=self.dtype)
        label = (torch.zeros(n, dtype=torch.int64) if label is None else label.to(torch.int64).reshape(n))
        form, g = self.formulation, self._data_generator
        if start == "train":
            level = form.sample_training_level(n, g, "cpu").to(self.device, self.dtype)  # method.md §5.1, raw level
            index = form.index(level).to(self.dtype)  # clamped to the grid
        else:
            index = (torch.zeros(n, dtype=self.dtype) if start == "max"
                     else torch.rand(n, generator=g, dtype=self.dtype) * max(self.max_valid_index, 0.0)).to(self.device)
            level = form.level(index).to(self.dtype)
        noise = torch.randn(x0.shape, generator=self._generator, device=self.device, dtype=self.dtype)
        x = form.add_noise(x0, level, noise).to(self.dtype)
        return {"x": x, "level": level, "index": index, "label": label.to(self.device), "x0": x0,
                "valid": self.td_valid(level, index)}

    # ---- EnvBase API -------------------------------------------------------------------------------------------
    def step(self, tensordict: TensorDictBase) -> TensorDictBase:
        """EnvBase.step, after checking the tensordict's batch and its action's shape (ConfigError naming them)."""
        self._check_step_input(tensordict)
        return super().step(tensordict)

    def rollout(self, max_steps: int, *args, **kwargs) -> TensorDictBase:
        """EnvBase.rollout, after checking max_steps >= 1 (ConfigError)."""
        check_positive("max_steps", max_steps)
        return super().rollout(int(max_steps), *args, **kwargs)

    def _check_step_input(self, tensordict: TensorDictBase) -> None:
        batch = tuple(tensordict.batch_size)
        if self.batch_size and batch != tuple(self.batch_size):
            raise ConfigError(f"env.step got a tensordict of batch {list(batch)}; this env's batch is "
                              f"{list(self.batch_size)}: accepted {list(self.batch_size)} (build the env with "
                              f"batch_size=() to step batches of any size)")
        action = tensordict.get("action", None)
        if action is not None and tuple(action.shape) != batch:
            raise ConfigError(f"action of shape {list(action.shape)} does not fit the batch {list(batch)}; accepted "
                              f"shape {list(batch)}: one action (0) per sample")

    def _reset(self, tensordict: TensorDictBase | None = None, start: str | None = None,
               **kwargs) -> TensorDictBase:
        start = check_choice("start", start or self.start, STARTS)
        batch = self.batch_size
        if tensordict is not None and not self.batch_size and tensordict.batch_size:
            batch = tensordict.batch_size  # not batch-locked: the reset tensordict sets the batch
        mask = tensordict.get("_reset", None) if tensordict is not None else None
        n = batch.numel()
        if mask is None or bool(mask.all()):
            state = self._start(n, start)
        else:
            # partial reset (TorchRL's "_reset", e.g. auto-reset inside a rollout or a collector): fresh states are
            # drawn only where the mask is set; TorchRL keeps the other entries of the running episodes
            mask = mask.reshape(n)
            fresh = self._start(int(mask.sum()), start)
            state = {k: v.new_zeros((n, *v.shape[1:])) for k, v in fresh.items()}
            for k, v in fresh.items():
                state[k][mask] = v
        return self._pack(batch, state, truncated=torch.zeros(n, dtype=torch.bool, device=self.device))

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch = tensordict.batch_size
        n = batch.numel()
        action = tensordict.get("action", None)
        if action is not None and bool((action != 0).any()):
            bad = action[action != 0].flatten()[0].item()
            raise ConfigError(f"action {bad} is not an action of the diffusion MRP; accepted: 0 (its single action, "
                              f"see envs.single_action_policy)")
        missing = [k for k in ("x", "level", "index", "label", "x0") if k not in tensordict.keys()]
        if missing:
            raise ConfigError(f"env.step needs the state keys {missing} (missing); call env.reset() first")
        flat = {k: tensordict.get(k).reshape(n, *tensordict.get(k).shape[len(batch):])
                for k in ("x", "level", "index", "label", "x0")}
        nxt = self._transition(flat["x"], flat["level"], flat["index"], flat["x0"])
        nxt["label"] = flat["label"]
        return self._pack(batch, nxt, truncated=nxt.pop("truncated"))

    def _pack(self, batch: torch.Size, state: dict[str, Tensor], *, truncated: Tensor) -> TensorDict:
        """A TensorDict with batch dims `batch` from flat tensors (the leading dim has batch.numel() entries)."""
        trunc = truncated.reshape(*batch, 1)
        data = {k: v.reshape((*batch, *v.shape[1:])) for k, v in state.items()}
        data.update(done=trunc.clone(), terminated=torch.zeros_like(trunc), truncated=trunc)
        return TensorDict(data, batch_size=batch, device=self.device)

    # ---- training draws: a reset at the training levels plus env steps -------------------------------------------
    def _num(self, batch_size: int | None) -> int:
        if batch_size is None:
            return max(self.batch_size.numel(), 1)
        check_positive("batch_size", batch_size)
        return int(batch_size)

    def reset_training(self, batch_size: int | None = None) -> TensorDictBase:
        """`reset(start="train")` for a batch [B]: x0, training levels and x ~ q(x | x0) (method.md §5.1)."""
        n = self._num(batch_size)
        if self.batch_size and self.batch_size.numel() != n:
            raise ConfigError(f"batch_size {n} differs from the env's batch_size {tuple(self.batch_size)}; build the "
                              f"env with batch_size=() to draw batches of any size")
        td = TensorDict({}, batch_size=[n] if not self.batch_size else self.batch_size, device=self.device)
        return self.reset(td, start="train")

    def sample_trajectories(self, n: int, batch_size: int | None = None) -> TensorDictBase:
        """Chains of `n` env steps from the training levels, [B, n]: `reset_training`, then `env.step` and
        TorchRL's `step_mdp` n times, as `env.rollout` does, but never resetting mid-chain.

        Each row holds a transition as env.rollout writes it ("valid" at the root says whether that row's
        transition is TD-valid; the last dim is named "time"). A chain that reaches the sigma_min end stays there:
        its later rows are zero-reward steps from the end state onto itself, marked "done". No fresh episode is
        started, so the data generator draws only the start states, and a baseline, a TD(0) and a multi-step agent
        with one seed see the same x0 and levels at every step.
        """
        check_positive("n", n)
        td = self.reset_training(batch_size)
        rows = []
        for _ in range(int(n)):
            td = self.step(single_action_policy(td))
            rows.append(td)
            td = step_mdp(td)
        chains = torch.stack(rows, dim=td.batch_dims)
        chains.names = [None] * td.batch_dims + ["time"]
        return chains

    def sample_pairs(self, batch_size: int | None = None) -> TensorDictBase:
        """The paper's training draw (method.md §5): one transition per sample from the training levels, [B].

        `reset_training` + one env step: x_t at the raw training level (possibly outside the grid: the base loss
        uses it, and such samples are TD-invalid), its partner at index_t + stride from the true reverse kernel,
        the image-valued reward, and "valid", the TD-valid mask of method.md §5.2.
        """
        return self.sample_trajectories(1, batch_size)[..., 0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dataset={getattr(self.dataset, 'name', '?')!r}, "
                f"formulation={self.formulation!r}, batch_size={tuple(self.batch_size)}, stride={self.stride}, "
                f"one_step={self.one_step}, coupling={self.coupling!r}, start={self.start!r}, device={self.device})")
