"""The FID pipeline on a chosen device: the Frechet distance from one symmetric eigenvalue problem, ImageFID's features
and statistics on its device (equal, on the CPU, to a frozen reference computation of every metric), the sampling
precision and compile settings of EvalConfig, and the fid_speed benchmark's arithmetic. CUDA variants are skipped
without a GPU."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.evaluation import EvalConfig, Evaluator
from diffusion_rl.feature_net import FeatureNet
from diffusion_rl.formulations import make_formulation
from diffusion_rl.metrics import ImageFID, frechet_distance, mean_and_covariance, psd_sqrt
from diffusion_rl.networks import MLP, Denoiser

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, seed: int, rank: int | None = None) -> Tensor:
    a = torch.randn(d, rank or 2 * d, generator=_gen(seed), dtype=torch.float64)
    return a @ a.T / a.shape[1]


# ------------------------------------------------------------------------------------------- the Frechet distance


def test_frechet_distance_of_commuting_covariances_is_the_closed_form() -> None:
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())  # 4.25 + 4 + 1 + 0
    assert float(frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(9.25)


def test_frechet_distance_equals_torchmetrics_general_eigenvalue_form() -> None:
    from torchmetrics.image.fid import _compute_fid

    d = 24
    mu1, mu2 = (torch.randn(d, generator=_gen(s), dtype=torch.float64) for s in (1, 2))
    s1, s2 = _spd(d, 3), _spd(d, 4)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours.dtype == torch.float64 and ours.shape == ()
    assert float(ours) == pytest.approx(float(_compute_fid(mu1, s1, mu2, s2)), rel=1e-10)
    assert float(frechet_distance(mu2, s2, mu1, s1)) == pytest.approx(float(ours), rel=1e-10)  # symmetric
    assert float(frechet_distance(mu1, s1, mu2, s2, sqrt_sigma1=psd_sqrt(s1))) == float(ours)  # reused root
    assert abs(float(frechet_distance(mu1, s1, mu1, s1))) < 1e-10 * float(s1.trace())  # zero on itself
    low = _spd(d, 5, rank=d // 3)  # singular (fewer vectors than dimensions), as Inception's 2048-d with few samples
    assert float(frechet_distance(mu1, low, mu2, s2)) == pytest.approx(float(_compute_fid(mu1, low, mu2, s2)),
                                                                       rel=1e-8)


def test_psd_sqrt_squares_back_and_mean_and_covariance_match_torch() -> None:
    s = _spd(10, 6)
    r = psd_sqrt(s)
    torch.testing.assert_close(r @ r, s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r, r.T)
    f = torch.randn(50, 10, generator=_gen(7), dtype=torch.float64) + 3
    mu, cov = mean_and_covariance(f.sum(0), f.T @ f, 50)
    torch.testing.assert_close(mu, f.mean(0))
    torch.testing.assert_close(cov, torch.cov(f.T), rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="at least 2"):
        mean_and_covariance(f[0], torch.outer(f[0], f[0]), 1)


# --------------------------------------------------------------- ImageFID against a frozen reference computation


def _feature_net(seed: int = 0) -> FeatureNet:
    """An untrained FeatureNet (fixed seed): a real conv net with a classifier head, no cache needed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureNet(1, 4, width=8, num_features=12).eval()


def _images(n: int, seed: int, shift: float = 0.0) -> Tensor:
    return (torch.rand(n, 1, 8, 8, generator=_gen(seed)) * 1.6 - 0.8 + shift).clamp(-1, 1)


