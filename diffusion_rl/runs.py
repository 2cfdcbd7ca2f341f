"""Output folders that cannot lose work: path checks, a lock per folder, protection of finished runs.

`RunFolder(out, resume=..., overwrite=...)` is entered before any work starts:
- the path must be a folder, or creatable, and writable (no file in the way, no read-only parent);
- a lock file `.lock`, held with an exclusive `flock` for the command's lifetime, names the owner's PID, host and
  start time; a second run on the same folder is refused, and a lock left by a process that died (the kernel drops
  its flock, even after SIGKILL) is reported and taken over;
- a folder that holds a run (a checkpoint, a metrics log or results, in it or in any of its subfolders) is refused
  unless `resume` (continue it) or `overwrite` (delete what the library wrote there first) is given;
- stale temporary files from killed writers (`*.pt*.tmp`, `results.json.*.tmp`, ...) are removed.
The lock is released when the block exits.

What the library wrote is recorded: each folder it writes into holds a manifest (`MANIFEST`, a JSON object) naming
those files (relative paths, with their kind: "train" for checkpoints, metrics logs and TensorBoard events, "eval"
for results, plots and sample grids, "diagnose") and the learner subfolders ("runs") of a command's --out.
`overwrite` deletes only files the manifests list (of the kinds the command writes), never a file it reads (`keep`),
never a subfolder its manifest does not name (another run), never anything else. A folder written before manifests
existed has none: there `overwrite` deletes only the run files the command would replace anyway (`LEGACY`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["RunFolder", "check_writable_folder", "remove_stale_temporaries", "RUN_FILES", "atomic_write",
           "atomic_write_text", "atomic_save", "record_written", "written_files", "remove_written", "set_aside",
           "MANIFEST", "no_new_folders_if_failed"]

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "results.json")  # their presence means the folder holds a run
LOCK = ".lock"
MANIFEST = ".diffusion-rl-manifest"  # what the library wrote in this folder (see the module docstring)
KINDS = ("train", "eval", "diagnose")
# in a folder without a manifest (written by an older version), the files of each kind `overwrite` may delete: only
# those a command of that kind replaces anyway
LEGACY = {"train": ("checkpoint.pt", "metrics.jsonl"), "eval": ("results.json",), "diagnose": ()}
TEMPORARIES = ("*.pt*.tmp", "results.json.*.tmp", "diagnose.json.*.tmp", MANIFEST + ".*.tmp", "metrics.jsonl.*.tmp")


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
    """`torch.save(obj, path)`, atomically (see `atomic_write`). torch reports a short write (a full disk) as a
    RuntimeError ("unexpected pos ...", "file write failed"): that becomes OSError(ENOSPC) naming the file."""
    import torch

    def save(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            text = str(e)
            if "unexpected pos" in text or "file write failed" in text or "PytorchStreamWriter failed" in text:
                raise OSError(errno.ENOSPC, "No space left on device (torch.save could not write all of the "
                                            "checkpoint)", str(path)) from e
            raise

    atomic_write(path, save)


def set_aside(path: str | Path, why: str) -> Path:
    """Rename an unreadable file to `<name>.<why>-<time>` (never deleting it) and warn in one line; returns the new
    path."""
    path = Path(path)
    new = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while new.exists():
        new = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, new)
    warnings.warn(f"{str(path)!r} is unreadable ({why}); set aside as {str(new)!r}", stacklevel=2)
    return new


# ---- the manifest of what the library wrote ------------------------------------------------------------------------
def written_files(folder: str | Path) -> dict | None:
    """The manifest of `folder`: {"files": {relative path: kind}, "runs": [subfolder, ...]}; None when the folder
    has none (or it is unreadable, when it is set aside with a warning and nothing counts as written)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode())
        if not (isinstance(data, dict) and isinstance(data.get("files", {}), dict)
                and isinstance(data.get("runs", []), list)):
            raise ValueError("not a manifest")
    except (OSError, ValueError):
        set_aside(path, "corrupt")
        return {"files": {}, "runs": []}
    return {"files": dict(data.get("files", {})), "runs": list(data.get("runs", []))}


def _safe_relative(rel: str | Path) -> str | None:
    """`rel` as a POSIX relative path inside its folder; None for an absolute path or one with '..'."""
    rel = Path(rel)
    if rel.is_absolute() or ".." in rel.parts or str(rel) in ("", "."):
        return None
    return rel.as_posix()


def record_written(folder: str | Path, rel: str | Path, kind: str) -> None:
    """Name `folder / rel` (a file the library wrote) in `folder`'s manifest, with its kind ("train", "eval",
    "diagnose"), or with kind "run" a learner subfolder of a command's --out."""
    folder = Path(folder)
    rel = _safe_relative(rel)
    if rel is None:
        return
    data = written_files(folder) or {"files": {}, "runs": []}
    if kind == "run":
        if rel in data["runs"]:
            return
        data["runs"].append(rel)
    else:
        if data["files"].get(rel) == kind:
            return
        data["files"][rel] = kind
    atomic_write_text(folder / MANIFEST, json.dumps(data, indent=1))


