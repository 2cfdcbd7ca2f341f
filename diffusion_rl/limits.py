"""Resource limits, checked before any work starts.

Each limit guards against a typo turning into hours of compute or an allocation that takes the machine down (a
budget of 10^9 network evaluations, a 2 TB network). A limit is raised, where a larger value is legitimate, by
the environment variable named in its error message, e.g. `DIFFUSION_RL_MAX_NFE=50000`.
"""
from __future__ import annotations

import os

from .errors import ConfigError

__all__ = ["LIMITS", "limit", "check_limit", "check_samples"]

# name -> (default, what it bounds)
LIMITS: dict[str, tuple[int, str]] = {
    "nfe": (10_000, "network evaluations per sample"),
    "samples": (1_000_000, "samples per command"),
    "image_side": (1_024, "pixels per image side"),
    "classes": (100_000, "classes of a data set or a class-conditional network"),
    "parameters": (2_000_000_000, "network parameters"),
    "data_bytes": (16 * 2 ** 30, "bytes of a data set, on disk or unpacked in memory"),
    "steps": (100_000_000, "training steps"),
    "batch_size": (65_536, "samples per training batch"),
    "depth": (1_000, "residual blocks per network level"),
    "grid": (1_024, "samples drawn into a .png"),
}


def limit(name: str) -> int:
    """The limit `name`: `DIFFUSION_RL_MAX_<NAME>` when set (a positive integer), else its default."""
    default, _ = LIMITS[name]
    var = f"DIFFUSION_RL_MAX_{name.upper()}"
    text = os.environ.get(var)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{var}={text!r} must be a positive integer")
    return value


def check_limit(what: str, value: int | float, name: str) -> None:
    """Raise ConfigError if `value` exceeds the limit `name`, naming the limit and how to raise it."""
    cap = limit(name)
    if value > cap:
        raise ConfigError(f"{what} = {value:,} exceeds the limit of {cap:,} {LIMITS[name][1]}; if you mean it, "
                          f"raise it with DIFFUSION_RL_MAX_{name.upper()}={int(value)}")


def check_samples(n_samples: int, budgets: int, networks: int) -> None:
    """Raise ConfigError if a command's samples (`n_samples` at each of `budgets` NFE budgets for each of `networks`
    networks) exceed the limit "samples", which counts per command."""
    total = int(n_samples) * int(budgets) * int(networks)
    check_limit(f"samples drawn ({n_samples:,} x {budgets} NFE budgets x {networks} networks)", total, "samples")
