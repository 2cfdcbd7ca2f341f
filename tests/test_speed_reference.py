"""benchmarks.speed's minimal reference computes the library's TD-EDM objective: the RL layer's overhead is measured
against the same maths, not a cheaper loss."""
from __future__ import annotations

import torch

from benchmarks.speed import MinimalTDStep
from diffusion_rl.build import make_learner
from diffusion_rl.config import Args
from diffusion_rl.data import load_dataset


def test_the_minimal_step_is_the_agents_objective():
    agent = make_learner(Args(method="td", batch_size=64, width=8, eval=False), dataset=load_dataset("digits"))
    agent.out_dir = None
    with torch.no_grad():  # a target that differs from the online network
        for p in agent.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref = MinimalTDStep(agent)
    batch = agent.env.sample_pairs(64)
    x0, s, x = batch["x0"], batch["level"], batch["x"]
    s_n, x_n = batch["next", "level"], batch["next", "x"]
    # the partner from the same draws: the Markov kernel k index units on (method.md §2)
    s_ref, _ = ref.partner(x0, s, x, torch.zeros_like(x))
    torch.testing.assert_close(s_ref, s_n)
    out = agent.loss(batch)
    torch.testing.assert_close(ref.loss(x0, s, x, s_n, x_n), out["loss_td"] + out["loss_base"], rtol=1e-5, atol=1e-6)
    assert out["valid_fraction"] < 1  # the invalid branch is exercised too
    before = [p.clone() for p in ref.net.parameters()]
    ref()
    assert any(not torch.equal(a, b) for a, b in zip(before, ref.net.parameters()))
