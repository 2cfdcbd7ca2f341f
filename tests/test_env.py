"""The diffusion MRP environment (envs/diffusion_mrp.py, envs/gym_env.py): specs, dynamics, rewards, draws."""
from __future__ import annotations

import importlib
import math

import gymnasium
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

import envs
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import CTFormulation, EDMFormulation, VPFormulation
from envs import DiffusionMRP, single_action_policy

from agents.functional import chain_mask

STATE = ("x", "level", "index", "label")  # observations that follow the state (x0 is hidden state)
DONE = ("done", "terminated", "truncated")


def data_for(name, points, digits):
    return points if name == "points" else digits


# ---------------------------------------------------------------- specs and rollouts ----------------------------

@pytest.mark.parametrize("data,form", [("digits", "edm"), ("digits", "vp"), ("points", "edm"), ("points", "vp"),
                                       ("points", "ct")])
def test_check_env_specs(data, form, points, digits):
    env = DiffusionMRP(data_for(data, points, digits), form, batch_size=(3,), seed=0)
    check_env_specs(env, seed=0)


def test_check_env_specs_random_start_and_2d_batch(points):
    env = DiffusionMRP(points, "edm", batch_size=(2, 3), start="random", seed=1)
    check_env_specs(env, seed=1, break_when_any_done="all")
    td = env.reset()
    assert td["index"].shape == (2, 3)
    hi = env.last_index - (env.stride + env.one_step)
    assert (td["index"] >= 0).all() and (td["index"] <= hi).all()


@pytest.mark.parametrize("form", ["edm", "vp", "ct"])
def test_rollout_shapes_strides_truncation(form, points):
    B = 4
    env = DiffusionMRP(points, form, batch_size=(B,), seed=0)
    N1 = env.formulation.steps - 1
    k, d = env.stride, env.one_step
    T_expected = math.ceil(N1 / k - 1e-6)  # states 0, k, 2k, ... and a last, shorter step onto N-1
    ro = env.rollout(1000)
    T = ro.batch_size[1]
    assert ro.batch_size == (B, T) and T == T_expected
    assert ro["x"].shape == (B, T, 2) and ro["next", "reward"].shape == (B, T, 2)
    for key in DONE:
        assert ro[key].shape == (B, T, 1) and ro["next", key].shape == (B, T, 1)
    idx = ro["index"]
    torch.testing.assert_close(ro["next", "index"], (idx + k).clamp(max=N1))
    torch.testing.assert_close(idx[:, 0], torch.zeros(B))
    torch.testing.assert_close(ro["next", "level"], env.formulation.level(ro["next", "index"]))
    assert not ro["next", "terminated"].any()
    trunc = ro["next", "truncated"].squeeze(-1)
    assert trunc[:, -1].all() and not trunc[:, :-1].any()
    assert torch.equal(ro["next", "done"], ro["next", "truncated"])
    # rollouts from the noisiest level reach the sigma_min end of the grid
    torch.testing.assert_close(ro["next", "index"][:, -1], torch.full((B,), float(N1)))
    lo = env.formulation.level(torch.tensor(float(N1)))
    torch.testing.assert_close(ro["next", "level"][:, -1], lo.expand(B).to(ro["level"].dtype))
    # TD-valid rows: a full stride and its one-step shift fit in the grid (method.md §5.2)
    torch.testing.assert_close(ro["valid"], idx <= N1 - (k + d))
    # x0 is hidden state, carried unchanged along the episode and never written as an observation
    assert torch.equal(ro["x0"][:, 1:], ro["x0"][:, :-1]) and ("next", "x0") not in ro.keys(True)
    assert torch.equal(ro["label"], ro["next", "label"])


