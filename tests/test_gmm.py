"""The ground-truth benchmark: Gaussian mixtures with an exact denoiser, the exact ODE, the data sets, the metrics."""
from __future__ import annotations

import math
import os

import pytest
import torch

from diffusion_rl.data import Dataset, cache_dir, load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import EDMFormulation, make_formulation
from diffusion_rl.gmm import ExactDenoiser, GaussianMixture, fit_gmm
from diffusion_rl.groundtruth import (consistency_error_by_level, denoiser_error_by_level, distribution_metrics,
                                      ground_truth_report, solver_split)
from diffusion_rl.samplers import sample


def small_mixture(covariance: str, d: int = 6, k: int = 3, rank: int = 2, seed: int = 0) -> GaussianMixture:
    """K overlapping components in D dimensions, random orientations; classes 0, 1, 0 (two share a class)."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    r = d if covariance == "full" else rank
    vecs = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64)).Q[:, :, :r]
    vals = 0.05 + torch.rand(k, r, generator=g, dtype=torch.float64)
    res = torch.full((k,), 0.02 if r < d else 0.0, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, vecs, vals, res,
                           classes=torch.tensor([0, 1, 0]), sample_shape=(1, 2, d // 2))


MIXTURES = {"full": small_mixture("full"), "lowrank": small_mixture("lowrank", d=8, rank=2)}


class Scaled(ExactDenoiser):
    """A deliberately wrong denoiser: the exact one, evaluated at 1.5 times the noise level."""

    def forward(self, x, level, labels=None):
        return super().forward(x, torch.as_tensor(level) * 1.5, labels)


@pytest.mark.parametrize("kind", MIXTURES)
def test_posterior_mean_matches_monte_carlo(kind: str) -> None:
    gmm = MIXTURES[kind]
    g = torch.Generator().manual_seed(1)
    x0, _ = gmm.sample(300_000, g)
    queries, _ = gmm.sample(4, g)
    for sigma in (0.3, 1.0, 3.0):
        x = queries + sigma * torch.randn(queries.shape, generator=g, dtype=torch.float64)
        exact = gmm.posterior_mean(x, sigma)
        logw = -((x[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma ** 2)  # [4, M] self-normalised weights
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        se = ((w ** 2) @ (x0 ** 2) - 2 * mc * (w ** 2 @ x0) + (w ** 2).sum(1, keepdim=True) * mc ** 2).sqrt()
        assert se.max() < 0.05, (sigma, se.max())  # the check has teeth
        assert ((exact - mc).abs() <= 5 * se + 1e-6).all(), (kind, sigma, (exact - mc).abs().max(), se.max())


@pytest.mark.parametrize("kind", MIXTURES)
def test_log_prob_score_and_limits(kind: str) -> None:
    gmm = MIXTURES[kind]
    x, _ = gmm.sample(5, torch.Generator().manual_seed(2))
    u, eye = gmm.vecs, torch.eye(gmm.dim, dtype=torch.float64)
    rest = gmm.res[:, None, None] * (eye - u @ u.mT) if kind == "lowrank" else 0
    covs = u @ torch.diag_embed(gmm.vals) @ u.mT + rest
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gmm.weights),
                                                torch.distributions.MultivariateNormal(gmm.means, covs))
    assert torch.allclose(gmm.log_prob(x), ref.log_prob(x), atol=1e-9)
    # score = grad log p_sigma (Tweedie), p_sigma the mixture with Sigma_k + sigma^2 I
    sigma = 0.7
    noisy = GaussianMixture(gmm.weights, gmm.means, gmm.vecs, gmm.vals + sigma ** 2,
                            gmm.res + (sigma ** 2 if gmm.rank < gmm.dim else 0.0))
    xr = x.clone().requires_grad_(True)
    noisy.log_prob(xr).sum().backward()
    assert torch.allclose(gmm.score(x, sigma), xr.grad, atol=1e-9)
    # limits: D -> x as sigma -> 0, D -> the mixture mean as sigma -> infinity; a batch of sigmas is row-wise
    assert torch.allclose(gmm.posterior_mean(x, 1e-6), x, atol=1e-8)
    assert torch.allclose(gmm.posterior_mean(x, 1e6), (gmm.weights @ gmm.means).expand_as(x), atol=1e-6)
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0])
    rows = torch.cat([gmm.posterior_mean(x[i:i + 1], float(s)) for i, s in enumerate(sig)])
    assert torch.allclose(gmm.posterior_mean(x, sig), rows, atol=1e-12)
    # class-conditional: the mixture of the label's components only
    only_1 = gmm.posterior_mean(x, 0.5, torch.ones(5, dtype=torch.int64))
    sub = GaussianMixture(gmm.weights[1:2], gmm.means[1:2], gmm.vecs[1:2], gmm.vals[1:2], gmm.res[1:2])
    assert torch.allclose(only_1, sub.posterior_mean(x, 0.5), atol=1e-12)


@pytest.mark.parametrize("kind", MIXTURES)
def test_ode_solution_is_converged(kind: str) -> None:
    from scipy.integrate import solve_ivp

    gmm = MIXTURES[kind]
    x_T = 80.0 * torch.randn(3, gmm.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fine, half = gmm.ode_solution(x_T, 80.0, 0.002, steps=256), gmm.ode_solution(x_T, 80.0, 0.002, steps=128)
    assert (fine - half).abs().max() < 1e-5  # RK4: the finer solve's own error is ~1/16 of this difference
    for i in range(3):  # an independent route: adaptive DOP853 in log sigma, then the same final denoise
        sol = solve_ivp(lambda t, y: y - gmm.posterior_mean(torch.from_numpy(y)[None], math.exp(t))[0].numpy(),
                        (math.log(80.0), math.log(0.002)), x_T[i].numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
        end = gmm.posterior_mean(torch.from_numpy(sol.y[:, -1])[None], 0.002)[0]
        assert (end - fine[i]).abs().max() < 1e-6


def test_ode_maps_noise_to_the_mixture() -> None:
    gmm = MIXTURES["full"]
    g = torch.Generator().manual_seed(4)
    y = gmm.ode_solution(80.0 * torch.randn(400, gmm.dim, generator=g, dtype=torch.float64), 80.0, steps=64)
    ll_y, ll_true = gmm.log_prob(y), gmm.log_prob(gmm.sample(400, g)[0])
    se = math.sqrt(ll_y.var() / 400 + ll_true.var() / 400)
    assert abs(float(ll_y.mean() - ll_true.mean())) < 4 * se
    tv = 0.5 * float((gmm.responsibilities(y, 0.0).mean(0) - gmm.weights).abs().sum())
    assert tv < 0.08


def test_fit_recovers_a_mixture() -> None:
    gmm = MIXTURES["full"]
    x, comp = gmm.sample(3000, torch.Generator().manual_seed(5))
    fit = fit_gmm(x, 3, "full", seed=0, floor=1e-6, labels=comp)
    assert sorted(fit.classes.tolist()) == [0, 1, 2]  # one component per true component
    assert abs(float(fit.log_prob(x).mean() - gmm.log_prob(x).mean())) < 0.05
    low = fit_gmm(x, 3, "lowrank", rank=2, seed=0)
    assert low.rank == 2 and float(low.log_prob(x).mean()) > float(gmm.log_prob(x).mean()) - 1.0


def test_gmm_digits_dataset() -> None:
    ds = load_dataset("gmm:digits")
    assert ds.kind == "image" and tuple(ds.x.shape) == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert isinstance(ds.truth, GaussianMixture) and ds.truth.sample_shape == (1, 8, 8)
    assert ds.num_classes == 10 and ds.labels.shape == (1797,) and int(ds.labels.max()) < 10
    assert ds.truth.classes.tolist() == list(range(10))  # initialised per class: one component per digit
    files = os.listdir(cache_dir("gmm"))
    assert any(f.startswith("digits-") and f.endswith(".pt") for f in files)
    again = load_dataset("gmm:digits")  # from the cache: the same mixture and, with the same seed, the same samples
    assert torch.equal(again.x, ds.x) and torch.equal(again.truth.means, ds.truth.means)
    assert not torch.equal(load_dataset("gmm:digits", seed=1).x, ds.x)
    a, b = ds.fresh(50, torch.Generator().manual_seed(7)), ds.fresh(50, torch.Generator().manual_seed(7))
    assert tuple(a.shape) == (50, 1, 8, 8) and torch.equal(a, b)
    assert ds.on("cpu").truth is ds.truth
    # the data look like their mixture: log-likelihood per pixel of the finite set near the mixture's own
    ll = float(ds.truth.log_prob(ds.x).mean()) / 64
    assert abs(ll - float(ds.truth.log_prob(ds.fresh(1797, torch.Generator().manual_seed(8))).mean()) / 64) < 0.05


def test_exact_denoiser_through_the_samplers() -> None:
    gmm, f = MIXTURES["full"], EDMFormulation()
    errors = [solver_split(ExactDenoiser(gmm), gmm, f, "heun", nfe, n=64, seed=0) for nfe in (5, 17, 65)]
    assert all(e["network"] == 0 and e["total"] == e["solver"] for e in errors)
    assert errors[0]["solver"] > errors[1]["solver"] > errors[2]["solver"]
    assert errors[2]["solver"] < 1e-3
    res = sample(ExactDenoiser(gmm), f, (8, *gmm.sample_shape), nfe=9, generator=torch.Generator().manual_seed(0))
    assert tuple(res.x.shape) == (8, 1, 2, 3) and res.nfe == 9


def test_metrics_zero_for_exact_positive_for_wrong() -> None:
    gmm, f = MIXTURES["full"], EDMFormulation(steps=10)
    exact, wrong = ExactDenoiser(gmm, f), Scaled(gmm, f)
    sig = [0.05, 0.5, 2.0]
    e_exact = denoiser_error_by_level(exact, gmm, sig, 128, torch.Generator().manual_seed(0))
    e_wrong = denoiser_error_by_level(wrong, gmm, sig, 128, torch.Generator().manual_seed(0))
    assert max(e_exact["error"]) < 1e-20 and min(e_wrong["error"]) > 1e-6
    assert all(0 < v < 2 for v in e_exact["posterior_variance"])
    c_exact = consistency_error_by_level(exact, gmm, f, 2, 64, torch.Generator().manual_seed(0))
    c_wrong = consistency_error_by_level(wrong, gmm, f, 2, 64, torch.Generator().manual_seed(0))
    assert len(c_exact["error"]) == 8 and c_exact["sigma_next"][0] == pytest.approx(float(f.grid()[2]))
    assert max(c_exact["error"]) < 1e-20 and max(c_exact["exact_gap"]) > 1e-3  # the posterior mean moves
    assert max(c_wrong["error"]) > 1e-3
    s_wrong = solver_split(wrong, gmm, f, "heun", 35, n=64, seed=0)
    assert s_wrong["network"] > 1e-3 and s_wrong["solver"] < s_wrong["network"]
    m = distribution_metrics(gmm.sample(400, torch.Generator().manual_seed(1))[0], gmm, 400,
                             torch.Generator().manual_seed(2))
    assert abs(m["loglik_gap"]) < 0.1 and m["mode_tv"] < 0.1 and m["frechet"] < 0.5
    bad = distribution_metrics(gmm.means[:1].expand(400, -1) + 0.01, gmm, 400, torch.Generator().manual_seed(2))
    assert bad["mode_tv"] > 0.4 and bad["frechet"] > 1.0


def test_ground_truth_report_is_json() -> None:
    import json

    gmm = MIXTURES["lowrank"]
    x, comp = gmm.sample(100, torch.Generator().manual_seed(0))
    ds = Dataset("small", x.float().reshape(100, *gmm.sample_shape), gmm.classes[comp], 2, "image", truth=gmm)
    rep = ground_truth_report(ExactDenoiser(gmm, EDMFormulation(steps=8)), ds, ("heun", "euler"), (3, 5), n=32)
    json.dumps(rep)
    assert len(rep["solvers"]) == 4 and all(r["network"] == 0 for r in rep["solvers"])
    assert max(rep["denoiser_error"]["error"]) < 1e-20 and len(rep["denoiser_error"]["sigma"]) == 8


def test_bad_inputs_name_the_value_and_the_accepted() -> None:
    with pytest.raises(ConfigError, match=r"'gmm:foo'.*gmm:digits.*gmm:mnist5k"):
        load_dataset("gmm:foo")
    with pytest.raises(ConfigError, match=r"'bogus=1'.*components=K"):
        load_dataset("gmm:digits:bogus=1")
    gmm, vp = MIXTURES["full"], make_formulation("vp")
    with pytest.raises(ConfigError, match=r"'vp'.*accepted: edm"):
        consistency_error_by_level(ExactDenoiser(gmm), gmm, vp, n=4)
    with pytest.raises(ConfigError, match=r"'ct'.*accepted: edm"):
        solver_split(ExactDenoiser(gmm), gmm, make_formulation("ct"), n=4)
    with pytest.raises(ConfigError, match=r"'vp'.*accepted: edm"):
        ExactDenoiser(gmm, vp)
    with pytest.raises(ConfigError, match=r"'digits'.*no known ground truth.*gmm:digits"):
        ground_truth_report(ExactDenoiser(gmm), load_dataset("digits"))
    with pytest.raises(ConfigError, match=r"sampler.*'ddim'"):
        solver_split(ExactDenoiser(gmm), gmm, EDMFormulation(), "ddim", 5, n=4)
    with pytest.raises(ConfigError, match="rank"):
        fit_gmm(torch.randn(50, 4), 2, "lowrank", rank=4)
    with pytest.raises(ConfigError, match=r"covariance 'diag'.*full, lowrank"):
        fit_gmm(torch.randn(50, 4), 2, "diag")


def test_training_draws_fresh_mixture_samples_unless_finite():
    """gmm: data sets are infinite: each env batch is a fresh draw from the mixture on the env's data generator (so
    two envs with one seed draw the same batches); ':finite' trains on the fixed draw `x`."""
    from diffusion_rl.data import load_dataset
    from envs import DiffusionMRP

    infinite, finite = load_dataset("gmm:digits"), load_dataset("gmm:digits:finite")
    assert infinite.stream is not None and finite.stream is None
    torch.testing.assert_close(infinite.x, finite.x)
    a, b = (DiffusionMRP(infinite, batch_size=64, seed=3).reset_training(64) for _ in range(2))
    torch.testing.assert_close(a["x0"], b["x0"])
    rows = {tuple(r.flatten().tolist()) for r in infinite.x}
    assert not any(tuple(r.flatten().tolist()) in rows for r in a["x0"])  # none of them is from the fixed draw
    f = DiffusionMRP(finite, batch_size=64, seed=3).reset_training(64)
    assert all(tuple(r.flatten().tolist()) in rows for r in f["x0"])
    assert set(a["label"].tolist()) <= set(range(10))
