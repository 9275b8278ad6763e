"""tracemalloc as the forensics tool (the standard library's; the default).

On only while a traced call runs: started just before it, a snapshot after it (what it left
allocated, by traceback), then stopped, which frees every trace. Other tasks of the child run
untraced, and a snapshot costs in proportion to what the one call kept: snapshots taken across
a whole trace cost in proportion to every block traced since it began (about 15 µs a block,
measured here), and a task keeping many small objects made each take most of a second.
"""

from __future__ import annotations

import tracemalloc

from celery_memguard.agent.code_paths import AGENT_DIR, Frame, Key, where


class TracemallocTool:
    """A block a call keeps and a later call frees still counts for the first: the RSS
    growth beside it tells a leak from a value replaced on every call.

    A process that traces already (``PYTHONTRACEMALLOC``) is left tracing: each call is then
    the difference of two snapshots, with what it freed of earlier blocks counted against
    them."""

    name = "tracemalloc"
    in_body = True

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.shared = False  # the process traced before the trace began
        self._before_snapshot: tracemalloc.Snapshot | None = None
        self._ours: dict[str, bool] = {}  # file name -> the agent's (or tracemalloc's) own

    def start(self) -> None:
        self.shared = tracemalloc.is_tracing()

    def before_call(self) -> None:
        if self.shared:
            self._before_snapshot = tracemalloc.take_snapshot()
        elif not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)

    def after_call(self) -> object:
        snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        if not self.shared and tracemalloc.is_tracing():
            tracemalloc.stop()
        return snapshot

    def left(self, taken: object) -> dict[Key, tuple[int, int]]:
        after = self._held(taken)
        before = self._held(self._before_snapshot)
        self._before_snapshot = None
        left: dict[Key, tuple[int, int]] = {}
        for traceback, (size, count) in after.items():
            was = before.pop(traceback, (0, 0))
            if size != was[0] or count != was[1]:
                left[_key(traceback)] = (size - was[0], count - was[1])
        for traceback, (size, count) in before.items():  # freed entirely during the call
            left[_key(traceback)] = (-size, -count)
        return left

    def _held(self, snapshot: object) -> dict[tracemalloc.Traceback, tuple[int, int]]:
        """What a snapshot holds by traceback, without the agent's own allocations."""
        if not isinstance(snapshot, tracemalloc.Snapshot):
            return {}
        held = {}
        for stat in snapshot.statistics("traceback"):
            if not any(self._mine(frame.filename) for frame in stat.traceback):
                held[stat.traceback] = (stat.size, stat.count)
        return held

    def _mine(self, filename: str) -> bool:
        mine = self._ours.get(filename)
        if mine is None:
            mine = filename.startswith(AGENT_DIR) or filename == _TRACEMALLOC
            if len(self._ours) < 4096:
                self._ours[filename] = mine
        return mine

    def overhead(self) -> int:
        """tracemalloc's memory while it traces a call (a process tracing anyway: its own)."""
        return tracemalloc.get_tracemalloc_memory() if tracemalloc.is_tracing() and not (
            self.shared) else 0

    def user(self, frame: Frame) -> bool:
        return where().user(frame[0])

    def stop(self) -> None:
        self._before_snapshot, self._ours = None, {}
        if not self.shared and tracemalloc.is_tracing():
            tracemalloc.stop()  # a call cut short (an error): frees its traces


_TRACEMALLOC = tracemalloc.__file__


def _key(traceback: tracemalloc.Traceback) -> Key:
    return tuple((frame.filename, frame.lineno, "") for frame in reversed(traceback))