def test_family_policy_on_formulations():
    edm, vp, ct = EDMFormulation(), VPFormulation(), CTFormulation()
    assert (edm.default_stride, edm.default_one_step) == (3.0, 0.2)
    assert (vp.default_stride, vp.default_one_step) == (3.0, 0.2)  # VP's TD grid is EDM's rho grid of sigma~
    assert (ct.default_stride, ct.default_one_step) == (1.0, 0.25)
    assert [f.default_coupling for f in (edm, vp, ct)] == ["markov", "markov", "shared"]
    assert [f.default_reweighting for f in (edm, vp, ct)] == ["edm", "edm", "pairwise"]
    assert [f.consistency for f in (edm, vp, ct)] == [False, False, True]
    assert DiffusionMRP("8gaussians", "ct", seed=0).coupling == "shared"


def test_x0_is_hidden_state_not_an_observation(points, digits):
    """No key of the observation specs holds x0: it is environment state, read by the reward only."""
    for data in (points, digits):
        env = DiffusionMRP(data, "edm", batch_size=(3,), seed=0)
        obs_keys = set(env.observation_spec.keys(True, True))
        assert obs_keys == {"x", "level", "index", "label", "valid"}
        assert "x0" not in obs_keys and "x0" in env.state_spec.keys()
        ro = env.rollout(3, policy=single_action_policy)
        for key in obs_keys:  # and no observation carries the clean sample under another name
            v = ro[key]
            assert v.shape != ro["x0"].shape or not torch.equal(v, ro["x0"]), key
        # a critic built from the observation specs reads what it is given: x0 is not among them
        from envs.critic import check_critic_keys
        check_critic_keys(list(obs_keys))


def test_training_start_draws_the_formulations_levels(points):
    env = DiffusionMRP(points, "edm", seed=0, start="train")
    td = env.reset(TensorDict(batch_size=[40_000]))
    log_sigma = td["level"].log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)  # method.md §5.1: ln sigma ~ N(-1.2, 1.2^2)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)
    assert torch.equal(td["valid"], env.td_valid(td["level"], td["index"]))
    vp = DiffusionMRP(points, "vp", seed=0).reset_training(5000)["level"]
    assert vp.min() >= 1 and vp.max() <= 1000 and torch.equal(vp, vp.round())


def test_digits_rollout_image_reward(digits):
    env = DiffusionMRP(digits, "edm", batch_size=(2,), seed=0)
    ro = env.rollout(100)
    assert ro["next", "reward"].shape == (2, 6, 1, 8, 8)
    assert ro["label"].dtype == torch.int64
    assert ((ro["label"] >= 0) & (ro["label"] < 10)).all()


@pytest.mark.parametrize("form", ["edm", "vp", "ct"])
@pytest.mark.parametrize("coupling", ["markov", "shared"])
def test_rewards_telescope(form, coupling, points):
    env = DiffusionMRP(points, form, batch_size=(8,), coupling=coupling, seed=3, dtype=torch.float64)
    ro = env.rollout(1000)
    f = env.formulation
    mu0 = f.one_step_mean(ro["x0"][:, 0], ro["x"][:, 0], ro["level"][:, 0], env.one_step, coupling)
    muT = f.one_step_mean(ro["x0"][:, -1], ro["next", "x"][:, -1], ro["next", "level"][:, -1], env.one_step, coupling)
    torch.testing.assert_close(ro["next", "reward"].sum(1), mu0 - muT, atol=1e-5, rtol=0)
    # each reward is mu_true(s) - mu_true(s')
    r0 = mu0 - f.one_step_mean(ro["x0"][:, 0], ro["next", "x"][:, 0], ro["next", "level"][:, 0], env.one_step,
                               coupling)
    torch.testing.assert_close(ro["next", "reward"][:, 0], r0, atol=1e-9, rtol=0)


def test_rewards_telescope_float32(points):
    env = DiffusionMRP(points, "edm", batch_size=(8,), seed=3)
    ro = env.rollout(1000)
    f = env.formulation
    mu0 = f.one_step_mean(ro["x0"][:, 0], ro["x"][:, 0], ro["level"][:, 0], env.one_step)
    muT = f.one_step_mean(ro["x0"][:, -1], ro["next", "x"][:, -1], ro["next", "level"][:, -1], env.one_step)
    scale = mu0.abs().max()
    assert (ro["next", "reward"].sum(1) - (mu0 - muT)).abs().max() <= 1e-6 * scale


