"""The feature network that FID/KID/precision/recall are measured in, and the data split it trains on.

Without Inception weights the library measures sample quality in the feature space of `FeatureNet`, a small CNN
classifier trained on the data set's labels. It must not grade its own homework: `split_dataset` splits the data set
once (seeded, stratified by label) into a feature-net part, the only images the classifier trains and is validated
on, and a disjoint reference part, the only images the metrics (diffusion_rl/metrics.py) compare samples with.
Trained nets are cached, keyed by the data set's content, the seed and the split. `inception_feature_net` loads the
FID Inception-v3 instead, only when its weights are already on disk.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset, cache_dir
from .errors import ConfigError
from .runs import atomic_save

__all__ = ["DataSplit", "split_dataset", "FeatureNet", "train_feature_net", "get_feature_net",
           "inception_feature_net", "FEATURE_NET_VERSION"]

FEATURE_NET_VERSION = 3  # bump when the architecture or the training recipe changes (invalidates the cache)
# v3: trained only on the feature-net part of `split_dataset` (v2 trained on 85% of the whole data set)


# ----------------------------------------------------------------------------------------------------------------
# The split between the feature net's images and the reference images.


@dataclass(frozen=True, eq=False)
class DataSplit:
    """A seeded split of a data set's indices into two disjoint parts that together cover it.

    Attributes:
        feature_idx: sorted int64 indices of the feature-net part (the classifier trains and is validated on these;
            they are also the gallery of the memorisation check).
        reference_idx: sorted int64 indices of the reference part (FID/KID/precision/recall reference statistics).
        seed: the seed of the split.
        reference_fraction: the requested fraction of the data set in the reference part.
        stratified: whether the split was stratified by class label.
    """

    feature_idx: Tensor
    reference_idx: Tensor
    seed: int
    reference_fraction: float
    stratified: bool

    @property
    def size(self) -> int:
        return int(self.feature_idx.numel() + self.reference_idx.numel())

    def key(self) -> str:
        """12 hex digits naming this split (its seed, fraction, stratification and the feature-net indices); part of
        the feature-net cache key, so a net trained on other images is never reused."""
        h = hashlib.sha256(f"{self.seed}|{self.reference_fraction!r}|{self.stratified}|{self.size}|".encode())
        h.update(self.feature_idx.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def describe(self) -> dict:
        """Plain, JSON-ready fields naming the split (they go into every evaluation record)."""
        return {"split_seed": int(self.seed), "split_reference_fraction": float(self.reference_fraction),
                "split_stratified": bool(self.stratified), "split_feature_net_size": int(self.feature_idx.numel()),
                "split_reference_size": int(self.reference_idx.numel()), "split_key": self.key()}


def split_dataset(dataset: Dataset, reference_fraction: float = 0.5, seed: int = 0) -> DataSplit:
    """Split `dataset` once, deterministically, into a feature-net part and a reference part.

    Stratified by label when the data set has labels: the indices are ordered by (label, a seeded random rank) and
    position i goes to the reference part when floor((i + 1) f) > floor(i f), f = `reference_fraction`; so the
    reference part has floor(N f) images and every class contributes its share of them to within one image. Without
    labels the order is a seeded random permutation. Global RNG state is left untouched.
    """
    f = float(reference_fraction)
    if not 0.0 < f < 1.0:
        raise ConfigError(f"reference_fraction must be in (0, 1), got {reference_fraction!r}")
    n = len(dataset.x)
    n_ref = math.floor(n * f)
    if n_ref < 1 or n_ref > n - 1:
        raise ConfigError(f"splitting {n} images with reference_fraction {f} leaves a part empty; both the feature-net "
                          "part and the reference part need at least one image")
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    labels = dataset.labels
    stratified = labels is not None and dataset.num_classes >= 2
    if stratified:
        order = torch.argsort(labels.detach().cpu().to(torch.int64) * n + rank)  # by label, then randomly
    else:
        order = rank
    pos = torch.arange(n, dtype=torch.float64)
    to_ref = torch.floor((pos + 1) * f) > torch.floor(pos * f)
    return DataSplit(feature_idx=order[~to_ref].sort().values, reference_idx=order[to_ref].sort().values,
                     seed=int(seed), reference_fraction=f, stratified=stratified)


class FeatureNet(nn.Module):
    """A small CNN classifier (3 conv layers, 2x2 average pool, a feature layer, a linear head); its penultimate
    layer gives the features for FID/KID.

    Input: images [B, C, H, W] in [-1, 1]. `forward` returns features [B, num_features]; `logits` the class logits.
    No batch norm or dropout, so train/eval mode does not change the features.

    Attributes:
        num_features: feature dimension.
        accuracy: held-out classification accuracy measured after training (nan if unknown), on images of the
            feature-net part that the net did not train on.
        trained_on: `DataSplit.describe()` of the split whose feature-net part it was trained on (None if unknown).
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
        self.trained_on: dict | None = None

    @staticmethod
    def default_arch(in_channels: int, num_classes: int, width: int = 16, num_features: int = 64) -> dict[str, int]:
        """The constructor arguments as a plain dict (stored in the cache metadata)."""
        return {"in_channels": int(in_channels), "num_classes": int(num_classes), "width": int(width),
                "num_features": int(num_features)}

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.embed(self.trunk(x.float())))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x))

    def classify_features(self, features: Tensor) -> Tensor:
        """Class logits from already-extracted features [B, num_features] (= `logits` of the images)."""
        w = self.head.weight
        return self.head(features.to(device=w.device, dtype=w.dtype))


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
                      device: str | torch.device | None = None, split: DataSplit | None = None) -> FeatureNet:
    """Train a `FeatureNet` on the labels of the feature-net part of `split` (default `split_dataset(dataset)`:
    half the data set, seed 0) with Adam; the reference part is never seen.

    Within the feature-net part a seeded split keeps `holdout` (15%) aside; `accuracy` is measured on it.
    Epochs: ceil(60000 / n_train) clipped to [4, 40] (batch 128, one-cycle learning rate). Global RNG state is left
    untouched. Sets `trained_on` to `split.describe()`.
    """
    _check_labeled_images(dataset)
    split = split if split is not None else split_dataset(dataset)
    if split.size != len(dataset.x):
        raise ConfigError(f"the split covers {split.size} images; the data set {dataset.name!r} has {len(dataset.x)}")
    device = torch.device(device) if device is not None else dataset.x.device
    x, y = dataset.x.to(device), dataset.labels.to(device)
    part = split.feature_idx
    train_pos, val_pos = _split(part.numel(), holdout, seed)
    train_idx, val_idx = part[train_pos].to(device), part[val_pos].to(device)
    n_train = train_idx.numel()
    if n_train < 1:  # the held-out image(s) took the whole feature-net part
        raise ConfigError(f"the feature-net part of {dataset.name!r} has {part.numel()} image(s), too few to train the "
                          f"FID classifier and hold some out ({holdout:.0%}); give at least 4 labelled images, or "
                          f"--features inception")
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
    net.trained_on = split.describe()
    if verbose:
        print(f"feature net for {dataset.name!r}: held-out accuracy {net.accuracy:.3f} "
              f"({n_train} training images of the feature-net part, {epochs} epochs, {time.time() - t0:.1f} s)")
    return net.cpu()


