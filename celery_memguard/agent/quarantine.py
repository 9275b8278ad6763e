"""In a pool child: refuse a task id the daemon quarantined (protocol.quarantine).

The list is re-read when the daemon's file changes, looked at no more than every
``CHECK_SECONDS`` (a redelivery comes seconds after the kill that quarantined it). A refused
task fails inside its own body with MemoryLimitExceeded (reason ``quarantined``), so Celery
records it in the result backend, acknowledges it, and the task's own retry policy decides:
the exception is raised by a trace function at the first call of the task's body, and the
trace function is removed at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from celery_memguard.protocol import paths, quarantine

CHECK_SECONDS = 0.1


class Quarantine:
    def __init__(self, socket: str) -> None:
        self.path = paths.quarantine_path(socket)
        self.entries: dict[str, quarantine.Entry] = {}
        self.after = 0
        self._mtime = 0.0
        self._next_check = 0.0

    def lookup(self, task_id: str, now: float) -> quarantine.Entry | None:
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            self._refresh()
        return self.entries.get(task_id) if self.entries else None

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime == self._mtime:
                return
            with open(self.path, "rb") as fh:
                decoded = quarantine.decode(fh.read(1 << 20))
        except OSError:
            self.entries, self._mtime = {}, 0.0  # no daemon, or it cleared the list
            return
        if decoded is not None:
            self.entries, self.after = decoded
            self._mtime = mtime


def raise_in_body(run_code: CodeType, error: BaseException) -> Callable[[], None]:
    """Have ``error`` raised as the function whose code is ``run_code`` starts, in this thread;
    return the function that removes the trace should the body never start."""
    previous: Any = sys.gettrace()

    def tracer(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is run_code:
            sys.settrace(previous)
            raise error

    def remove() -> None:
        if sys.gettrace() is tracer:
            sys.settrace(previous)

    sys.settrace(tracer)
    return remove