def test_unbatched_env_takes_batch_from_reset(points):
    env = DiffusionMRP(points, "edm", batch_size=(), seed=0)
    check_env_specs(env, seed=0)
    td = env.reset(TensorDict(batch_size=[7]))
    assert td["x"].shape == (7, 2) and td["index"].shape == (7,)
    ro = env.rollout(100, tensordict=td, auto_reset=False)
    assert ro.batch_size == (7, 6)
    single = env.reset()
    assert single["x"].shape == (2,) and single["level"].shape == ()


def test_auto_reset_after_truncation(points):
    env = DiffusionMRP(points, "edm", batch_size=(2,), seed=0)
    ro = env.rollout(12, break_when_any_done=False)
    assert ro.batch_size == (2, 12)
    # 6 steps per episode (0, 3, ..., 15, then onto 17), then a fresh episode at index 0
    torch.testing.assert_close(ro["index"][:, 6], torch.zeros(2))
    torch.testing.assert_close(ro["index"][:, 7], torch.full((2,), 3.0))


# ---------------------------------------------------------------- the reverse kernel ----------------------------

@pytest.mark.parametrize("form", ["edm", "vp"])
def test_markov_kernel_moments(form, points):
    """Monte Carlo: x' | x, x0 has mean A x0 + kappa x and per-pixel variance posterior_variance (method.md §2-§4)."""
    M = 200_000
    env = DiffusionMRP(points, form, batch_size=(), seed=11, dtype=torch.float64)
    f = env.formulation
    idx = torch.tensor(env.stride + 1.5, dtype=torch.float64)  # off-grid: a fractional index
    level = f.level(idx)
    level_next = f.level(idx + env.stride)
    x0 = torch.tensor([0.7, -1.2], dtype=torch.float64)
    x = torch.tensor([3.0, 1.0], dtype=torch.float64) * (level if form == "edm" else 1.0)
    td = TensorDict({"x": x.expand(M, 2).clone(), "level": level.expand(M).clone(), "index": idx.expand(M).clone(),
                     "label": torch.zeros(M, dtype=torch.int64), "x0": x0.expand(M, 2).clone(),
                     "action": torch.zeros(M, dtype=torch.int64)}, batch_size=[M])
    nxt = env.step(td)["next"]
    A, kappa = f.posterior(level, level_next, "markov")
    var = f.posterior_variance(level, level_next, "markov")
    mean = A * x0 + kappa * x
    sample_mean, sample_var = nxt["x"].mean(0), nxt["x"].var(0)
    se = (var / M).sqrt()
    assert ((sample_mean - mean).abs() <= 5 * se).all(), (sample_mean, mean)
    assert ((sample_var / var - 1).abs() <= 5 * math.sqrt(2 / M)).all(), (sample_var, var)
    torch.testing.assert_close(nxt["level"], level_next.expand(M))


@pytest.mark.parametrize("form", ["edm", "vp"])
def test_shared_kernel_is_deterministic(form, points):
    env = DiffusionMRP(points, form, batch_size=(5,), coupling="shared", seed=0, dtype=torch.float64)
    td = env.reset()
    td["action"] = torch.zeros(5, dtype=torch.int64)
    nxt = env.step(td.clone())["next"]
    A, kappa = env.formulation.posterior(td["level"], nxt["level"], "shared")
    torch.testing.assert_close(nxt["x"], A[:, None] * td["x0"] + kappa[:, None] * td["x"])


