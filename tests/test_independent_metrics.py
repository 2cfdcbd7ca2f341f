"""Image metrics that do not grade their own homework: the feature-net / reference split, improved k-NN precision
and recall, class coverage, the pixel-space memorisation check, and the records that name what they used."""
from __future__ import annotations

import math
import os

import pytest
import torch

from diffusion_rl import feature_net
from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.evaluation import EvalConfig, Evaluator
from diffusion_rl.feature_net import FeatureNet, get_feature_net, split_dataset, train_feature_net
from diffusion_rl.formulations import make_formulation
from diffusion_rl.metrics import (ImageFID, class_histogram, knn_radii, memorisation_ratio, nearest_neighbour_distance,
                                  precision_recall, total_variation)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy_images(n: int = 200, seed: int = 0) -> Dataset:
    """n labelled 1x8x8 images of 2 easy classes (bright left half / bright right half, plus noise)."""
    g = _gen(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 8, 8), -0.8)
    x[labels == 0, :, :, :4] = 0.8
    x[labels == 1, :, :, 4:] = 0.8
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return Dataset("toy-halves", x, labels, 2, "image")


# ------------------------------------------------------------------------------------------------ the split


def test_split_is_disjoint_covering_deterministic_and_stratified(digits) -> None:
    s = split_dataset(digits)
    n = len(digits)
    feat, ref = set(s.feature_idx.tolist()), set(s.reference_idx.tolist())
    assert not feat & ref and feat | ref == set(range(n))
    assert s.reference_idx.numel() == n // 2 and s.feature_idx.numel() == n - n // 2
    for c in range(digits.num_classes):  # every class is split in half, to within one image
        in_ref = int((digits.labels[s.reference_idx] == c).sum())
        assert abs(in_ref - int((digits.labels == c).sum()) / 2) <= 1
    again = split_dataset(digits)
    assert torch.equal(again.reference_idx, s.reference_idx) and again.key() == s.key()
    other = split_dataset(digits, seed=1)
    assert not torch.equal(other.reference_idx, s.reference_idx) and other.key() != s.key()
    third = split_dataset(digits, reference_fraction=0.3)
    assert third.reference_idx.numel() == math.floor(0.3 * n) and third.key() != s.key()
    info = s.describe()
    assert info["split_feature_net_size"] + info["split_reference_size"] == n and info["split_stratified"]
    with pytest.raises(ConfigError, match="reference_fraction"):
        split_dataset(digits, reference_fraction=1.0)


def test_the_feature_net_never_sees_the_reference_part() -> None:
    """Reference-part images are poisoned with NaN: had the net trained or validated on any, it would be NaN."""
    data = _toy_images()
    s = split_dataset(data)
    poisoned = data.x.clone()
    poisoned[s.reference_idx] = float("nan")
    net = train_feature_net(Dataset(data.name, poisoned, data.labels, 2, "image"), split=s)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert net.accuracy > 0.9 and net.trained_on == s.describe()


def test_the_cache_key_includes_the_split(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _toy_images()
    trained = []

    def quick_train(dataset, seed=0, verbose=False, split=None):  # records the split; no real training
        trained.append(split.key())
        net = FeatureNet(1, 2)
        net.accuracy, net.trained_on = 0.5, split.describe()
        return net

    monkeypatch.setattr(feature_net, "train_feature_net", quick_train)
    s, other = split_dataset(data), split_dataset(data, seed=1)
    a = get_feature_net(data, cache_dir=str(tmp_path), split=s)
    assert get_feature_net(data, cache_dir=str(tmp_path), split=s).trained_on == a.trained_on  # loaded
    b = get_feature_net(data, cache_dir=str(tmp_path), split=other)  # another split: another net
    assert trained == [s.key(), other.key()] and b.trained_on["split_key"] == other.key()
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert len(files) == 2 and all(any(k in f for f in files) for k in (s.key(), other.key()))
    assert get_feature_net(data, cache_dir=str(tmp_path)).trained_on == a.trained_on  # default: split seed 0, 50%


# ------------------------------------------------------------------------------------------------ precision / recall


def _clusters(centres: torch.Tensor, per: int, g: torch.Generator) -> torch.Tensor:
    return (centres[:, None, :] + torch.randn(len(centres), per, centres.shape[1], generator=g)).flatten(0, 1)


def test_knn_radii_match_a_sort_and_blocks_change_nothing() -> None:
    x = torch.randn(300, 5, generator=_gen(0), dtype=torch.float64)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    expected = d.sort(dim=1).values[:, 3]  # index 0 is the point itself
    torch.testing.assert_close(knn_radii(x, k=3), expected)
    torch.testing.assert_close(knn_radii(x, k=3, block=7), expected)
    with pytest.raises(ConfigError, match="more than k"):
        knn_radii(x[:3], k=3)


def test_precision_recall_identical_far_and_half_the_modes() -> None:
    g = _gen(0)
    centres = torch.zeros(10, 2, dtype=torch.float64)
    centres[:, 0] = 20 * torch.arange(10)  # 10 unit Gaussian modes 20 apart on a line
    real = _clusters(centres, 200, g)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 1000.0) == {"precision": 0.0, "recall": 0.0}

    half = _clusters(centres[:5], 200, g)  # fresh draws from 5 of the 10 modes
    pr = precision_recall(real, half)
    assert pr["precision"] > 0.9 and pr["recall"] == pytest.approx(0.5, abs=0.05)
    whole = precision_recall(real, _clusters(centres, 200, g))  # fresh draws from all modes
    assert whole["precision"] > 0.9 and whole["recall"] > 0.9

    radii = knn_radii(real, 3)
    assert precision_recall(real, half, real_radii=radii, block=13) == pr  # reused radii, other blocks
    with pytest.warns(UserWarning, match="NaN"):
        assert math.isnan(precision_recall(real, torch.full((10, 2), float("nan")))["precision"])


