"""Multi-process training with torch.distributed (DDP), launched by torchrun.

    torchrun --nproc_per_node=4 -m diffusion_rl train --method td --batch-size 512 ...

`init_from_env()` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
gloo on CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK). Then every learner
- splits the global batch over the ranks (the batch size must divide by the world size);
- draws from its own env, seeded with `rank_seed(seed, rank)` (rank 0 keeps the seed: a 1-process run draws what
  rank 0 of a multi-process run draws);
- sends the online forward through `DistributedDataParallel`, so gradients are averaged over ranks and every rank
  takes the same optimizer step; the target network and the evaluation EMA stay outside DDP and move identically on
  every rank;
- checkpoints on rank 0 with every rank's generator states; logs, results and evaluation are rank 0's.
A 2-process run thus equals a 1-process run on the two ranks' concatenated draws (tests/test_distributed.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["DistInfo", "current", "init_from_env", "rank_seed", "all_gather_objects", "any_rank"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """The process group this process belongs to (a 1-process DistInfo when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def rank_seed(seed: int, rank: int) -> int:
    """The env seed of `rank`: the seed itself on rank 0, a distinct stream on every other rank."""
    return (int(seed) + 1_000_003 * int(rank)) % (2 ** 63)


def init_from_env(device: str = "auto", backend: str = "") -> DistInfo:
    """Join torchrun's process group if WORLD_SIZE > 1 (no-op otherwise); returns this process's DistInfo.

    backend "" picks NCCL when the device is CUDA, gloo otherwise; NCCL without CUDA is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("the nccl backend needs CUDA; on CPU use gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return current()


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] without a process group)."""
    info = current()
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (so that all ranks take a collective decision together)."""
    if current().world_size == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