def test_markov_pairs_increments_independent(points):
    """EDM Markov pairs: x_t - x_t' ~ N(0, sigma_t^2 - sigma_t'^2), independent of x_t' - x0 ~ N(0, sigma_t'^2)."""
    env = DiffusionMRP(points, "edm", seed=5, dtype=torch.float64)
    p = env.sample_pairs(100_000)
    st, ss = p["level"], p["next", "level"]
    keep = st > ss * 1.01
    d1 = (p["x"] - p["next", "x"])[keep] / (st[keep] ** 2 - ss[keep] ** 2).sqrt()[:, None]
    d2 = (p["next", "x"] - p["x0"])[keep] / ss[keep][:, None]
    n = d1.shape[0]
    tol = 5 / math.sqrt(n)
    for z in (d1, d2):
        assert (z.mean(0).abs() < tol).all()
        assert ((z.var(0) - 1).abs() < 5 * math.sqrt(2 / n)).all()
    corr = (d1 * d2).mean(0)
    assert (corr.abs() < tol).all()
    # the unnormalised form, per sample: E[(x_t - x_t')^2] = sigma_t^2 - sigma_t'^2
    ratio = ((p["x"] - p["next", "x"])[keep] ** 2).mean(1) / (st[keep] ** 2 - ss[keep] ** 2)
    assert abs(ratio.mean().item() - 1) < 0.02


# ---------------------------------------------------------------- sample_pairs ----------------------------------

def _edm_index_reference(sigma: torch.Tensor, f: EDMFormulation) -> torch.Tensor:
    a, b = f.sigma_max ** (1 / f.rho), f.sigma_min ** (1 / f.rho)
    s = sigma.double().clamp(f.sigma_min, f.sigma_max)
    return (s ** (1 / f.rho) - a) / (b - a) * (f.steps - 1)


def test_sample_pairs_keys_match_rollout(points, digits):
    for data in (points, digits):
        env = DiffusionMRP(data, "edm", seed=0)
        ro = env.rollout(3, tensordict=env.reset(TensorDict(batch_size=[2])), auto_reset=False)
        p = env.sample_pairs(6)
        assert set(p.keys(True, True)) == set(ro.keys(True, True))
        assert p.batch_size == (6,)
        for key in ro.keys(True, True):
            assert p[key].shape[1:] == ro[key].shape[2:], key
            assert p[key].dtype == ro[key].dtype, key
        assert p["valid"].dtype == torch.bool and p["valid"].shape == (6,)


def test_sample_pairs_valid_mask_edm(points):
    env = DiffusionMRP(points, "edm", seed=0)
    f = env.formulation
    p = env.sample_pairs(20_000)
    sigma = p["level"]
    i_ref = _edm_index_reference(sigma, f)
    thr = (f.steps - 1) - (env.stride + env.one_step)
    ref = (sigma >= f.sigma_min) & (sigma <= f.sigma_max) & (i_ref <= thr)
    clear = (i_ref - thr).abs() > 1e-4
    assert torch.equal(p["valid"][clear], ref[clear])
    assert p["valid"].any() and (~p["valid"]).any()
    # training levels are the raw log-normal sigmas: some fall off the grid, and those are invalid
    assert not p["valid"][(sigma > f.sigma_max) | (sigma < f.sigma_min)].any()
    torch.testing.assert_close(p["index"].double(), i_ref, atol=1e-3, rtol=0)
    # partner: stride index units on (the last step stops at N-1); valid ones are never clamped; finite everywhere
    torch.testing.assert_close(p["next", "index"], (p["index"] + env.stride).clamp(max=f.steps - 1))
    # ... and never noisier than the state itself (a sigma_t below sigma_min keeps its own level)
    torch.testing.assert_close(p["next", "level"], torch.minimum(f.level(p["index"] + env.stride), p["level"]))
    for key in ("x", "level", "index", "reward"):
        assert torch.isfinite(p["next", key]).all()
    assert torch.isfinite(p["x"]).all()
    # reward = mu_true(s) - mu_true(s')
    r = (f.one_step_mean(p["x0"], p["x"], p["level"], env.one_step)
         - f.one_step_mean(p["x0"], p["next", "x"], p["next", "level"], env.one_step))
    torch.testing.assert_close(p["next", "reward"], r)
    assert not p["next", "terminated"].any() and not p["terminated"].any() and not p["done"].any()
    torch.testing.assert_close(p["next", "truncated"].squeeze(-1), p["next", "index"] >= f.steps - 1)


