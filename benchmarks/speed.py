"""Speed: what the RL layer costs, TD step / baseline step, and one sampling pass; JSON with its command.

    python -m benchmarks.speed [--data digits] [--batch-size 128] [--width 32] [--repeats 40]

Three training steps are timed interleaved in one run (round-robin, so machine load hits them alike), on the same
network, batch size and maths:
- `td_rl`:    the TDEvaluator step, `agent.update(agent.collect())`: env reset + step, TensorDicts, the critic
              module, TorchRL's estimator, the TDLoss module, SoftUpdate;
- `td_minimal`: the same TD-EDM step as docs/method.md states it, in plain tensors around the same raw network
              (`MinimalTDStep`: no library code in the step);
- `baseline`: the EDM baseline step, `baseline.update(baseline.collect())`.
Reported: median seconds of each, rl_overhead = td_rl / td_minimal - 1 (target <= 5% on digits at batch 128, on an
idle machine), and td_over_baseline = td_rl / baseline (target <= 1.30). Then one Heun sampling pass.
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


class MinimalTDStep:
    """TD-EDM (TD(0), Markov coupling, EDM weight, soft target) as docs/method.md §1-§6 states it, in plain tensors
    around copies of the agent's raw network: the rho grid, log-normal levels, the Markov reverse kernel, EDM's
    preconditioning, the loss, Adam, the evaluation EMA and the target EMA, and nothing of the library in the step
    (no formulation, env, TensorDict, critic, estimator or loss module). The target runs on the TD-valid partners
    only on a CPU and on every partner, masked, on a GPU, as the library does. `loss` on the env's own draws equals
    the agent's loss (tested)."""

    def __init__(self, agent) -> None:
        f, env = agent.formulation, agent.env
        self.N, self.smin, self.smax, self.rho = f.steps, f.sigma_min, f.sigma_max, f.rho
        self.sd, self.p_mean, self.p_std = f.sigma_data, f.p_mean, f.p_std
        self.k, self.delta, self.lam, self.tau = env.stride, env.one_step, agent.base_lambda, agent.tau
        self.net = copy.deepcopy(agent.denoiser.net)
        self.target = copy.deepcopy(agent.target.net).eval().requires_grad_(False)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=agent.config.lr)
        self.device, self.batch = agent.device, agent.config.batch_size
        self.images = agent.dataset.x.to(self.device)
        self.ema_beta = 0.5 ** (self.batch / agent.config.ema_halflife_images)
        self.g = torch.Generator(device=self.device).manual_seed(0)

    def sigma_of(self, i: torch.Tensor) -> torch.Tensor:  # method.md §1
        a, b = self.smax ** (1 / self.rho), self.smin ** (1 / self.rho)
        return (a + i / (self.N - 1) * (b - a)).clamp(b, a) ** self.rho

    def index_of(self, s: torch.Tensor) -> torch.Tensor:
        a, b = self.smax ** (1 / self.rho), self.smin ** (1 / self.rho)
        return (s.clamp(self.smin, self.smax) ** (1 / self.rho) - a) / (b - a) * (self.N - 1)

    def denoise(self, net, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # EDM's preconditioning
        s4 = s.view(-1, *[1] * (x.dim() - 1))
        var = s4 ** 2 + self.sd ** 2
        out = net(x / var.sqrt(), s.log() / 4, None)
        return self.sd ** 2 / var * x + s4 * self.sd / var.sqrt() * out

    def partner(self, x0: torch.Tensor, s: torch.Tensor, x: torch.Tensor, z: torch.Tensor):
        """(sigma', x') k index units on, x' from the Markov reverse kernel with noise z (method.md §2)."""
        s_n = torch.minimum(self.sigma_of((self.index_of(s) + self.k).clamp(max=self.N - 1)), s)
        r2 = ((s_n / s) ** 2).view(-1, *[1] * (x.dim() - 1))
        return s_n, x0 + r2 * (x - x0) + s_n.view_as(r2) * (1 - r2).clamp(min=0).sqrt() * z

    def loss(self, x0: torch.Tensor, s: torch.Tensor, x: torch.Tensor, s_n: torch.Tensor,
             x_n: torch.Tensor) -> torch.Tensor:
        """The batch's TD-EDM objective (method.md §4-§6)."""
        e = lambda v: v.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
        valid = (s >= self.smin) & (s <= self.smax) & (self.index_of(s) <= self.N - 1 - self.k - self.delta)
        A = 1 - (self.sigma_of(self.index_of(s) + self.delta) / s) ** 2
        A_n = 1 - (self.sigma_of(self.index_of(s_n) + self.delta) / s_n) ** 2
        D = self.denoise(self.net, x, s)
        with torch.no_grad():  # the partners TD uses: indexed on a CPU, masked on a GPU (no sync), as the library
            if x.device.type == "cpu":
                D_n = torch.zeros_like(x)
                D_n[valid] = self.denoise(self.target, x_n[valid], s_n[valid])
            else:
                D_n = torch.where(e(valid), self.denoise(self.target, x_n, s_n), 0.0)
        err = e(A) * (x0 - D) - e(A_n) * (x0 - D_n)  # r + V-(s') - V(s): the kappa x terms cancel
        c_out2 = (s * self.sd) ** 2 / (s ** 2 + self.sd ** 2)
        td = err.pow(2).flatten(1).mean(1) / (A ** 2 * c_out2).clamp(min=1e-8)
        base = (D - x0).pow(2).flatten(1).mean(1) / c_out2
        return torch.where(valid, td + self.lam * base, (1 + self.lam) * base).mean()

    def __call__(self) -> None:
        n, dev = self.batch, self.device
        x0 = self.images[torch.randint(len(self.images), (n,), device=dev, generator=self.g)]
        s = (self.p_mean + self.p_std * torch.randn(n, device=dev, generator=self.g)).exp()
        x = x0 + s.view(-1, *[1] * (x0.dim() - 1)) * torch.randn(x0.shape, device=dev, generator=self.g)
        s_n, x_n = self.partner(x0, s, x, torch.randn(x0.shape, device=dev, generator=self.g))
        self.net.train()
        loss = self.loss(x0, s, x, s_n, x_n)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            params = list(self.net.parameters())
            torch._foreach_lerp_(list(self.ema.parameters()), params, 1 - self.ema_beta)
            torch._foreach_lerp_(list(self.target.parameters()), params, 1 - self.tau)


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
    steps = {"td_rl": lambda: agent.update(agent.collect(), check=False), "td_minimal": MinimalTDStep(agent),
             "baseline": lambda: base.update(base.collect(), check=False)}
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
        "rl_overhead": round(med["td_rl"] / med["td_minimal"] - 1, 4),
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
