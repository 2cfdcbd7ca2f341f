"""Metrics: point-cloud distances against closed forms, FID plumbing against the Gaussian Fréchet distance,
and the cached feature net."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import Tensor, nn

from diffusion_rl import feature_net
from diffusion_rl.data import Dataset, load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.feature_net import FeatureNet, get_feature_net, inception_feature_net, split_dataset
from diffusion_rl.metrics import ImageFID, energy_distance, sliced_wasserstein2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ point clouds


def test_energy_distance_same_vs_shifted() -> None:
    x = torch.randn(1500, 2, generator=_gen(0))
    y = torch.randn(1500, 2, generator=_gen(1))
    same = energy_distance(x, y)
    shifted = energy_distance(x, y + torch.tensor([1.0, 0.0]))
    assert abs(same) < 0.02
    assert shifted > 0.2 and shifted > 10 * abs(same)


def test_energy_distance_is_u_statistic() -> None:
    x = torch.tensor([[0.0], [1.0]])
    # cross mean (0 + 1 + 1 + 0) / 4 = 0.5; within-sample means over i != j pairs = 1 each
    assert energy_distance(x, x) == pytest.approx(2 * 0.5 - 1 - 1)


def test_sliced_w2_gaussian_shift_closed_form() -> None:
    d, mu = 4, torch.tensor([2.0, 0.0, 0.0, 0.0])
    x = torch.randn(4000, d, generator=_gen(0))
    y = torch.randn(4000, d, generator=_gen(1)) + mu
    expected = float(mu.norm()) / math.sqrt(d)  # E_theta (theta . mu)^2 = |mu|^2 / D
    assert sliced_wasserstein2(x, y, n_projections=2000, generator=_gen(2)) == pytest.approx(expected, rel=0.06)
    y_small = y[:2500]  # unequal sample sizes
    assert sliced_wasserstein2(x, y_small, n_projections=2000, generator=_gen(2)) == pytest.approx(expected, rel=0.06)
    assert sliced_wasserstein2(x, torch.randn(3000, d, generator=_gen(3)), generator=_gen(2)) < 0.1


def test_sliced_w2_exact_1d_unequal_sizes() -> None:
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [0.5], [1.0]])
    # quantile functions differ by 0.5 on (1/3, 2/3]: W2^2 = 0.25 * 1/3
    assert sliced_wasserstein2(x, y, n_projections=8, generator=_gen(0)) == pytest.approx(math.sqrt(1 / 12))
    z = torch.randn(50, 3, generator=_gen(1))
    assert sliced_wasserstein2(z, torch.cat([z, z, z]), generator=_gen(0)) == pytest.approx(0.0, abs=1e-9)


def test_point_metrics_reject_bad_input() -> None:
    with pytest.raises(ConfigError, match="dimension"):
        energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ConfigError, match="shape"):
        sliced_wasserstein2(torch.zeros(5), torch.zeros(5, 1))
    with pytest.warns(UserWarning, match="NaN"):  # a diverged sampler is reported, not an error
        assert math.isnan(sliced_wasserstein2(torch.full((5, 2), float("nan")), torch.zeros(5, 2)))
    with pytest.warns(UserWarning, match="NaN"):
        assert math.isnan(energy_distance(torch.zeros(5, 2), torch.full((5, 2), float("inf"))))


# ------------------------------------------------------------------------------------------------ FID plumbing


class _Scale(nn.Module):
    """Identity-like feature net: flattens and scales by 10 (images stay well inside [-1, 1])."""

    num_features = 3

    def forward(self, x: Tensor) -> Tensor:
        return 10 * x.flatten(1)


def _frechet(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_image_fid_matches_gaussian_frechet_distance() -> None:
    n = 20000
    m1, m2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    a2 = np.array([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.0, 0.3, 1.2]])
    s1, s2 = np.eye(3), a2 @ a2.T
    g = _gen(0)
    f_real = torch.from_numpy(m1) + torch.randn(n, 3, generator=g, dtype=torch.float64)
    f_fake = torch.from_numpy(m2) + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.from_numpy(a2).T
    real, fake = (f_real / 10).float()[:, :, None, None], (f_fake / 10).float()[:, :, None, None]
    assert real.abs().max() < 1 and fake.abs().max() < 1

    fid = ImageFID(real, _Scale(), kid_subsets=10)
    out = fid.compute(fake)
    fr, ff = (10 * real).double().flatten(1).numpy(), (10 * fake).double().flatten(1).numpy()
    sample_form = _frechet(fr.mean(0), np.cov(fr.T), ff.mean(0), np.cov(ff.T))
    assert out["fid"] == pytest.approx(sample_form, rel=1e-5)  # exact plumbing
    assert out["fid"] == pytest.approx(_frechet(m1, s1, m2, s2), abs=0.1)  # population closed form
    assert out["kid"] > 0.1 and out["kid_std"] >= 0

    f_same = torch.from_numpy(m1) + torch.randn(n, 3, generator=g, dtype=torch.float64)
    same = fid.compute((f_same / 10).float()[:, :, None, None])
    assert same["fid"] < 0.01 and abs(same["kid"]) < 0.05 * out["kid"]
    assert fid.compute(fake)["fid"] == pytest.approx(out["fid"])  # real statistics survive the resets


def _kid_whole_sets(fr: np.ndarray, ff: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets with KID's kernel k(x, y) = (x.y / d + 1)^3."""
    d, m = fr.shape[1], fr.shape[0]
    k_rr, k_ff, k_rf = ((a @ b.T / d + 1) ** 3 for a, b in ((fr, fr), (ff, ff), (fr, ff)))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(k_rr) + off(k_ff) - 2 * k_rf.mean())