def test_sample_pairs_valid_mask_vp(points):
    env = DiffusionMRP(points, "vp", seed=0)
    p = env.sample_pairs(4000)
    t = p["level"].double()
    N1, f = env.formulation.steps - 1, env.formulation
    # by hand: sigma~ = sqrt((1 - abar) / abar) at integer t, then EDM's rho-grid index of sigma~ (method.md §9)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t.long() - 1]
    s = ((1 - abar) / abar).sqrt()
    a, b = f.sigma_ve_max ** (1 / 7), f.sigma_ve_min ** (1 / 7)
    i_ref = (s ** (1 / 7) - a) / (b - a) * N1
    ref = (t >= 1) & (t <= 1000) & (i_ref <= N1 - (env.stride + env.one_step))
    clear = (i_ref - (N1 - (env.stride + env.one_step))).abs() > 1e-4
    assert torch.equal(p["valid"][clear], ref[clear])
    assert p["valid"].any() and (~p["valid"]).any()


def test_sample_pairs_batch_one_and_seeding(points):
    p = DiffusionMRP(points, "edm", seed=123).sample_pairs(1)
    assert p["valid"].shape == (1,) and p["level"].shape == (1,)
    env = DiffusionMRP(points, "edm", batch_size=(4,), seed=123)
    assert env.sample_pairs().batch_size == (4,)
    with pytest.raises(ConfigError, match=r"batch_size 16 differs.*\(4,\)"):
        env.sample_pairs(16)
    a = DiffusionMRP(points, "edm", seed=7)
    b = DiffusionMRP(points, "edm", seed=7)
    assert (a.sample_pairs(16) == b.sample_pairs(16)).all()
    a.set_seed(99)
    first = a.sample_pairs(16)
    a.set_seed(99)
    assert (a.sample_pairs(16) == first).all()
    assert not torch.equal(a.sample_pairs(16)["x"], first["x"])


def test_reset_step_seeding(digits):
    a = DiffusionMRP(digits, "edm", batch_size=(3,), seed=5)
    b = DiffusionMRP(digits, "edm", batch_size=(3,), seed=5)
    assert (a.rollout(4) == b.rollout(4)).all()
    a.set_seed(1)
    r1 = a.rollout(4)
    a.set_seed(1)
    assert (a.rollout(4) == r1).all()
    c = DiffusionMRP(digits, "edm", batch_size=(3,), seed=6)
    assert not torch.equal(c.rollout(4)["x"], r1["x"])


def test_neighbouring_seeds_share_no_random_stream(points):
    # with seed and seed + 1 one seed's data stream (levels, data order) was the next seed's noise stream
    draws = {}
    for seed in range(4):
        env = DiffusionMRP(points, "edm", seed=seed)
        for name, g in (("noise", env.generator), ("data", env.data_generator)):
            draws[name, seed] = torch.randn(64, generator=g)
    for (k1, v1) in draws.items():
        for (k2, v2) in draws.items():
            if k1 < k2:
                assert not torch.isin(v1, v2).any(), (k1, k2)


# ---------------------------------------------------------------- sample_trajectories ---------------------------

