"""Memory stall triggers (PSI): the kernel wakes the daemon when a container stalls on memory.

A tick reads each container's pressure once per ``sampling.interval``, as an average over the
last 10 s. A trigger written to a pressure file (``some <stall µs> <window µs>``) makes the
kernel wake a poller as soon as tasks stalled that long within the window, between two ticks:
the daemon then reads the container at once and decides for its workers. The file is the
container's own ``memory.pressure`` (cgroup v2), else the system's ``/proc/pressure/memory``.

The smallest window is tried first: the kernel allows 0.5 s to a privileged process and
multiples of 2 s to others. Where no trigger can be written (no PSI, no permission, a cgroup
gone), the reason is kept for ``/status`` and logged once, the tick's reads go on as before,
and it is tried again every ``RETRY_SECONDS`` while a worker still needs it.

The loop polls each trigger's descriptor itself, for ``EPOLLPRI``: the kernel clears a
trigger's event as it reports it, so a poller nested in between would see it and lose it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WINDOWS = (0.5, 2.0)  # seconds, tried in order
RETRY_SECONDS = 60.0  # a file that took no trigger is tried again this often


class StallTriggers:
    def __init__(self) -> None:
        self._armed: dict[Path, tuple[int, float, float]] = {}  # file -> (fd, share, window)
        self._fds: dict[int, tuple[Path, int]] = {}  # fd -> (file, serial: each open its own)
        self._serial = 0
        self.unavailable: dict[Path, str] = {}  # file -> why no trigger could be written
        self._retry_at: dict[Path, float] = {}
        self.revision = 0  # changes whenever a trigger is armed or dropped

    def arm(self, wanted: dict[Path, float], now: float) -> list[tuple[Path, str]]:
        """Keep one trigger on each pressure file, at its share of stalled time (a share
        changed by a reload writes it anew); drop the others. Returns the files that newly
        could not be armed, with why (each said once while it stays wanted; tried again every
        ``RETRY_SECONDS``)."""
        for path in [p for p in self._armed if wanted.get(p) != self._armed[p][1]]:
            self._disarm(path)
        for path in [p for p in self.unavailable if p not in wanted]:
            del self.unavailable[path], self._retry_at[path]
        failed: list[tuple[Path, str]] = []
        for path, share in wanted.items():
            if path in self._armed or now < self._retry_at.get(path, now):
                continue
            why = self._write(path, share)
            if why is None:
                self.unavailable.pop(path, None)
                self._retry_at.pop(path, None)
                continue
            if path not in self.unavailable:
                failed.append((path, why))
            self.unavailable[path] = why
            self._retry_at[path] = now + RETRY_SECONDS
        return failed

    def _write(self, path: Path, share: float) -> str | None:
        why = "no window accepted"
        for window in WINDOWS:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                return f"cannot open it: {exc.strerror}"
            stall = max(1, int(share * window * 1e6))
            try:
                os.write(fd, f"some {stall} {int(window * 1e6)}\n".encode())
            except OSError as exc:
                os.close(fd)
                why = f"the kernel refused a trigger: {exc.strerror}"
                continue
            self._armed[path] = (fd, share, window)
            self._serial += 1
            self._fds[fd] = (path, self._serial)
            self.revision += 1
            return None
        return why

    def _disarm(self, path: Path) -> None:
        fd, _, _ = self._armed.pop(path)
        self._fds.pop(fd, None)
        os.close(fd)
        self.revision += 1

    def descriptors(self) -> dict[int, tuple[Path, int]]:
        """Each armed trigger's descriptor, to poll for ``EPOLLPRI``, with its file and a
        serial that changes when the descriptor is another open (a number can be reused)."""
        return dict(self._fds)

    def gone(self, fd: int) -> None:
        """A trigger's file went away (its cgroup was removed): drop it."""
        found = self._fds.get(fd)
        if found is not None:
            self._disarm(found[0])

    def armed(self) -> dict[str, float]:
        """Each armed file with its window in seconds."""
        return {str(path): window for path, (_, _, window) in self._armed.items()}

    def status(self) -> dict[str, Any]:
        """What /status shows: the armed files with their windows, the others with why."""
        return {"armed": self.armed(),
                "unavailable": {str(path): why for path, why in self.unavailable.items()}}

    def close(self) -> None:
        for path in list(self._armed):
            self._disarm(path)
