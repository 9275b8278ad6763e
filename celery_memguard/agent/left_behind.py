"""What the tasks a child runs leave behind: the figure its leave-before decision reads.

Per task name, the growth of its last ``LEFT_RUNS`` runs in this child; a name's first run here
is its warm-up and does not count. Pure bookkeeping, no I/O: child_agent.py feeds it each task's
end and asks it, before reading the next job, whether that job would likely cross.
"""

from __future__ import annotations

from collections import deque

LEFT_RUNS = 32  # runs per task name whose growth a child remembers
MIN_RUNS = 5  # runs of a name before its growth predicts anything
MAX_NAMES = 256
RECENT = 8  # tasks whose growth the predictive verdict reads, whatever their names


class LeftBehind:
    __slots__ = ("_likely", "left", "most", "recent")

    def __init__(self) -> None:
        self.recent: deque[int] = deque(maxlen=RECENT)  # what each recent task left behind
        self.left: dict[str, deque[int]] = {}  # per task name: what its recent runs left
        self.most = 0  # the most any run here left behind: is a name's quantile worth it?
        self._likely: int | None = None  # likely(), until the next task ends

    def add(self, name: str, grew: int) -> None:
        """What a run of ``name`` left behind. A name's first run in this child is its
        warm-up (imports, caches, connections: memory it keeps once, not per call) and does
        not count towards what the next run is likely to leave."""
        self.recent.append(grew)
        self.most = max(self.most, grew)
        self._likely = None
        runs = self.left.get(name)
        if runs is None:
            if len(self.left) < MAX_NAMES:
                self.left[name] = deque(maxlen=LEFT_RUNS)
            return
        runs.append(max(grew, 0))

    def likely(self) -> int:
        """What the next task, whichever it is, is likely to leave behind: the largest 90th
        percentile (nearest rank) over the names that ran ``MIN_RUNS`` times here after
        their first run. Not the mean: a task that keeps memory one call in ten still
        crosses. Names with fewer runs predict nothing; memory a task frees before it returns
        leaves nothing, so spikes never count. Kept until the next task ends."""
        if self._likely is None:
            self._likely = max((sorted(runs)[-(-9 * len(runs) // 10) - 1]
                                for runs in self.left.values() if len(runs) >= MIN_RUNS),
                               default=0)
        return self._likely

    def would_cross(self, rss: int, threshold: int) -> bool:
        """Whether the next task would likely take a child at ``rss`` to ``threshold``."""
        if threshold <= 0 or rss + self.most < threshold:
            return False  # far from it whatever the task: the common case, no sorting
        likely = self.likely()
        return likely > 0 and rss + likely >= threshold