@pytest.mark.parametrize("form", ["edm", "vp"])
def test_sample_trajectories(form, points):
    """Chains are the env's own rollout from the training levels: one episode until its first done."""
    env = DiffusionMRP(points, form, seed=0)
    n, B = 3, 500
    tr = env.sample_trajectories(n, B)
    ro = env.rollout(2, tensordict=env.reset(TensorDict(batch_size=[2])), auto_reset=False)
    assert tr.batch_size == (B, n)
    assert set(tr.keys(True, True)) == set(ro.keys(True, True))
    f = env.formulation
    done = tr["next", "done"].squeeze(-1)
    same_episode = ~done[:, :-1]  # row j + 1 continues row j's episode
    for key in STATE:
        a, b = tr["next", key][:, :-1][same_episode], tr[key][:, 1:][same_episode]
        torch.testing.assert_close(a, b)
    assert torch.equal(tr["x0"][:, 1:][same_episode], tr["x0"][:, :-1][same_episode])
    assert done.any() and same_episode.any()
    torch.testing.assert_close(tr["next", "index"], (tr["index"] + env.stride).clamp(max=f.steps - 1))
    assert torch.equal(tr["valid"], env.td_valid(tr["level"], tr["index"]))
    # start states are the training draw: the same as sample_pairs from the same seed
    p = DiffusionMRP(points, form, seed=0).sample_pairs(B)
    for key in (*STATE, "x0", "valid"):
        assert torch.equal(p[key], tr[key][:, 0]), key
    torch.testing.assert_close(p["next", "x"], tr["next", "x"][:, 0])
    # rewards telescope along the used part of each chain
    used = chain_mask(tr["valid"], done).all(1)
    m0 = f.one_step_mean(tr["x0"][:, 0], tr["x"][:, 0], tr["level"][:, 0], env.one_step)
    mT = f.one_step_mean(tr["x0"][:, -1], tr["next", "x"][:, -1], tr["next", "level"][:, -1], env.one_step)
    scale = m0.abs().max().clamp(min=1)
    assert used.any() and ((tr["next", "reward"].sum(1) - (m0 - mT))[used].abs().max() <= 1e-5 * scale)
    for key in ("x", "level", "reward"):
        assert torch.isfinite(tr["next", key]).all()


# ---------------------------------------------------------------- bad input -------------------------------------

