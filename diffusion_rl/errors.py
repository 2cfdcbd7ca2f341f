"""One error type for bad input, and the small checks that raise it before any work starts.

The CLI turns a `ConfigError` into a one-line message and exit code 2.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigError", "check_choice", "check_positive", "check_non_negative", "check_range", "check_distinct"]


class ConfigError(ValueError):
    """Bad user input: the message names the bad value and what is accepted."""


def check_choice(what: str, value: Any, accepted: Iterable[Any]) -> Any:
    """Return `value` if it is one of `accepted`, else raise naming both."""
    accepted = list(accepted)
    if value not in accepted:
        raise ConfigError(f"unknown {what} {value!r}; accepted: {', '.join(map(str, accepted))}")
    return value


def check_positive(what: str, value: Any, integer: bool = True) -> Any:
    """Return `value` if it is a positive (integer) number, else raise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ConfigError(f"{what} must be {kind}, got {value!r}")
    return value


def check_non_negative(what: str, value: Any, note: str = "") -> float:
    """Return `value` as a float if it is a finite number >= 0, else raise (`note` follows the range: " (0: off)")."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ConfigError(f"{what} must be a finite number >= 0{note}, got {value!r}")
    return float(value)


def check_range(what: str, value: Any, low: float, high: float) -> Any:
    """Return `value` if low <= value <= high, else raise naming the closed range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high):
        raise ConfigError(f"{what} must be in [{low}, {high}], got {value!r}")
    return value


def check_distinct(what: str, values: Iterable[Any]) -> tuple:
    """Return `values` as a tuple if no value repeats, else raise naming the repeated ones."""
    values = tuple(values)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{what} {list(values)} repeats {', '.join(map(str, repeated))}; give each value once")
    return values
