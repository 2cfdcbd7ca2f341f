"""The TD loss of agents/td_loss.py against method.md §2-§10, on fixed inputs and with a Gaussian oracle."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from agents import TDEvaluator
from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import CTFormulation, VPFormulation
from diffusion_rl.networks import MLP, Denoiser
from diffusion_rl.training import TrainConfig, objective
from envs import DiffusionMRP

# ---- an independent transcription of method.md §1, §3 and §5 (no library calls) -----------------------------------
N, RHO, SMIN, SMAX, SDATA = 18, 7.0, 0.002, 80.0, 0.5
STRIDE, ONE_STEP, LAM = 3.0, 0.2, 0.5


def spec_sigma(i):
    a, b = SMAX ** (1 / RHO), SMIN ** (1 / RHO)
    return (a + i / (N - 1) * (b - a)).clamp(min=b, max=a) ** RHO


def spec_index(sigma):
    a, b = SMAX ** (1 / RHO), SMIN ** (1 / RHO)
    return (sigma.clamp(SMIN, SMAX) ** (1 / RHO) - a) / (b - a) * (N - 1)


def spec_A_kappa(sigma, coupling):
    sd = spec_sigma(spec_index(sigma) + ONE_STEP)
    kappa = (sd / sigma) ** 2 if coupling == "markov" else sd / sigma
    return 1 - kappa, kappa


def spec_c_out(sigma):
    return sigma * SDATA / (sigma ** 2 + SDATA ** 2).sqrt()


def spec_w_edm(sigma):
    return (sigma ** 2 + SDATA ** 2) / (sigma * SDATA) ** 2


def spec_valid(sigma):
    i = spec_index(sigma)
    return (sigma >= SMIN) & (sigma <= SMAX) & (i >= 0) & (i <= (N - 1) - (STRIDE + ONE_STEP))


def spec_w_td(name, A_t, A_n, sigma):
    if name == "edm":
        return 1 / (A_t ** 2 * spec_c_out(sigma) ** 2).clamp(min=1e-8)
    if name == "pairwise":
        return 1 / (A_t ** 2 + A_n ** 2).clamp(min=0.01)
    if name == "linear":
        return 1 / (A_t + A_n).clamp(min=0.01)
    return torch.ones_like(A_t)


# ---- fixtures ------------------------------------------------------------------------------------------------------
def toy_data(dim: int = 2) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("toy", torch.randn(256, dim, generator=g), None, 0, "points")


def random_denoiser(formulation, dim: int = 2, seed: int = 0, dtype=torch.float64) -> Denoiser:
    """Fixed random weights with a non-zero output layer (the library zero-inits it, which gives D = c_skip x)."""
    torch.manual_seed(seed)
    net = MLP(dim=dim, width=16, depth=1)
    torch.nn.init.normal_(net.out.weight, std=0.5)
    torch.nn.init.normal_(net.out.bias, std=0.1)
    return Denoiser(net.to(dtype), formulation)


def make_agent(coupling="markov", reweighting="edm", formulation="edm", **kw):
    env = DiffusionMRP(toy_data(), formulation, coupling=coupling, seed=0,
                       **({} if formulation != "edm" else {"stride": STRIDE, "one_step": ONE_STEP}))
    den = random_denoiser(env.formulation)
    ag = TDEvaluator(env, denoiser=den, reweighting=reweighting, base_lambda=LAM,
                     config=TrainConfig(batch_size=8), device="cpu", **kw)
    # make the target differ from the online net, so that using the wrong one shows
    with torch.no_grad():
        for p in ag.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return env, ag


SIGMAS = [0.08, 0.3, 1.0, 5.0, 40.0,  # valid (sigma(13.8) = 0.0716 is the last valid level)
          100.0, 0.0015, 0.004, 0.02]  # invalid: above sigma_max, below sigma_min, partner past the end (x2)


def fixed_batch(sigmas, coupling, seed=1):
    """Fixed x0, x_t, x_t' at the given sigmas, partner sigma(i_t + stride); reward and mask by hand."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    n = sigma.shape[0]
    sigma_n = spec_sigma(spec_index(sigma) + STRIDE)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t = x0 + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_n = x0 + sigma_n[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    A_t, k_t = spec_A_kappa(sigma, coupling)
    A_n, k_n = spec_A_kappa(sigma_n, coupling)
    reward = (A_t[:, None] * x0 + k_t[:, None] * x_t) - (A_n[:, None] * x0 + k_n[:, None] * x_n)  # method.md §4
    valid = spec_valid(sigma)
    label = torch.zeros(n, dtype=torch.long)
    flags = torch.zeros(n, 1, dtype=torch.bool)
    batch = TensorDict({
        "x": x_t, "level": sigma, "index": spec_index(sigma), "label": label, "x0": x0, "valid": valid,
        "action": label.clone(), "done": flags, "terminated": flags, "truncated": flags,
        "next": {"x": x_n, "level": sigma_n, "index": spec_index(sigma) + STRIDE, "label": label, "x0": x0,
                 "reward": reward, "done": flags, "terminated": flags, "truncated": flags},
    }, batch_size=[n])
    return batch


def spec_loss(ag, batch, coupling, reweighting):
    """Per-sample loss of method.md §5, with the network outputs read off the agent's online and target denoisers."""
    sigma, sigma_n, x0 = batch["level"], batch["next", "level"], batch["x0"]
    with torch.no_grad():
        D = ag.denoiser(batch["x"], sigma)
        D_tgt = ag.target(batch["next", "x"], sigma_n)
    A_t, _ = spec_A_kappa(sigma, coupling)
    A_n, _ = spec_A_kappa(sigma_n, coupling)
    base = spec_w_edm(sigma) * ((D - x0) ** 2).mean(1)
    delta = A_t[:, None] * (x0 - D) - A_n[:, None] * (x0 - D_tgt)
    td = spec_w_td(reweighting, A_t, A_n, sigma) * (delta ** 2).mean(1)
    valid = batch["valid"]
    per = torch.where(valid, td + LAM * base, (1 + LAM) * base)
    return per, base, torch.where(valid, td, torch.zeros_like(td)), delta


# ---- parity with method.md ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["markov", "shared"])
@pytest.mark.parametrize("reweighting", ["edm", "pairwise", "linear", "none"])
def test_parity_with_method_section_5(coupling, reweighting):
    env, ag = make_agent(coupling, reweighting)
    batch = fixed_batch(SIGMAS, coupling)
    assert batch["valid"].tolist() == [True] * 5 + [False] * 4
    assert env.td_valid(batch["level"], batch["index"]).tolist() == batch["valid"].tolist()
    out = ag.loss(batch)
    per, base, td, _ = spec_loss(ag, batch, coupling, reweighting)
    torch.testing.assert_close(out["sample_base"], base, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["sample_td"], td, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["sample_loss"], per, rtol=1e-6, atol=1e-9)
    # TorchRL's convention: the scalar "loss_*" entries sum to the objective, the batch mean of the method.md §5.5 loss
    assert sorted(k for k in out.keys() if k.startswith("loss")) == ["loss_base", "loss_td"]
    assert all(out[k].dim() == 0 for k in ("loss_base", "loss_td"))
    torch.testing.assert_close(out["loss_td"] + out["loss_base"], per.mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(objective(out), per.mean(), rtol=1e-6, atol=1e-9)
    assert out["valid"].tolist() == batch["valid"].tolist()
    # invalid samples stay in the batch with (1 + lambda) base weight (method.md §12.2)
    inv = ~batch["valid"]
    torch.testing.assert_close(out["sample_loss"][inv], (1 + LAM) * base[inv], rtol=1e-6, atol=1e-9)


def test_edm_weight_generalisation_equals_c_out_form():
    """td_weight("edm") with the formulation's c_out is method.md §6's 1/max(A^2 c_out^2, 1e-8), c_out by hand."""
    _, ag = make_agent()
    sigma = torch.tensor(SIGMAS[:5], dtype=torch.float64)
    A, _ = spec_A_kappa(sigma, "markov")
    from agents import td_weight
    w = td_weight("edm", A, A, ag.formulation.preconditioning(sigma)[1])
    torch.testing.assert_close(w, 1 / (A ** 2 * spec_c_out(sigma) ** 2), rtol=1e-10, atol=0)


@pytest.mark.parametrize("coupling", ["markov", "shared"])
@pytest.mark.parametrize("valid_sigma", [True, False])
def test_batch_size_one(coupling, valid_sigma):
    _, ag = make_agent(coupling)
    batch = fixed_batch([0.5 if valid_sigma else 200.0], coupling)
    out = ag.loss(batch)
    for key in ("valid", "sample_td", "sample_base", "sample_loss"):
        assert out[key].shape == (1,), key  # masks stay 1-D (method.md §12.6)
    assert out["td_error"].shape == (1, 2)
    per, *_ = spec_loss(ag, batch, coupling, "edm")
    torch.testing.assert_close(out["sample_loss"], per, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("coupling", ["markov", "shared"])
def test_td_error_identities(coupling):
    """delta = r + V-(s') - V(s) with gamma 1, and = A_t (x0 - D(x_t)) - A_t' (x0 - D-(x_t')) (method.md §4)."""
    _, ag = make_agent(coupling)
    batch = fixed_batch(SIGMAS, coupling)
    out = ag.loss(batch)
    valid = batch["valid"]
    with torch.no_grad():
        v = ag.critic(batch.select("x", "level", "label").clone())["state_value"]
        v_next = ag.target_critic(batch["next"].select("x", "level", "label").clone())["state_value"]
    # the critic is V = A D + kappa x (method.md §3)
    A_t, k_t = spec_A_kappa(batch["level"], coupling)
    with torch.no_grad():
        D = ag.denoiser(batch["x"], batch["level"])
    torch.testing.assert_close(v, A_t[:, None] * D + k_t[:, None] * batch["x"], rtol=1e-9, atol=1e-9)
    expected = batch["next", "reward"] + v_next - v
    torch.testing.assert_close(out["td_error"][valid], expected[valid], rtol=1e-9, atol=1e-9)
    *_, delta = spec_loss(ag, batch, coupling, "edm")
    torch.testing.assert_close(out["td_error"][valid], delta[valid], rtol=1e-8, atol=1e-9)
    assert torch.all(out["td_error"][~valid] == 0)


def test_target_forward_only_on_valid_samples_in_eval_mode():
    _, ag = make_agent()
    seen = []
    ag.target.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[0], mod.training)))
    ag.denoiser.train()
    batch = fixed_batch(SIGMAS, "markov")
    ag.loss(batch)
    assert seen == [(int(batch["valid"].sum()), False)]
    seen.clear()
    ag.loss(fixed_batch([200.0, 0.001], "markov"))  # nothing valid: no target forward at all
    assert seen == []