def test_bad_inputs(points):
    with pytest.raises(ConfigError, match=r"17.*0\.5.*17"):
        DiffusionMRP(points, "edm", stride=17, one_step=0.5)
    with pytest.raises(ConfigError, match="foo"):
        DiffusionMRP(points, "edm", coupling="foo")
    with pytest.raises(ConfigError, match="bar"):
        DiffusionMRP(points, "edm", start="bar")
    with pytest.raises(ConfigError, match="-1"):
        DiffusionMRP(points, "edm", stride=-1)
    with pytest.raises(ConfigError, match="one_step"):
        DiffusionMRP(points, "edm", one_step=0.0)
    with pytest.raises(ConfigError, match="nope"):
        DiffusionMRP(points, "nope")
    with pytest.raises(ConfigError, match="batch_size"):
        DiffusionMRP(points, "edm", batch_size=(-2,))
    env = DiffusionMRP(points, "edm", seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        env.sample_pairs(0)
    with pytest.raises(ConfigError):
        env.sample_trajectories(0)
    # the boundary is allowed
    DiffusionMRP(points, "edm", stride=16.5, one_step=0.5, seed=0)
    # a single-action MRP: any other action is refused, naming it
    env = DiffusionMRP(points, "edm", batch_size=(2,), seed=0)
    td = env.reset()
    td["action"] = torch.tensor([0, 5])
    with pytest.raises(ConfigError, match="action 5.*accepted: 0"):
        env.step(td)
    with pytest.raises(ConfigError, match=r"\['x0'\].*reset"):
        env.step(td.exclude("x0").set("action", torch.zeros(2, dtype=torch.int64)))


# ---------------------------------------------------------------- gymnasium -------------------------------------

GYM_BOX_WARNING = "ignore:.*Box observation space.*:UserWarning"  # x is a Gaussian sample: unbounded by nature


@pytest.mark.filterwarnings(GYM_BOX_WARNING)
def test_gymnasium_make_and_check_env():
    from gymnasium.utils.env_checker import check_env
    importlib.reload(envs)  # registering twice must not fail
    assert envs.ENV_ID in gymnasium.registry
    env = gymnasium.make("diffusion_rl/DiffusionMRP-v0", dataset="digits")
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert set(obs) == {"x", "level", "index", "label"} and "x0" in info
    assert obs["x"].shape == (1, 8, 8)
    steps = 0
    while True:
        obs, reward, terminated, truncated, info = env.step(0)
        steps += 1
        assert not terminated
        assert reward == pytest.approx(float(info["reward_image"].mean()), rel=1e-6, abs=1e-6)
        assert info["reward_image"].shape == (1, 8, 8)
        if truncated:
            break
    assert steps == 6 and obs["index"][0] == pytest.approx(17.0)  # the episode reaches the sigma_min end
    with pytest.raises(RuntimeError, match="truncated.*reset"):
        env.step(0)
    env.close()


@pytest.mark.filterwarnings(GYM_BOX_WARNING)
def test_gymnasium_points_vp():
    from gymnasium.utils.env_checker import check_env
    env = gymnasium.make("diffusion_rl/DiffusionMRP-v0", dataset="8gaussians", formulation="vp")
    check_env(env.unwrapped, skip_render_check=True)


def test_training_level_below_grid_keeps_its_own_noise():
    """A log-normal sigma_t below sigma_min is TD-invalid; its x_t must still carry noise sigma_t, not sigma_min."""
    from diffusion_rl.formulations import EDMFormulation

    class LowSigma(EDMFormulation):
        def sample_training_level(self, n, generator=None, device="cpu"):
            return torch.full((n,), 1e-4, device=device)

    from diffusion_rl.data import load_dataset

    env = DiffusionMRP(load_dataset("8gaussians", n_points=500), LowSigma(), seed=0, dtype=torch.float64)
    b = env.sample_pairs(4000)
    assert not b["valid"].any()
    assert (b["next", "level"] <= b["level"]).all()
    assert (b["x"] - b["x0"]).std().item() == pytest.approx(1e-4, rel=0.05)


def test_gymnasium_make_in_a_fresh_interpreter():
    """The env id resolves in a new interpreter with nothing imported first: through the "envs:" module prefix on
    every Gymnasium, and the bare id through the plugin entry point where Gymnasium still loads plugins (< 1.0)."""
    import subprocess
    import sys

    from gymnasium.envs import registration

    def fresh(env_id: str) -> str:
        code = ("import gymnasium, warnings; warnings.simplefilter('ignore')\n"
                f"env = gymnasium.make({env_id!r}, dataset='8gaussians')\n"
                "obs, info = env.reset(seed=0); print(sorted(obs))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "['index', 'label', 'level', 'x']" in fresh("envs:" + envs.ENV_ID)
    if hasattr(registration, "load_plugin_envs"):  # Gymnasium < 1.0 loads the pyproject entry point
        assert "['index', 'label', 'level', 'x']" in fresh(envs.ENV_ID)



def test_hflip_mirrors_about_half_of_the_drawn_images():
    from diffusion_rl.data import load_dataset

    data = load_dataset("digits")
    plain = DiffusionMRP(data, "edm", batch_size=[256], seed=3)
    flipped = DiffusionMRP(data, "edm", batch_size=[256], seed=3, hflip=True)
    a, b = plain.reset_training(256)["x0"], flipped.reset_training(256)["x0"]
    mirrored = (b == a.flip(-1)).flatten(1).all(1) & ~(b == a).flatten(1).all(1)
    same = (b == a).flatten(1).all(1)
    assert bool((mirrored | same).all()) and 80 < int(mirrored.sum()) < 176
    with pytest.raises(ConfigError, match="hflip mirrors images"):
        DiffusionMRP("moons", "edm", hflip=True)


def test_mixed_coupling_transitions_follow_each_start_states_coupling():
    env = DiffusionMRP("moons", "edm", coupling="mixed:6", batch_size=[256], seed=0, start="random")
    check_env_specs(env)
    batch = env.sample_pairs(256)
    x0, x, level, index = batch["x0"], batch["x"], batch["level"], batch["index"]
    nxt = batch["next"]
    shared_next = x0 + (nxt["level"] / level)[:, None] * (x - x0)  # shared noise: x' is determined by (x, x0)
    noisy = index < 6
    assert 0 < int(noisy.sum()) < 256
    torch.testing.assert_close(nxt["x"][noisy], shared_next[noisy], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(nxt["x"][~noisy], shared_next[~noisy], atol=1e-3)
    with pytest.raises(ConfigError, match="unknown coupling 'tied'"):
        DiffusionMRP("moons", "edm", coupling="tied")
