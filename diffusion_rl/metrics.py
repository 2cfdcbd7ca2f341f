"""Sample-quality metrics: FID/KID on images (with a small data-set-specific feature net or InceptionV3), improved
k-NN precision and recall, class coverage, a pixel-space memorisation check, and the sliced Wasserstein-2 and
energy distances on point clouds.

Without Inception weights, FID is computed in the feature space of a small CNN classifier trained on the data
set's labels (`FeatureNet`, diffusion_rl/feature_net.py), on a part of the data set disjoint from the reference
images the metrics compare samples with. Such numbers compare models on the same data set and feature net only;
they are not comparable with published Inception FIDs.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .data import Dataset
from .errors import ConfigError, check_positive

__all__ = [
    "rms_from_mean",
    "ImageFID",
    "mean_and_covariance",
    "psd_sqrt",
    "frechet_distance",
    "knn_radii",
    "precision_recall",
    "class_histogram",
    "total_variation",
    "nearest_neighbour_distance",
    "memorisation_ratio",
    "sliced_wasserstein2",
    "energy_distance",
    "evaluate_samples",
]

# ----------------------------------------------------------------------------------------------------------------
# Features for the image metrics.


class _Passthrough(nn.Module):
    """Feature "extractor" for torchmetrics that returns its input: features are computed once, outside."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, feats: Tensor) -> Tensor:
        return feats


def _module_device(net: nn.Module, default: torch.device) -> torch.device:
    """The device of a module's first parameter or buffer, else `default` (a module without any)."""
    for t in (*net.parameters(), *net.buffers()):
        return t.device
    return default


