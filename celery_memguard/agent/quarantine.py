"""Refuse a task id that keeps killing its worker process (protocol.quarantine).

In the worker's main process, where every task is received before a child runs it: a task
id is quarantined when the daemon lists it (its file, re-read when it changes, looked at no
more than every ``CHECK_SECONDS``), or when this process saw it running at
``quarantine.after`` OOM kills itself. It learns of those before the task is redelivered:
Celery marks the job lost, and with ``task_reject_on_worker_lost`` requeues it, in the same
call that reaps the child, while the daemon hears of the kill a moment later. The request of
a quarantined task is marked (``MARK``), and the child given it refuses it: the task fails
inside its own body with MemoryLimitExceeded (reason ``quarantined``), so Celery records it in
the result backend, acknowledges it, and the task's own retry policy decides. The exception
is raised by a trace function at the first call of the task's body, removed at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from celery_memguard.protocol import paths, quarantine
from celery_memguard.protocol.oom import OomLedger

CHECK_SECONDS = 0.1
MARK = "celery_memguard_quarantined"  # the key set in a quarantined task's request


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


class Guard:
    """The main process's side: what it knows of the task ids that kill their children."""

    def __init__(self, socket: str) -> None:
        self.listed = Quarantine(socket)
        self.oom = OomLedger()
        self.kills: dict[str, tuple[str, int]] = {}  # task id -> (name, OOM kills seen here)

    def killed(self, task_id: str | None, name: str | None, counter: int | None,
               now: float) -> None:
        """A child running ``task_id`` died of a SIGKILL; ``counter`` is the container's OOM
        kill counter read just now: if it moved, the kernel killed it."""
        if self.oom.claim("self", counter, now) and task_id:
            count = self.kills.get(task_id, (name or "", 0))[1] + 1
            self.kills[task_id] = (name or "", count)
            if len(self.kills) > 4096:
                del self.kills[next(iter(self.kills))]

    def why(self, task_id: str, now: float) -> str | None:
        """Why ``task_id`` must not run again, or None."""
        entry = self.listed.lookup(task_id, now)
        if entry is not None:
            return entry.why(self.listed.after)
        name, count = self.kills.get(task_id, ("", 0))
        after = self.listed.after
        if after and count >= after:
            return quarantine.Entry(name, count, 0, 0.0).why(after)
        return None


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
