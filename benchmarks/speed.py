"""Speed: what the RL layer costs, TD step / baseline step, and one sampling pass; JSON with its command.

    python -m benchmarks.speed [--data digits] [--batch-size 128] [--width 32] [--repeats 40]

Three training steps are timed interleaved in one run (round-robin, so machine load hits them alike), on the same
network, batch size and maths:
- `td_rl`:    the TDEvaluator step, `agent.update(agent.collect())`: env reset + step, TensorDicts, the critic
              module, TorchRL's estimator, the TDLoss module, SoftUpdate;
- `td_fused`: the same TD-EDM step written with plain tensors (no env, TensorDict or estimator);
- `baseline`: the EDM baseline step, `baseline.update(baseline.collect())`.
Reported: median seconds of each, rl_overhead = td_rl / td_fused - 1 (target <= 5% on digits at batch 128), and
td_over_baseline = td_rl / baseline. Then one Heun sampling pass.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from agents.functional import combine_losses, mean_pixels, td_weight
from diffusion_rl.build import make_learner
from diffusion_rl.config import Args, add_dataclass_args, dataclass_from_args, opt
from diffusion_rl.data import load_dataset
from diffusion_rl.samplers import sample


@dataclass
class BenchArgs:
    data: str = opt("digits", "data set")
    batch_size: int = opt(128, "training batch")
    width: int = opt(32, "network width")
    repeats: int = opt(40, "timed calls of each step (interleaved)")
    warmup: int = opt(5, "untimed calls of each step first")
    sample_batch: int = opt(500, "samples per sampling pass")
    nfe: int = opt(35, "NFE of the timed sampling pass (Heun)")
    device: str = opt("auto", "auto | cpu | cuda")
    out: str = opt("benchmarks/results/speed.json", "the JSON written")


class FusedTDStep:
    """The TDEvaluator's TD-EDM step (td0, Markov, edm weight, soft target) in plain tensors, on copies of the
    agent's networks: draw x0 and a training level, x ~ q(x | x0), x' from the reverse kernel, the loss of
    method.md §5 with r + V-(x') - V(x) (§4), Adam, the evaluation EMA and the target EMA. The transition, reward
    and TD-valid rule come from the env's plain-tensor maths (`env._transition`, its one copy); what is left out
    is the RL layer itself: EnvBase.step, TensorDicts, the critic module, the estimator, the LossModule."""

    def __init__(self, agent) -> None:
        self.net, self.target = copy.deepcopy(agent.denoiser), copy.deepcopy(agent.target)
        self.ema = copy.deepcopy(agent.ema)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=agent.config.lr)
        self.form, self.data, self.device = agent.formulation, agent.dataset, agent.device
        self.env = env = agent.env
        self.one_step = env.one_step
        self.lam, self.tau, self.batch = agent.base_lambda, agent.tau, agent.config.batch_size
        self.ema_beta = 0.5 ** (self.batch / agent.config.ema_halflife_images)
        self.g = torch.Generator(device=self.device).manual_seed(0)
        self.g_data = torch.Generator().manual_seed(1)

    def __call__(self) -> None:
        f, n, dev = self.form, self.batch, self.device
        x0 = self.data.draw(n, self.g_data)[0].to(dev)
        level = f.sample_training_level(n, self.g_data, "cpu").to(dev)
        index = f.index(level)
        x = f.add_noise(x0, level, torch.randn(x0.shape, generator=self.g, device=dev))
        valid = self.env.td_valid(level, index)
        nxt = self.env._transition(x, level, index, x0)
        x_n, level_n, reward = nxt["x"], nxt["level"], nxt["reward"]
        self.net.train()
        D = self.net(x, level)
        value = f.one_step_mean(D, x, level, self.one_step)
        next_value = torch.zeros_like(value)
        with torch.no_grad():
            self.target.eval()
            d_n = self.target(x_n[valid], level_n[valid])
            next_value[valid] = f.one_step_mean(d_n, x_n[valid], level_n[valid], self.one_step)
        delta = torch.where(valid.reshape(-1, *[1] * (x.dim() - 1)), reward + next_value - value, 0.0)
        A_t, _ = f.one_step_posterior(level, self.one_step)
        A_n, _ = f.one_step_posterior(level_n, self.one_step)
        td = td_weight("edm", A_t, A_n, f.preconditioning(level)[1]) * mean_pixels(delta.pow(2))
        loss = combine_losses(torch.where(valid, td, 0.0), f.base_loss(D, x0, level), valid, self.lam).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for p_e, p_t, p in zip(self.ema.parameters(), self.target.parameters(), self.net.parameters()):
                p_e.lerp_(p, 1 - self.ema_beta)
                p_t.lerp_(p, 1 - self.tau)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(p, BenchArgs)
    a = dataclass_from_args(BenchArgs, p.parse_args())
    dataset = load_dataset(a.data)
    learners = {m: make_learner(Args(data=a.data, method=m, batch_size=a.batch_size, width=a.width,
                                     device=a.device, progress=False), dataset=dataset) for m in ("baseline", "td")}
    for learner in learners.values():
        learner.out_dir = None
    agent, base = learners["td"], learners["baseline"]
    dev = agent.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps = {"td_rl": lambda: agent.update(agent.collect()), "td_fused": FusedTDStep(agent),
             "baseline": lambda: base.update(base.collect())}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(a.warmup + a.repeats):
        for name, fn in steps.items():  # round-robin: every step sees the same machine load
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    den = agent.ema
    shape = (a.sample_batch, *dataset.sample_shape)
    sample(den, den.formulation, shape, nfe=a.nfe, device=dev)  # warm-up
    sync()
    t0 = time.perf_counter()
    sample(den, den.formulation, shape, nfe=a.nfe, device=dev)
    sync()
    record = {
        "benchmark": "speed",
        "train_step_s": {k: round(v, 5) for k, v in med.items()},
        "rl_overhead": round(med["td_rl"] / med["td_fused"] - 1, 4),
        "td_over_baseline": round(med["td_rl"] / med["baseline"], 4),
        f"sample_pass_s_heun_nfe{a.nfe}_batch{a.sample_batch}": round(time.perf_counter() - t0, 3),
        "config": asdict(a), "device": str(dev),
        "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": " ".join(shlex.quote(x) for x in ["python", "-m", "benchmarks.speed", *sys.argv[1:]]),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
