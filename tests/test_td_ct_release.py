"""TD-CT as the consistency-model release does it (method.md §10.1-§10.4).

`release_td_ct` below is a transcription of the release's TD-CT loss written from its semantics (docs/method.md
§10.1-§10.3), not from its text: indices n ~ U{0..N-2}, shared noise, kappa = (sigma(n + delta) / sigma(n))^2 with
the one-step index clamped to the grid, boundary n >= N-2, the target in train mode replaying the online call's
dropout masks for the CT target and drawing fresh ones for the TD partner. The library's loss must equal it on the
same draws and networks.
"""
from __future__ import annotations

import math

import pytest
import torch

from agents import ConsistencyBaseline, TDEvaluator
from diffusion_rl.build import make_learner
from diffusion_rl.config import Args, apply_preset
from diffusion_rl.data import load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import CTFormulation
from diffusion_rl.networks import Denoiser, build_network
from diffusion_rl.schedules import adaptive_target_tau, progressive_grid_size
from diffusion_rl.training import TrainConfig
from envs import DiffusionMRP

SMIN, SMAX, RHO, SD = 0.002, 80.0, 7.0, 0.5


def sigma_of(i: torch.Tensor, N: int) -> torch.Tensor:
    a, b = SMAX ** (1 / RHO), SMIN ** (1 / RHO)
    return (a + i.clamp(0, N - 1) / (N - 1) * (b - a)) ** RHO


def release_td_ct(online, target, x0, noise, n, N, delta, lam, td_weight, ct_weight):
    """Per-sample TD-CT loss of the release, from its semantics (method.md §10.1-§10.3)."""
    t, t2 = sigma_of(n, N), sigma_of(n + 1, N)
    e = lambda v: v.reshape(-1, *([1] * (x0.dim() - 1)))  # noqa: E731
    x_t, x_t2 = x0 + e(t) * noise, x0 + e(t2) * noise
    boundary = n >= N - 2
    state = torch.get_rng_state()
    f = online(x_t, t)
    torch.set_rng_state(state)  # the CT target replays the online call's dropout masks
    target.train()
    with torch.no_grad():
        f_ct = target(x_t2, t2)
        f_td = target(x_t2, t2)  # the TD partner: fresh masks
    target.eval()
    w_ct = torch.ones_like(t) if ct_weight == "uniform" else t ** -2 + 1 / SD ** 2
    loss_ct = w_ct * ((f - f_ct) ** 2).flatten(1).mean(1)
    kap_t = (sigma_of(n + delta, N) / t) ** 2  # the Markov posterior's coefficient, clamped one-step index
    kap_2 = (sigma_of(n + 1 + delta, N) / t2) ** 2
    A_t, A_2 = 1 - kap_t, 1 - kap_2
    mu_true = lambda A, k, x: e(A) * x0 + e(k) * x  # noqa: E731
    mu_model = lambda A, k, x, g: e(A) * g + e(k) * x  # noqa: E731
    d_true = mu_true(A_2, kap_2, x_t2) - mu_true(A_t, kap_t, x_t)
    d_model = mu_model(A_2, kap_2, x_t2, f_td) - mu_model(A_t, kap_t, x_t, f)
    td = ((d_true - d_model) ** 2).flatten(1).mean(1)
    w_td = 1 / (A_2 ** 2 + A_t ** 2).clamp(min=0.01) if td_weight == "pairwise" else 1 / (A_2 + A_t).clamp(min=0.01)
    td = td * w_td * (~boundary)
    return torch.where(boundary, (1 + lam) * loss_ct, td + lam * loss_ct)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def agent(digits, N, delta, dropout, td_weight, ct_weight, lam=0.5):
    form = CTFormulation(steps=N, weight=ct_weight)
    env = DiffusionMRP(digits, form, coupling="shared", one_step=delta, seed=3, dtype=torch.float64)
    torch.manual_seed(0)
    net = build_network((1, 8, 8), width=8, dropout=dropout).double()
    for p in net.parameters():  # away from the zero-initialised output, so f depends on the weights
        torch.nn.init.normal_(p, std=0.2)
    ag = TDEvaluator(env, denoiser=Denoiser(net, form), reweighting=td_weight, base_lambda=lam,
                     config=TrainConfig(batch_size=64), device="cpu")
    with torch.no_grad():  # a target that differs from the online network
        for p in ag.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ag, form


