"""Stopping cleanly on SIGTERM, the usual preemption signal of clusters and container runtimes.

`handle_sigterm()` (entered by the command line) turns SIGTERM into a `Terminated` exception. While a learner
trains (inside `training()`), the signal only sets a flag: `Learner.train` checks it after each whole step, writes a
checkpoint and raises `Terminated` there, so a checkpoint never holds a half-done step. Elsewhere (data loading,
evaluation) `Terminated` is raised at once. Either way `with` blocks unwind, so the run folder's lock is released.
No torch import: the command line loads this before any heavy module.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "handle_sigterm", "training", "requested"]


class Terminated(BaseException):
    """A termination signal arrived. A BaseException, like KeyboardInterrupt, so `except Exception` passes it on.
    `step` is the step of the checkpoint written on the way out (None when no learner was training)."""

    def __init__(self, signum: int = signal.SIGTERM, step: int | None = None) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum, self.step = signum, step


_state: dict = {"signal": None, "training": 0}


def requested() -> int | None:
    """The signal number received since `handle_sigterm()` was entered, or None."""
    return _state["signal"]


@contextmanager
def training() -> Iterator[None]:
    """Marks a training loop: a SIGTERM inside it is deferred to the loop's next step boundary."""
    _state["training"] += 1
    try:
        yield
    finally:
        _state["training"] -= 1


def _handler(signum: int, frame) -> None:
    _state["signal"] = signum
    if not _state["training"]:
        raise Terminated(signum)


@contextmanager
def handle_sigterm() -> Iterator[None]:
    """SIGTERM raises `Terminated` (deferred to a step boundary while training) for the length of the block; the
    previous handler is restored after it. Outside the main thread (where no handler can be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _handler)
    _state["signal"] = None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _state["signal"] = None
