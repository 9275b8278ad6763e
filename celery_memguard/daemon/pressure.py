"""Memory stall triggers (PSI): the kernel wakes the daemon when a container stalls on memory.

A tick reads each container's pressure once per ``sampling.interval``, as an average over the
last 10 s. A trigger written to a pressure file (``some <stall µs> <window µs>``) makes the
kernel wake a poller as soon as tasks stalled that long within the window, between two ticks:
the daemon then reads the container at once and decides for its workers. The file is the
container's own ``memory.pressure`` (cgroup v2), else the system's ``/proc/pressure/memory``.

The smallest window is tried first: the kernel allows 0.5 s to a privileged process and
multiples of 2 s to others. Where no trigger can be written (no PSI, no permission), the reason
is kept for ``/status`` and logged once, and the tick's reads go on as before.

The loop polls each trigger's descriptor itself, for ``EPOLLPRI``: the kernel clears a
trigger's event as it reports it, so a poller nested in between would see it and lose it.
"""

from __future__ import annotations

import os
from pathlib import Path

WINDOWS = (0.5, 2.0)  # seconds, tried in order


class StallTriggers:
    def __init__(self) -> None:
        self._armed: dict[Path, tuple[int, float, float]] = {}  # file -> (fd, share, window)
        self._paths: dict[int, Path] = {}  # fd -> file
        self.unavailable: dict[Path, str] = {}  # file -> why no trigger could be written
        self.revision = 0  # changes whenever a trigger is armed or dropped

    def arm(self, wanted: dict[Path, float]) -> list[tuple[Path, str]]:
        """Keep one trigger on each pressure file, at its share of stalled time (a share
        changed by a reload writes it anew); drop the others. Returns the files that could not
        be armed this time, with why (each once: they are not tried again)."""
        for path in [p for p in self._armed if wanted.get(p) != self._armed[p][1]]:
            self._disarm(path)
        failed: list[tuple[Path, str]] = []
        for path, share in wanted.items():
            if path in self._armed or path in self.unavailable:
                continue
            why = self._write(path, share)
            if why is not None:
                self.unavailable[path] = why
                failed.append((path, why))
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
            self._paths[fd] = path
            self.revision += 1
            return None
        return why

    def _disarm(self, path: Path) -> None:
        fd, _, _ = self._armed.pop(path)
        self._paths.pop(fd, None)
        os.close(fd)
        self.revision += 1

    def descriptors(self) -> dict[int, Path]:
        """Each armed trigger's descriptor, to poll for ``EPOLLPRI``."""
        return dict(self._paths)

    def gone(self, fd: int) -> None:
        """A trigger's file went away (its cgroup was removed): drop it."""
        path = self._paths.get(fd)
        if path is not None:
            self._disarm(path)

    def armed(self) -> dict[str, float]:
        """Each armed file with its window in seconds (for /status)."""
        return {str(path): window for path, (_, _, window) in self._armed.items()}

    def close(self) -> None:
        for path in list(self._armed):
            self._disarm(path)
