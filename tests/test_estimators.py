"""Value estimators with gamma = 1 on image-valued rewards (agents/estimators.py, method.md §7 and §12.7)."""
from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives.value import TD0Estimator, TDLambdaEstimator
from torchrl.objectives.value.functional import td_lambda_return_estimate

from agents import TDEvaluator
from agents.estimators import ESTIMATORS, make_estimator, returns, td_errors
from agents.functional import chain_mask
from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.networks import MLP, Denoiser
from diffusion_rl.training import TrainConfig
from envs import DiffusionMRP

B, T, F = 3, 5, (2, 3, 4)


def _traj(seed: int = 0, feat=F):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, *feat, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, *feat, generator=g, dtype=torch.float64)
    return r, v


def _hand_lambda_return(r, v, lam):
    """G_t = r_t + (1 - lam) v_{t+1} + lam G_{t+1}, G_{T-1} = r_{T-1} + v_T (truncation bootstrap), gamma 1."""
    g = torch.empty_like(r)
    g[:, -1] = r[:, -1] + v[:, -1]
    for t in range(r.shape[1] - 2, -1, -1):
        g[:, t] = r[:, t] + (1 - lam) * v[:, t] + lam * g[:, t + 1]
    return g


def test_names_and_instances():
    assert ESTIMATORS == ("td0", "nstep", "td_lambda")
    for name in ESTIMATORS:
        est = make_estimator(name, lmbda=0.5)
        assert float(est.gamma) == 1.0
    inst = TD0Estimator(gamma=1.0, value_network=None)
    assert make_estimator(inst) is inst
    with pytest.raises(ConfigError, match="'td2'"):
        make_estimator("td2")
    with pytest.raises(ConfigError, match="1.5"):
        make_estimator("td_lambda", lmbda=1.5)
    with pytest.raises(ConfigError, match="-0.1"):
        make_estimator("td_lambda", lmbda=-0.1)


def test_td0_single_transitions_and_td_error():
    g = torch.Generator().manual_seed(1)
    r, v_next, v = (torch.randn(4, *F, generator=g, dtype=torch.float64) for _ in range(3))
    est = make_estimator("td0")
    torch.testing.assert_close(returns(est, r, v_next), r + v_next, rtol=0, atol=1e-12)
    # method.md §4: delta = r + V-(s') - V(s), gamma 1, gradient only through V(s)
    v.requires_grad_(True)
    v_next.requires_grad_(True)
    delta = td_errors(est, v, r, v_next)
    torch.testing.assert_close(delta, r + v_next - v, rtol=0, atol=1e-12)
    delta.sum().backward()
    assert v.grad is not None and torch.all(v.grad == -1)
    assert v_next.grad is None  # the bootstrap value is detached


def test_td_lambda_zero_equals_td0():
    r, v = _traj()
    g_lam = returns(make_estimator("td_lambda", lmbda=0.0), r, v, time_dim=1)
    g_td0 = returns(make_estimator("td0"), r, v, time_dim=1)
    torch.testing.assert_close(g_lam, g_td0, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_td0, r + v, rtol=0, atol=1e-12)


