"""DDP on CPU (gloo): a 2-process run equals a 1-process run on the two ranks' concatenated draws."""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_rl.build import make_learner
from diffusion_rl.config import Args
from diffusion_rl.distributed import rank_seed
from envs import DiffusionMRP

STEPS, BATCH = 3, 32


def _args(method: str) -> Args:
    return Args(data="moons", method=method, batch_size=BATCH, width=32, lr=1e-2, warmup_steps=0, seed=0,
                device="cpu", progress=False)


def _params(learner) -> dict[str, list[torch.Tensor]]:
    mods = {"online": learner.denoiser, "ema": learner.ema, **learner.extra_modules()}
    return {k: [p.detach().clone() for p in m.parameters()] for k, m in mods.items()}


def _worker(rank: int, world: int, init_file: str, method: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        learner = make_learner(_args(method))
        assert learner.local_batch == BATCH // world and learner.dist.rank == rank
        for _ in range(STEPS):
            learner.update(learner.collect())
        if rank == 0:
            torch.save({**_params(learner), "images_seen": learner.images_seen}, out)
        learner.close()  # release the DDP wrapper while the process group still exists
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["baseline", "td"])
def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(method, tmp_path):
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path / "init"), method, str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180  # a hung rank fails the test instead of the whole suite
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process gloo run did not finish in 180 s")
    ddp = torch.load(out)
    assert ddp.pop("images_seen") == STEPS * BATCH  # the EMA and the target's half-life count global images

    ref = make_learner(_args(method))  # one process, the global batch
    envs = [DiffusionMRP(ref.dataset, ref.formulation, batch_size=[BATCH // 2], seed=rank_seed(0, r), device="cpu")
            for r in (0, 1)]
    for _ in range(STEPS):
        parts = [e.reset_training(BATCH // 2) if method == "baseline" else e.sample_pairs(BATCH // 2) for e in envs]
        ref.update(torch.cat(parts))
    mine = _params(ref)
    assert mine.keys() == ddp.keys()
    for k in mine:
        for a, b in zip(mine[k], ddp[k]):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)  # float32 sums in another order
    assert not all(torch.equal(a, b) for a, b in zip(mine["online"], _params(make_learner(_args(method)))["online"]))


def test_rank_zero_keeps_the_seed_and_other_ranks_get_their_own_streams():
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8


def test_bad_distributed_settings_are_refused_before_work(monkeypatch):
    from diffusion_rl import distributed
    from diffusion_rl.errors import ConfigError

    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=1, world_size=3))
    with pytest.raises(ConfigError, match="batch_size 32 does not divide over 3 processes"):
        make_learner(_args("td"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="the nccl backend needs CUDA"):
            distributed.init_from_env("cpu", backend="nccl")
        with pytest.raises(ConfigError, match="device cuda requested but CUDA is not available"):
            distributed.init_from_env("cuda")


DYING_RANK = """
import sys
import diffusion_rl.training as T
from diffusion_rl.cli import main

update = T.Learner.update
def dying_update(self, batch, **kw):
    if self.dist.rank == 1 and self.step == 6:
        raise RuntimeError("rank 1 dies")
    return update(self, batch, **kw)
T.Learner.update = dying_update
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_dies_stops_the_torchrun_job_and_the_last_checkpoint_stays(tmp_path):
    import subprocess
    import sys

    from diffusion_rl.checkpoints import load_checkpoint

    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), "train", "--data",
           "moons", "--batch-size", "16", "--steps", "50", "--checkpoint-every", "2", "--no-eval", "--no-progress",
           "--out", str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "rank 1 dies" in proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 120  # torchrun stops the surviving rank; nothing waits for a collective timeout
    ckpt = load_checkpoint(out / "edm-baseline" / "checkpoint.pt")  # rank 0's last good checkpoint, intact
    assert ckpt["step"] == 6 and ckpt["config"]["world_size"] == 2
