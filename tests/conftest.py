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


def file_times(root) -> dict:
    """Every file under root with its modification time: equal before and after means nothing was touched."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def refused(capsys):
    """refused(argv, code, needle): `diffusion_rl.cli.main(argv)` returns `code` and writes one line on stderr
    that contains `needle`, with no traceback. With argparse_exit=True argparse's own exit (SystemExit, for a value
    of the wrong type) counts as the exit code too; otherwise main must return."""
    from diffusion_rl.cli import main

    def check(argv: list[str], code: int, needle: str, argparse_exit: bool = False) -> str:
        capsys.readouterr()
        try:
            got = main(argv)
        except SystemExit as e:
            if not argparse_exit:
                raise
            got = int(e.code)
        err = capsys.readouterr().err.strip()
        assert got == code, err
        assert needle in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err
    return check
