"""Recycle grants: how many children of a worker may recycle themselves before the daemon
looks again.

A child whose task leaves it past its soft threshold should leave right after that task. When
the daemon has to be told first and answer with a signal, the answer comes tens to hundreds
of milliseconds later on a busy host, and a fast leaker runs several more tasks meanwhile.
So the daemon publishes in advance, per worker, what its rate limit, share cap and floor
allow (the daemon's ``policy.grant_sizes``), in a small file beside its socket
(``paths.grant_path``); a child past its threshold takes one unit under the file's lock and
leaves after its task, and the daemon collects the units taken when it next publishes. A child
that finds none left rings the daemon, which decides.

Both sides try the lock for a millisecond at most: neither a stopped daemon nor a stopped
child can hold the other up. The file names the worker by pid and start time, so a reused pid
never inherits a grant.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time

VERSION = 1
LOCK_TRIES = 20  # attempts 50 µs apart: the other side holds the lock for microseconds
FILE_MODE = 0o660


SELF_REASONS = ("soft", "predicted")  # why a child leaves on its own, under a grant


def exchange(path: str, worker: tuple[int, int], grant: int) -> list[tuple[int, str]] | None:
    """Daemon side: collect (pid, reason) of the children that took a unit since the last
    exchange and publish ``grant`` less those (it was computed before they were counted). None
    when the file is locked or cannot be written: nothing changed, try again on the next tick."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            return None  # not a file this daemon made: never truncate what a link points at
        if not lock(fd):
            return None
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # a new file: the umask may have narrowed it
        body = _read(fd, worker)
        taken = body[1] if body is not None else []
        publish = max(0, grant - len(taken))
        if body != (publish, []):  # most ticks: the same grant, nothing taken, nothing to write
            _write(fd, worker, publish, [])
    except OSError:
        return None
    else:
        return taken
    finally:
        os.close(fd)  # releases the lock


def take(path: str, pid: int, worker: tuple[int, int], reason: str) -> bool:
    """Child side: take one unit of this worker's grant for ``pid`` (``reason``: soft or
    predicted); False when none is left, the file is missing or locked, or it belongs to an
    earlier process that had the worker's pid."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if not lock(fd):
            return False
        body = _read(fd, worker)
        if body is None:
            return False
        grant, taken = body
        if len(taken) >= grant or any(p == pid for p, _ in taken):
            return False
        _write(fd, worker, grant, [*taken, (pid, reason)])
    except OSError:
        return False
    else:
        return True
    finally:
        os.close(fd)


def remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def lock(fd: int, shared: bool = False) -> bool:
    """Take the file's lock (``shared``: a reader's), trying for a millisecond at most."""
    for _ in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            time.sleep(0.00005)
        else:
            return True
    return False


def _read(fd: int, worker: tuple[int, int]) -> tuple[int, list[tuple[int, str]]] | None:
    """(grant, taken) for this worker, or None for anything else (empty, malformed, the file of
    an earlier process with the same pid)."""
    try:
        body = json.loads(os.pread(fd, 65536, 0))
    except (ValueError, UnicodeDecodeError, RecursionError):  # anyone in the group may write it
        return None
    if (not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != VERSION
            or body.get("worker") != list(worker)):
        return None
    grant, taken = body.get("grant"), body.get("taken")
    if (type(grant) is not int or grant < 0 or not isinstance(taken, list) or len(taken) > 4096
            or not all(isinstance(t, list) and len(t) == 2 and type(t[0]) is int and t[0] > 0
                       and t[1] in SELF_REASONS for t in taken)):
        return None
    return grant, [(t[0], t[1]) for t in taken]


def _write(fd: int, worker: tuple[int, int], grant: int, taken: list[tuple[int, str]]) -> None:
    data = json.dumps({"v": VERSION, "worker": list(worker), "grant": grant,
                       "taken": [list(t) for t in taken]}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