# ------------------------------------------------------------------------------------------------ class coverage


def test_class_histogram_and_total_variation() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 1.0]])
    assert class_histogram(logits, 3).tolist() == [1, 2, 0]
    assert class_histogram(torch.tensor([2, 2, 0]), 3).tolist() == [1, 0, 2]
    assert total_variation(torch.tensor([1, 1]), torch.tensor([0.5, 0.5])) == 0.0
    assert total_variation(torch.tensor([4, 0]), torch.tensor([0, 1])) == 1.0
    assert total_variation(torch.tensor([3, 1]), torch.tensor([1, 1])) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        class_histogram(torch.tensor([3]), 3)


# ------------------------------------------------------------------------------------------------ memorisation


def test_nearest_neighbour_distance_is_per_pixel_l2_to_the_nearest() -> None:
    g = _gen(1)
    gallery = torch.rand(50, 1, 4, 4, generator=g) * 2 - 1
    x = torch.rand(30, 1, 4, 4, generator=g) * 2 - 1
    brute = torch.cdist(x.flatten(1).double(), gallery.flatten(1).double()).min(dim=1).values / 4  # sqrt(16) px
    torch.testing.assert_close(nearest_neighbour_distance(x, gallery), brute)
    torch.testing.assert_close(nearest_neighbour_distance(x, gallery, block=4), brute)
    assert nearest_neighbour_distance(gallery[[3, 7]], gallery).tolist() == [0.0, 0.0]  # exact copies


def test_memorisation_ratio_copies_zero_heldout_one(digits) -> None:
    s = split_dataset(digits)
    gallery, heldout = digits.x[s.feature_idx], digits.x[s.reference_idx]
    copies = memorisation_ratio(gallery[torch.randperm(len(gallery), generator=_gen(0))[:500]], gallery, heldout)
    assert copies["memorisation_ratio"] == 0.0 and copies["nn_distance"] == 0.0
    fresh = memorisation_ratio(heldout[:500], gallery, heldout)  # real images the gallery does not hold
    assert fresh["memorisation_ratio"] == pytest.approx(1.0, abs=0.1) and fresh["heldout_nn_distance"] > 0.1
    assert memorisation_ratio(heldout, gallery, heldout)["memorisation_ratio"] == pytest.approx(1.0, abs=1e-12)
    noise = memorisation_ratio(torch.rand(200, 1, 8, 8, generator=_gen(0)) * 2 - 1, gallery, heldout)
    assert noise["memorisation_ratio"] > 1.5  # off-distribution samples are farther than new real images


# ------------------------------------------------------------------------------------------------ the Evaluator


@pytest.fixture(scope="module")
def evaluator(digits, tmp_path_factory) -> Evaluator:
    cache = str(tmp_path_factory.getbasetemp() / "cache" / "features")  # the session's cache (conftest.py)
    ev = Evaluator(digits, EvalConfig(nfe_grid=(3,), n_samples=400, cache_dir=cache))
    ev._fid.kid_subsets = 5  # KID is not under test here and its 100 subsets are most of a score's time
    return ev


