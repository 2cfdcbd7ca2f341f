"""A results file that several worker processes can fill at once, and that a restart continues.

`ResultGrid(path, settings, command)` holds `{"command", "settings", "summary", "runs"}` where `runs` maps a key
("variant|seed=S") to that run's records. Every read-modify-write happens under an exclusive `flock` on
`<path>.lock`, so workers started with the same command share one file:
- `claim(key)` is true when the key is neither finished nor being run by a live worker; the worker then holds an
  exclusive `flock` on the claim file `<path>.claims/<key>` (which also names its PID, for people) until it
  finishes or dies: the kernel drops a dead worker's lock, so a killed worker's run is redone, never lost or
  duplicated, and a reused PID cannot keep a run claimed;
- `finish(key, records)` merges the records into the file as it is on disk now and drops the claim.
The file is written with its settings when the grid opens, so a command with other settings is refused before any
work even while no run has finished.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import statistics
from pathlib import Path
from typing import IO, Iterator

from diffusion_rl.errors import ConfigError
from diffusion_rl.runs import atomic_write_text

__all__ = ["ResultGrid", "run_key", "run_seed", "summarise"]


def run_key(label: str, seed: int) -> str:
    """The key of one run's records: 'td:stride=6|seed=2'."""
    return f"{label}|seed={seed}"


def run_seed(key: str) -> int:
    """The seed of a run key ('td:stride=6|seed=2' -> 2)."""
    return int(key.rpartition("|seed=")[2])


def summarise(records: list[dict]) -> list[dict]:
    """Mean, std and values over seeds of every (variant, nfe, metric); with two or more seeds the std is nan when a
    value is not finite (a diverged sampler's nan FID), which `statistics.stdev` would refuse; one seed's std is 0."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["nfe"], r["metric"]), []).append(r["value"])

    def std(vals: list[float]) -> float:
        if len(vals) < 2:
            return 0.0
        return statistics.stdev(vals) if all(map(math.isfinite, vals)) else math.nan

    return [{"variant": v, "nfe": n, "metric": m, "mean": statistics.fmean(vals), "std": std(vals),
             "n_seeds": len(vals), "values": vals} for (v, n, m), vals in groups.items()]


class ResultGrid:
    """One resumable, shareable results file (see the module docstring)."""

    def __init__(self, path: str | Path, settings: dict, command: str) -> None:
        self.path = Path(path)
        self.settings, self.command = settings, command
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.claims = self.path.with_name(self.path.name + ".claims")
        self.claims.mkdir(exist_ok=True)
        self._held: dict[str, IO] = {}  # key -> the open claim file this process holds a lock on
        with self._locked():
            if not self.path.exists():  # names these settings now: another command is refused from the start
                self._write({})
            self._load()  # refuses a file made with other settings

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _load(self) -> dict[str, list[dict]]:
        if not self.path.exists():
            return {}
        old = json.loads(self.path.read_text())
        if old.get("settings") != self.settings:
            raise ConfigError(f"{self.path} was made with settings {old.get('settings')}, not {self.settings}; "
                              f"use another --out or delete it")
        return old.get("runs", {})

    def runs(self) -> dict[str, list[dict]]:
        """The finished runs on disk now."""
        with self._locked():
            return self._load()

    def _claim_file(self, key: str) -> Path:
        return self.claims / key.replace("/", "_")

    def _write(self, runs: dict[str, list[dict]]) -> None:
        flat = [r for rs in runs.values() for r in rs]
        atomic_write_text(self.path, json.dumps({"command": self.command, "settings": self.settings,
                                                 "summary": summarise(flat), "runs": runs}, indent=1))

    def claim(self, key: str) -> bool:
        """True (and the key is this process's until `finish` or its exit) when `key` is unfinished and no live
        worker holds it."""
        with self._locked():
            if key in self._held:
                return True
            if key in self._load():
                return False
            f = open(self._claim_file(key), "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live worker holds it
                f.close()
                return False
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            self._held[key] = f
            return True

    def release(self, key: str) -> None:
        """Drop this process's claim on `key` without a result (its run failed): another worker may take it."""
        held = self._held.pop(key, None)
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)  # not only close: a forked child may share the open file
            held.close()

    def finish(self, key: str, records: list[dict]) -> None:
        """Merge one run's records into the file (atomic replace) and drop its claim."""
        with self._locked():
            runs = self._load()
            runs[key] = records
            self._write(runs)
            if key in self._held:  # a --score-at budget's key is never claimed: no claim file of another's to drop
                self._claim_file(key).unlink(missing_ok=True)
            self.release(key)