def test_td_lambda_one_equals_monte_carlo_and_nstep():
    r, v = _traj(2)
    mc = r.flip(1).cumsum(1).flip(1) + v[:, -1:]  # sum of remaining rewards + bootstrap at the truncation end
    g1 = returns(make_estimator("td_lambda", lmbda=1.0), r, v, time_dim=1)
    gn = returns(make_estimator("nstep"), r, v, time_dim=1)
    torch.testing.assert_close(g1, mc, rtol=0, atol=1e-12)
    torch.testing.assert_close(gn, mc, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam", [1e-9, 0.3, 0.95])
def test_td_lambda_recursion_and_mixture(lam):
    r, v = _traj(3)
    g = returns(make_estimator("td_lambda", lmbda=lam), r, v, time_dim=1)
    torch.testing.assert_close(g, _hand_lambda_return(r, v, lam), rtol=1e-12, atol=1e-12)
    # method.md §7 (derived): at t = 0 the TD(lambda) return mixes the j-step returns with weights (1-lam) lam^(j-1),
    # the remaining mass lam^(T-1) on the full return
    nstep = [r[:, :j].sum(1) + v[:, j - 1] for j in range(1, T + 1)]
    mix = sum((1 - lam) * lam ** (j - 1) * nstep[j - 1] for j in range(1, T)) + lam ** (T - 1) * nstep[-1]
    torch.testing.assert_close(g[:, 0], mix, rtol=1e-10, atol=1e-10)


def test_truncation_inside_trajectory_bootstraps():
    r, v = _traj(4)
    done = torch.zeros(B, T, dtype=torch.bool)
    done[:, 1] = True  # a chain cut after step 1: returns there bootstrap from V(s_2), not look through
    g = returns(make_estimator("nstep"), r, v, done, time_dim=1)
    torch.testing.assert_close(g[:, 1], r[:, 1] + v[:, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(g[:, 0], r[:, 0] + r[:, 1] + v[:, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(g[:, 2], r[:, 2:].sum(1) + v[:, -1], rtol=0, atol=1e-12)
    # terminated=False everywhere is the default (method.md §2); a terminated flag would drop the bootstrap
    term = torch.zeros(B, T, dtype=torch.bool)
    term[:, -1] = True
    g_term = returns(make_estimator("td0"), r, v, None, term, time_dim=1)
    torch.testing.assert_close(g_term[:, -1], r[:, -1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["td0", "nstep", "td_lambda"])
def test_image_layout_is_pixelwise(name):
    """Pinned layout (method.md §12.7): pixels are flattened to [*B, T, P] with done expanded; this equals both a
    per-pixel scalar computation and TorchRL's image-shaped [*B, T, *F] call with time_dim."""
    r, v = _traj(5)
    est = make_estimator(name, lmbda=0.7)
    g = returns(est, r, v, time_dim=1)
    assert g.shape == r.shape
    # per pixel, one scalar trajectory [B, T, 1] at a time
    rf, vf = r.reshape(B, T, -1), v.reshape(B, T, -1)
    per_pixel = torch.stack([returns(est, rf[..., p:p + 1], vf[..., p:p + 1], time_dim=1)[..., 0]
                             for p in range(rf.shape[-1])], dim=-1).reshape(r.shape)
    torch.testing.assert_close(g, per_pixel, rtol=0, atol=1e-12)
    # TorchRL's functional on image-shaped tensors with time_dim=1 and done/terminated expanded to the image
    lam = {"td0": 0.0, "nstep": 1.0, "td_lambda": 0.7}[name]
    done = torch.zeros(B, T, *F, dtype=torch.bool)
    done[:, -1] = True
    if lam == 0.0:
        ref = r + v
    else:
        ref = td_lambda_return_estimate(1.0, lam, v, r, done, torch.zeros_like(done), time_dim=1)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)


def test_estimator_module_forward_agrees():
    """The estimator's own forward (value_network=None, values read from the tensordict) gives G - V."""
    r, v_next = _traj(6, feat=(4,))
    v = torch.randn_like(r)
    est = TDLambdaEstimator(gamma=1.0, lmbda=0.5, value_network=None, vectorized=False)
    done = torch.zeros(B, T, 4, dtype=torch.bool)
    done[:, -1] = True
    td = TensorDict({"state_value": v, "next": {"state_value": v_next, "reward": r, "done": done,
                                                "terminated": torch.zeros_like(done)}}, [B, T])
    est(td)
    torch.testing.assert_close(td["advantage"], returns(est, r, v_next, time_dim=1) - v, rtol=1e-12, atol=1e-12)


# ---- telescoping through the agent: n-step with stride k == td0 with stride n k (method.md §7) -------------------


def _toy_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("toy", torch.randn(512, 2, generator=g), None, 0, "points")


def _denoiser(env) -> Denoiser:
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1)
    torch.nn.init.normal_(net.out.weight, std=0.3)  # non-trivial outputs (the zero init gives D = c_skip x)
    return Denoiser(net, env.formulation)


@pytest.mark.parametrize("reweighting", ["edm", "pairwise", "linear"])
def test_nstep_stride_k_equals_td0_stride_nk(reweighting):
    """On the same draws, n-step at stride k is TD(0) at stride n k: same TD error, TD term and loss under every
    weighting (the partner's A is taken where the return bootstraps, method.md §6-§7)."""
    n, k, one_step = 3, 1.0, 0.2
    data = _toy_dataset()
    env_k = DiffusionMRP(data, "edm", stride=k, one_step=one_step, seed=3)
    env_nk = DiffusionMRP(data, "edm", stride=n * k, one_step=one_step, seed=3)
    den = _denoiser(env_k)
    cfg = TrainConfig(batch_size=8)
    ag_n = TDEvaluator(env_k, denoiser=copy.deepcopy(den), estimator="nstep", n_steps=n, config=cfg, device="cpu",
                       reweighting=reweighting)
    ag_0 = TDEvaluator(env_nk, denoiser=copy.deepcopy(den), estimator="td0", config=cfg, device="cpu",
                       reweighting=reweighting)
    traj = env_k.sample_trajectories(n, 256)
    keep = chain_mask(traj["valid"], traj["next", "done"].squeeze(-1)).all(1)  # all n transitions in the chain
    assert keep.sum() > 20
    traj = traj[keep]
    first, last = traj[:, 0], traj[:, -1]["next"]
    # the same two states as one td0 transition of stride n k, with that env's own reward
    reward = (env_nk.true_value(first["x0"], first["x"], first["level"])
              - env_nk.true_value(first["x0"], last["x"], last["level"]))
    pair = first.clone()
    pair.set("valid", env_nk.td_valid(first["level"], first["index"]))
    assert pair["valid"].all()
    nxt = last.clone()
    nxt.set("reward", reward)
    pair.set("next", nxt)
    out_n = ag_n.loss(traj)
    out_0 = ag_0.loss(pair)
    for key in ("td_error", "sample_td", "sample_loss"):
        torch.testing.assert_close(out_n[key], out_0[key], rtol=1e-4, atol=2e-4)
    # telescoping of the rewards themselves
    torch.testing.assert_close(traj["next", "reward"].sum(1), reward, rtol=1e-4, atol=2e-4)


def test_multistep_loss_is_taken_at_the_start_state_only():
    """One online forward per sample (the start states), target forwards at the later states (method.md §7)."""
    data = _toy_dataset()
    env = DiffusionMRP(data, "edm", stride=1.0, one_step=0.2, seed=5)
    ag = TDEvaluator(env, denoiser=_denoiser(env), estimator="nstep", n_steps=3, config=TrainConfig(batch_size=8),
                     device="cpu")
    traj = env.sample_trajectories(3, 64)
    online, target = [], []
    ag.denoiser.register_forward_hook(lambda m, a, o: online.append(a[0].shape[0]))
    ag.target.register_forward_hook(lambda m, a, o: target.append(a[0].shape[0]))
    out = ag.loss(traj)
    used = chain_mask(traj["valid"], traj["next", "done"].squeeze(-1))
    assert online == [64] and sum(target) == int(used.sum())
    assert out["valid"].tolist() == traj["valid"][:, 0].tolist()  # TD(0)'s TD-valid samples
    assert out["td_error"].shape == (64, 2) and out["sample_loss"].shape == (64,)


def test_td_lambda_endpoints_and_mixture_through_agent():
    """TD(lambda) at 0 is TD(0) at stride k, at 1 is n-step; in between the lambda-mixture of the two (method.md §7)."""
    data = _toy_dataset()
    env = DiffusionMRP(data, "edm", stride=1.0, one_step=0.2, seed=4)
    den = _denoiser(env)
    cfg = TrainConfig(batch_size=8)

    def loss(**kw):
        return TDEvaluator(env, denoiser=copy.deepcopy(den), config=cfg, device="cpu", **kw).loss(traj)

    traj = env.sample_trajectories(2, 64)
    td0, nstep = loss(estimator="td0"), loss(estimator="nstep", n_steps=2)
    lam0, lam1 = loss(estimator="td_lambda", lmbda=0.0, n_steps=2), loss(estimator="td_lambda", lmbda=1.0, n_steps=2)
    lam = loss(estimator="td_lambda", lmbda=0.3, n_steps=2)
    torch.testing.assert_close(lam0["td_error"], td0["td_error"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lam1["td_error"], nstep["td_error"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lam["td_error"], 0.7 * td0["td_error"] + 0.3 * nstep["td_error"], rtol=1e-5, atol=1e-6)
    # td0 on a chain reads its first transition only: the same as on the pairs of those start states
    torch.testing.assert_close(td0["td_error"], loss(estimator="td0")["td_error"])
    pairs_out = TDEvaluator(env, denoiser=copy.deepcopy(den), config=cfg, device="cpu").loss(traj[:, 0])
    torch.testing.assert_close(td0["sample_loss"], pairs_out["sample_loss"])
    # and by hand: delta = r_0 + V-(s_1) - V(s_0) on TD-valid start states
    ag = TDEvaluator(env, denoiser=copy.deepcopy(den), config=cfg, device="cpu")
    with torch.no_grad():
        v = ag.critic(traj[:, 0].select("x", "level", "label").clone())["state_value"]
        v_next = ag.target_critic(traj[:, 0]["next"].select("x", "level", "label").clone())["state_value"]
    expected = traj[:, 0]["next", "reward"] + v_next - v
    valid = traj["valid"][:, 0]
    torch.testing.assert_close(td0["td_error"][valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert torch.all(td0["td_error"][~valid] == 0)
