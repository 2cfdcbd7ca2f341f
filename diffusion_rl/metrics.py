"""Sample-quality metrics: FID/KID on images (with a small data-set-specific feature net or InceptionV3) and the
sliced Wasserstein-2 and energy distances on point clouds.

Without Inception weights, FID is computed in the feature space of a small CNN classifier trained on the data
set's labels (`FeatureNet`). Such numbers compare models on the same data set and feature net only; they are
not comparable with published Inception FIDs.
"""
from __future__ import annotations

import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset, cache_dir
from .errors import ConfigError, check_positive
from .runs import atomic_save

__all__ = [
    "FeatureNet",
    "train_feature_net",
    "get_feature_net",
    "inception_feature_net",
    "ImageFID",
    "sliced_wasserstein2",
    "energy_distance",
    "evaluate_samples",
]

FEATURE_NET_VERSION = 2  # bump when the architecture or the training recipe changes (invalidates the cache)


class FeatureNet(nn.Module):
    """A small CNN classifier (3 conv layers, 2x2 average pool, a feature layer, a linear head); its penultimate
    layer gives the features for FID/KID.

    Input: images [B, C, H, W] in [-1, 1]. `forward` returns features [B, num_features]; `logits` the class logits.
    No batch norm or dropout, so train/eval mode does not change the features.

    Attributes:
        num_features: feature dimension.
        accuracy: held-out classification accuracy measured after training (nan if unknown).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, num_features: int = 64) -> None:
        super().__init__()
        w = width
        self.arch = self.default_arch(in_channels, num_classes, width, num_features)
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, w), w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(math.gcd(8, 2 * w), 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, 4 * w), 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # a 2x2 grid keeps coarse layout (global pooling loses it)
        )
        self.embed = nn.Linear(16 * w, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = int(num_features)
        self.accuracy = float("nan")

    @staticmethod
    def default_arch(in_channels: int, num_classes: int, width: int = 16, num_features: int = 64) -> dict[str, int]:
        """The constructor arguments as a plain dict (stored in the cache metadata)."""
        return {"in_channels": int(in_channels), "num_classes": int(num_classes), "width": int(width),
                "num_features": int(num_features)}

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.embed(self.trunk(x.float())))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x))


def _split(n: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * holdout)))
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def _accuracy(net: FeatureNet, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((net.logits(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def _check_labeled_images(dataset: Dataset) -> None:
    if dataset.kind != "image":
        raise ConfigError(f"a feature net needs an image data set; {dataset.name!r} is of kind {dataset.kind!r}"
                          " (use sliced_wasserstein2 / energy_distance for points)")
    if dataset.labels is None or dataset.num_classes < 2:
        raise ConfigError(f"data set {dataset.name!r} has no class labels, so no FID feature net can be trained; "
                          "use --features inception with --inception-weights FILE (the FID Inception-v3 weights)")


def train_feature_net(dataset: Dataset, seed: int = 0, verbose: bool = False, holdout: float = 0.15,
                      device: str | torch.device | None = None) -> FeatureNet:
    """Train a `FeatureNet` on the data set's labels (seeded split: 85% train, 15% held out) with Adam.

    Epochs: ceil(60000 / n_train) clipped to [4, 40] (batch 128, one-cycle learning rate). Global RNG state is left
    untouched. Sets `accuracy` to the held-out accuracy.
    """
    _check_labeled_images(dataset)
    device = torch.device(device) if device is not None else dataset.x.device
    x, y = dataset.x.to(device), dataset.labels.to(device)
    train_idx, val_idx = _split(x.shape[0], holdout, seed)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    n_train = train_idx.numel()
    batch_size = 128
    epochs = max(4, min(40, math.ceil(60_000 / n_train)))
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: weight init happens on CPU; CUDA RNGs stay untouched
        net = FeatureNet(dataset.sample_shape[0], dataset.num_classes).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        steps = epochs * math.ceil(n_train / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(seed + 1)
        net.train()
        for epoch in range(epochs):
            order = train_idx[torch.randperm(n_train, generator=g).to(device)]
            for i in range(0, n_train, batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(net.logits(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"feature net epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    net.eval()
    net.accuracy = _accuracy(net, x[val_idx], y[val_idx])
    if verbose:
        print(f"feature net for {dataset.name!r}: held-out accuracy {net.accuracy:.3f} "
              f"({epochs} epochs, {time.time() - t0:.1f} s)")
    return net.cpu()


def _load_cached(path: str, content_hash: str, arch: dict[str, int]) -> FeatureNet | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        if meta.get("hash") != content_hash or meta.get("version") != FEATURE_NET_VERSION or meta.get("arch") != arch:
            return None
        net = FeatureNet(**meta["arch"])
        net.load_state_dict(blob["state_dict"])
        net.accuracy = float(meta["accuracy"])
    except Exception as e:  # unreadable or stale cache file: retrain and overwrite
        warnings.warn(f"ignoring unreadable feature-net cache {path}: {e}", stacklevel=3)
        return None
    return net.eval()


def get_feature_net(dataset: Dataset, cache_dir: str | None = None, seed: int = 0,
                    verbose: bool = False) -> FeatureNet:
    """The feature net for `dataset`, loaded from the cache or trained (`train_feature_net`) and cached.

    The cache file is keyed by the data set's content hash and `seed`, in `cache_dir` (default
    `$DIFFUSION_RL_CACHE/features` or `~/.cache/diffusion_rl/features`); it is written atomically and holds
    the state dict plus plain metadata (accuracy, feature dim, hash, architecture).
    """
    _check_labeled_images(dataset)
    folder = os.path.expanduser(cache_dir) if cache_dir is not None else _default_cache()
    content_hash = dataset.content_hash()
    path = os.path.join(folder, f"featurenet-v{FEATURE_NET_VERSION}-{content_hash}-seed{seed}.pt")
    arch = FeatureNet.default_arch(dataset.sample_shape[0], dataset.num_classes)
    if os.path.isfile(path):
        net = _load_cached(path, content_hash, arch)
        if net is not None:
            if verbose:
                print(f"feature net loaded from {path} (held-out accuracy {net.accuracy:.3f})")
            return net
    net = train_feature_net(dataset, seed=seed, verbose=verbose)
    meta = {"version": FEATURE_NET_VERSION, "hash": content_hash, "name": str(dataset.name), "seed": int(seed),
            "accuracy": float(net.accuracy), "num_features": int(net.num_features), "arch": dict(net.arch)}
    atomic_save({"state_dict": net.state_dict(), "meta": meta}, path)
    if verbose:
        print(f"feature net cached at {path}")
    return net.eval()


def _default_cache() -> str:
    return cache_dir("features")


# ----------------------------------------------------------------------------------------------------------------
# InceptionV3: the FID network of diffusion_rl/inception.py, only when its weights file is already on disk.


def inception_feature_net(weights: str | None = None) -> nn.Module | None:
    """The FID Inception-v3's 2048-d pool features of images in [-1, 1], with the weights in `weights`, or found by
    `inception.find_inception_weights` (None when no file is on disk; nothing is downloaded). A file that is
    missing, unreadable or does not match raises ConfigError."""
    from .inception import find_inception_weights, load_inception

    path = find_inception_weights(weights)
    return None if path is None else load_inception(path)


# ----------------------------------------------------------------------------------------------------------------
# FID / KID on images.


class _Passthrough(nn.Module):
    """Feature "extractor" for torchmetrics that returns its input: features are computed once, outside."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, feats: Tensor) -> Tensor:
        return feats


