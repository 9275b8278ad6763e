"""What a process reads of itself from /proc, with the standard library only."""

from __future__ import annotations

import os


class StatmReader:
    """Reads this process's RSS through one open descriptor (pread regenerates the file)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0


def start_ticks(pid: int) -> int:
    """A process's start time in clock ticks (/proc/PID/stat field 22): with the pid, the
    identity the daemon's jitter and grants are computed from. 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
