import os

import pytest
import torch

# at most 2 threads, or OMP_NUM_THREADS when it is set (e.g. 1 beside a running benchmark)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Feature-network caches go to one temp folder per test session, never the user's home."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("DIFFUSION_RL_CACHE", str(cache))
    yield


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private feature-net cache, so a test can see whether any feature net was fitted."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSION_RL_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def points():
    """2,000 points of the 8-gaussians toy (seed 0)."""
    from diffusion_rl.data import load_dataset
    return load_dataset("8gaussians", n_points=2000, seed=0)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits."""
    from diffusion_rl.data import load_dataset
    return load_dataset("digits")