def test_evaluator_names_the_split_the_net_and_the_reference(evaluator, digits) -> None:
    info, s = evaluator.feature_info, evaluator.split
    assert s is not None and {k: info[k] for k in s.describe()} == s.describe()
    assert info["split_feature_net_size"] + info["split_reference_size"] == len(digits)
    assert "reference part" in info["reference"] and str(info["split_reference_size"]) in info["reference"]
    assert "feature-net part" in info["feature_net_trained_on"] and info["feature_net_accuracy"] > 0.9
    assert info["precision_recall_k"] == 3 and info["heldout_nn_distance"] > 0
    assert sum(info["reference_class_histogram"]) == pytest.approx(1.0, abs=1e-4)
    assert evaluator._fid.num_real == info["split_reference_size"]  # FID's reference is the reference part only
    net = evaluator._fid.feature_net
    assert net.trained_on == s.describe()


def test_evaluator_scores_reference_copies_and_one_class_samples(evaluator, digits) -> None:
    s = evaluator.split
    reference, feature_part = digits.x[s.reference_idx], digits.x[s.feature_idx]

    own = evaluator.score(reference)  # the reference's own images
    assert list(own)[:3] == ["fid", "kid", "kid_std"]
    assert own.keys() >= {"precision", "recall", "class_tv", "nn_distance", "memorisation_ratio"}
    assert own["class_tv"] < 0.05 and own["precision"] == own["recall"] == 1.0
    assert own["memorisation_ratio"] == pytest.approx(1.0, abs=1e-9)

    copies = evaluator.score(feature_part[:500])  # exact copies of training images
    assert copies["memorisation_ratio"] == 0.0 and copies["nn_distance"] == 0.0
    assert copies["class_tv"] < 0.1 and copies["precision"] > 0.8

    threes = reference[digits.labels[s.reference_idx] == 3]
    one_class, details = evaluator.score_details(threes)
    assert one_class["class_tv"] > 0.8 and one_class["recall"] < 0.2
    hist = details["class_tv"]["class_histogram"]
    assert len(hist) == 10 and sum(hist) == len(threes) and max(hist) == hist[3]


def test_sweep_records_carry_the_new_metrics_and_the_histogram(evaluator, digits, monkeypatch) -> None:
    class _Stub:  # the sweep only needs the formulation to pick a sampler; generate is replaced below
        formulation = make_formulation("edm")

    images = digits.x[evaluator.split.reference_idx][:400]
    monkeypatch.setattr(evaluator, "generate", lambda denoiser, nfe, device="cpu": (images, "heun"))
    records = evaluator.sweep(_Stub(), "copy", 0, progress=False)
    by_metric = {r["metric"]: r for r in records}
    assert list(by_metric)[:3] == ["fid", "kid", "kid_std"]
    assert by_metric.keys() >= {"precision", "recall", "class_tv", "nn_distance", "memorisation_ratio"}
    assert sum(by_metric["class_tv"]["class_histogram"]) == 400
    assert all("class_histogram" not in r for m, r in by_metric.items() if m != "class_tv")
    for r in records:
        assert r["split_key"] == evaluator.split.key() and "reference part" in r["reference"]


def test_nonfinite_samples_give_nan_for_every_metric(evaluator) -> None:
    bad = torch.zeros(20, 1, 8, 8)
    bad[0] = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        scores = evaluator.score(bad)
    assert scores.keys() == set(evaluator._fid.metric_names) and all(math.isnan(v) for v in scores.values())


def test_image_fid_without_labels_or_gallery_reports_feature_metrics_only() -> None:
    class _Flat(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            return x.flatten(1)

    g = _gen(2)
    real = torch.rand(60, 1, 4, 4, generator=g) * 2 - 1
    fid = ImageFID(real, _Flat(), kid_subsets=2)
    out = fid.compute(real)
    assert list(out) == ["fid", "kid", "kid_std", "precision", "recall", "rms_from_mean"] and out["precision"] == 1.0
    # the reference itself sits at the reference's own distance from its mean (method.md §10.5)
    assert out["rms_from_mean"] == pytest.approx(fid.data_rms_from_mean)
    assert fid.compute(torch.zeros(5, 1, 4, 4) + real.mean(0))["rms_from_mean"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(fid.compute(real[:3])["precision"])  # 3 samples: no 3rd neighbour, no radius
    with pytest.raises(ConfigError, match="nn_gallery"):
        ImageFID(real, _Flat(), nn_heldout=real)