def test_kid_on_whole_sets_computes_one_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchmetrics.image.kid as kid_module
    calls = []
    poly_mmd = kid_module.poly_mmd
    monkeypatch.setattr(kid_module, "poly_mmd", lambda *a, **k: calls.append(1) or poly_mmd(*a, **k))
    g = _gen(3)
    real, fake = torch.randn(40, 3, 1, 1, generator=g) / 10, torch.randn(40, 3, 1, 1, generator=g) / 8 + 0.02
    fid = ImageFID(real, _Scale(), kid_subsets=10)
    out = fid.compute(fake)  # subset size 40 = both set sizes: every subset is both whole sets
    fr, ff = (10 * real).double().flatten(1).numpy(), (10 * fake).double().flatten(1).numpy()
    assert len(calls) == 1 and out["kid_std"] == 0
    assert out["kid"] == pytest.approx(_kid_whole_sets(fr, ff), rel=1e-10)
    calls.clear()
    fid.compute(torch.cat([fake, fake[:7]]))  # 47 generated images: the subsets differ, all 10 are drawn
    assert len(calls) == 10


def test_image_fid_rejects_wrong_shape_and_flags_nan() -> None:
    fid = ImageFID(torch.zeros(10, 3, 1, 1).uniform_(-0.1, 0.1), _Scale(), kid_subsets=2)
    with pytest.raises(ConfigError, match="shape"):
        fid.compute(torch.zeros(10, 1, 3, 1))
    diverged = torch.zeros(10, 3, 1, 1)
    diverged[3] = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        assert all(math.isnan(v) for v in fid.compute(diverged).values())


# ------------------------------------------------------------------------------------------------ feature nets


def test_feature_net_digits_trains_and_is_cached(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = load_dataset("digits")
    calls = []
    real_train = feature_net.train_feature_net

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(feature_net, "train_feature_net", counting_train)
    rng_before = torch.random.get_rng_state()
    net = get_feature_net(d, cache_dir=str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert len(calls) == 1 and isinstance(net, FeatureNet)
    assert net.accuracy > 0.9 and net.num_features == 64
    files = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    assert len(files) == 1 and d.content_hash() in files[0]
    assert not any(f.startswith(".tmp") for f in os.listdir(tmp_path))  # atomic write left no temp file

    again = get_feature_net(d, cache_dir=str(tmp_path))
    assert len(calls) == 1  # loaded, not retrained
    assert again.accuracy == pytest.approx(net.accuracy)
    with torch.no_grad():
        assert torch.allclose(again(d.x[:32]), net(d.x[:32]))
    assert tuple(net(d.x[:5]).shape) == (5, 64)

    split = split_dataset(d)  # the net trained on the feature-net part; the reference is the disjoint other part
    assert net.trained_on == split.describe()
    fid = ImageFID(d.x[split.reference_idx], net, kid_subsets=10)
    g = _gen(0)
    good = fid.compute(d.x[torch.randperm(len(d), generator=g)[:600]])
    bad = fid.compute(torch.rand(600, 1, 8, 8, generator=g) * 2 - 1)
    assert bad["fid"] > 10 * good["fid"] and bad["kid"] > good["kid"]


def test_feature_net_cache_env_var(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSION_RL_CACHE", str(tmp_path))
    assert feature_net._default_cache() == os.path.join(str(tmp_path), "features")


def test_feature_net_needs_labeled_images() -> None:
    unlabeled = Dataset("folder", torch.zeros(10, 1, 8, 8), None, 0, "image")
    with pytest.raises(ConfigError, match="inception"):
        get_feature_net(unlabeled)
    with pytest.raises(ConfigError, match="points"):
        get_feature_net(load_dataset("moons", n_points=100))


def test_inception_absent_returns_none(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFUSION_RL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert inception_feature_net() is None
    monkeypatch.undo()
    net = inception_feature_net()  # whatever is installed locally: never downloads
    assert net is None or getattr(net, "num_features", None) == 2048