@torch.no_grad()
def _features(net: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = images.device
    out = []
    for i in range(0, images.shape[0], batch_size):
        batch = images[i:i + batch_size].to(device).float().clamp(-1, 1)
        out.append(net(batch).reshape(batch.shape[0], -1).double().cpu())
    return torch.cat(out)


class ImageFID:
    """FID and KID of generated images against a fixed reference set, in a feature net's space.

    Real features are computed once. Uses torchmetrics' FrechetInceptionDistance (reset_real_features=False) and
    KernelInceptionDistance (subset size min(1000, n_real, n_fake), cubic polynomial kernel). Features are computed
    here in batches (images clamped to [-1, 1]) and handed to both metrics, so each image passes the net once.

    Args:
        real: the reference data set (its images) or a tensor of reference images [N, C, H, W] in [-1, 1].
        feature_net: a module mapping [B, C, H, W] in [-1, 1] to [B, num_features] with an int `num_features`
            (a `FeatureNet`, `inception_feature_net()`, ...).
        batch_size: images per feature-net call (default: the net's `batch_size` attribute, else 500).
        kid_subsets: number of random subsets KID averages over. When the subset size equals both set sizes every
            subset is the whole of both sets (a permutation changes no term of the estimate), so one is computed.
        seed: seeds KID's subset sampling (global RNG state is left untouched).
    """

    def __init__(self, real: Dataset | Tensor, feature_net: nn.Module, batch_size: int | None = None,
                 kid_subsets: int = 100, seed: int = 0) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        images = real.x if isinstance(real, Dataset) else real
        if isinstance(real, Dataset) and real.kind != "image":
            raise ConfigError(f"FID needs an image data set; {real.name!r} is of kind {real.kind!r}")
        nf = getattr(feature_net, "num_features", None)
        if not isinstance(nf, int) or nf < 1:
            raise ConfigError(f"feature_net must have a positive int attribute num_features, got {nf!r}")
        batch_size = batch_size if batch_size is not None else getattr(feature_net, "batch_size", 500)
        check_positive("batch_size", batch_size)
        check_positive("kid_subsets", kid_subsets)
        if images.shape[0] < 2:
            raise ConfigError(f"FID needs at least 2 reference images, got {images.shape[0]}")
        self.feature_net = feature_net.eval()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.kid_subsets = int(kid_subsets)
        self.sample_shape = tuple(images.shape[1:])
        self.real_features = _features(feature_net, images, self.batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # KID's "saves all features" notice
            self.fid = FrechetInceptionDistance(feature=_Passthrough(nf), reset_real_features=False)
            self.kid = KernelInceptionDistance(feature=_Passthrough(nf), subsets=int(kid_subsets),
                                               subset_size=min(1000, images.shape[0]), reset_real_features=False)
        self.fid.update(self.real_features, real=True)
        self.kid.update(self.real_features, real=True)

    @property
    def num_real(self) -> int:
        return int(self.real_features.shape[0])

    def compute(self, fake: Tensor) -> dict[str, float]:
        """{"fid", "kid", "kid_std"} of the generated images `fake` [M, C, H, W] (M >= 2) against the reference.

        Images are clamped to [-1, 1]; if any value is NaN or infinite all three results are nan.
        """
        if tuple(fake.shape[1:]) != self.sample_shape:
            raise ConfigError(f"generated images have shape {tuple(fake.shape[1:])}; the reference set has "
                              f"{self.sample_shape}")
        if fake.shape[0] < 2:
            raise ConfigError(f"FID needs at least 2 generated images, got {fake.shape[0]}")
        if not torch.isfinite(fake).all():  # a diverged sampler: report it instead of a meaningless number
            warnings.warn("generated images contain NaN or infinite values; FID/KID reported as nan", stacklevel=2)
            return {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
        fake_features = _features(self.feature_net, fake, self.batch_size)
        return self.compute_from_features(fake_features)

    def compute_from_features(self, fake_features: Tensor) -> dict[str, float]:
        """Same as `compute` from already-extracted features [M, num_features]."""
        fake_features = fake_features.double().cpu()
        self.fid.reset()
        self.fid.update(fake_features, real=False)
        fid = float(self.fid.compute())
        self.kid.reset()
        self.kid.subset_size = min(1000, self.num_real, fake_features.shape[0])
        whole_sets = self.kid.subset_size == self.num_real == fake_features.shape[0]
        self.kid.subsets = 1 if whole_sets else self.kid_subsets  # identical subsets: KID's std is then 0
        self.kid.update(fake_features, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)  # KID's subsets use the CPU global RNG
            kid, kid_std = self.kid.compute()
        return {"fid": fid, "kid": float(kid), "kid_std": float(kid_std)}


# ----------------------------------------------------------------------------------------------------------------
# Point-cloud distances.


def _as_points(what: str, x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ConfigError(f"{what} must be a [N, D] tensor of points with N >= 1, got shape {tuple(x.shape)}")
    return x.detach().double().cpu()


def _nonfinite(x: Tensor, y: Tensor) -> bool:
    """True (with a warning) if a point cloud holds NaN/inf, e.g. from a diverged sampler: the metric is then nan."""
    if torch.isfinite(x).all() and torch.isfinite(y).all():
        return False
    warnings.warn("point cloud contains NaN or infinite values; distance reported as nan", stacklevel=3)
    return True


def _w2_squared_1d(xs: Tensor, ys: Tensor) -> Tensor:
    """Exact squared W2 between the empirical measures of sorted 1-D samples, batched: xs [P, n], ys [P, m] -> [P].

    W2^2 = int_0^1 (Qx(u) - Qy(u))^2 du with step quantile functions Qx(u) = xs[ceil(n u) - 1]; both steps are
    constant between consecutive points of {i/n} U {j/m}, so the integral is a finite weighted sum.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (xs - ys).square().mean(dim=1)
    u = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                torch.arange(1, m + 1, dtype=torch.float64) / m]))
    lower = torch.cat([u.new_zeros(1), u[:-1]])
    width, mid = u - lower, (u + lower) / 2
    ix = (mid * n).floor().long().clamp_(0, n - 1)
    iy = (mid * m).floor().long().clamp_(0, m - 1)
    return ((xs[:, ix] - ys[:, iy]).square() * width).sum(dim=1)


def sliced_wasserstein2(x: Tensor, y: Tensor, n_projections: int = 256,
                        generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between point clouds x [n, D] and y [m, D].

    Returns sqrt( mean over `n_projections` random unit directions theta of W2^2(<x, theta>, <y, theta>) ),
    where W2^2 between the 1-D empirical measures is computed exactly (sorted samples; for n != m by integrating
    the two step quantile functions over their merged breakpoints). For y = x + mu with isotropic directions in
    D dimensions, the expected value of the squared result is |mu|^2 / D. NaN/inf in the input gives nan.
    """
    x, y = _as_points("x", x), _as_points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    check_positive("n_projections", n_projections)
    if _nonfinite(x, y):
        return math.nan
    theta = torch.randn(int(n_projections), x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    xs = (theta @ x.T).sort(dim=1).values
    ys = (theta @ y.T).sort(dim=1).values
    return float(_w2_squared_1d(xs, ys).mean().sqrt())


def _mean_distance(a: Tensor, b: Tensor, exclude_diagonal: bool, block: int = 1024) -> float:
    total = 0.0
    for i in range(0, a.shape[0], block):
        d = torch.cdist(a[i:i + block], b, compute_mode="donot_use_mm_for_euclid_dist")
        total += float(d.sum())  # the diagonal of d(a, a) is exactly 0, so it adds nothing
    pairs = a.shape[0] * (b.shape[0] - 1) if exclude_diagonal else a.shape[0] * b.shape[0]
    return total / pairs


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between point clouds x [n, D] and y [m, D] (n, m >= 2).

    Unbiased U-statistic: the within-sample means exclude the i = j pairs, so the value is an unbiased estimate of
    the population energy distance and may be slightly negative when the distributions are equal. This is the
    squared form (no square root). NaN/inf in the input gives nan. Cost O(n m D) time, O(1024 max(n, m)) memory.
    """
    x, y = _as_points("x", x), _as_points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ConfigError(f"energy distance needs at least 2 points per sample, got {x.shape[0]} and {y.shape[0]}")
    if _nonfinite(x, y):
        return math.nan
    return 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)


def evaluate_samples(dataset: Dataset, samples: Tensor, fid: ImageFID | None = None,
                     reference: Tensor | None = None, generator: torch.Generator | None = None,
                     max_points: int = 5000) -> dict[str, float]:
    """Metrics of generated `samples` for `dataset`.

    Images: `fid.compute(samples)` (an `ImageFID` is required). Points: "sw2" and "energy" against `reference`
    (default: `dataset.fresh(len(samples))` for toys, else the data set's points), both capped at `max_points`.
    """
    if dataset.kind == "image":
        if fid is None:
            raise ConfigError("evaluate_samples on an image data set needs an ImageFID (fid=...)")
        return fid.compute(samples)
    n = min(samples.shape[0], max_points)
    if reference is None:
        reference = dataset.fresh(n, generator) if dataset.fresh is not None else dataset.x
    ref = reference[:max_points]
    return {"sw2": sliced_wasserstein2(samples[:n], ref, generator=generator),
            "energy": energy_distance(samples[:n], ref)}
