"""Stop requests from a job's scheduler: SIGTERM (SLURM, Kubernetes, spot instances) and SIGINT.

A scheduler that preempts a job sends SIGTERM and waits a grace period before SIGKILL. The
training loop asks :class:`StopSignals` after each step whether a stop was requested, and if so
writes a checkpoint and stops (:class:`subspaces.errors.Preempted`); nothing is interrupted
half-way (a step, a checkpoint write). A second signal of the same kind, a second or more
after the first, stops at once (``KeyboardInterrupt``), for a user who does not want to wait;
one that follows within a second is the same request arriving twice (a scheduler signals the
whole process group while a parent, such as a comparison, forwards it to its workers).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any


class StopSignals:
    """Context manager that turns SIGTERM / SIGINT into a request, read with :attr:`requested`.

    Handlers are installed only in the main thread (Python delivers signals there) and the
    previous ones are restored on exit, so nesting (a comparison running members in-process)
    leaves the outer handler in place afterwards.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_WINDOW_S = 1.0

    def __init__(self, announce: bool = True) -> None:
        self.requested: str | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._first = 0.0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested == name:
            if now - self._first < self.REPEAT_WINDOW_S:
                return
            raise KeyboardInterrupt(f"second {name}: stopping now, without a checkpoint of this epoch")
        self.requested = name
        self._first = now
        if self.announce:
            print(f"{name} received: finishing this step and writing a checkpoint (send it again to stop now)",
                  file=sys.stderr, flush=True)
