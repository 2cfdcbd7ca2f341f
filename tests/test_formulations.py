"""Closed-form checks of the formulations (method.md §1, §3)."""
import pytest
import torch

from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import (CTFormulation, EDMFormulation, ICTFormulation, VPFormulation, make_formulation,
                                      pseudo_huber)
from diffusion_rl.schedules import ict_grid_size


@pytest.fixture(autouse=True)
def _float64():
    """These are closed-form checks: run them in float64, and restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)



def test_edm_grid_matches_spec_formula_and_direction():
    f = EDMFormulation()
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    expected = torch.tensor([(a + i / 17 * (b - a)) ** 7 for i in range(18)])
    assert torch.allclose(f.grid(), expected, rtol=1e-12)
    assert f.grid()[0] == pytest.approx(80) and f.grid()[-1] == pytest.approx(0.002)
    assert (f.grid().diff() < 0).all()  # larger index = less noise


def test_edm_index_round_trip_and_clamps():
    f = EDMFormulation()
    i = torch.linspace(0, 17, 101)
    assert torch.allclose(f.index(f.level(i)), i, atol=1e-9)
    assert f.level(torch.tensor([-3.0, 20.0])).tolist() == pytest.approx([80.0, 0.002])
    assert f.index(torch.tensor([1e3, 1e-6])).tolist() == pytest.approx([0.0, 17.0])


def test_vp_index_round_trip_and_alpha_bar_exact_at_integers():
    f = VPFormulation(timesteps=100)
    i = torch.linspace(0, 17, 37, dtype=torch.float64)
    assert torch.allclose(f.index(f.level(i)), i, atol=1e-9)
    assert f.level(torch.tensor([0.0, 17.0], dtype=torch.float64)).tolist() == pytest.approx([100.0, 1.0])
    betas = torch.linspace(1e-4 * 10, 0.02 * 10, 100)
    ab = torch.cumprod(1 - betas, 0)
    assert torch.allclose(f.alpha_bar(torch.arange(1, 101).double()), ab, rtol=1e-10)
    assert f.alpha_bar(torch.tensor(0.0)) == 1


def test_vp_integer_timesteps_give_what_float_ones_give():
    # DDPM timesteps are integers: an integer level is not truncated to an integer index or coefficient
    f = VPFormulation()
    t = torch.tensor([1, 250, 500, 999])
    assert torch.allclose(f.index(t), f.index(t.double()))
    for ints, floats in zip(f.one_step_posterior(t, 0.2), f.one_step_posterior(t.double(), 0.2)):
        assert ints.is_floating_point() and torch.allclose(ints, floats)


def test_edm_preconditioning_and_weight():
    f = EDMFormulation()
    s = torch.tensor([0.01, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = f.preconditioning(s)
    assert torch.allclose(c_skip, 0.25 / (s ** 2 + 0.25))
    assert torch.allclose(c_out, s * 0.5 / (s ** 2 + 0.25).sqrt())
    assert torch.allclose(c_in, 1 / (s ** 2 + 0.25).sqrt())
    assert torch.allclose(c_noise, s.log() / 4)
    assert torch.allclose(f.base_weight(s), 1 / c_out ** 2)


def test_ct_boundary_condition():
    f = CTFormulation()
    c_skip, c_out, _, _ = f.preconditioning(torch.tensor([0.002]))
    assert c_skip.item() == pytest.approx(1.0) and c_out.item() == pytest.approx(0.0)


def test_edm_kappa_depends_on_coupling():
    f = EDMFormulation()
    t, s = torch.tensor([2.0]), torch.tensor([1.0])
    A, k = f.posterior(t, s, "markov")
    assert k.item() == pytest.approx(0.25) and A.item() == pytest.approx(0.75)
    A, k = f.posterior(t, s, "shared")
    assert k.item() == pytest.approx(0.5) and A.item() == pytest.approx(0.5)


@pytest.mark.parametrize("name,coupling", [("edm", "markov"), ("edm", "shared"), ("vp", "markov"), ("vp", "shared")])
def test_posterior_matches_monte_carlo(name, coupling):
    """E[x_s | x_t, x0] = A x0 + kappa x_t: regress x_s on x_t for fixed x0 over pairs drawn FORWARD by hand
    (x_s ~ q(x_s | x0), then x_t ~ q(x_t | x_s) for Markov; one shared noise otherwise), independent of the library's
    posterior and reverse kernel."""
    f = make_formulation(name)
    lt, ls = (torch.tensor([3.0]), torch.tensor([1.2])) if name == "edm" else (torch.tensor([600.0]), torch.tensor([350.0]))
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    g = torch.Generator().manual_seed(0)
    n1, n2 = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    x_s = f.add_noise(x0, ls.expand(n), n1)
    if coupling == "shared":
        x_t = f.add_noise(x0, lt.expand(n), n1)
    elif name == "edm":
        x_t = x_s + (lt ** 2 - ls ** 2).sqrt() * n2
    else:
        ratio = f.alpha_bar(lt) / f.alpha_bar(ls)
        x_t = ratio.sqrt() * x_s + (1 - ratio).sqrt() * n2
    # the library's reverse kernel draws x_s | x_t, x0 with the same moments
    x_rev = f.reverse_step(x0, x_t, lt.expand(n), ls.expand(n), coupling, generator=g)
    assert (x_rev - x_s).mean().abs().item() < 0.01 and abs(x_rev.var().item() - x_s.var().item()) < 0.02
    A, kappa = f.posterior(lt, ls, coupling)
    xt, xs = x_t[:, 0], x_s[:, 0]
    slope = ((xt - xt.mean()) * (xs - xs.mean())).mean() / xt.var()
    intercept = xs.mean() - slope * xt.mean()
    assert slope.item() == pytest.approx(kappa.item(), abs=0.01)
    assert intercept.item() == pytest.approx(A.item() * 0.7, abs=0.01)
    resid = xs - (A * 0.7 + kappa * xt)
    assert resid.var().item() == pytest.approx(f.posterior_variance(lt, ls, coupling).item(), abs=0.01)


def test_vp_posterior_is_not_ve_shortcut():
    f = VPFormulation()
    A, kappa = f.posterior(torch.tensor([500.0]), torch.tensor([400.0]))
    assert abs((A + kappa).item() - 1) > 1e-3  # method.md §12.3: VP needs its own A and kappa


def x0_from_eps(f: VPFormulation, x, eps, t):
    """x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), by hand (method.md §9)."""
    ab = f.alpha_bar(t)[:, None]
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


def test_vp_eps_x0_round_trip_and_eps_loss_weight():
    f = VPFormulation()
    x0, eps, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1.0, 10.0, 500.0, 999.0])
    x = f.add_noise(x0, t, eps)
    assert torch.allclose(f.eps_from_x0(x, x0, t), eps, atol=1e-8)
    assert torch.allclose(x0_from_eps(f, x, eps, t), x0, atol=1e-6)
    # the base loss on D equals the eps loss on the implied eps prediction
    d = x0 + 0.1 * torch.randn(4, 3)
    eps_hat = f.eps_from_x0(x, d, t)
    assert torch.allclose(f.base_loss(d, x0, t), (eps_hat - eps).pow(2).mean(1), rtol=1e-6)


def test_vp_preconditioning_gives_x0_from_eps():
    f = VPFormulation()
    t = torch.tensor([3.0, 700.0])
    x, eps = torch.randn(2, 5), torch.randn(2, 5)
    c_skip, c_out, c_in, _ = f.preconditioning(t)
    d = c_skip[:, None] * x + c_out[:, None] * eps
    assert torch.allclose(d, x0_from_eps(f, x, eps, t))


def test_cosine_schedule_alpha_bar_decreasing():
    f = VPFormulation(schedule="cosine")
    ab = f.alpha_bars
    assert ab[0] == 1 and (ab.diff() < 0).all() and ab[-1] < 1e-3


@pytest.mark.parametrize("bad,match", [
    (lambda: make_formulation("edn"), "edn"),
    (lambda: EDMFormulation(steps=0), "steps"),
    (lambda: EDMFormulation(sigma_min=5, sigma_max=1), "sigma_min"),
    (lambda: VPFormulation(schedule="quadratic"), "quadratic"),
    (lambda: ICTFormulation(s0=1), "2 <= s0 <= s1"),
    (lambda: ICTFormulation(s0=20, s1=10), "s0=20, s1=10"),
    (lambda: EDMFormulation().posterior(torch.ones(1), torch.ones(1), "tied"), "tied"),
])
def test_bad_input_is_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        bad()


def test_training_level_distribution_is_lognormal():
    f = EDMFormulation()
    s = f.sample_training_level(100_000, torch.Generator().manual_seed(0))
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.02)


def test_vp_td_grid_keeps_the_partner_ratio_near_one():
    """TD on VP in variance-exploding units on EDM's rho grid of sigma~: r = A_t' / A_t stays in (1, 1.5) over every
    TD-valid start of the default grid, as for EDM (method.md §7, §9). On the raw timestep grid it ran 1.9-8.0."""
    f = VPFormulation()
    k, d = f.default_stride, f.default_one_step
    idx = torch.linspace(0, f.steps - 1 - (k + d), 400, dtype=torch.float64)
    A_t, kappa_t = f.one_step_posterior(f.level(idx), d)
    A_n, _ = f.one_step_posterior(f.level(idx + k), d)
    r = A_n / A_t
    assert (r > 1).all() and (r < 1.5).all(), (r.min(), r.max())
    # the value's coefficients are EDM's of sigma~: A = 1 - sigma~_d^2 / sigma~^2
    s, s_d = f.sigma_ve(f.level(idx)), f.sigma_ve(f.level(idx + d))
    torch.testing.assert_close(A_t, 1 - (s_d / s) ** 2)


def test_vp_sigma_ve_inverse():
    f = VPFormulation()
    t = torch.linspace(1, 1000, 97, dtype=torch.float64)
    torch.testing.assert_close(f.timestep_of_sigma_ve(f.sigma_ve(t)), t)


def test_ict_curriculum_doubles_in_equal_stages():
    """N = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)): 8 stages from 11 to 1281 points."""
    sizes = [ict_grid_size(k, 8000, 10, 1280) for k in range(8000)]
    assert sizes[0] == 11 and sizes[-1] == 1281 and sizes == sorted(sizes)
    assert [sizes[k] for k in range(0, 8000, 1000)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_grid_size(10**6, 8000, 10, 1280) == 1281  # capped past the end (a resume with more steps)
    base = ICTFormulation()
    assert base.steps == 11 and "steps" not in base.config()  # the current N is training state, not identity
    f = base.at_step(7999, 8000)
    assert base.steps == 11 and base.at_step(7999, 8000) is f  # a value per grid (cached), the base unchanged
    assert f.steps == 1281 and f.grid()[0] == 80.0 and f.grid()[-1] == pytest.approx(0.002)
    assert f.config() == base.config() and base.at_step(0, 8000) is base
    assert make_formulation("ict", **{k: v for k, v in f.config().items() if k != "name"}).config() == f.config()


def test_ict_levels_follow_the_lognormal_on_a_fine_grid():
    """Pair n is drawn with the N(-1.1, 2^2) mass of ln sigma between sigma(n) and sigma(n+1): on the 1281-point grid
    the drawn levels have that median, and every level is a grid point other than the last."""
    f = ICTFormulation().at_step(10**6, 8000)
    s = f.sample_training_level(50_000, torch.Generator().manual_seed(0))
    assert s.log().median().item() == pytest.approx(-1.1, abs=0.05)
    idx = f.index(s.double())
    assert torch.allclose(idx, idx.round(), atol=1e-3) and idx.max() <= f.steps - 2


def test_pseudo_huber_is_l2_near_zero_and_l1_far_away():
    a = torch.zeros(2, 1, 8, 8)
    c = 0.00054 * 8
    small, large = torch.full_like(a, 1e-5), torch.full_like(a, 3.0)
    assert pseudo_huber(a, a).abs().max() < 1e-12
    sq = small.pow(2).sum().item() / 2
    assert pseudo_huber(small, a)[0].item() == pytest.approx(sq / (2 * c), rel=1e-2)
    assert pseudo_huber(large, a)[0].item() == pytest.approx(3.0 * 8 - c, rel=1e-4)


def test_ict_weight_is_the_inverse_gap_to_the_partner():
    f = ICTFormulation()
    grid = f.grid(torch.float64)
    w = f.base_weight(grid[:-1])
    torch.testing.assert_close(w, 1 / (grid[:-1] - grid[1:]))


@pytest.mark.parametrize("name", ["edm", "vp"])
def test_mixed_coupling_is_shared_below_the_switch_index_and_markov_above(name):
    f = make_formulation(name)
    idx = torch.linspace(0, f.steps - 1.5, 40, dtype=torch.float64)
    lt = f.level(idx)
    ls = f.level(idx + 1)
    noisy = idx < 6
    for fn in (lambda c: f.posterior(lt, ls, c), lambda c: (f.posterior_variance(lt, ls, c),),
               lambda c: f.one_step_posterior(lt, 0.2, c)):
        for m, s, k in zip(fn("mixed:6"), fn("shared"), fn("markov")):
            torch.testing.assert_close(m[noisy], s[noisy], check_dtype=False)
            torch.testing.assert_close(m[~noisy], k[~noisy], check_dtype=False)
    with pytest.raises(ConfigError, match="accepted: markov, shared, mixed:M"):
        f.posterior(lt, ls, "mixed:abc")
    with pytest.raises(ConfigError, match="past the grid's last index"):
        f.posterior(lt, ls, "mixed:40")


def test_each_family_names_its_level_currency():
    """A "level" is sigma for EDM and CT, the timestep t for VP (method.md §1); the index converts between them."""
    from diffusion_rl.formulations import make_formulation

    assert {n: make_formulation(n).level_name for n in ("edm", "ct", "ict", "vp")} == {
        "edm": "sigma", "ct": "sigma", "ict": "sigma", "vp": "t"}
    for name in ("edm", "vp"):
        f = make_formulation(name)
        idx = torch.tensor([0.0, 5.5, float(f.steps - 1)], dtype=torch.float64)
        torch.testing.assert_close(f.index(f.level(idx)), idx, rtol=0, atol=1e-6)
