"""Output folders that cannot lose work: path checks, a lock per folder, protection of finished runs.

`RunFolder(out, resume=..., overwrite=...)` is entered before any work starts:
- the path must be a folder, or creatable, and writable (no file in the way, no read-only parent);
- a lock file `.lock`, held with an exclusive `flock` for the command's lifetime, names the owner's PID, host and
  start time; a second run on the same folder is refused, and a lock left by a process that died (the kernel drops
  its flock, even after SIGKILL) is reported and taken over;
- a folder that holds a run (a checkpoint, a metrics log or results, in it or in any of its subfolders) is refused
  unless `resume` (continue it) or `overwrite` (delete its run files, results, plots and sample grids first) is
  given;
- stale temporary checkpoint files from killed runs (`*.pt*.tmp`) are removed.
The lock is released when the block exits.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["RunFolder", "check_writable_folder", "remove_stale_temporaries", "RUN_FILES", "atomic_write",
           "atomic_write_text", "atomic_save"]

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "results.json")  # their presence means the folder holds a run
OUTPUTS = ("samples", "tensorboard")  # what a run writes besides RUN_FILES and the *_vs_nfe.png plots
LOCK = ".lock"


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temporary file beside `path` (named `<name>.<random>.tmp`), which is flushed to disk and
    renamed over `path`, and the folder is synced: a crash, even of the machine, leaves the old file or the new one,
    never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (see `atomic_write`)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_writable_folder(path: str | Path, what: str = "--out") -> Path:
    """Create `path` if needed and prove it is a writable folder; ConfigError naming the problem otherwise."""
    path = Path(path)
    if not str(path).strip():
        raise ConfigError(f"{what} is empty; give a folder")
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({e.strerror or e})") from None
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary checkpoint files a killed writer left behind; returns what was removed."""
    removed = []
    for tmp in Path(folder).glob("*.pt*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


class RunFolder:
    """Guard one output folder for the length of a `with` block (see the module docstring).

    Args:
        path: the output folder.
        resume: the command continues the run held there.
        overwrite: the command replaces the run held there (its run files and sample grids are deleted).
        subfolders: the learners' folders inside `path` (each may hold a run).
    """

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 subfolders: tuple[str, ...] = ()) -> None:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: continue the run or replace it")
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.subfolders = subfolders
        self._fd: int | None = None

    def runs_held(self) -> list[Path]:
        """The folders (this one and any subfolder) that hold a run."""
        folders = [self.path, *(p for p in sorted(self.path.iterdir()) if p.is_dir())] if self.path.is_dir() else []
        return [f for f in folders if any((f / name).exists() for name in RUN_FILES)]

    def __enter__(self) -> "RunFolder":
        check_writable_folder(self.path)
        self._acquire()
        try:
            held = self.runs_held()
            if held and not (self.resume or self.overwrite):
                raise ConfigError(f"--out {str(self.path)!r} already holds a run ({', '.join(map(str, held))}); "
                                  f"pass --resume to continue it or --overwrite to replace it")
            if self.resume and not held:
                raise ConfigError(f"--resume: {str(self.path)!r} holds no run to continue (no checkpoint.pt); "
                                  f"run without --resume to start one")
            if self.overwrite:
                for folder in {self.path, *held}:
                    targets = [*(folder / n for n in (*RUN_FILES, *OUTPUTS)), *folder.glob("*_vs_nfe.png")]
                    for target in targets:
                        if target.is_dir():
                            shutil.rmtree(target)
                        elif target.exists():
                            target.unlink()
            for folder in [self.path, *(self.path / s for s in self.subfolders)]:
                if folder.is_dir():
                    remove_stale_temporaries(folder)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    # ---- the lock ----------------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(5):
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = self._read(fd)
                os.close(fd)
                raise ConfigError(f"--out {str(self.path)!r} is in use by process {owner.get('pid', '?')} on "
                                  f"{owner.get('host', '?')} (started {owner.get('started', '?')}); wait for it, "
                                  f"or choose another --out") from None
            try:  # the lock file may have been replaced between open and flock: then try again
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = self._read(fd)
            if owner.get("pid"):
                warnings.warn(f"took over a stale lock on {str(self.path)!r} left by process {owner['pid']} on "
                              f"{owner.get('host', '?')} (started {owner.get('started', '?')}), which is no longer "
                              f"running", stacklevel=3)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            return
        raise ConfigError(f"could not lock {str(self.path)!r}; another process keeps replacing {str(lock)!r}")

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def _release(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(fd)  # drops the flock
            self._fd = None