def test_semi_gradient():
    """Gradients reach the online network only; the target has no grad and requires none (method.md §4, §12.5)."""
    _, ag = make_agent()
    out = ag.loss(fixed_batch(SIGMAS, "markov"))
    objective(out).backward()
    assert all(not p.requires_grad and p.grad is None for p in ag.target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ag.denoiser.parameters())
    # the TD part alone: its gradient equals that of -2 w delta . dV/dtheta, i.e. d(td)/d(next value) = 0
    ag.denoiser.zero_grad()
    out = ag.loss(fixed_batch(SIGMAS[:5], "markov"))
    out["loss_td"].backward()
    assert all(p.grad is None for p in ag.target.parameters())


# ---- VP and CT through the same code -------------------------------------------------------------------------------
def test_vp_td_error_in_variance_exploding_units():
    """TD on VP (method.md §9): values are one-step posterior means of x~ = x / sqrt(abar), with EDM's coefficients
    of sigma~ = sqrt((1 - abar) / abar) on EDM's rho grid of sigma~; transcribed here by hand."""
    form = VPFormulation(timesteps=1000)
    env = DiffusionMRP(toy_data(), form, seed=0, dtype=torch.float64)
    ag = TDEvaluator(env, denoiser=random_denoiser(form), config=TrainConfig(batch_size=8), device="cpu")
    assert ag.method == "td-vp" and (env.stride, env.one_step, form.steps) == (3.0, 0.2, 18)
    batch = env.sample_pairs(256)
    t = batch["level"]
    assert torch.equal(t, t.round())  # training timesteps are integers: the hand table needs no interpolation
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sig = ((1 - abar[t.long() - 1]) / abar[t.long() - 1]).sqrt()
    a, b = form.sigma_ve_max ** (1 / 7), form.sigma_ve_min ** (1 / 7)
    i = (sig ** (1 / 7) - a) / (b - a) * 17

    def rho(j):  # EDM's rho grid of sigma~
        return (a + j.clamp(0, 17) / 17 * (b - a)) ** 7

    A_t = 1 - (rho(i + 0.2) / sig) ** 2
    A_n = 1 - (rho(i + 3.2) / rho(i + 3)) ** 2
    out = ag.loss(batch)
    with torch.no_grad():
        D = ag.denoiser(batch["x"], t)
        D_tgt = ag.target(batch["next", "x"], batch["next", "level"])
    x0 = batch["x0"]
    delta = A_t[:, None] * (x0 - D) - A_n[:, None] * (x0 - D_tgt)
    valid = out["valid"]
    assert valid.sum() > 100
    torch.testing.assert_close(out["td_error"][valid], delta[valid], rtol=1e-6, atol=1e-8)
    # the reward is the drop of mu~ = A x0 + kappa x / sqrt(abar) between the pair (it telescopes in x~ units)
    mu = form.one_step_mean(x0, batch["x"], t, 0.2)
    torch.testing.assert_close(mu, A_t[:, None] * x0 + (1 - A_t)[:, None] * batch["x"] / abar[t.long() - 1].sqrt()[:, None])


