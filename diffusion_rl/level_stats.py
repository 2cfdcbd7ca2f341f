"""Per-level training curves (method.md §11): `LevelStats` bins per-sample training outputs by the start state's grid
index (rounded) and averages them between log lines; the learner writes them to metrics.jsonl under "per_level"."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LevelStats"]


class LevelStats:
    """Running per-level means of per-sample training outputs, binned by the rounded grid index of the start state."""

    KEYS = ("sample_base", "sample_td", "valid")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.parts: list[tuple[Tensor, dict[str, Tensor]]] = []

    def add(self, index: Tensor, out) -> None:
        """Keep one step's start indices [B] and per-sample outputs ([B] entries of `out`), on their device: no
        host sync or Python loop on the training step; the binning happens in `summary`, once per log line."""
        idx = index.detach().reshape(-1).round().long()
        vals = {k: out[k].detach().reshape(-1).float() for k in self.KEYS
                if k in out.keys() and out[k].numel() == idx.numel()}
        self.parts.append((idx, vals))

    def summary(self) -> dict[str, list]:
        """{"index", "count", "base", "td", "valid"} per bin (keys seen only), then resets. "td" is the mean weighted
        TD loss over the bin's TD-valid samples (None where it has none), "base" the mean base loss, "valid" the
        TD-valid fraction."""
        if not self.parts:
            return {"index": [], "count": []}
        idx = torch.cat([i for i, _ in self.parts]).cpu()
        size = int(idx.max()) + 1
        counts = torch.bincount(idx, minlength=size).double()
        sums = {}
        for key in self.KEYS:
            if all(key in v for _, v in self.parts):
                vals = torch.cat([v[key] for _, v in self.parts]).cpu().double()
                sums[key] = torch.zeros(size, dtype=torch.float64).index_add_(0, idx, vals)
        bins = counts.nonzero().reshape(-1).tolist()
        out: dict[str, list] = {"index": bins, "count": [int(counts[b]) for b in bins]}
        if "sample_base" in sums:
            out["base"] = [float(sums["sample_base"][b] / counts[b]) for b in bins]
        if "valid" in sums:
            out["valid"] = [float(sums["valid"][b] / counts[b]) for b in bins]
            if "sample_td" in sums:
                out["td"] = [float(sums["sample_td"][b] / sums["valid"][b]) if sums["valid"][b] > 0 else None
                             for b in bins]
        self.reset()
        return out
