"""The training loop shared by every learner: optimizer, evaluation EMA, checkpoints, metrics, resume.

A `Learner` owns an online `Denoiser`, its evaluation EMA, Adam (or RAdam) with linear warm-up and a step counter;
its `envs.DiffusionMRP` produces every batch and owns the run's pair of generators (data order and noise).
Subclasses say how to `collect()` a batch from the env and how to compute its `loss(batch)` (scalar "loss_*" terms
whose sum is the objective); `update()` and `train()` do the rest, RL style. Checkpoints hold model, EMA,
optimizer, RNG states, step and config; they are written atomically and loaded with `torch.load(weights_only=True)`
(diffusion_rl/checkpoints.py), so `resume()` continues a run exactly (bit for bit on CPU).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn
from tqdm.auto import tqdm

from . import distributed, preemption
from .checkpoints import RESUME_MAY_CHANGE, checkpoint_identity, config_diff, load_checkpoint, run_identity
from .level_stats import LevelStats
from .errors import ConfigError, check_choice, check_positive
from .limits import check_limit
from .networks import Denoiser, build_network
from .runs import KINDS, atomic_save, atomic_write, record_written, remove_stale_temporaries, remove_written

__all__ = ["TrainConfig", "Learner", "NonFiniteLossError", "resolve_device", "atomic_save", "batch_from_env",
           "split_batch", "objective"]


def objective(losses: TensorDict) -> torch.Tensor:
    """The training objective: the sum of the scalar "loss_*" entries (TorchRL's loss-module convention)."""
    terms = [v for k, v in losses.items() if isinstance(k, str) and k.startswith("loss_")]
    if not terms:
        raise ValueError(f"a loss output needs scalar 'loss_*' entries, got keys {list(losses.keys())}")
    return torch.stack([t.reshape(()) for t in terms]).sum()


def halflife_decay(batch_size: int, halflife_images: float) -> float:
    """EMA decay per step for a half-life in training images (EDM): 0.5 ** (batch / half-life); 0 for a half-life
    of 0 (the average is the latest value)."""
    return 0.5 ** (batch_size / halflife_images) if halflife_images > 0 else 0.0


def check_speed(config: "TrainConfig", device: torch.device) -> None:
    """Refuse, before any work, precision settings the device cannot run; switch TF32 on for CUDA if asked."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (got {device.type}); on CPU use bf16 or fp32")
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16 is not supported by this GPU; use fp16 or fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config.tf32)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" picks CUDA when there is a GPU, else CPU. Unknown names and absent devices raise ConfigError."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise ConfigError(f"unknown device {text!r}; accepted: {', '.join(DEVICES)}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {text!r}: no CUDA device is available on this machine; accepted here: auto, cpu")
    if text.startswith("cuda:") and int(text[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' is not available on this machine; accepted here: auto, cpu")
    return torch.device(text)


OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}  # PyTorch's defaults: betas (0.9, 0.999), eps 1e-8


@dataclass
class TrainConfig:
    """Optimisation settings shared by every learner."""

    batch_size: int | None = None   # samples per optimizer step (None: the env's batch size, else 128)
    lr: float = 1e-3                # learning rate after warm-up
    optimizer: str = "adam"         # adam | radam (the consistency-model release's, method.md §10.4)
    warmup_steps: int = 200         # linear learning-rate warm-up from 0
    ema_halflife_images: float = 20_000.0  # evaluation EMA half-life, in training images (EDM)
    grad_clip: float = 0.0          # max gradient norm; 0 disables clipping
    seed: int = 0                   # seeds a network the learner builds (the env's seed drives data and noise)
    checkpoint_every: int = 0       # steps between checkpoints; 0 writes only at the end of train()
    checkpoint_seconds: float = 300.0  # also checkpoint when this much wall-clock time has passed; 0 disables
    log_every: int = 25             # steps between JSONL metric records
    tensorboard: bool = False       # also write metrics as TensorBoard scalars to out_dir/tensorboard
    precision: str = "fp32"         # autocast of the raw network's training forwards: fp32 | bf16 | fp16 (CUDA)
    compile: bool = False           # torch.compile the raw network (online and target)
    channels_last: bool = False     # channels_last memory format for image networks
    tf32: bool = True               # TF32 matmuls and convolutions on CUDA in fp32

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size)
            check_limit("batch_size", self.batch_size, "batch_size")  # a typo must not become an allocation
        check_positive("lr", self.lr, integer=False)
        check_positive("ema_halflife_images", self.ema_halflife_images, integer=False)
        for name in ("warmup_steps", "checkpoint_every", "grad_clip", "checkpoint_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr > 1.0:
            raise ConfigError(f"lr must be in (0, 1], got {self.lr!r}")
        check_positive("log_every", self.log_every)
        check_choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install 'diffusion-rl[tensorboard]'")


DEFAULT_BATCH = 128  # the batch of an env with no batch size of its own (batch_size=()) and a config with none


def split_batch(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch under DDP; ConfigError unless it divides evenly."""
    if batch_size % world_size:
        raise ConfigError(f"batch_size {batch_size} does not divide over {world_size} processes; give a multiple of "
                          f"{world_size}")
    return batch_size // world_size


def batch_from_env(env, config: TrainConfig | None, world_size: int = 1) -> int:
    """The global batch of a learner on `env`: the env's batch size (times the processes under DDP), which a
    config's explicit batch_size must equal; for an unbatched env (batch_size=()) the config's, else 128."""
    env_batch = tuple(env.batch_size)
    given = None if config is None else config.batch_size
    if len(env_batch) > 1:
        raise ConfigError(f"the env's batch_size {env_batch} has {len(env_batch)} dims; a learner trains on a flat "
                          f"batch: accepted () or (B,)")
    if not env_batch:
        batch = DEFAULT_BATCH if given is None else given
        split_batch(batch, world_size)
        return batch
    batch = env_batch[0] * world_size
    if given is not None and given != batch:
        raise ConfigError(f"the config's batch_size {given} differs from the env's batch {env_batch[0]}"
                          + (f" x {world_size} processes" if world_size > 1 else "")
                          + f"; the env's batch is the batch: drop the config's batch_size or give {batch}")
    return batch


class Learner(ABC):
    """Base class of every trainable method: subclasses implement `collect` and `loss`.

    Args:
        env: the `envs.DiffusionMRP` that produces every training batch; its data set, formulation and pair of
            generators (data order and noise) are the learner's. Its batch size is the batch (a config that
            gives another is refused); an unbatched env (batch_size=()) takes config.batch_size (default 128).
        denoiser: the online preconditioned network; None builds the default network for the data set, seeded
            by `config.seed`. Its formulation must equal the env's.
        config: optimisation settings.
        out_dir: folder for checkpoints (`checkpoint.pt`) and metrics (`metrics.jsonl`); None keeps nothing on disk.
            A folder that holds another run's checkpoint is refused by `train` unless the learner `resume()`s it or
            is told to replace it (`overwrite()`, or `train(..., overwrite=True)`).
        device: "auto" (GPU when there is one), "cpu" or "cuda".
    """

    method: str = "learner"

    def __init__(self, env, denoiser: Denoiser | None = None, config: TrainConfig | None = None,
                 out_dir: str | Path | None = None, device: str | torch.device = "auto") -> None:
        for attr in ("formulation", "dataset", "reset_training", "generators"):
            if not hasattr(env, attr):
                raise ConfigError(f"env must be a DiffusionMRP (missing {attr!r}), got {type(env).__name__}")
        self.dist = distributed.current()  # DDP (diffusion_rl/distributed.py): the global batch split over ranks
        self.config = dataclasses.replace(config or TrainConfig(),
                                          batch_size=batch_from_env(env, config, self.dist.world_size))
        self.local_batch = self.config.batch_size // self.dist.world_size
        if denoiser is None:
            torch.manual_seed(self.config.seed)  # the initialisation follows the seed
            ds = env.dataset
            denoiser = Denoiser(build_network(ds.sample_shape, num_classes=int(getattr(ds, "num_classes", 0) or 0)),
                                env.formulation)
        elif denoiser.formulation.config() != env.formulation.config():
            raise ConfigError(f"the denoiser's formulation {denoiser.formulation.config()} differs from the env's "
                              f"{env.formulation.config()}; accepted: the same formulation and settings")
        self.device = resolve_device(device)
        self.env = env
        self.dataset = env.dataset
        denoiser.check_shape(self.dataset.sample_shape)
        self.denoiser = denoiser.to(self.device)
        if self.dist.world_size > 1:  # broadcast rank 0's parameters; gradients averaged over ranks
            self.denoiser.wrap_ddp([self.device.index] if self.device.type == "cuda" else None)
        self.formulation = denoiser.formulation
        self.ema = copy.deepcopy(self.denoiser).eval().requires_grad_(False)  # evaluation: fp32, eager
        self.apply_speed()
        self.optimizer = OPTIMIZERS[self.config.optimizer](self.denoiser.parameters(), lr=self.config.lr)
        self.step = 0
        self.images_seen = 0
        self.train_seconds = 0.0  # wall-clock seconds in `train`, over every resume (nan: an older checkpoint's)
        self._clock: float | None = None  # when `train_seconds` was last brought up to date, while training
        self.run_id = uuid.uuid4().hex[:12]  # names this run in every metrics line; kept across resumes
        hasher = getattr(self.dataset, "content_hash", None)  # the data is identified by content, not by path
        self.data_hash = hasher() if callable(hasher) else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._writer = None  # TensorBoard SummaryWriter, made on first use
        self._claimed: Path | None = None  # the out_dir this learner resumed or started its run in
        self._recorded: set[tuple[Path, str]] = set()  # files already named in out_dir's manifest
        self.level_stats = LevelStats()  # per-level training curves, logged under "per_level"
        self._steps_dev: torch.Tensor | None = None  # on-device step counter and first non-finite step (-1: none)
        self._first_bad: torch.Tensor | None = None

    # ---- what a subclass defines ---------------------------------------------------------------------
    @abstractmethod
    def collect(self) -> TensorDict:
        """Draw one training batch from the env."""

    @abstractmethod
    def loss(self, batch: TensorDict) -> TensorDict:
        """Scalar "loss_*" terms whose sum is the objective (TorchRL's convention), plus diagnostics."""

    def after_update(self) -> None:
        """Hook run after each optimizer step (target networks move here)."""

    def apply_speed(self) -> None:
        """Apply the config's precision, compile and memory-format settings to the trained network(s); refused
        settings raise ConfigError. Called at construction and after a resume (which may change them)."""
        check_speed(self.config, self.device)
        self.denoiser.set_speed(self.config.precision, self.config.compile, self.config.channels_last)
        self.scaler = torch.amp.GradScaler("cuda") if self.config.precision == "fp16" else None

    def before_step(self, total: int) -> None:
        """Called by `train` before each step with the run's total steps: schedules that follow training progress.
        Here, a grid schedule (improved CT's curriculum, the release's progressive grid, method.md §10.4) hands this
        step's grid to everything that draws or weighs on it (`use_grid`)."""
        if self.formulation.scheduled:
            self.use_grid(self.formulation.at_step(self.step, total))

    def use_grid(self, formulation) -> None:
        """Train the next steps on `formulation`, the family's formulation on this step's grid (a value from
        `Formulation.at_step`): the env draws its levels, pairs and rewards on it. The denoiser keeps the family's
        own (its preconditioning does not depend on the grid)."""
        self.env.formulation = formulation

    def close(self) -> None:
        """Release the DDP wrapper of the trained network; under DDP call it before `destroy_process_group` (a
        wrapper freed after it can hang the process on exit). The learner stays usable on one process."""
        self.denoiser.unwrap_ddp()
        gc.collect()  # DDP's hooks form reference cycles: free it now, while the process group exists

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules besides the denoiser and EMA that a checkpoint must hold."""
        return {}

    def method_config(self) -> dict:
        """Method settings that must match on resume."""
        return {}

    def labels_for_net(self, labels: torch.Tensor) -> torch.Tensor | None:
        return labels if self.denoiser.conditional else None

    # ---- one optimisation step ---------------------------------------------------------------------------
    def _lr(self) -> float:
        w = self.config.warmup_steps
        return self.config.lr * min(1.0, (self.step + 1) / w) if w > 0 else self.config.lr

    def update(self, batch: TensorDict, check: bool = True) -> TensorDict:
        """One optimizer step on `batch`, then the EMA and `after_update`. Raises NonFiniteLossError before the step
        when the loss or the gradient norm is not finite. `check=False` (the training loop) makes no host sync: the
        finiteness goes into an on-device flag that `check_finite` reads at logging and before every checkpoint."""
        self.denoiser.train()
        out = self.loss(batch)
        loss = objective(out)
        if check and not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss {loss.item()} at step {self.step}; "
                                     "the last good checkpoint is left intact")
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scaled gradients, unscaled before clipping and the step
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.scaler is None:  # (fp16's scaler skips a step with non-finite gradients itself)
            # the norm clips when grad_clip > 0; with 0 it is only measured (the gradients stay as they are):
            # non-finite gradients stop the run, so the checkpoints stay finite
            if self.config.grad_clip > 0:
                norm = nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.config.grad_clip)
            else:
                norm = nn.utils.get_total_norm([p.grad for p in self._ema_pairs()[1] if p.grad is not None])
            if check and not torch.isfinite(norm):
                raise NonFiniteLossError(f"non-finite gradient norm {norm.item()} at step {self.step} (finite loss "
                                         f"{loss.item():.4g}); the last good checkpoint is left intact")
        else:  # fp16: the scaler skips a step whose unscaled gradients overflow, so only the loss is watched
            if self.config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.config.grad_clip)
            norm = None
        if not check:
            self._watch_finite(loss, norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        images = batch.batch_size[0] * self.dist.world_size  # the global batch
        self._update_ema(images)
        self.step += 1
        self.images_seen += images
        self.after_update()
        out = out.detach()
        out.set("loss", loss.detach())
        return out

    @torch.no_grad()
    def _watch_finite(self, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        """Record on the device whether this step's loss (and gradient norm) is finite, and the first step where it
        was not: no host sync (`check_finite` reads it)."""
        ok = torch.isfinite(loss.detach()) if norm is None else torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if self._steps_dev is None or self._steps_dev.device != ok.device:
            self._steps_dev = torch.full((), self.step, dtype=torch.long, device=ok.device)
            self._first_bad = torch.full((), -1, dtype=torch.long, device=ok.device)
        self._first_bad = torch.where((self._first_bad < 0) & ~ok, self._steps_dev, self._first_bad)
        self._steps_dev += 1

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a step since the last check had a non-finite loss or gradient norm (one host
        sync). The training loop calls it at every log line and `save` before every checkpoint, so no checkpoint
        holds a step past a non-finite one and the run stops with its last good checkpoint."""
        bad = -1 if self._first_bad is None else int(self._first_bad)
        if self.dist.world_size > 1 and distributed.any_rank(bad >= 0) and bad < 0:
            raise NonFiniteLossError(f"another rank's loss or gradient norm became non-finite (found at step "
                                     f"{self.step}); the last good checkpoint is left intact")
        if bad >= 0:
            raise NonFiniteLossError(f"non-finite loss or gradient norm at step {bad} (found at step {self.step}); "
                                     f"the last good checkpoint is left intact")

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA parameters, online parameters), gathered once: a checkpoint loads into the same tensors."""
        if getattr(self, "_pairs", None) is None:
            self._pairs = (list(self.ema.parameters()), list(self.denoiser.parameters()))
        return self._pairs

    @torch.no_grad()
    def _update_ema(self, batch_size: int) -> None:
        beta = halflife_decay(batch_size, self.config.ema_halflife_images)
        ema, online = self._ema_pairs()
        torch._foreach_lerp_(ema, online, 1 - beta)  # one call over the parameter lists
        for b_ema, b in zip(self.ema.buffers(), self.denoiser.buffers()):
            b_ema.copy_(b)

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self, steps: int, progress: bool = True, overwrite: bool = False) -> Iterator[dict]:
        """Run until `self.step == steps` (total, so a resumed run stops where the uninterrupted one would),
        yielding a metrics dict every `log_every` steps and writing checkpoints and metrics.jsonl to out_dir.

        An out_dir holding another run's checkpoint is refused (ConfigError) unless this learner resumed it
        (`resume()`) or `overwrite=True` replaces it (see `overwrite()`). A SIGTERM received under the command
        line's handler (`diffusion_rl.preemption`) writes a checkpoint after the current step and raises
        `Terminated`."""
        check_positive("steps", steps)
        check_limit("steps", steps, "steps")
        if steps < self.step:
            raise ConfigError(f"steps={steps} is below the step {self.step} this run has reached; give steps >= "
                              f"{self.step} (the total, not the number still to train)")
        cfg = self.config
        self._claim_out_dir(overwrite)
        if self.out_dir is not None and self.out_dir.is_dir() and self.dist.is_main:
            remove_stale_temporaries(self.out_dir)
        progress = progress and self.dist.is_main
        bar = tqdm(total=steps, initial=self.step, desc=self.method, disable=not progress, file=sys.stderr,
                   dynamic_ncols=True, leave=False)
        t0, acc, n_acc = time.perf_counter(), {}, 0
        last_save = self._clock = t0
        stopping = preemption.training()
        stopping.__enter__()
        try:
            while self.step < steps:
                self.before_step(steps)
                batch = self.collect()
                out = self.update(batch, check=False)  # no host sync: finiteness checked at logs and checkpoints
                if "index" in batch.keys():  # per-level curves (diffusion_rl.diagnostics): the start states' index
                    index = batch["index"]
                    self.level_stats.add(index[:, 0] if index.dim() > 1 else index, out)
                for k, v in out.items():  # summed on the device, read once per log line
                    if v.numel() == 1:
                        acc[k] = acc.get(k, 0.0) + v.detach().to(torch.float32 if v.device.type == "mps"
                                                                 else torch.float64)
                n_acc += 1
                bar.update(1)
                rec = None
                if self.step % cfg.log_every == 0 or self.step == steps:
                    self.check_finite()
                    rec = {"run_id": self.run_id, "seed": cfg.seed, "method": self.method, "step": self.step,
                           "images": self.images_seen, "lr": self._lr(), "seconds": time.perf_counter() - t0,
                           **{k: float(v) / n_acc for k, v in acc.items()},  # averaged over the steps taken
                           "steps_averaged": n_acc,  # since the previous record, or since a resume
                           "per_level": self.level_stats.summary()}
                    acc, n_acc = {}, 0
                    bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}")
                    self._log(rec)  # before the checkpoint: a resume trims lines past the checkpoint's step
                due = cfg.checkpoint_seconds and time.perf_counter() - last_save >= cfg.checkpoint_seconds
                if self.dist.world_size > 1:  # saving is collective: every rank decides alike
                    due = distributed.any_rank(bool(due))
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or due:
                    self.save()
                    last_save = time.perf_counter()
                self._stop_if_terminated()
                if rec is not None:
                    yield rec
            self.save()
            self._stop_if_terminated(saved=True)
        except GeneratorExit:  # the caller stopped iterating early: keep what was trained
            self.save()
            raise
        finally:
            self._count_time()
            self._clock = None
            bar.close()
            stopping.__exit__(None, None, None)

    def _stop_if_terminated(self, saved: bool = False) -> None:
        """After a whole step: on a SIGTERM (see `diffusion_rl.preemption`), checkpoint and raise Terminated."""
        signum = preemption.requested()
        stop = signum is not None
        if self.dist.world_size > 1:  # saving is collective: every rank stops alike
            stop = distributed.any_rank(stop)
        if stop:
            if not saved:
                self.save()
            raise preemption.Terminated(signum or 15, step=self.step)

    # ---- the output folder -------------------------------------------------------------------------------------
    def _claim_out_dir(self, overwrite: bool) -> None:
        """Before training into out_dir: refuse a folder holding another run's checkpoint unless `overwrite`."""
        if self.out_dir is None:
            return
        here = self.out_dir.resolve()
        if self._claimed == here:
            return
        ckpt = self.out_dir / "checkpoint.pt"
        if os.path.lexists(ckpt):
            other = checkpoint_identity(ckpt)
            if other.get("run_id") != self.run_id:
                if not overwrite:
                    raise ConfigError(f"out_dir {str(self.out_dir)!r} holds another run's checkpoint (run "
                                      f"{other.get('run_id', '?')}, step {other.get('step', '?')}); call resume() to "
                                      f"continue it, or overwrite() / train(..., overwrite=True) to replace it")
                self.overwrite()
                return
        self._claimed = here

    def overwrite(self) -> "Learner":
        """Replace the run held in out_dir: delete the files the library wrote there (those its manifest lists; in
        a folder from before manifests, checkpoint.pt, metrics.jsonl and results.json), then train a new run there.
        Files the library did not write are kept; a checkpoint.pt among them is refused (ConfigError)."""
        if self.out_dir is None:
            raise ConfigError("overwrite needs an out_dir")
        if self.dist.is_main:
            remove_written(self.out_dir, KINDS)
            if os.path.lexists(self.out_dir / "checkpoint.pt"):
                raise ConfigError(f"out_dir {str(self.out_dir)!r} holds a checkpoint.pt the library did not record "
                                  f"writing; move it away or choose another out_dir")
        self._claimed = self.out_dir.resolve()
        return self

    def _record(self, rel: str) -> None:
        """Name out_dir/rel in out_dir's manifest (once per learner and file), before it is written."""
        key = (self.out_dir.resolve(), rel)
        if key not in self._recorded:
            record_written(self.out_dir, rel, "train")
            self._recorded.add(key)

    def _log(self, rec: dict) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._record("metrics.jsonl")
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.config.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                board = self.out_dir / "tensorboard"
                before = set(board.rglob("*")) if board.is_dir() else set()
                self._writer = SummaryWriter(str(board))
                self._writer.flush()
                for new in sorted(set(board.rglob("*")) - before):  # its event file(s), not the user's
                    if new.is_file():
                        self._record(new.relative_to(self.out_dir).as_posix())
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._writer.add_scalar(f"{self.method}/{k}", v, rec["step"])
            self._writer.flush()

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def full_config(self) -> dict:
        """Everything a resume must agree on."""
        return {"method": self.method, "formulation": self.formulation.config(),
                "network": getattr(self.denoiser.net, "config", {}),
                "dataset": getattr(self.dataset, "name", "?"), "data_hash": self.data_hash,
                "env_dtype": str(getattr(self.env, "dtype", "")),
                "sample_shape": list(self.dataset.sample_shape),
                "train": asdict(self.config), "method_config": self.method_config(),
                **({"world_size": self.dist.world_size} if self.dist.world_size > 1 else {}),
                **({"hflip": True} if getattr(self.env, "hflip", False) else {})}

    def _count_time(self) -> None:
        """Add the training time since the last count to `train_seconds`."""
        if self._clock is not None:
            now = time.perf_counter()
            self.train_seconds += now - self._clock
            self._clock = now

    def state_dict(self) -> dict:
        self._count_time()
        # the env's pair of generators (data order, noise) is the only RNG state a run draws from besides torch's
        rng = {"torch": torch.get_rng_state(), "env": {k: g.get_state() for k, g in self.env.generators().items()}}
        if self.dist.world_size > 1:  # every rank's data and noise streams, in rank order
            rng["env_ranks"] = distributed.all_gather_objects(rng["env"])
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model": self.denoiser.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "extra": {k: m.state_dict() for k, m in self.extra_modules().items()},
                "step": self.step, "images_seen": self.images_seen, "run_id": self.run_id,
                "train_seconds": self.train_seconds,
                "config": json.loads(json.dumps(self.full_config())), "rng": rng,
                # fp16's loss scale and its growth counter: without them a resumed run skips other steps
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write a checkpoint atomically (default out_dir/checkpoint.pt); returns its path. Under DDP every rank must
        call it (the ranks' generator states are gathered) and rank 0 writes."""
        self.check_finite()  # a checkpoint never holds a step past a non-finite loss
        state = self.state_dict() if self.dist.world_size > 1 else None  # collective
        if path is None:
            if self.out_dir is None:
                return None
            path = self.out_dir / "checkpoint.pt"
        if not self.dist.is_main:
            return None
        if self.out_dir is not None and Path(path) == self.out_dir / "checkpoint.pt":
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._record("checkpoint.pt")  # before the write: a file on disk is always one the manifest names
        atomic_save(state or self.state_dict(), path)
        return Path(path)

    def load_state_dict(self, ckpt: dict, strict_config: bool = True,
                        keep: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
        """Restore a checkpoint. Settings that change the run's identity must match (the first difference is
        named); RESUME_MAY_CHANGE may differ. Those named in `keep` keep this learner's value (a changed learning
        rate is warned about); the others take the checkpoint's."""
        self._steps_dev = self._first_bad = None  # the finiteness watch restarts from the checkpoint's step
        mine = json.loads(json.dumps(self.full_config()))
        saved = ckpt["config"]
        if saved.get("world_size", 1) != self.dist.world_size:  # each rank's data stream depends on the world size
            raise ConfigError(f"the checkpoint was trained by {saved.get('world_size', 1)} process(es), this run has "
                              f"{self.dist.world_size}; another world size changes the data streams: resume with "
                              f"torchrun --nproc_per_node={saved.get('world_size', 1)} (or without torchrun for 1)")
        if (strict_config and saved.get("data_hash") is not None and saved.get("data_hash") == mine.get("data_hash")
                and saved.get("dataset") != mine.get("dataset")):  # the data is identified by content, not path
            warnings.warn(f"the data set {saved.get('dataset')!r} of the checkpoint is read from {mine['dataset']!r} "
                          f"now: the same content (hash {mine['data_hash']}), so the run continues on it",
                          stacklevel=2)
            saved = {**saved, "dataset": mine["dataset"]}
        if strict_config and run_identity(saved) != run_identity(mine):
            no_hash = ({**run_identity(saved), "data_hash": None}, {**run_identity(mine), "data_hash": None})
            if no_hash[0] != no_hash[1]:
                raise ConfigError(f"checkpoint config does not match this run: {config_diff(*no_hash)}")
            raise ConfigError(f"the data differs from the checkpoint's: content hash {mine.get('data_hash')} now vs "
                              f"{saved.get('data_hash')} saved (data set {saved.get('dataset')!r}); resume on the "
                              f"same data")
        saved_train = saved.get("train", {})
        for name in RESUME_MAY_CHANGE:
            if name not in keep and name in saved_train:
                setattr(self.config, name, saved_train[name])
        old_lr = saved_train.get("lr")
        if old_lr is not None and old_lr != self.config.lr:
            warnings.warn(f"resuming with lr {self.config.lr} (the checkpoint trained with {old_lr})", stacklevel=2)
        try:
            self.denoiser.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for k, m in self.extra_modules().items():
                m.load_state_dict(ckpt["extra"][k])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"checkpoint tensors do not fit the network: {first}") from None
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr
        self.run_id = str(ckpt.get("run_id", self.run_id))
        self.step, self.images_seen = int(ckpt["step"]), int(ckpt.get("images_seen", 0))
        self.train_seconds = float(ckpt.get("train_seconds", math.nan))  # unknown for checkpoints before it
        torch.set_rng_state(ckpt["rng"]["torch"])
        env_rng = ckpt["rng"].get("env")
        if self.dist.world_size > 1:
            env_rng = ckpt["rng"]["env_ranks"][self.dist.rank]
        if not isinstance(env_rng, dict) or set(env_rng) != set(self.env.generators()):
            raise ConfigError("the checkpoint holds no state of the env's generators (written by an older version, "
                              "whose learner drew its own data); it cannot be resumed exactly: start a new run")
        for k, g in self.env.generators().items():
            try:
                g.set_state(env_rng[k])
            except RuntimeError:  # a CUDA generator's state is not a CPU one's: the streams cannot continue exactly
                raise ConfigError(f"the checkpoint's {k} state does not fit this run's {g.device.type} generator: it "
                                  "was trained on another kind of device; resume it on the kind it was trained on "
                                  "(an exact resume continues its random streams)") from None
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.apply_speed()  # the resumed config's precision and compile settings
        if self.scaler is not None and ckpt.get("scaler"):  # still fp16: continue its loss scale
            self.scaler.load_state_dict(ckpt["scaler"])

    def resume(self, path: str | Path | None = None, keep: tuple[str, ...] = RESUME_MAY_CHANGE) -> "Learner":
        """Continue from a checkpoint (default out_dir/checkpoint.pt); the config must match. Of the settings a
        resume may change, those in `keep` (default: all) keep this learner's values, the others the checkpoint's."""
        path = path or (self.out_dir / "checkpoint.pt" if self.out_dir else None)
        if path is None:
            raise ConfigError("resume needs a checkpoint path or an out_dir")
        self.load_state_dict(load_checkpoint(path), keep=keep)
        if self.out_dir is not None and self.out_dir.is_dir():
            remove_stale_temporaries(self.out_dir)
        if self.out_dir is not None and Path(path).resolve() == (self.out_dir / "checkpoint.pt").resolve():
            self._claimed = self.out_dir.resolve()  # continuing the run held there
        self._trim_log()
        return self

    def _trim_log(self) -> None:
        """Drop metric records written after the checkpoint (a crashed run's tail), so the resumed log has no
        duplicate steps. Unreadable lines (cut short by a killed writer, or bytes that are not UTF-8) are dropped
        with a warning. The log is rewritten atomically."""
        log = self.out_dir / "metrics.jsonl" if self.out_dir is not None and self.dist.is_main else None
        if log is None or not log.exists():
            return
        keep, torn = [], 0
        original = log.read_bytes()
        for line in original.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                if rec["step"] <= self.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                torn += 1  # a line cut short by a killed writer: dropped, and said
        if torn:
            warnings.warn(f"{log}: dropped {torn} unreadable line(s) (a run killed while writing)", stacklevel=3)
        data = b"".join(line + b"\n" for line in keep)
        if data != original:  # rewritten only when a line goes
            atomic_write(log, lambda tmp: tmp.write_bytes(data))