def test_td_ct_loss():
    """method.md §10: loss_ct = mean (f(x_t, t) - f-(x_t2, t2))^2 on shared-noise grid pairs; TD with f, pairwise weight;
    boundary n = N-2: (1 + lambda) loss_ct. Here with the library's earlier choices, kappa of the shared-noise path
    and the masking boundary rule (§10.1, §10.2); tests/test_td_ct_release.py checks the release's default."""
    form = CTFormulation(kappa="shared-path", boundary="mask")
    env = DiffusionMRP(toy_data(), form, coupling="shared", seed=0, dtype=torch.float64)
    assert (env.stride, env.one_step) == (1.0, 0.25)
    ag = TDEvaluator(env, denoiser=random_denoiser(form), base_lambda=LAM,
                     config=TrainConfig(batch_size=8), device="cpu")
    assert ag.reweighting == "pairwise" and ag.method == "td-ct"
    batch = env.sample_pairs(256)
    n = spec_index(batch["level"].double()).round()
    assert set(n.long().tolist()) <= set(range(N - 1))
    boundary = n >= N - 2
    assert boundary.any() and (~boundary).any()
    assert torch.equal(batch["valid"], ~boundary)
    out = ag.loss(batch)
    with torch.no_grad():
        f = ag.denoiser(batch["x"], batch["level"]).double()
        f_tgt = ag.target(batch["next", "x"], batch["next", "level"]).double()
    x0 = batch["x0"].double()
    sigma, sigma2 = batch["level"].double(), batch["next", "level"].double()
    # shared coupling on the CT grid: x_t = x0 + t n, x_t2 = x0 + t2 n (method.md §10)
    noise = (batch["x"].double() - x0) / sigma[:, None]
    torch.testing.assert_close(batch["next", "x"].double(), x0 + sigma2[:, None] * noise, rtol=1e-4, atol=1e-4)
    ct = ((f - f_tgt) ** 2).mean(1)
    ratio = lambda s: spec_sigma(spec_index(s) + 0.25) / s  # noqa: E731
    A_t, A_2 = 1 - ratio(sigma), 1 - ratio(sigma2)
    delta = A_t[:, None] * (x0 - f) - A_2[:, None] * (x0 - f_tgt)
    td = 1 / (A_t ** 2 + A_2 ** 2).clamp(min=0.01) * (delta ** 2).mean(1)
    per = torch.where(boundary, (1 + LAM) * ct, td + LAM * ct)
    torch.testing.assert_close(out["sample_base"].double(), ct, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["sample_loss"].double(), per, rtol=1e-4, atol=1e-5)


