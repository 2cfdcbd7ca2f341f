"""The denoising chain as a TorchRL Markov reward process (spec section 3).

State s = (x, level, index, label) plus the clean sample x0, which the environment keeps only to compute rewards
(the critic must never read it). MRP time runs in the denoising direction: one step moves `stride` index units
toward the data, drawing x' from the true x0-conditioned reverse kernel q(x' | x, x0) of the formulation. The
reward is image-valued, r = mu_true(s) - mu_true(s'), with mu_true(x, level) = A x0 + kappa x the one-step
posterior mean `one_step` index units ahead (spec 2), so rewards telescope along any trajectory.

Keys (batch dims [*B], sample dims [*F]):

    root:   "x" [*B,*F] float, "level" [*B] float (sigma for EDM/CT, timestep t for VP), "index" [*B] float
            (continuous grid index, 0 = noisiest), "label" [*B] int64 (0 without labels), "x0" [*B,*F] float,
            "action" [*B] int64 (a single-action MRP: always 0, ignored), "done"/"terminated"/"truncated" [*B,1]
    "next": the same state keys at the next level, "reward" [*B,*F], "done"/"terminated"/"truncated" [*B,1].

Episodes are never terminated: they are truncated when one more stride would take the index past
N-1-one_step (the sigma_min end), so estimators still bootstrap from V(s_T) (spec 3).

Besides rollouts, `sample_pairs` gives the paper's training draw (spec 4: one transition per sample from the
training level distribution, with the TD-valid mask "valid") and `sample_trajectories` gives n-step chains from
the same starting distribution, for multi-step estimators.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from diffusion_rl.data import Dataset, load_dataset
from diffusion_rl.errors import ConfigError, check_choice, check_positive
from diffusion_rl.formulations import COUPLINGS, Formulation, make_formulation

__all__ = ["DiffusionMRP", "default_stride_one_step", "default_coupling", "check_stride_one_step", "STARTS",
           "STATE_KEYS"]

STARTS: tuple[str, ...] = ("max", "random")
STATE_KEYS: tuple[str, ...] = ("x", "level", "index", "label", "x0")
DONE_KEYS: tuple[str, ...] = ("done", "terminated", "truncated")


def default_stride_one_step(formulation: Formulation) -> tuple[float, float]:
    """Paper defaults (stride k, one_step delta) in index units for a formulation.

    EDM: k = 3, delta = 0.2 on the 18-point grid, i.e. 3/17 and 0.2/17 of the grid span N-1 (spec 1-3); the same
    fractions of the grid for VP (and EDM grids with N != 18). CT: k = 1, delta = 0.25 (spec 5).
    """
    if formulation.name == "ct":
        return 1.0, 0.25
    span = (formulation.steps - 1) / 17.0
    return 3.0 * span, 0.2 * span


def default_coupling(formulation: Formulation) -> str:
    """"markov" (spec 3: the true reverse kernel, the Bellman fixed point), "shared" for CT (spec 5)."""
    return "shared" if formulation.name == "ct" else "markov"


def check_stride_one_step(stride, one_step, steps: int) -> tuple[float, float]:
    """Validate stride > 0, one_step > 0 and stride + one_step <= N-1; return them as floats."""
    check_positive("stride", stride, integer=False)
    check_positive("one_step", one_step, integer=False)
    if stride + one_step > steps - 1:
        raise ConfigError(f"stride + one_step = {stride} + {one_step} = {stride + one_step} exceeds N-1 = {steps - 1} "
                          f"index units of the {steps}-point grid; need stride + one_step <= {steps - 1}")
    return float(stride), float(one_step)


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


class DiffusionMRP(EnvBase):
    """The diffusion denoising chain as a batched TorchRL environment (spec section 3).

    Args:
        dataset: a data set name for `diffusion_rl.data.load_dataset` ("digits", "8gaussians", ...) or a Dataset.
        formulation: "edm", "vp"/"ddpm", "ct" or a Formulation instance.
        batch_size: env batch dims [*B] (an int means (B,)). Not batch-locked: with batch_size=() the batch of a
            rollout comes from the tensordict passed to `reset`.
        stride: k, index units per MRP step (defaults: `default_stride_one_step`).
        one_step: delta, index units of the one-step posterior mean that defines values and rewards.
        coupling: "markov" (the true reverse kernel) or "shared" (shared noise: x' deterministic given x, x0);
            None picks `default_coupling`: markov, or shared for CT (spec 5).
        start: "max" starts every episode at index 0 (the noisiest level); "random" at a uniform index in
            [0, N-1-(stride+one_step)], so that at least one step is always possible.
        device: where states live; the env's torch.Generator lives there too.
        seed: seed of the env's generators (None: drawn from torch's global RNG).
        dtype: float dtype of states and rewards (float32; float64 makes reward sums telescope to rounding error).
    """

    batch_locked = False  # TorchRL idiom (pendulum tutorial): the batch may come from the reset tensordict

    def __init__(self, dataset: str | Dataset = "digits", formulation: str | Formulation = "edm", *,
                 batch_size: int | Sequence[int] = (1,), stride: float | None = None,
                 one_step: float | None = None, coupling: str | None = None, start: str = "max",
                 device: str | torch.device = "cpu", seed: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        # --- validate everything cheap before loading data ---
        if coupling is not None:
            check_choice("coupling", coupling, COUPLINGS)
        check_choice("start", start, STARTS)
        batch_size = _as_batch_size(batch_size)
        if not isinstance(dataset, str) and not callable(getattr(dataset, "draw", None)):
            raise ConfigError(f"dataset must be a data set name or a Dataset, got {type(dataset).__name__}")
        form = make_formulation(formulation)
        d_stride, d_one = default_stride_one_step(form)
        stride, one_step = check_stride_one_step(d_stride if stride is None else stride,
                                                 d_one if one_step is None else one_step, form.steps)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an int or None, got {seed!r}")
        check_choice("dtype", dtype, (torch.float32, torch.float64))

        super().__init__(device=device, batch_size=batch_size)
        self.formulation = form
        self.stride, self.one_step = stride, one_step
        self.coupling, self.start = coupling or default_coupling(form), start
        self.dataset = load_dataset(dataset, seed=0 if seed is None else seed) if isinstance(dataset, str) else dataset
        self.sample_shape = tuple(self.dataset.sample_shape)
        self.num_classes = int(getattr(self.dataset, "num_classes", 0) or 0)
        self.dtype = dtype
        self.last_index = float(form.steps - 1)  # N-1
        self._make_spec()
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.set_seed(seed)

    # ---- specs -------------------------------------------------------------------------------------------------
    def _make_spec(self) -> None:
        B, F, dev, dt = self.batch_size, self.sample_shape, self.device, self.dtype
        self.observation_spec = Composite(
            x=Unbounded(shape=(*B, *F), dtype=dt, device=dev),
            level=Unbounded(shape=B, dtype=dt, device=dev),
            index=Bounded(low=0.0, high=self.last_index, shape=B, dtype=dt, device=dev),
            label=Categorical(n=max(self.num_classes, 1), shape=B, dtype=torch.int64, device=dev),
            x0=Unbounded(shape=(*B, *F), dtype=dt, device=dev),
            shape=B, device=dev,
        )
        self.state_spec = Composite(shape=B, device=dev)
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
        seed = int(seed) % (2 ** 63)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        # data draws index a CPU tensor: their own CPU generator, seeded seed + 1 exactly as the Learner's data
        # order (diffusion_rl.training), so a baseline and a TD agent with one seed see the same batches
        self._data_generator = torch.Generator().manual_seed((seed + 1) % (2 ** 63))

    @property
    def generator(self) -> torch.Generator:
        """The env's noise generator (on the env's device); `set_seed` replaces it."""
        return self._generator

    @property
    def data_generator(self) -> torch.Generator:
        """The CPU generator of the data draws (`Dataset.draw`); `set_seed` replaces it."""
        return self._data_generator

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _draw(self, n: int) -> tuple[Tensor, Tensor]:
        x0, labels = self.dataset.draw(n, self._data_generator)
        x0 = x0.to(device=self.device, dtype=self.dtype)
        if labels is None:
            labels = torch.zeros(n, dtype=torch.int64, device=self.device)
        else:
            labels = labels.to(device=self.device, dtype=torch.int64).reshape(n)
        return x0, labels

    def _randn(self, shape) -> Tensor:
        return torch.randn(tuple(shape), generator=self._generator, device=self.device, dtype=self.dtype)

    def true_value(self, x0: Tensor, x: Tensor, level: Tensor) -> Tensor:
        """mu_true(x, level) = A x0 + kappa x, the one-step posterior mean `one_step` index units ahead (spec 2).

        Flat inputs: x0, x [n, *F], level [n].
        """
        return self.formulation.one_step_mean(x0, x, level, self.one_step, self.coupling)

    @property
    def max_valid_index(self) -> float:
        """The last index a transition may start from: (N-1) - (stride + one_step) (spec 4.2)."""
        return self.last_index - (self.stride + self.one_step)

    def truncation(self, index: Tensor) -> Tensor:
        """True where one more stride would take the index past N-1-one_step (the episode is truncated there)."""
        return index > self.max_valid_index

    def td_valid(self, level: Tensor, index: Tensor) -> Tensor:
        """TD-valid mask of spec 4.2: in_range(level) & index <= (N-1) - (stride + one_step)."""
        return self.formulation.in_range(level) & (index <= self.max_valid_index)

    def _next_level(self, level: Tensor, index_next: Tensor) -> Tensor:
        """level(index + stride), never noisier than `level`: a training level below the grid's end (sigma_t <
        sigma_min, an invalid sample) keeps its own level instead of being paired with the noisier grid end."""
        return torch.minimum(self.formulation.level(index_next).to(self.dtype), level)

    def _transition(self, x: Tensor, level: Tensor, index: Tensor, x0: Tensor) -> dict[str, Tensor]:
        """One MRP step on flat tensors: x' ~ q(x' | x, x0) at index + stride, and the image-valued reward."""
        index_next = index + self.stride
        level_next = self._next_level(level, index_next)
        x_next = self.formulation.reverse_step(x0, x, level, level_next, self.coupling, self._generator)
        x_next = x_next.to(self.dtype)
        reward = self.true_value(x0, x, level) - self.true_value(x0, x_next, level_next)
        return {"x": x_next, "level": level_next, "index": index_next, "reward": reward,
                "truncated": self.truncation(index_next)}

    def _pack(self, batch: torch.Size, *, x, level, index, label, x0, truncated=None, reward=None,
              extra: dict | None = None) -> TensorDict:
        """A TensorDict with batch dims `batch` from flat tensors (the leading dim has batch.numel() entries)."""
        n_feat = self.sample_shape
        if truncated is None:
            truncated = torch.zeros(batch.numel(), dtype=torch.bool, device=self.device)
        trunc = truncated.reshape(*batch, 1)
        data = {
            "x": x.reshape(*batch, *n_feat), "level": level.reshape(batch), "index": index.reshape(batch),
            "label": label.reshape(batch), "x0": x0.reshape(*batch, *n_feat),
            "done": trunc.clone(), "terminated": torch.zeros_like(trunc), "truncated": trunc,
        }
        if reward is not None:
            data["reward"] = reward.reshape(*batch, *n_feat)
        if extra:
            data.update(extra)
        return TensorDict(data, batch_size=batch, device=self.device)

    def _flat_state(self, td: TensorDictBase) -> tuple[torch.Size, Tensor, Tensor, Tensor, Tensor, Tensor]:
        batch = td.batch_size
        n = batch.numel()
        x = td.get("x").reshape(n, *self.sample_shape)
        x0 = td.get("x0").reshape(n, *self.sample_shape)
        return batch, x, td.get("level").reshape(n), td.get("index").reshape(n), td.get("label").reshape(n), x0

    # ---- EnvBase API -------------------------------------------------------------------------------------------
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        batch = self.batch_size
        if tensordict is not None and not self.batch_size and tensordict.batch_size:
            batch = tensordict.batch_size  # not batch-locked: the reset tensordict sets the batch
        n = batch.numel()
        x0, label = self._draw(n)
        if self.start == "max":
            index = torch.zeros(n, dtype=self.dtype, device=self.device)
        else:
            high = self.max_valid_index
            index = torch.rand(n, generator=self._generator, device=self.device, dtype=self.dtype) * high
        level = self.formulation.level(index).to(self.dtype)
        x = self.formulation.add_noise(x0, level, self._randn(x0.shape)).to(self.dtype)
        return self._pack(batch, x=x, level=level, index=index, label=label, x0=x0)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch, x, level, index, label, x0 = self._flat_state(tensordict)
        nxt = self._transition(x, level, index, x0)
        return self._pack(batch, x=nxt["x"], level=nxt["level"], index=nxt["index"], label=label, x0=x0,
                          truncated=nxt["truncated"], reward=nxt["reward"])

    # ---- training draws ----------------------------------------------------------------------------------------
    def _num(self, batch_size: int | None) -> int:
        if batch_size is None:
            return max(self.batch_size.numel(), 1)
        check_positive("batch_size", batch_size)
        return int(batch_size)

    def _root(self, n: int, *, x, level, index, label, x0, valid) -> TensorDict:
        td = self._pack(torch.Size([n]), x=x, level=level, index=index, label=label, x0=x0,
                        extra={"valid": valid.reshape(n)})
        td.set("action", torch.zeros(n, dtype=torch.int64, device=self.device))
        return td

    def sample_pairs(self, batch_size: int | None = None) -> TensorDict:
        """The paper's training draw (spec 4): one transition per sample at a training level.

        level_t ~ formulation.sample_training_level (log-normal sigma for EDM), index_t = index(level_t) (clamped to
        the grid), partner level' = level(index_t + stride); (x_t, x_t') = formulation.coupled_pair(x0, level_t,
        level', coupling) (Markov: the less noisy state first, spec 3 / 7.4). "x" holds x_t at the raw level_t
        (possibly outside the grid: the base loss uses it), "next" the partner state and the image-valued reward
        mu_true(s) - mu_true(s'). "valid" [B] is the TD-valid mask of spec 4.2, in_range(level_t) &
        index_t <= (N-1) - (stride + one_step): partners past the end are masked, never clamped into validity;
        invalid samples still carry finite next states. Keys are those of one env.rollout transition plus "valid".
        """
        n = self._num(batch_size)
        x0, label = self._draw(n)
        level = self.formulation.sample_training_level(n, self._generator, self.device).to(self.dtype)
        index = self.formulation.index(level).to(self.dtype)
        index_next = index + self.stride
        level_next = self._next_level(level, index_next)
        x, x_next = self.formulation.coupled_pair(x0, level, level_next, self.coupling, self._generator)
        x, x_next = x.to(self.dtype), x_next.to(self.dtype)
        reward = self.true_value(x0, x, level) - self.true_value(x0, x_next, level_next)
        td = self._root(n, x=x, level=level, index=index, label=label, x0=x0, valid=self.td_valid(level, index))
        td.set("next", self._pack(torch.Size([n]), x=x_next, level=level_next, index=index_next, label=label,
                                  x0=x0, truncated=self.truncation(index_next), reward=reward))
        return td

    def sample_trajectories(self, n: int, batch_size: int | None = None) -> TensorDict:
        """Chains of `n` env steps from the training level distribution, as a TensorDict [B, n].

        Start states are those of `sample_pairs` (level_0 from the training distribution, x_0 ~ q(x | x0) at
        level_0, index_0 = index(level_0)); each step is an env step (true reverse kernel, image-valued reward),
        with the same keys and nesting as env.rollout plus "valid" [B, n]: valid[:, j] = in_range(level_0) &
        index_j <= (N-1) - (stride + one_step), i.e. transition j is TD-valid. The mask is non-increasing in j, so
        valid[:, j] says the chain has j + 1 valid strides, and valid[:, -1] (= valid.all(-1)) that all n are.
        Steps are never cut: past the end the levels are clamped to the grid and stay finite, masked invalid.
        """
        check_positive("n", n)
        m = self._num(batch_size)
        x0, label = self._draw(m)
        level = self.formulation.sample_training_level(m, self._generator, self.device).to(self.dtype)
        index = self.formulation.index(level).to(self.dtype)
        x = self.formulation.add_noise(x0, level, self._randn(x0.shape)).to(self.dtype)
        in_range = self.formulation.in_range(level)
        batch = torch.Size([m])
        truncated = torch.zeros(m, dtype=torch.bool, device=self.device)
        steps = []
        for _ in range(int(n)):
            valid = in_range & (index <= self.max_valid_index)
            td = self._root(m, x=x, level=level, index=index, label=label, x0=x0, valid=valid)
            trunc = truncated.reshape(m, 1)
            td.update({"done": trunc.clone(), "truncated": trunc.clone()})
            nxt = self._transition(x, level, index, x0)
            td.set("next", self._pack(batch, x=nxt["x"], level=nxt["level"], index=nxt["index"], label=label,
                                      x0=x0, truncated=nxt["truncated"], reward=nxt["reward"]))
            steps.append(td)
            x, level, index, truncated = nxt["x"], nxt["level"], nxt["index"], nxt["truncated"]
        return torch.stack(steps, dim=1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dataset={getattr(self.dataset, 'name', '?')!r}, "
                f"formulation={self.formulation!r}, batch_size={tuple(self.batch_size)}, stride={self.stride}, "
                f"one_step={self.one_step}, coupling={self.coupling!r}, start={self.start!r}, device={self.device})")
