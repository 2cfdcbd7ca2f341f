"""The critic (envs/critic.py): V(s) = A D(x) + kappa x, read from observable keys only."""
from __future__ import annotations

import pytest
import torch
from tensordict.nn import TensorDictModule

from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import make_formulation
from diffusion_rl.networks import Denoiser, build_network
from envs import DiffusionMRP, ValueNet, make_critic


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised output layer random weights so D depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _denoiser(shape, form, num_classes=0, seed=0):
    torch.manual_seed(seed)
    net = build_network(shape, num_classes=num_classes, width=16 if len(shape) > 1 else 32)
    return Denoiser(_randomize(net, seed), make_formulation(form))


@pytest.mark.parametrize("form", ["edm", "vp", "ct"])
@pytest.mark.parametrize("coupling", ["markov", "shared"])
def test_value_is_A_D_plus_kappa_x(form, coupling, points):
    env = DiffusionMRP(points, form, batch_size=(16,), coupling=coupling, seed=0)
    den = _denoiser((2,), env.formulation)
    critic = make_critic(den, env.formulation, env.one_step, coupling)
    assert isinstance(critic, TensorDictModule)
    td = env.reset()
    out = critic(td.clone())
    with torch.no_grad():
        D = den(td["x"], td["level"])
        A, kappa = env.formulation.one_step_posterior(td["level"], env.one_step, coupling)
    # VP values live in variance-exploding units: x~ = x / sqrt(abar) (method.md §9)
    x = td["x"] / env.formulation.alpha_bar(td["level"]).sqrt()[:, None] if form == "vp" else td["x"]
    torch.testing.assert_close(out["denoised"], D)
    torch.testing.assert_close(out["state_value"], A[:, None] * D + kappa[:, None] * x)


def test_critic_cannot_read_x0(digits):
    env = DiffusionMRP(digits, "edm", batch_size=(4,), seed=0)
    den = _denoiser((1, 8, 8), env.formulation, num_classes=10)
    critic = make_critic(den, env.formulation, env.one_step, "markov")
    assert "x0" not in critic.in_keys
    td = env.reset()
    out1 = critic(td.clone())
    td2 = td.clone()
    td2["x0"] = torch.randn_like(td2["x0"]) * 100
    out2 = critic(td2)
    assert torch.equal(out1["state_value"], out2["state_value"])
    assert torch.equal(out1["denoised"], out2["denoised"])
    td3 = td.clone().exclude("x0")
    assert torch.equal(critic(td3)["state_value"], out1["state_value"])
    for keys in (["x", "level", "x0"], ["x0", "level", "label"], ["x", ("next", "x0"), "label"]):
        with pytest.raises(ConfigError, match="x0"):
            make_critic(den, env.formulation, env.one_step, "markov", in_keys=keys)


def test_labels_only_for_conditional_nets(digits):
    env = DiffusionMRP(digits, "edm", batch_size=(3,), seed=0)
    td = env.reset()
    td_other = td.clone()
    td_other["label"] = (td["label"] + 1) % 10
    cond = make_critic(_denoiser((1, 8, 8), "edm", num_classes=10), "edm", env.one_step)
    assert not torch.equal(cond(td.clone())["denoised"], cond(td_other.clone())["denoised"])
    uncond = make_critic(_denoiser((1, 8, 8), "edm", num_classes=0), "edm", env.one_step)
    assert torch.equal(uncond(td.clone())["denoised"], uncond(td_other.clone())["denoised"])


def test_critic_on_rollout_batch_dims(points):
    env = DiffusionMRP(points, "edm", batch_size=(3,), seed=0)
    critic = make_critic(_denoiser((2,), "edm"), env.formulation, env.one_step)
    ro = env.rollout(10)
    out = critic(ro.clone())
    assert out["state_value"].shape == ro["x"].shape
    nxt = critic(ro["next"].clone())
    assert nxt["state_value"].shape == ro["next", "x"].shape
    flat = critic(ro.reshape(-1).clone())
    torch.testing.assert_close(out["state_value"].reshape(-1, 2), flat["state_value"])


@pytest.mark.parametrize("form", ["edm", "vp"])
def test_td_error_identity(form, points):
    """method.md §4: r + V(s') - V(s) = A_t (x0 - D(x_t)) - A_t' (x0 - D(x_t')) (the kappa x terms cancel)."""
    env = DiffusionMRP(points, form, seed=0, dtype=torch.float64)
    den = _denoiser((2,), env.formulation).double()
    critic = make_critic(den, env.formulation, env.one_step)
    p = env.sample_pairs(64)
    with torch.no_grad():
        v = critic(p.clone())["state_value"]
        v_next = critic(p["next"].clone())["state_value"]
        D, Dn = den(p["x"], p["level"]), den(p["next", "x"], p["next", "level"])
    f = env.formulation
    A_t, _ = f.one_step_posterior(p["level"], env.one_step)
    A_s, _ = f.one_step_posterior(p["next", "level"], env.one_step)
    delta = p["next", "reward"] + v_next - v
    ref = A_t[:, None] * (p["x0"] - D) - A_s[:, None] * (p["x0"] - Dn)
    torch.testing.assert_close(delta, ref, atol=1e-8, rtol=1e-6)


def test_true_denoiser_value_is_true_mean(points):
    """With D = x0 the critic's value is mu_true, so TD errors vanish (the Bellman fixed point)."""
    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conditional = False
            self.formulation = make_formulation("edm")
            self.x0 = None

        def forward(self, x, level, labels=None):
            return self.x0

    env = DiffusionMRP(points, "edm", seed=0)
    p = env.sample_pairs(32)
    oracle = Oracle()
    vn = ValueNet(oracle, None, env.one_step, "markov")
    oracle.x0 = p["x0"]
    _, v = vn(p["x"], p["level"], p["label"])
    _, vn_next = vn(p["next", "x"], p["next", "level"], p["next", "label"])
    torch.testing.assert_close(p["next", "reward"] + vn_next - v, torch.zeros_like(v), atol=1e-4, rtol=0)


def test_value_net_bad_config():
    den = _denoiser((2,), "edm")
    with pytest.raises(ConfigError, match="nope"):
        ValueNet(den, None, 0.2, "nope")
    with pytest.raises(ConfigError, match="-0.5"):
        ValueNet(den, None, -0.5)
    with pytest.raises(ConfigError, match="99"):
        ValueNet(den, None, 99.0)
    assert ValueNet(den).one_step == pytest.approx(0.2)