@pytest.mark.parametrize("N,delta,dropout,td_weight,ct_weight,lam", [
    (18, 0.25, 0.0, "pairwise", "uniform", 0.5),
    (18, 0.25, 0.3, "pairwise", "uniform", 0.5),
    (6, 1.5, 0.0, "linear", "uniform", 0.5),   # delta > 1: the clamped one-step index and the n >= N-2 boundary
    (6, 1.5, 0.3, "pairwise", "karras", 2.0),
    (40, 0.25, 0.2, "pairwise", "karras", 0.5),
    (81, 0.25, 0.0, "linear", "uniform", 5.0),
])
def test_td_ct_equals_the_release_on_the_same_draws(digits, N, delta, dropout, td_weight, ct_weight, lam):
    ag, form = agent(digits, N, delta, dropout, td_weight, ct_weight, lam)
    batch = ag.env.sample_pairs(64)
    x0 = batch["x0"]
    t = batch["level"]
    n = form.index(t).round()
    assert torch.allclose(sigma_of(n, N), t, rtol=1e-6)  # the env draws grid levels in float32
    noise = (batch["x"] - x0) / t.reshape(-1, 1, 1, 1)
    torch.manual_seed(7)
    out = ag.loss(batch)
    torch.manual_seed(7)
    want = release_td_ct(ag.denoiser, ag.target, x0, noise, n, N, delta, lam,
                         td_weight, ct_weight)
    assert torch.equal(out["valid"], n < N - 2)
    torch.testing.assert_close(out["sample_loss"], want.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out["loss_td"] + out["loss_base"], want.mean(), rtol=1e-5, atol=1e-9)


def test_the_library_choices_stay_as_options(digits):
    """shared-path kappa and the masking boundary differ from the release where §10.1-§10.2 say they do."""
    ag, form = agent(digits, 6, 1.5, 0.0, "pairwise", "uniform")
    old = CTFormulation(steps=6, kappa="shared-path", boundary="mask")
    env = DiffusionMRP(load_dataset("digits"), old, coupling="shared", one_step=1.5, seed=3, dtype=torch.float64)
    batch, batch_old = ag.env.sample_pairs(256), env.sample_pairs(256)
    n = form.index(batch["level"]).round()
    assert torch.equal(batch["valid"], n < 4)  # release: n <= N-3
    n_old = old.index(batch_old["level"]).round()
    assert torch.equal(batch_old["valid"], n_old <= 6 - 1 - 2.5)  # mask: n + 1 + delta <= N-1
    level = torch.tensor([form.level(torch.tensor(1.0)).item()], dtype=torch.float64)
    A_rel, k_rel = form.one_step_posterior(level, 1.5, "shared")
    A_old, k_old = old.one_step_posterior(level, 1.5, "shared")
    ratio = sigma_of(torch.tensor(2.5), 6) / level
    torch.testing.assert_close(k_rel, ratio ** 2)
    torch.testing.assert_close(k_old, ratio)


def test_ct_target_eval_is_one_eval_mode_forward(digits):
    """--ct-target eval: the consistency target and the TD partner are one eval-mode forward (no dropout)."""
    ag, form = agent(digits, 18, 0.25, 0.3, "pairwise", "uniform")
    ev = TDEvaluator(ag.env, denoiser=ag.denoiser, reweighting="pairwise", ct_target="eval",
                     config=TrainConfig(batch_size=64), device="cpu")
    ev.target.load_state_dict(ag.target.state_dict())
    batch = ag.env.sample_pairs(64)
    torch.manual_seed(7)
    out = ev.loss(batch)
    with torch.no_grad():
        f_tgt = ev.target.eval()(batch["next", "x"], batch["next", "level"])
    torch.manual_seed(7)
    f = ev.denoiser(batch["x"], batch["level"])
    ct = ((f - f_tgt) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out["sample_base"], ct.detach())
    with pytest.raises(ConfigError, match="ct_target"):
        TDEvaluator(ag.env, denoiser=ag.denoiser, ct_target="frozen", device="cpu")


def test_ct_baseline_replays_dropout_like_the_release(digits):
    """Plain CT's target also replays the online call's masks: its loss equals the release's loss_ct."""
    form = CTFormulation()
    env = DiffusionMRP(digits, form, coupling="shared", seed=1, dtype=torch.float64)
    torch.manual_seed(0)
    net = build_network((1, 8, 8), width=8, dropout=0.3).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ct = ConsistencyBaseline(env, denoiser=Denoiser(net, form), config=TrainConfig(batch_size=32), device="cpu")
    batch = env.sample_pairs(32)
    torch.manual_seed(5)
    got = ct.loss(batch)["sample_base"]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    f = ct.denoiser(batch["x"], batch["level"])
    torch.set_rng_state(state)
    ct.target.train()
    with torch.no_grad():
        f_tgt = ct.target(batch["next", "x"], batch["next", "level"])
    ct.target.eval()
    torch.testing.assert_close(got, ((f - f_tgt) ** 2).flatten(1).mean(1).detach())
    assert not ct.target.training


@pytest.mark.parametrize("frac,N", [(0.0, 2), (0.1, 48), (0.5, 107), (1.0, 151)])
def test_the_release_schedule(frac, N):
    """The release's progressive grid (2 -> 151 points) and adaptive target EMA over its 800,001 steps."""
    total = 800_001
    assert progressive_grid_size(round(frac * total), total, 2, 150) == N
    assert adaptive_target_tau(N, 0.9, 2) == pytest.approx(math.exp(math.log(0.9) * 2 / (N - 1)))
    assert adaptive_target_tau(2, 0.9, 2) == pytest.approx(0.81)
    assert adaptive_target_tau(151, 0.9, 2) == pytest.approx(0.998596, abs=1e-6)


