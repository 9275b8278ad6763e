"""The room file of a worker: what its tasks need, and which are starting, shared by its children.

Past its container's soft line a child waits before it starts a task (agent/headroom.py). Two
things make that check right where one child alone would get it wrong:

- **What a task name needs**, the most its run raised a child's RSS at its peak, is known to
  every child of the worker, not only to those that ran it before (a replacement child knows
  nothing of its own);
- **tasks that have started but not yet allocated**: children that read their jobs at the same
  moment all see the same usage and would all start. A child reserves its task's need before
  it starts, and another counts what is not yet allocated of each reservation (its need less
  what the starting child's RSS has risen since);
- **first runs**: a task name whose need no child knows yet is run by one child first, for a
  moment (agent/headroom.py ``FIRST_RUN_WAIT``): the others wait until it has shown what it
  needs, or ended, or the moment has passed.

``<socket>.room.<worker pid>`` (paths.room_path) is created by the daemon for each worker with
the agent, beside its grant file, with the same mode, and removed with it; children read and
write it under its lock, for microseconds. It names the worker by pid and start time, so a
reused pid never inherits it. Without a daemon there is no room file: each child goes by its
own needs alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from celery_memguard.protocol.grants import FILE_MODE, lock

VERSION = 1
_T = TypeVar("_T")
MAX_NEEDS = 512  # task names
MAX_STARTING = 1024
MAX_FIRST = 256  # first runs under way


@dataclass
class Room:
    needs: dict[str, int] = field(default_factory=dict)  # task name -> bytes at its peak
    starting: list[tuple[int, int, int]] = field(default_factory=list)  # (pid, need, RSS before)
    first: list[tuple[int, str, int]] = field(default_factory=list)  # (pid, task name, started:
    # CLOCK_MONOTONIC in ms, which every process of the host shares)


def create(path: str, worker: tuple[int, int]) -> bool:
    """Daemon side: make the file for this worker unless it is there already; False when it
    cannot be (the directory, a link in the way)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not lock(fd):
            return False
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        if _read(fd, worker) is None:
            _write(fd, worker, Room())
    except OSError:
        return False
    else:
        return True
    finally:
        os.close(fd)


def read(path: str, worker: tuple[int, int]) -> Room | None:
    """The room as it stands, under a reader's lock (a write is a truncate and a write: read
    between the two, the file would be empty); None when missing, busy or not this worker's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _read(fd, worker) if lock(fd, shared=True) else None
    finally:
        os.close(fd)


class Busy:
    """The room's lock was held longer than a try lasts: ask again shortly."""


BUSY = Busy()


def update(path: str, worker: tuple[int, int],
           change: Callable[[Room], _T]) -> _T | Busy | None:
    """Child side: apply ``change`` to the room under its lock and write it back; return what
    ``change`` returned, ``BUSY`` when the lock was held too long, or None when there is no
    room for this worker (no file, not this worker's, unreadable)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not lock(fd):
            return BUSY
        room = _read(fd, worker)
        if room is None:
            return None
        result = change(room)
        _write(fd, worker, room)
    except OSError:
        return None
    else:
        return result
    finally:
        os.close(fd)


def remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _read(fd: int, worker: tuple[int, int]) -> Room | None:
    try:
        body = json.loads(os.pread(fd, 1 << 20, 0))
    except (ValueError, UnicodeDecodeError, RecursionError):  # anyone in the group may write it
        return None
    if (not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != VERSION
            or body.get("worker") != list(worker)):
        return None
    needs, starting, first = body.get("needs"), body.get("starting"), body.get("first", [])
    if (not isinstance(needs, dict) or len(needs) > MAX_NEEDS
            or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in needs.items())
            or not isinstance(starting, list) or len(starting) > MAX_STARTING
            or not all(isinstance(s, list) and len(s) == 3 and all(type(x) is int and x >= 0
                                                                   for x in s) for s in starting)
            or not isinstance(first, list) or len(first) > MAX_FIRST
            or not all(isinstance(f, list) and len(f) == 3 and type(f[0]) is int
                       and isinstance(f[1], str) and type(f[2]) is int for f in first)):
        return None
    return Room(needs=dict(needs), starting=[(s[0], s[1], s[2]) for s in starting],
                first=[(f[0], f[1], f[2]) for f in first])


def _write(fd: int, worker: tuple[int, int], room: Room) -> None:
    needs = dict(list(room.needs.items())[-MAX_NEEDS:])
    data = json.dumps({"v": VERSION, "worker": list(worker), "needs": needs,
                       "starting": [list(s) for s in room.starting[-MAX_STARTING:]],
                       "first": [list(f) for f in room.first[-MAX_FIRST:]]}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