def remove_written(folder: str | Path, kinds: tuple[str, ...] = KINDS, keep: tuple[str | Path, ...] = ()
                   ) -> list[Path]:
    """Delete the files of `kinds` that `folder`'s manifest lists (without one, the `LEGACY` names), except those in
    `keep` (files a command reads); folders emptied by it go too. Returns what was deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    data = written_files(folder)
    if data is None:
        listed = {name: kind for kind in kinds for name in LEGACY[kind]}
    else:
        listed = {rel: kind for rel, kind in data["files"].items() if kind in kinds}
    kept = {(st.st_ino, st.st_dev) for st in (_stat(k) for k in keep) if st is not None}
    removed = []
    for rel in listed:
        target = folder / rel
        if _safe_relative(rel) is None or not os.path.lexists(target):
            continue
        st = os.lstat(target)
        if stat.S_ISDIR(st.st_mode):
            continue  # a manifest names files, never folders
        real = _stat(target)
        if real is not None and (real.st_ino, real.st_dev) in kept:
            continue  # the command reads it
        target.unlink()  # a symlink is unlinked, never its target
        removed.append(target)
        for parent in target.parents:  # folders left empty by it (never `folder` itself)
            if parent == folder or folder not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break
    if data is not None and removed:
        gone = {p.relative_to(folder).as_posix() for p in removed}
        data["files"] = {rel: kind for rel, kind in data["files"].items() if rel not in gone}
        atomic_write_text(folder / MANIFEST, json.dumps(data, indent=1))
    return removed


def _stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def check_writable_folder(path: str | Path, what: str = "--out", create: bool = True) -> Path:
    """Create `path` if needed and prove it is a writable folder; ConfigError naming the problem otherwise.
    `create=False` leaves nothing behind: no file may stand in the way, and the nearest existing folder must take
    a new folder (the check a command makes before its other checks; it creates the folder once they all pass)."""
    path = Path(path)
    if not str(path).strip():
        raise ConfigError(f"{what} is empty; give a folder")
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not create:  # a folder made and removed in the nearest existing one proves the path can be made
        nearest = next((p for p in [path, *path.parents] if p.exists()), Path("."))
        try:
            os.rmdir(tempfile.mkdtemp(dir=nearest, prefix=f".write-test-{os.getpid()}-"))
        except OSError as e:
            raise ConfigError(f"{what} {str(path)!r} is not writable ({e.strerror or e})") from None
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def no_new_folders_if_failed(path: str | Path) -> Iterator[None]:
    """Run the block; if it raises, remove the folders it created on the way to `path` (`path` and the parents that
    did not exist before) that are still empty: a refused command leaves no new folder behind."""
    path = Path(path)
    new = [p for p in [path, *path.parents] if not os.path.lexists(p)]  # deepest first
    try:
        yield
    except BaseException:
        for folder in new:
            try:
                folder.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files of the library's atomic writes that a killed writer left behind; returns what was
    removed."""
    removed = []
    for tmp in {t for pattern in TEMPORARIES for t in Path(folder).glob(pattern)}:
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
        overwrite: the command replaces the run held there: the files of `kinds` the manifests of `path`, of
            `subfolders` and (for "train") of the learner subfolders `path`'s manifest names are deleted.
        subfolders: the learners' folders inside `path` (each may hold a run).
        kinds: what the command writes ("train", "eval", "diagnose"); `overwrite` deletes only those.
        keep: files the command reads (checkpoints it evaluates): never deleted.
    """

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 subfolders: tuple[str, ...] = (), kinds: tuple[str, ...] = KINDS,
                 keep: tuple[str | Path, ...] = ()) -> None:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: continue the run or replace it")
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.subfolders = subfolders
        self.kinds, self.keep = tuple(kinds), tuple(keep)
        self._fd: int | None = None

    def runs_held(self) -> list[Path]:
        """The folders (this one and any subfolder) that hold a run."""
        folders = [self.path, *(p for p in sorted(self.path.iterdir()) if p.is_dir())] if self.path.is_dir() else []
        return [f for f in folders if any((f / name).exists() for name in RUN_FILES)]

    def owned_folders(self) -> list[Path]:
        """The folders whose written files `overwrite` deletes: `path`, and for a training command its learner
        subfolders and those its manifest names (never another subfolder: that is another run)."""
        folders = [self.path]
        if "train" in self.kinds:
            runs = (written_files(self.path) or {}).get("runs", [])
            folders += [self.path / s for s in dict.fromkeys([*self.subfolders, *runs]) if _safe_relative(s)]
        return folders

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
                for folder in self.owned_folders():
                    remove_written(folder, self.kinds, self.keep)
            for sub in self.subfolders:
                record_written(self.path, sub, "run")
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
            try:  # never through a symlink: the file it points to would be truncated and overwritten
                fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ConfigError(f"--out {str(self.path)!r}: the lock file {str(lock)!r} is a symlink; remove "
                                      f"it (a lock is a plain file the command creates)") from None
                raise
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ConfigError(f"--out {str(self.path)!r}: the lock file {str(lock)!r} is not a plain file; "
                                  f"remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = self._read(fd)
                os.close(fd)
                raise ConfigError(f"--out {str(self.path)!r} is in use by process {owner.get('pid', '?')} on "
                                  f"{owner.get('host', '?')} (started {owner.get('started', '?')}); wait for it, "
                                  f"or choose another --out") from None
            try:  # the lock file may have been replaced between open and flock: then try again
                same = os.fstat(fd).st_ino == os.lstat(lock).st_ino
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
