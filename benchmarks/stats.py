"""Paired statistics over seeds: two variants run with the same seeds (same data order, same initialisation, same
sampling noise) are compared seed by seed, not by their two means and stds.

    paired({0: 40.1, 1: 41.0, 2: 39.5}, {0: 77.0, 1: 78.2, 2: 76.1})   # A's and B's values per seed

gives the differences A - B over the seeds both have, their mean, a Student-t confidence interval for that mean
(none from a single seed), how many seeds have A lower, B lower or a tie, and a verdict read from the interval alone:
"A lower" when the whole interval lies below 0, "B lower" when it lies above, otherwise "no difference shown".
Pure: no file, no plotting, no knowledge of what A and B are.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from scipy import stats as _scipy_stats

__all__ = ["A_LOWER", "B_LOWER", "NO_DIFFERENCE", "PairedDifference", "paired"]

A_LOWER, B_LOWER, NO_DIFFERENCE = "A lower", "B lower", "no difference shown"


@dataclass(frozen=True)
class PairedDifference:
    """A - B per shared seed and what they show. `interval` is None with one seed (no spread to estimate) and when a
    difference is not finite (a diverged sampler's nan FID: a nan seed counts as neither side lower)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    interval: tuple[float, float] | None
    a_lower: int
    b_lower: int
    ties: int
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def finite(self) -> bool:
        """Whether every seed's difference is a finite number."""
        return all(map(math.isfinite, self.differences))

    @property
    def verdict(self) -> str:
        """'A lower' when the whole interval is below 0, 'B lower' when above, else 'no difference shown' (always so
        without an interval, and when a value is not finite)."""
        if self.interval is None:
            return NO_DIFFERENCE
        low, high = self.interval
        if high < 0:
            return A_LOWER
        if low > 0:
            return B_LOWER
        return NO_DIFFERENCE


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> PairedDifference:
    """The paired comparison of A and B (seed -> value, the same metric, solver and NFE) over the seeds both have:
    mean difference A - B, its two-sided Student-t interval at `confidence` (n - 1 degrees of freedom), and the counts
    of seeds where A is lower, B is lower, or they tie (a nan difference is none of them). No interval when a
    difference is not finite. ValueError when no seed is shared."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must lie in (0, 1)")
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed in both: A has {sorted(a)}, B has {sorted(b)}; nothing to pair")
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    mean = statistics.fmean(diffs)
    interval = None
    if len(diffs) > 1 and all(map(math.isfinite, diffs)):
        t = float(_scipy_stats.t.ppf((1 + confidence) / 2, len(diffs) - 1))
        half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
        interval = (mean - half, mean + half)
    return PairedDifference(seeds=seeds, differences=diffs, mean=mean, interval=interval,
                            a_lower=sum(x < 0 for x in diffs), b_lower=sum(x > 0 for x in diffs),
                            ties=sum(x == 0 for x in diffs), confidence=confidence)