@torch.no_grad()
def _features(net: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """The net's features [N, F] of `images` (clamped to [-1, 1]) as float64 on `device`: the images go to the
    device one batch at a time, the features stay there."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        batch = images[i:i + batch_size].to(device).float().clamp(-1, 1)
        out.append(net(batch).reshape(batch.shape[0], -1).double())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# The Frechet distance between Gaussians.


def mean_and_covariance(feature_sum: Tensor, outer_sum: Tensor, n: int | Tensor) -> tuple[Tensor, Tensor]:
    """The mean [D] and unbiased covariance [D, D] of n vectors from their sum [D] and the sum of their outer products
    [D, D] (torchmetrics FrechetInceptionDistance's states): mu = s / n, S = (O - n mu mu^T) / (n - 1), in float64
    on the inputs' device (the formula of torchmetrics' `compute`)."""
    n = int(n)
    if n < 2:
        raise ConfigError(f"a covariance needs at least 2 vectors, got {n}")
    mu = feature_sum.double() / n
    return mu, (outer_sum.double() - n * torch.outer(mu, mu)) / (n - 1)


def psd_sqrt(sigma: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix [D, D], from its eigendecomposition
    (torch.linalg.eigh; eigenvalues below 0, which only rounding produces, count as 0). float64, on sigma's device."""
    s = sigma.double()
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor,
                     sqrt_sigma1: Tensor | None = None) -> Tensor:
    """The Frechet (Wasserstein-2) distance between N(mu1, sigma1) and N(mu2, sigma2), squared, as FID defines it
    (Heusel et al. 2017): |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). A 0-d float64 tensor on the
    inputs' device.

    The trace of the square root is sum_i sqrt(lambda_i), lambda the eigenvalues of R sigma2 R with R = sigma1^(1/2)
    (`psd_sqrt`): sigma1 sigma2 = R (R sigma2) has the eigenvalues of (R sigma2) R (AB and BA share them), a
    symmetric positive semi-definite matrix, so one symmetric eigenvalue problem (torch.linalg.eigvalsh, which CUDA
    solves on the device) replaces torchmetrics' general torch.linalg.eigvals of sigma1 sigma2; the results agree up
    to rounding. Rounding's negative eigenvalues count as 0, as in torchmetrics (the real part of their root).
    `sqrt_sigma1` (= psd_sqrt(sigma1)) may be passed to reuse it across calls.
    """
    mu1, mu2, sigma1, sigma2 = mu1.double(), mu2.double(), sigma1.double(), sigma2.double()
    r = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1.double()
    m = r @ sigma2 @ r
    root_trace = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the body with the CPU generator (and, on CUDA, `device`'s generator) seeded with `seed`, restoring their
    states afterwards. torchmetrics' KID draws its subsets with torch.randperm on the default device's generator (the
    CPU's unless torch.set_default_device says otherwise), so its subsets, and KID, are the same on every device."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------------------------
# Improved precision and recall, class coverage, memorisation.


def _tolerance(features: Tensor) -> float:
    """1e-6 of the features' RMS norm: distances this small count as zero (matrix-product distances of identical
    points are not exactly 0 in floating point)."""
    return 1e-6 * float(features.square().sum(1).mean().sqrt()) if features.numel() else 0.0


def _as_features(what: str, x: Tensor, device: torch.device | None = None) -> Tensor:
    """`x` as float64 [N, D] features (N >= 1) on `device` (default: where it is)."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ConfigError(f"{what} must be a [N, D] tensor of features with N >= 1, got shape {tuple(x.shape)}")
    return x.detach().to(device=device if device is not None else x.device, dtype=torch.float64)


def knn_radii(features: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """The distance from each row of `features` [N, D] (N > k) to its k-th nearest neighbour among the other rows:
    float64 [N] on the features' device. Euclidean, computed in blocks of `block` rows (memory O(block N));
    duplicates count as neighbours."""
    f = _as_features("features", features)
    check_positive("k", k)
    check_positive("block", block)
    n = f.shape[0]
    if n <= k:
        raise ConfigError(f"k-th nearest-neighbour radii need more than k = {k} points, got {n}")
    out = torch.empty(n, dtype=torch.float64, device=f.device)
    for i in range(0, n, block):
        d = torch.cdist(f[i:i + block], f)
        out[i:i + block] = d.kthvalue(k + 1, dim=1).values  # the row's own (zero) distance is the smallest
    return out


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, real_radii: Tensor | None = None,
                     block: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) of `fake` [M, D] against `real` [N, D] features.

    Every point gets a ball whose radius is the distance to its k-th nearest neighbour within its own set
    (`knn_radii`). precision = the fraction of fake points inside at least one real ball (samples look like data);
    recall = the fraction of real points inside at least one fake ball (the data is covered by the samples).
    Identical sets give 1 and 1; sets farther apart than their radii give 0 and 0; samples from half of the data's
    well-separated modes give precision ~1 and recall ~0.5. Needs N > k and M > k. `real_radii` (= `knn_radii(real,
    k)`) may be passed to reuse them across calls. Distances are Euclidean (matrix-product form), in blocks of
    `block` fake rows, so memory is O(block (N + M)); a distance within 1e-6 of the real features' RMS norm of a
    radius counts as inside (rounding). Runs in float64 on `real`'s device (`fake` is moved there). NaN/inf in the
    input gives nan for both.
    """
    real = _as_features("real", real)
    fake = _as_features("fake", fake, real.device)
    if real.shape[1] != fake.shape[1]:
        raise ConfigError(f"real and fake features must have the same dimension, got {real.shape[1]} and "
                          f"{fake.shape[1]}")
    if _nonfinite(real, fake):
        return {"precision": math.nan, "recall": math.nan}
    r_real = knn_radii(real, k, block) if real_radii is None else real_radii.detach().to(real.device, torch.float64)
    if r_real.shape != (real.shape[0],):
        raise ConfigError(f"real_radii must have shape ({real.shape[0]},), got {tuple(r_real.shape)}")
    r_fake = knn_radii(fake, k, block)
    tol = _tolerance(real)
    r_real, r_fake = r_real + tol, r_fake + tol
    inside = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for i in range(0, fake.shape[0], block):
        d = torch.cdist(fake[i:i + block], real)  # [b, N]
        inside[i:i + block] = (d <= r_real[None, :]).any(dim=1)
        covered |= (d <= r_fake[i:i + block, None]).any(dim=0)
    return {"precision": float(inside.double().mean()), "recall": float(covered.double().mean())}


def class_histogram(predictions: Tensor, num_classes: int) -> Tensor:
    """Counts [num_classes] (int64) of predicted classes: `predictions` are logits [M, C] (argmax taken) or class
    indices [M]."""
    check_positive("num_classes", num_classes)
    p = predictions.detach().cpu()
    if p.ndim == 2:
        p = p.argmax(dim=1)
    p = p.to(torch.int64)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ConfigError(f"class predictions must lie in [0, {num_classes}), got [{int(p.min())}, {int(p.max())}]")
    return torch.bincount(p, minlength=num_classes)


def total_variation(p: Tensor, q: Tensor) -> float:
    """Total-variation distance 0.5 sum_c |p_c - q_c| between two histograms [C] (each normalised to sum 1 first):
    0 for equal class frequencies, 1 for disjoint supports."""
    p, q = torch.as_tensor(p).double().flatten(), torch.as_tensor(q).double().flatten()
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ConfigError(f"histograms must have the same length and positive mass, got {tuple(p.shape)} and "
                          f"{tuple(q.shape)}")
    return 0.5 * float((p / p.sum() - q / q.sum()).abs().sum())


class _PixelGallery:
    """Images [G, ...] flattened once (float32, on `device`, default where they are) with their squared norms, for
    repeated nearest-image queries; the queries are moved to the gallery's device one block at a time."""

    def __init__(self, images: Tensor, device: torch.device | None = None) -> None:
        if images.shape[0] < 1:
            raise ConfigError("the nearest-image gallery needs at least one image")
        device = device if device is not None else images.device
        self.images = images.detach().reshape(images.shape[0], -1).to(device, torch.float32).contiguous()
        self.sq_norms = self.images.square().sum(dim=1)
        self.item_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def distances(self, x: Tensor, block: int | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.item_shape:
            raise ConfigError(f"images of shape {tuple(x.shape[1:])} cannot be compared with a gallery of "
                              f"{self.item_shape}")
        xf = x.detach().reshape(x.shape[0], -1)
        block = block or max(1, 2 ** 22 // len(self))  # about 16 MB of distances per block
        out = torch.empty(xf.shape[0], dtype=torch.float64, device=self.images.device)
        for i in range(0, xf.shape[0], block):
            xb = xf[i:i + block].to(self.images.device, torch.float32)
            nearest = (self.sq_norms[None, :] - 2 * xb @ self.images.T).argmin(dim=1)  # |x|^2 is the same per row
            out[i:i + block] = (xb.double() - self.images[nearest].double()).square().mean(dim=1).sqrt()  # exact
        return out


def rms_from_mean(x: Tensor, mean: Tensor) -> float:
    """Root-mean-square per-pixel distance of samples [B, *F] from the data mean [*F]: sqrt(mean (x - mu)^2). Next to
    the data's own value it says whether one-step samples overshoot away from the mean (method.md §10.5)."""
    return float((x.float() - mean.to(x.device, torch.float32)).pow(2).mean().sqrt())


def nearest_neighbour_distance(x: Tensor, gallery: Tensor, block: int | None = None) -> Tensor:
    """Per-pixel L2 distance from each image of `x` [M, ...] to its nearest image in `gallery` [G, ...]: [M] float64.

    d(x_i) = min_g ||x_i - g||_2 / sqrt(P), P the number of values per image (C H W): the root-mean-square pixel
    difference to the nearest gallery image, in the images' own units (0 for an exact copy; at most 2 for images in
    [-1, 1]). The nearest image is found with float32 matrix products in blocks (about 16 MB each); its distance is
    then recomputed exactly in float64. Runs on the gallery's device.
    """
    return _PixelGallery(gallery).distances(x, block)


def memorisation_ratio(samples: Tensor, gallery: Tensor, heldout: Tensor) -> dict[str, float]:
    """A pixel-space memorisation check: how close samples come to training images, on the scale of new images.

    Compares two means of `nearest_neighbour_distance` (per-pixel L2 to the nearest image of `gallery`):
      nn_distance: over the generated `samples`, to the nearest `gallery` image;
      heldout_nn_distance: over `heldout` images, real images that are not in `gallery`, to the nearest `gallery`
          image: the distance at which a genuinely new image of the data distribution lies;
      memorisation_ratio = nn_distance / heldout_nn_distance.
    `gallery` should be images the model trained on. Exact copies of gallery images give a ratio of 0; fresh draws
    from the data distribution give ~1 (exactly 1 for `samples` = `heldout`); well below 1 suggests copying; above
    1, samples farther from the training images than real new images are (e.g. blurry or off-distribution ones).

    In `Evaluator` the gallery is the feature-net part of the split and the held-out images are the reference part.
    The model trained on the whole data set, so the reference part is held out from the gallery, not from the model:
    a model that copies its training set uniformly puts the copies of reference-part images at the held-out distance
    and the copies of feature-net-part images at 0, so a pure copier scores ~ the reference fraction (~0.5 with the
    default 50/50 split), not 0.
    """
    g = _PixelGallery(gallery)
    nn = float(g.distances(samples).mean())
    held = float(g.distances(heldout).mean())
    return {"nn_distance": nn, "heldout_nn_distance": held, "memorisation_ratio": nn / held if held > 0 else math.nan}


def _seeded_subset(n: int, cap: int, seed: int) -> Tensor | None:
    """Sorted indices of a seeded random subset of size `cap` of range(n), or None when n <= cap."""
    if n <= cap:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


# ----------------------------------------------------------------------------------------------------------------
# FID / KID / precision / recall / class coverage / memorisation on images.


class ImageFID:
    """FID, KID and the companion metrics of generated images against a fixed reference set, in a feature net's
    space (the memorisation check is in pixel space).

    Everything about the reference is computed once: its features and FID statistics (mean, covariance and the
    covariance's square root), its k-NN radii (precision and recall), its label histogram (class coverage) and the
    held-out images' nearest-gallery distance (memorisation). Uses torchmetrics' FrechetInceptionDistance
    (reset_real_features=False; its float64 sums of the features and of their outer products) and
    KernelInceptionDistance (subset size min(1000, n_real, n_fake), cubic polynomial kernel). Features are computed
    here in batches (images clamped to [-1, 1]) and handed to all feature metrics, so each image passes the net once.

    Where it runs: the feature net, the features, the FID/KID states, the k-NN work and the memorisation gallery live
    on `device`; images (on any device) are moved there one batch at a time. The statistics are float64 there; the
    Frechet distance takes one symmetric eigenvalue problem per sample set (`frechet_distance`), KID's subsets run
    there too (drawn from the CPU generator, seeded: the same subsets on every device), and only the final numbers
    come back to the host.

    `compute` returns, in this order: "fid", "kid", "kid_std"; "precision", "recall" (`precision_recall` with k
    = `k`; nan when either set has <= k points); "class_tv" when class coverage is on (`labels` known and the net has
    `classify_features`, as `FeatureNet` does): the total-variation distance between the histogram of the net's
    predicted classes over the samples and the reference's label histogram; "nn_distance" when `nn_gallery` is given
    and "memorisation_ratio" when `nn_heldout` is too (see `memorisation_ratio`).

    Args:
        real: the reference data set (its images) or a tensor of reference images [N, C, H, W] in [-1, 1].
        feature_net: a module mapping [B, C, H, W] in [-1, 1] to [B, num_features] with an int `num_features`
            (a `FeatureNet`, `inception_feature_net()`, ...).
        batch_size: images per feature-net call (default: the net's `batch_size` attribute, else 500).
        kid_subsets: number of random subsets KID averages over. When the subset size equals both set sizes every
            subset is the whole of both sets (a permutation changes no term of the estimate), so one is computed.
        seed: seeds KID's subset sampling and the capped subsets below (global RNG state is left untouched).
        labels: the reference images' class labels [N] for class coverage (default: `real.labels` of a data set).
        num_classes: classes of the histograms (default: the data set's, else the classifier's outputs).
        nn_gallery: images the model trained on [G, C, H, W]: the gallery of the memorisation check.
        nn_heldout: real images not in `nn_gallery`: the memorisation check's scale of a genuinely new image.
        k: the nearest neighbour that sets the precision/recall radii (3).
        max_points: precision/recall use at most this many reference features (a seeded random subset) and the
            first this many samples; the memorisation check at most this many held-out images (seeded subset) and
            samples. Keeps the k-NN work bounded for FID-50k sized sets.
        device: where the metric runs ("cpu", "cuda", "cuda:1", "auto": CUDA if any; default: the feature net's
            device). The feature net is moved there (`nn.Module.to`, in place).
    """

    def __init__(self, real: Dataset | Tensor, feature_net: nn.Module, batch_size: int | None = None,
                 kid_subsets: int = 100, seed: int = 0, *, labels: Tensor | None = None,
                 num_classes: int | None = None, nn_gallery: Tensor | None = None, nn_heldout: Tensor | None = None,
                 k: int = 3, max_points: int = 5000, device: str | torch.device | None = None) -> None:
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
        check_positive("k", k)
        check_positive("max_points", max_points)
        if images.shape[0] < 2:
            raise ConfigError(f"FID needs at least 2 reference images, got {images.shape[0]}")
        if device is None:
            self.device = _module_device(feature_net, torch.device("cpu"))
        else:  # resolved as training resolves it (imported lazily: metrics does not depend on training otherwise)
            from .training import resolve_device

            self.device = resolve_device(device)
        self.feature_net = feature_net.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.kid_subsets = int(kid_subsets)
        self.k = int(k)
        self.max_points = int(max_points)
        self.sample_shape = tuple(images.shape[1:])
        self.real_features = _features(self.feature_net, images, self.batch_size, self.device)
        self._mean = images.detach().float().mean(0).cpu()  # the reference's mean image (rms_from_mean)
        self.data_rms_from_mean = rms_from_mean(images.detach().cpu(), self._mean)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # KID's "saves all features" notice
            self.fid = FrechetInceptionDistance(feature=_Passthrough(nf), reset_real_features=False).to(self.device)
            self.kid = KernelInceptionDistance(feature=_Passthrough(nf), subsets=int(kid_subsets),
                                               subset_size=min(1000, images.shape[0]),
                                               reset_real_features=False).to(self.device)
        # torchmetrics keeps FID's sums in float64 whatever the features' dtype (its add_state defaults are .double())
        # and KID's features as given (float64 here), on the device the metric was moved to (Metric._apply).
        self.fid.update(self.real_features, real=True)
        self.kid.update(self.real_features, real=True)
        self._mu_real, self._sigma_real = mean_and_covariance(self.fid.real_features_sum,
                                                              self.fid.real_features_cov_sum, self.num_real)
        self._sqrt_sigma_real = psd_sqrt(self._sigma_real)  # once: each sample set then costs one eigvalsh

        # precision / recall: the reference's k-NN radii, once
        sub = _seeded_subset(self.num_real, self.max_points, self.seed)
        self._pr_real = self.real_features if sub is None else self.real_features[sub.to(self.device)]
        self._pr_radii = knn_radii(self._pr_real, self.k) if self._pr_real.shape[0] > self.k else None

        # class coverage: the reference's label histogram, once
        if labels is None and isinstance(real, Dataset):
            labels = real.labels
        self.reference_class_histogram: Tensor | None = None  # fractions [num_classes]
        self.num_classes = 0
        if labels is not None and callable(getattr(feature_net, "classify_features", None)):
            labels = labels.detach().cpu().to(torch.int64)
            if labels.shape != (self.num_real,):
                raise ConfigError(f"labels must have shape ({self.num_real},), got {tuple(labels.shape)}")
            with torch.no_grad():
                n_out = int(feature_net.classify_features(self.real_features[:1]).shape[1])
            if num_classes is None:
                num_classes = real.num_classes if isinstance(real, Dataset) else int(labels.max()) + 1
            self.num_classes = max(int(num_classes), n_out)
            self.reference_class_histogram = class_histogram(labels, self.num_classes).double() / self.num_real

        # memorisation: the gallery (on the device) and the held-out images' distance to it, once
        self._gallery = _PixelGallery(nn_gallery, self.device) if nn_gallery is not None else None
        self.heldout_nn_distance: float | None = None
        if nn_heldout is not None:
            if self._gallery is None:
                raise ConfigError("nn_heldout needs nn_gallery (the images the held-out ones are measured against)")
            sub = _seeded_subset(nn_heldout.shape[0], self.max_points, self.seed)
            held = nn_heldout if sub is None else nn_heldout[sub.to(nn_heldout.device)]
            self.heldout_nn_distance = float(self._gallery.distances(held).mean())

    @property
    def num_real(self) -> int:
        return int(self.real_features.shape[0])

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of the metrics `compute` returns (as a set: its dict may list them in another order)."""
        names = ["fid", "kid", "kid_std", "precision", "recall", "rms_from_mean"]
        if self.reference_class_histogram is not None:
            names.append("class_tv")
        if self._gallery is not None:
            names.append("nn_distance")
            if self.heldout_nn_distance is not None:
                names.append("memorisation_ratio")
        return tuple(names)

    def compute(self, fake: Tensor) -> dict[str, float]:
        """The metrics (`metric_names`) of the generated images `fake` [M, C, H, W] (M >= 2) against the reference.

        Images are clamped to [-1, 1] for the feature net (the memorisation check uses them as they are); if any
        value is NaN or infinite all results are nan.
        """
        return self.compute_details(fake)[0]

    def compute_details(self, fake: Tensor) -> tuple[dict[str, float], dict[str, dict]]:
        """`compute`'s metrics, and details per metric that are not one number: {"class_tv": {"class_histogram":
        [counts of the predicted classes over the samples]}} when class coverage is on, else {}."""
        if tuple(fake.shape[1:]) != self.sample_shape:
            raise ConfigError(f"generated images have shape {tuple(fake.shape[1:])}; the reference set has "
                              f"{self.sample_shape}")
        if fake.shape[0] < 2:
            raise ConfigError(f"FID needs at least 2 generated images, got {fake.shape[0]}")
        if not torch.isfinite(fake).all():  # a diverged sampler: report it instead of a meaningless number
            warnings.warn("generated images contain NaN or infinite values; FID/KID reported as nan", stacklevel=3)
            return {name: math.nan for name in self.metric_names}, {}
        fake_features = _features(self.feature_net, fake, self.batch_size, self.device)
        scores, details = self._from_features(fake_features)
        scores["rms_from_mean"] = rms_from_mean(fake, self._mean)  # method.md §10.5: the overshoot check
        details["rms_from_mean"] = {"data_rms_from_mean": round(self.data_rms_from_mean, 6)}
        if self._gallery is not None:
            nn = float(self._gallery.distances(fake[:self.max_points]).mean())
            scores["nn_distance"] = nn
            if self.heldout_nn_distance is not None:
                held = self.heldout_nn_distance
                scores["memorisation_ratio"] = nn / held if held > 0 else math.nan
        return scores, details

    def compute_from_features(self, fake_features: Tensor) -> dict[str, float]:
        """Same as `compute` from already-extracted features [M, num_features] (any device; moved to `device`),
        without the pixel-space metrics ("nn_distance", "memorisation_ratio", "rms_from_mean")."""
        return self._from_features(fake_features)[0]

    def _frechet(self) -> float:
        """FID of the fake features in `self.fid` against the reference's cached statistics."""
        mu, sigma = mean_and_covariance(self.fid.fake_features_sum, self.fid.fake_features_cov_sum,
                                        self.fid.fake_features_num_samples)
        return float(frechet_distance(self._mu_real, self._sigma_real, mu, sigma, sqrt_sigma1=self._sqrt_sigma_real))

    def _from_features(self, fake_features: Tensor) -> tuple[dict[str, float], dict[str, dict]]:
        fake_features = fake_features.detach().to(self.device, torch.float64)
        self.fid.reset()
        self.fid.update(fake_features, real=False)
        fid = self._frechet()
        self.kid.reset()
        self.kid.subset_size = min(1000, self.num_real, fake_features.shape[0])
        whole_sets = self.kid.subset_size == self.num_real == fake_features.shape[0]
        self.kid.subsets = 1 if whole_sets else self.kid_subsets  # identical subsets: KID's std is then 0
        self.kid.update(fake_features, real=False)
        with _seeded_rng(self.seed, self.device):  # KID's subsets: torch.randperm on the default generator
            kid, kid_std = self.kid.compute()
        scores = {"fid": fid, "kid": float(kid), "kid_std": float(kid_std)}
        pr_fake = fake_features[:self.max_points]
        if self._pr_radii is not None and pr_fake.shape[0] > self.k:
            scores.update(precision_recall(self._pr_real, pr_fake, self.k, real_radii=self._pr_radii))
        else:
            scores.update(precision=math.nan, recall=math.nan)
        details: dict[str, dict] = {}
        if self.reference_class_histogram is not None:
            with torch.no_grad():
                logits = self.feature_net.classify_features(fake_features)
            counts = class_histogram(logits, self.num_classes)
            scores["class_tv"] = total_variation(counts, self.reference_class_histogram)
            details["class_tv"] = {"class_histogram": [int(c) for c in counts]}
        return scores, details


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

    Images: `fid.compute(samples)` (an `ImageFID` is required): "fid", "kid", "kid_std", "precision", "recall" and,
    where the `ImageFID` has what they need, "class_tv", "nn_distance", "memorisation_ratio". Points: "sw2" and
    "energy" against `reference` (default: `dataset.fresh(len(samples))` for toys, else the data set's points), both
    capped at `max_points`.
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