def test_ct_needs_shared_coupling_and_stride_one():
    form = CTFormulation()
    with pytest.raises(ConfigError, match="'markov'"):
        TDEvaluator(DiffusionMRP(toy_data(), form, coupling="markov", seed=0), device="cpu")
    with pytest.raises(ConfigError, match="stride 1"):
        TDEvaluator(DiffusionMRP(toy_data(), form, coupling="shared", stride=2.0, seed=0), device="cpu")


# ---- Gaussian oracle -----------------------------------------------------------------------------------------------
M0, S0 = 0.3, 0.5


class GaussianData:
    """x0 ~ N(M0, S0^2) per coordinate, drawn fresh (a Dataset-like object)."""

    name, num_classes, kind, sample_shape = "gaussian", 0, "points", (2,)

    def draw(self, n, generator=None):
        return M0 + S0 * torch.randn(n, 2, generator=generator), None


class OracleDenoiser(Denoiser):
    """The exact denoiser of the Gaussian under VE noise: D*(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m)."""

    def forward(self, x, level, labels=None):
        level = torch.as_tensor(level, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return M0 + S0 ** 2 / (S0 ** 2 + level ** 2) * (x - M0)


def _z(q):
    return q.mean(0) / (q.std(0) / math.sqrt(q.shape[0]))


@pytest.mark.parametrize("coupling", ["markov", "shared"])
def test_gaussian_oracle(coupling):
    """With the exact denoiser as critic and target, E[delta] = 0 under both couplings (tower rule), but only Markov
    coupling is Bellman-consistent: E[delta | x_t] = 0. Under shared noise x_t' = x0 + (sigma'/sigma)(x_t - x0) is a
    function of (x0, x_t), and (derived here) E[delta (x_t - m) | sigma] = A_t' s^2 sigma' (sigma - sigma') /
    (s^2 + sigma'^2) > 0, which the Monte Carlo estimate must match."""
    env = DiffusionMRP(GaussianData(), "edm", coupling=coupling, seed=0)
    oracle = OracleDenoiser(MLP(dim=2, width=8, depth=1), env.formulation)
    ag = TDEvaluator(env, denoiser=oracle, config=TrainConfig(batch_size=8), device="cpu")
    batch = env.sample_pairs(40_000)
    with torch.no_grad():
        out = ag.loss(batch)
    v = out["valid"]
    assert v.float().mean() > 0.5
    delta = out["td_error"][v].double()
    u = batch["x"][v].double() - M0
    assert torch.all(_z(delta).abs() < 4.5)  # zero-mean TD error
    du = delta * u
    if coupling == "markov":
        assert torch.all(_z(du).abs() < 4.5)  # conditional mean zero too: the true denoiser is the fixed point
    else:
        sigma, sigma2 = batch["level"][v].double(), batch["next", "level"][v].double()
        A2, _ = spec_A_kappa(sigma2, "shared")
        pred = A2 * S0 ** 2 * sigma2 * (sigma - sigma2) / (S0 ** 2 + sigma2 ** 2)
        se = du.std(0) / math.sqrt(du.shape[0])
        assert torch.all((du.mean(0) - pred.mean()).abs() < 4.5 * se)  # matches the derivation
        assert torch.all(pred.mean() > 10 * se)  # and is measurably nonzero: not Bellman-consistent


# ---- matched controls (method.md §5.5, §7) --------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["markov", "shared"])
def test_tdoff_is_the_td_runs_base_part_with_no_td_gradient(coupling):
    """tdoff (td_term=False) on the same batch: its loss is the TD agent's base part (the same TD-valid mask and
    per-sample weights lambda / 1 + lambda), its TD term is 0 and carries no gradient, and it never calls the target."""
    _, td = make_agent(coupling)
    _, off = make_agent(coupling, td_term=False)
    off.denoiser.load_state_dict(td.denoiser.state_dict())
    assert (td.method, off.method) == ("td-edm", "tdoff-edm") and off.method_config()["td_term"] is False
    batch = fixed_batch(SIGMAS, coupling)
    seen = []
    off.target.register_forward_hook(lambda *a: seen.append(1))
    out_td, out_off = td.loss(batch), off.loss(batch)
    assert seen == []
    torch.testing.assert_close(out_off["loss_base"], out_td["loss_base"], rtol=0, atol=0)
    assert out_off["valid"].tolist() == out_td["valid"].tolist() == batch["valid"].tolist()
    assert float(out_off["loss_td"]) == 0.0 and not out_off["loss_td"].requires_grad
    per, base, _, _ = spec_loss(td, batch, coupling, "edm")
    weights = torch.where(batch["valid"], LAM, 1 + LAM)
    torch.testing.assert_close(objective(out_off), (weights * base).mean(), rtol=1e-6, atol=1e-9)
    # its gradient is the TD run's base-part gradient: the TD agent's total minus its TD part's
    grad = lambda agent, loss: torch.autograd.grad(loss, list(agent.denoiser.parameters()))  # noqa: E731
    g_off = grad(off, objective(off.loss(batch)))
    g_base = grad(td, td.loss(batch)["loss_base"])
    for a, b in zip(g_off, g_base):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    g_td = grad(td, td.loss(batch)["loss_td"])
    assert any(float(t.abs().sum()) > 0 for t in g_td)  # the TD run's gradient has a TD part; tdoff's has none


def test_full_reach_trains_nstep_only_where_the_whole_chain_is_valid():
    """full_reach (method.md §7): n-step(2) at stride k applies TD exactly where TD(0) at stride 2k does (same start
    levels), and every TD sample's return reaches both strides; without it the first hop decides."""
    env = DiffusionMRP("digits", batch_size=256, stride=3, seed=0)
    batch = env.sample_trajectories(2)
    kw = dict(estimator="nstep", n_steps=2, config=TrainConfig(batch_size=256), device="cpu")
    full = TDEvaluator(env, full_reach=True, **kw).loss(batch)
    first = TDEvaluator(env, **kw).loss(batch)
    index = batch["index"][:, 0]
    wide = env.formulation.steps - 1 - env.one_step
    torch.testing.assert_close(full["valid"], index + 6 <= wide)  # TD(0) at stride 6's rule on the same starts
    torch.testing.assert_close(first["valid"], index + 3 <= wide)
    assert 0 < int(full["valid"].sum()) < int(first["valid"].sum())
    with pytest.raises(ConfigError, match="full_reach=True applies to the multi-step estimators"):
        TDEvaluator(env, full_reach=True, device="cpu")