def test_the_recipes_as_presets(digits):
    """ct-release follows the schedule step by step (grid and target EMA); ct-openai is N = 40 with tau 0."""
    args = apply_preset(Args(preset="ct-release", method="td", steps=10, batch_size=8, width=8, eval=False), set())
    ag = make_learner(args, dataset=digits)
    ag.out_dir = None
    assert (ag.config.optimizer, ag.config.lr, ag.reweighting) == ("radam", 2e-4, "linear")
    assert isinstance(ag.optimizer, torch.optim.RAdam)
    seen = []
    hook = ag.after_update

    def spy():
        seen.append((ag.env.formulation.steps, ag.current_tau()))
        hook()

    ag.after_update = spy
    for _ in ag.train(10, progress=False):
        pass
    want = [progressive_grid_size(k, 10, 2, 150) for k in range(10)]
    assert [s for s, _ in seen] == want and ag.loss_module.formulation is ag.env.formulation
    assert ag.formulation.steps == 2  # the family's own formulation is never edited
    assert [tau for _, tau in seen] == pytest.approx([0.9 ** (2 / (s - 1)) for s in want])
    openai = make_learner(apply_preset(Args(preset="ct-openai", method="td", steps=10, batch_size=8, width=8,
                                            eval=False), set()), dataset=digits)
    assert openai.formulation.steps == 40 and openai.current_tau() == 0.0
    assert openai.formulation.config()["weight"] == "karras" and openai.reweighting == "pairwise"
    given = apply_preset(Args(preset="ct-release", lr=1e-3), {"lr"})
    assert given.lr == 1e-3 and given.optimizer == "radam"  # options given explicitly win


def test_records_name_the_lpips_substitute(digits):
    from benchmarks.compare import run_settings

    args = apply_preset(Args(preset="ct-release", method="baseline", steps=5, batch_size=8, width=8, eval=False),
                        set())
    s = run_settings(make_learner(args, dataset=digits), args)
    assert s["lpips_substitute"].startswith("l2 in place of the release's LPIPS")
    assert s["ct_loss"]["grid"] == "progressive:2:150" and s["target_tau_schedule"] == "adaptive:0.9:2"


def test_lpips_from_a_weights_file(tmp_path):
    """A TorchScript LPIPS module is used with the release's input handling; a missing file is refused."""

    class Toy(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return ((a - b) ** 2).mean(dim=(1, 2, 3))

    path = tmp_path / "lpips.pt"
    torch.jit.script(Toy()).save(str(path))
    form = CTFormulation(distance=f"lpips:{path}")
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    up = lambda x: torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=224, mode="bilinear")  # noqa: E731
    want = (((up(a) + 1) / 2 - (up(b) + 1) / 2) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(form.base_loss(a, b, torch.ones(3)), want)
    assert form.config()["distance"] == f"lpips:{path}"
    missing = CTFormulation(distance=f"lpips:{tmp_path / 'missing.pt'}")  # sampling from a checkpoint needs no file
    with pytest.raises(ConfigError, match="do not exist"):
        missing.distance.load()  # training loads it before any work (build.formulation)
    with pytest.raises(ConfigError, match="do not exist"):
        make_learner(Args(formulation="ct", method="td", ct_distance=f"lpips:{tmp_path / 'missing.pt'}", eval=False))
    import copy
    assert copy.deepcopy(form).distance.fn is form.distance.fn  # the EMA and target copies share the metric
    with pytest.raises(ConfigError, match="accepted: l2, pseudo_huber"):
        CTFormulation(distance="lpips")


def test_ct_options_are_refused_elsewhere():
    from diffusion_rl.build import check_command

    with pytest.raises(ConfigError, match="consistency-training recipe"):
        check_command(apply_preset(Args(preset="ct-release", formulation="edm"), {"formulation"}),
                      given={"formulation", "preset"})
    with pytest.raises(ConfigError, match="exclude each other"):
        check_command(apply_preset(Args(preset="ct-release", method="td", target_tau=0.99), {"target_tau"}),
                      given={"target_tau", "preset"})
    assert progressive_grid_size(20, 10, 2, 150) == 151  # capped past the end

    with pytest.raises(ConfigError, match="--ct-kappa applies to the consistency formulations"):
        check_command(Args(formulation="edm", method="td", ct_kappa="shared-path"), given={"ct_kappa"})
    with pytest.raises(ConfigError, match="consistency grid"):
        CTFormulation(grid="progressive:1:5")
    with pytest.raises(ConfigError, match="adaptive:MU0:S0"):
        make_learner(Args(formulation="ct", method="td", target_tau_schedule="adaptive:1.5:2", eval=False))