def _frozen_reference(net: FeatureNet, real: Tensor, fake: Tensor, labels: Tensor, gallery: Tensor,
                      heldout: Tensor, seed: int, k: int, subsets: int) -> dict[str, float]:
    """Every metric of ImageFID from first principles, on the CPU in float64, without ImageFID's code paths: whole
    distance matrices, torch.cov, the trace of the square root as the nuclear norm of sqrt(S1) sqrt(S2) (its singular
    values are the roots of the eigenvalues of S1 S2), and KID as the CPU path always drew it (torchmetrics, its
    subsets from the CPU generator seeded with `seed`). "fid_torchmetrics" is FID as the CPU path computed it before
    (torchmetrics' own `compute`: the general eigenvalues of S1 S2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    with torch.no_grad():
        fr, ff = net(real.clamp(-1, 1)).double(), net(fake.clamp(-1, 1)).double()
        predicted = net.logits(fake.clamp(-1, 1)).argmax(1)
    s1, s2 = torch.cov(fr.T), torch.cov(ff.T)
    nuclear = torch.linalg.matrix_norm(_root(s1) @ _root(s2), ord="nuc")
    fid = float((fr.mean(0) - ff.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * nuclear)
    fid_metric = FrechetInceptionDistance(feature=_Identity(fr.shape[1]))
    fid_metric.update(fr, real=True)
    fid_metric.update(ff, real=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's "saves all features" notice
        kid_metric = KernelInceptionDistance(feature=_Identity(fr.shape[1]), subsets=subsets,
                                             subset_size=min(1000, len(fr), len(ff)))
    kid_metric.update(fr, real=True)
    kid_metric.update(ff, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid, kid_std = kid_metric.compute()

    d_rr, d_ff, d_fr = torch.cdist(fr, fr), torch.cdist(ff, ff), torch.cdist(ff, fr)
    r_real, r_fake = d_rr.kthvalue(k + 1, dim=1).values, d_ff.kthvalue(k + 1, dim=1).values
    tol = 1e-6 * float(fr.square().sum(1).mean().sqrt())
    precision = float((d_fr <= r_real[None, :] + tol).any(1).double().mean())
    recall = float((d_fr <= r_fake[:, None] + tol).any(0).double().mean())

    class_tv = 0.5 * float((_hist(predicted) - _hist(labels)).abs().sum())

    def nn_dist(x: Tensor) -> float:  # per-pixel RMS distance to the nearest gallery image, averaged
        flat = x.reshape(len(x), -1).double()
        return float((torch.cdist(flat, gallery.reshape(len(gallery), -1).double()).min(1).values / 8).mean())

    rms = float((fake.double() - real.double().mean(0)).square().mean().sqrt())
    return {"fid": fid, "fid_torchmetrics": float(fid_metric.compute()), "kid": float(kid), "kid_std": float(kid_std), "precision": precision, "recall": recall,
            "rms_from_mean": rms, "class_tv": class_tv, "nn_distance": nn_dist(fake),
            "memorisation_ratio": nn_dist(fake) / nn_dist(heldout)}


def _root(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _hist(classes: Tensor) -> Tensor:
    return torch.bincount(classes, minlength=4).double() / len(classes)


class _Identity(nn.Module):
    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize("n_fake", [150, 200])  # 200 = the reference's size: KID's one-subset case
def test_image_fid_on_the_cpu_equals_a_frozen_reference_computation(n_fake: int) -> None:
    net = _feature_net()
    real, fake = _images(200, 1), _images(n_fake, 2, shift=0.1)
    labels = torch.randint(0, 4, (200,), generator=_gen(3))
    gallery, heldout = _images(120, 4), _images(60, 5)
    fid = ImageFID(real, net, kid_subsets=7, seed=11, labels=labels, num_classes=4, nn_gallery=gallery,
                   nn_heldout=heldout, k=3, device="cpu")
    got = fid.compute(fake)
    want = _frozen_reference(net, real, fake, labels, gallery, heldout, seed=11, k=3,
                             subsets=1 if n_fake == 200 else 7)
    assert set(got) == set(want) - {"fid_torchmetrics"}
    assert want["fid"] == pytest.approx(want["fid_torchmetrics"], rel=1e-6)  # two routes to one number
    for name in got:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-12), name
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1 and got["fid"] > 0.01  # nothing trivially 0 or 1
    assert fid.compute(fake) == got  # the reference statistics survive the resets; KID's subsets are seeded


def test_kid_subsets_are_seeded_and_leave_the_global_generators_alone() -> None:
    fid = ImageFID(_images(80, 1), _feature_net(), kid_subsets=5, seed=3, device="cpu")
    before = torch.random.get_rng_state()
    a, b = fid.compute(_images(50, 2)), fid.compute(_images(50, 2))
    assert a["kid"] == b["kid"] and a["kid_std"] == b["kid_std"] > 0
    assert torch.equal(torch.random.get_rng_state(), before)


# ---------------------------------------------------------------------------------------- where ImageFID runs


def _device_of_everything(fid: ImageFID) -> set[torch.device]:
    return {fid.real_features.device, next(fid.feature_net.parameters()).device, fid.fid.real_features_sum.device,
            fid.kid.real_features[0].device, fid._sqrt_sigma_real.device, fid._pr_radii.device,
            fid._gallery.images.device}


def test_image_fid_takes_a_device_and_keeps_the_features_there() -> None:
    net = _feature_net()
    fid = ImageFID(_images(60, 1), net, kid_subsets=3, nn_gallery=_images(30, 4), device="cpu")
    assert fid.device == torch.device("cpu") and _device_of_everything(fid) == {torch.device("cpu")}
    assert fid.real_features.dtype == torch.float64
    assert set(fid.compute(_images(40, 2))) == set(fid.metric_names)
    assert ImageFID(_images(10, 1), _feature_net()).device == torch.device("cpu")  # default: the net's device
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert ImageFID(_images(10, 1), _feature_net(), kid_subsets=2, device="auto").device == expected
    with pytest.raises(ConfigError, match="unknown device"):
        ImageFID(_images(10, 1), _feature_net(), device="tpu")


@cuda
def test_image_fid_on_cuda_keeps_everything_there_and_matches_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 convolutions and matrix products:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the features agree to rounding
    real, fake, gallery, heldout = _images(300, 1), _images(250, 2, 0.1), _images(100, 4), _images(50, 5)
    labels = torch.randint(0, 4, (300,), generator=_gen(3))
    kw = {"kid_subsets": 9, "seed": 5, "labels": labels, "num_classes": 4, "nn_gallery": gallery,
          "nn_heldout": heldout}
    on_cpu = ImageFID(real, _feature_net(), device="cpu", **kw)
    on_gpu = ImageFID(real, _feature_net(), device="cuda", **kw)
    assert {d.type for d in _device_of_everything(on_gpu)} == {"cuda"}
    a, b = on_cpu.compute(fake), on_gpu.compute(fake.cuda())  # samples may live on either device
    assert on_gpu.compute(fake) == pytest.approx(b, rel=1e-6)  # ... with the same result
    assert set(a) == set(b) and all(math.isfinite(v) for v in b.values())
    for name in ("fid", "kid", "kid_std", "nn_distance", "memorisation_ratio", "rms_from_mean"):
        assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-6), name  # CUDA's kernels round differently
    for name in ("precision", "recall", "class_tv"):
        assert b[name] == pytest.approx(a[name], abs=0.02), name  # a point on a ball's edge (or a tie) may flip
    feats = on_cpu.real_features[:260].float()  # identical features on both devices: equal to 1e-6
    x = on_cpu.compute_from_features(feats[:200])
    y = on_gpu.compute_from_features(feats[:200].cuda())
    for name in ("fid", "kid", "kid_std", "precision", "recall"):
        assert y[name] == pytest.approx(x[name], rel=1e-6, abs=1e-9), name


@cuda
def test_kid_subsets_on_cuda_leave_the_cuda_generator_alone() -> None:
    fid = ImageFID(_images(80, 1), _feature_net(), kid_subsets=5, device="cuda")
    before = torch.cuda.get_rng_state()
    fid.compute(_images(50, 2))
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_evaluator_runs_the_image_metrics_on_its_device(digits) -> None:
    ev = Evaluator(digits, EvalConfig(nfe_grid=(3,), n_samples=50, device="cpu"))
    assert ev._fid.device == torch.device("cpu") and ev._fid.real_features.device == torch.device("cpu")
    scores = ev.score(digits.x[:50].cuda() if torch.cuda.is_available() else digits.x[:50])
    assert math.isfinite(scores["fid"]) and set(scores) == set(ev._fid.metric_names)


# ------------------------------------------------------------------------------- sampling precision and compile


def _denoiser() -> Denoiser:
    torch.manual_seed(0)
    net = MLP(dim=2, width=32, depth=2)
    with torch.no_grad():  # a non-zero output layer, so the precision shows
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Denoiser(net, make_formulation("edm")).eval()


def _points() -> Dataset:
    return Dataset("toy", torch.randn(256, 2, generator=_gen(0)), None, 0, "points")


def test_eval_config_checks_precision_and_compile() -> None:
    assert (EvalConfig().precision, EvalConfig().compile) == ("fp32", False)
    with pytest.raises(ConfigError, match="precision"):
        EvalConfig(precision="fp8")
    with pytest.raises(ConfigError, match="compile"):
        EvalConfig(compile="yes")


def test_bf16_sampling_uses_a_view_that_shares_the_weights_and_leaves_the_denoiser_alone() -> None:
    den = _denoiser()
    fp32 = Evaluator(_points(), EvalConfig(nfe_grid=(5,), n_samples=64, batch_size=32))
    bf16 = Evaluator(_points(), EvalConfig(nfe_grid=(5,), n_samples=64, batch_size=32, precision="bf16"))
    assert fp32.sampling_net(den) is den  # the defaults sample with the network as given
    view = bf16.sampling_net(den)
    assert view is not den and bf16.sampling_net(den) is view  # made once
    assert view.precision == "bf16" and den.precision == "fp32"
    assert view.net is den.net and all(a is b for a, b in zip(view.parameters(), den.parameters()))
    a, _ = fp32.generate(den, 5)
    b, _ = bf16.generate(den, 5)
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)  # autocast is on, the state is not bf16
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    with torch.no_grad():
        den.net.out.bias.add_(1.0)  # a weight update of the original (as an EMA's) reaches the view
    c, _ = bf16.generate(den, 5)
    assert not torch.allclose(c, b, atol=0.1)
    recs = bf16.sweep(den, "m", 0, progress=False)
    assert {r["precision"] for r in recs} == {"bf16"} and {r["precision"] for r in fp32.sweep(
        den, "m", 0, progress=False)} == {"fp32"}


def test_compile_is_asked_once_for_the_shared_network_and_fp16_needs_cuda(monkeypatch) -> None:
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)  # no inductor here
    den = _denoiser()
    ev = Evaluator(_points(), EvalConfig(nfe_grid=(3, 5), n_samples=8, compile=True))
    ev.generate(den, 5)
    ev.generate(den, 3)
    assert compiled == [den.net]  # once per denoiser, not once per budget
    assert ev.sampling_net(den) is not den and den.precision == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        Evaluator(_points(), EvalConfig(nfe_grid=(5,), n_samples=8, precision="fp16")).generate(den, 5, "cpu")


def test_a_repeated_budget_is_refused():  # its records would count as a second seed in every summary
    with pytest.raises(ConfigError, match=r"nfe_grid \[3, 5, 3\] repeats 3"):
        EvalConfig(nfe_grid=(3, 5, 3))


# ---------------------------------------------------------------------------------------- the fid_speed benchmark


def test_fid50k_estimate_scales_sampling_by_nfe_and_the_metric_by_budget() -> None:
    from benchmarks.fid_speed import SIX_BUDGETS, fid50k_estimate, metric_share

    sampling, metric = {3: 3.0, 9: 9.0}, {3: 0.5, 9: 0.7}  # 1 s per network evaluation over 1,000 samples
    est = fid50k_estimate(1000, 2.0, sampling, metric)
    assert est["fid50k_six_budgets_sampling_s"] == pytest.approx(1.0 * sum(SIX_BUDGETS) * 50)
    assert est["fid50k_six_budgets_metric_s"] == pytest.approx(0.6 * 6 * 50)
    assert est["fid50k_reference_s"] == pytest.approx(100.0)
    assert est["fid50k_six_budgets_s"] == pytest.approx(100 + 148 * 50 + 180)
    assert metric_share(sampling, metric) == pytest.approx(1.2 / 12)


def test_fid_speed_times_sampling_and_the_metric_apart(tmp_path) -> None:
    from benchmarks.fid_speed import FIDSpeedArgs, fid50k_estimate, run

    a = FIDSpeedArgs(shape="1,8,8", preset="", width=8, n_samples=40, nfe_grid="1,3", batch_size=20, device="cpu",
                     features="classifier", out=str(tmp_path / "f.json"))
    row = run(a)
    assert set(row["sampling_s"]) == set(row["metric_s"]) == {1, 3}
    assert row["metric_share"] == pytest.approx(sum(row["metric_s"].values()) / sum(row["sampling_s"].values()))
    est = fid50k_estimate(40, row["reference_features_s"], row["sampling_s"], row["metric_s"])
    assert row["fid50k_six_budgets_s"] == pytest.approx(est["fid50k_six_budgets_s"])
    assert row["feature_net_s"] > 0 and row["metric_device"] == "cpu"
    for nfe in (1, 3):
        assert row["sample_and_features_s"][nfe] == pytest.approx(row["sampling_s"][nfe] + row["metric_s"][nfe])
