"""Samplers against the exact Gaussian denoiser, NFE bookkeeping and errors."""
import math

import pytest
import torch

from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import EDMFormulation, VPFormulation, expand_as_image
from diffusion_rl.samplers import sample, sampler_for_nfe, steps_for_nfe

M, S = 0.3, 0.5


def gaussian_denoiser(x, sigma, labels=None):
    # D*(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m) for x0 ~ N(m, s^2)
    sig = expand_as_image(sigma, x)
    return M + S ** 2 / (S ** 2 + sig ** 2) * (x - M)


def exact_ode_solution(x_T, sigma_max):
    # (x_sigma - m) / sqrt(s^2 + sigma^2) is constant along the probability-flow ODE
    return M + (x_T - M) * S / (S ** 2 + sigma_max ** 2) ** 0.5


@pytest.mark.parametrize("sampler,nfe,tol", [("heun", 201, 5e-3), ("euler", 800, 1e-2)])
def test_edm_samplers_reach_exact_ode_solution(sampler, nfe, tol):
    f = EDMFormulation()
    res = sample(gaussian_denoiser, f, (500, 1), sampler=sampler, nfe=nfe, generator=torch.Generator().manual_seed(0))
    x_T = f.prior((500, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert res.nfe == nfe and res.x.dtype == torch.float64
    assert (res.x - exact_ode_solution(x_T, 80.0)).abs().max().item() < tol


def _ode_error(sampler: str, nfe: int) -> float:
    f = EDMFormulation()
    res = sample(gaussian_denoiser, f, (200, 1), sampler=sampler, nfe=nfe, generator=torch.Generator().manual_seed(0))
    x_T = f.prior((200, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert res.nfe == nfe
    return (res.x - exact_ode_solution(x_T, 80.0)).abs().max().item()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_lof", "ipndm"])
def test_multistep_solvers_converge_at_order_two(sampler):
    """DPM-Solver++(2M) and iPNDM reach the exact ODE solution of Gaussian data, the error falling about 4x per
    doubling of NFE (order 2) once past a handful of steps."""
    errs = [_ode_error(sampler, nfe) for nfe in (16, 32, 64, 128)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 2e-3, errs
    assert all(1.8 < p < 2.6 for p in orders), orders


def test_multistep_solvers_beat_euler_and_heun_at_few_steps():
    for nfe in (5, 9):
        best_classic = min(_ode_error("euler", nfe), _ode_error("heun", nfe))
        assert _ode_error("dpmpp_2m", nfe) < best_classic and _ode_error("ipndm", nfe) < best_classic


def test_lower_order_final_drops_only_the_extrapolation_into_sigma_min():
    """dpmpp_2m_lof at NFE 4: a first-order step, the 2M extrapolation D_1 + (D_1 - D_0) h_1 / (2 h_0), then a
    first-order step into sigma_min where dpmpp_2m extrapolates again, then D at sigma_min. At NFE 1-2 nothing is
    extrapolated, so both solvers agree."""
    from diffusion_rl.schedules import edm_sampling_sigmas

    f = EDMFormulation()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same start for each call
    s = edm_sampling_sigmas(4, f.sigma_min, f.sigma_max, f.rho)
    h = [(s[i].log() - s[i + 1].log()) for i in range(2)]
    D = lambda x, i: gaussian_denoiser(x, s[i].expand(50))  # noqa: E731
    step = lambda x, i, d: (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * d  # noqa: E731
    x0 = f.prior((50, 1), generator=gen(), dtype=torch.float64)
    d0 = D(x0, 0)
    x1 = step(x0, 0, d0)
    d1 = D(x1, 1)
    x2 = step(x1, 1, d1 + (d1 - d0) * h[1] / (2 * h[0]))
    x3 = step(x2, 2, D(x2, 2))  # first order into sigma_min
    by_hand = D(x3, 3)
    lof = sample(gaussian_denoiser, f, (50, 1), sampler="dpmpp_2m_lof", nfe=4, generator=gen()).x
    two_m = sample(gaussian_denoiser, f, (50, 1), sampler="dpmpp_2m", nfe=4, generator=gen()).x
    assert torch.allclose(lof, by_hand, rtol=0, atol=1e-12) and not torch.allclose(two_m, by_hand, atol=1e-6)
    for nfe in (1, 2):
        assert torch.equal(sample(gaussian_denoiser, f, (50, 1), sampler="dpmpp_2m_lof", nfe=nfe, generator=gen()).x,
                           sample(gaussian_denoiser, f, (50, 1), sampler="dpmpp_2m", nfe=nfe, generator=gen()).x)


def test_heun_error_shrinks_with_nfe():
    f = EDMFormulation()
    errs = []
    for nfe in (9, 35, 101):
        res = sample(gaussian_denoiser, f, (200, 1), nfe=nfe, generator=torch.Generator().manual_seed(1))
        x_T = f.prior((200, 1), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        errs.append((res.x - exact_ode_solution(x_T, 80.0)).abs().max().item())
    assert errs[0] > errs[1] > errs[2]


def test_nfe_bookkeeping():
    assert [steps_for_nfe("heun", n) for n in (1, 3, 5, 35)] == [1, 2, 3, 18]
    assert steps_for_nfe("euler", 2) == 2
    assert sampler_for_nfe(EDMFormulation(), 2) == "euler" and sampler_for_nfe(EDMFormulation(), 9) == "heun"
    with pytest.raises(ConfigError, match="sampler for formulation 'edm'.*'ddim'"):
        sampler_for_nfe(EDMFormulation(), 3, "ddim")  # another family's sampler is refused before any sampling
    calls = []

    def counting(x, s, y):
        calls.append(1)
        return gaussian_denoiser(x, s, y)

    for nfe in (1, 3, 9):
        calls.clear()
        assert sample(counting, EDMFormulation(), (4, 1), sampler="heun", nfe=nfe).nfe == nfe == len(calls)


def test_vp_samplers_with_exact_denoiser():
    """DDIM with the exact VP denoiser recovers the data moments; DDPM ancestral too (stochastic)."""
    f = VPFormulation()

    def d_vp(x, t, labels=None):
        ab = expand_as_image(f.alpha_bar(t), x)
        # x = sqrt(ab) x0 + sqrt(1-ab) n with x0 ~ N(m, s^2): E[x0 | x] by Gaussian conditioning
        var = ab * S ** 2 + (1 - ab)
        return M + ab.sqrt() * S ** 2 / var * (x - ab.sqrt() * M)

    for name, nfe in (("ddim", 100), ("ddpm", 200)):
        x = sample(d_vp, f, (20000, 1), sampler=name, nfe=nfe, generator=torch.Generator().manual_seed(0)).x
        assert x.mean().item() == pytest.approx(M, abs=0.02)
        assert x.std().item() == pytest.approx(S, abs=0.02)


def test_seeded_and_batched():
    f = EDMFormulation()
    a = sample(gaussian_denoiser, f, (8, 1), nfe=5, generator=torch.Generator().manual_seed(3)).x
    b = sample(gaussian_denoiser, f, (8, 1), nfe=5, generator=torch.Generator().manual_seed(3)).x
    assert torch.equal(a, b)
    c = sample(gaussian_denoiser, f, (8, 1), nfe=5, dtype=torch.float32).x
    assert c.dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    ({"sampler": "heun", "nfe": 4}, "nfe 4"),
    ({"sampler": "rk4", "nfe": 3}, "rk4"),
    ({"sampler": "ddim", "nfe": 3}, "ddim"),
    ({"sampler": "euler", "nfe": 0}, "nfe"),
    ({"sampler": "euler", "steps": -2}, "steps"),
])
def test_bad_sampler_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        sample(gaussian_denoiser, EDMFormulation(), (2, 1), **kwargs)


def test_consistency_multistep_renoises_to_levels_above_sigma_min():
    from diffusion_rl.formulations import CTFormulation
    from diffusion_rl.samplers import multistep

    f, seen = CTFormulation(), []

    def denoise(x, level, labels):
        seen.append(float(level.flatten()[0]))
        return torch.zeros_like(x)

    _, nfe = multistep(denoise, f, torch.randn(4, 2, dtype=torch.float64), 2)
    assert nfe == 2 and seen[0] == f.sigma_max and f.sigma_min * 100 < seen[1] < f.sigma_max / 10


def vp_gaussian_denoiser(f):
    """The exact VP denoiser of N(M, S^2) data: x~ = x / sqrt(abar) = x0 + sigma~ eps is EDM's problem in sigma~."""
    def denoise(x, t, labels=None):
        ab = expand_as_image(f.alpha_bar(t), x)
        return gaussian_denoiser(x / ab.sqrt(), expand_as_image(((1 - f.alpha_bar(t)) / f.alpha_bar(t)).sqrt(), x))
    return denoise


def test_euler_on_vp_converges_at_order_one_on_the_training_grid():
    """Euler in VP's variance-exploding view (what `diagnose` runs): first order, and at steps = N it evaluates the
    denoiser at exactly the training grid's timesteps."""
    f = VPFormulation()
    x_T = f.prior((200, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode_solution(x_T / f.alpha_bar(torch.tensor(1000.0)).sqrt(), f.sigma_ve_max)
    errs = [(sample(vp_gaussian_denoiser(f), f, (200, 1), sampler="euler", nfe=nfe,
                    generator=torch.Generator().manual_seed(0)).x - exact).abs().max().item() for nfe in (64, 128, 256)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(0.8 < p < 1.3 for p in orders), (errs, orders)
    seen = []
    sample(lambda x, t, y=None: seen.append(float(t[0])) or x, f, (2, 1), sampler="euler", steps=f.steps)
    assert seen == pytest.approx(f.grid(torch.float64).tolist(), rel=1e-6)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_lof", "ipndm"])
def test_multistep_solvers_converge_at_order_two_on_vp(sampler):
    """On VP the solvers run in the variance-exploding view: with the exact denoiser they reach the exact ODE solution
    from x_T ~ N(0, 1) at t = T, x0 = M + (x_T / sqrt(abar_T) - M) S / sqrt(S^2 + sigma~(T)^2), at order 2."""
    f = VPFormulation()
    x_T = f.prior((200, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode_solution(x_T / f.alpha_bar(torch.tensor(1000.0)).sqrt(), f.sigma_ve_max)
    errs = []
    for nfe in (16, 32, 64, 128):
        res = sample(vp_gaussian_denoiser(f), f, (200, 1), sampler=sampler, nfe=nfe,
                     generator=torch.Generator().manual_seed(0))
        errs.append((res.x - exact).abs().max().item())
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    # lof's error at NFE 16 is already lower than dpmpp_2m's (0.080 vs 0.119), so its first ratio is only 1.5
    settled = orders[1:] if sampler == "dpmpp_2m_lof" else orders
    assert errs[-1] < 2e-3 and all(1.8 < p < 3.5 for p in settled), (errs, orders)  # order 2 or a bit better