def _load_cached(path: str, content_hash: str, arch: dict[str, int], split: DataSplit) -> FeatureNet | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        if meta.get("hash") != content_hash or meta.get("version") != FEATURE_NET_VERSION or meta.get("arch") != arch:
            return None
        if (meta.get("split") or {}).get("split_key") != split.key():
            return None
        net = FeatureNet(**meta["arch"])
        net.load_state_dict(blob["state_dict"])
        net.accuracy = float(meta["accuracy"])
        net.trained_on = dict(meta["split"])
    except Exception as e:  # unreadable or stale cache file: retrain and overwrite
        warnings.warn(f"ignoring unreadable feature-net cache {path}: {e}", stacklevel=3)
        return None
    return net.eval()


def get_feature_net(dataset: Dataset, cache_dir: str | None = None, seed: int = 0,
                    verbose: bool = False, split: DataSplit | None = None) -> FeatureNet:
    """The feature net for `dataset`, trained on the feature-net part of `split` (default `split_dataset(dataset)`),
    loaded from the cache or trained (`train_feature_net`) and cached.

    The cache file is keyed by the data set's content hash, `seed` and the split (`DataSplit.key`), in `cache_dir`
    (default `$DIFFUSION_RL_CACHE/features` or `~/.cache/diffusion_rl/features`); it is written atomically and holds
    the state dict plus plain metadata (accuracy, feature dim, hash, architecture, split).
    """
    _check_labeled_images(dataset)
    split = split if split is not None else split_dataset(dataset)
    folder = os.path.expanduser(cache_dir) if cache_dir is not None else _default_cache()
    content_hash = dataset.content_hash()
    path = os.path.join(folder, f"featurenet-v{FEATURE_NET_VERSION}-{content_hash}-seed{seed}-split{split.key()}.pt")
    arch = FeatureNet.default_arch(dataset.sample_shape[0], dataset.num_classes)
    if os.path.isfile(path):
        net = _load_cached(path, content_hash, arch, split)
        if net is not None:
            if verbose:
                print(f"feature net loaded from {path} (held-out accuracy {net.accuracy:.3f})")
            return net
    net = train_feature_net(dataset, seed=seed, verbose=verbose, split=split)
    meta = {"version": FEATURE_NET_VERSION, "hash": content_hash, "name": str(dataset.name), "seed": int(seed),
            "accuracy": float(net.accuracy), "num_features": int(net.num_features), "arch": dict(net.arch),
            "split": split.describe()}
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
