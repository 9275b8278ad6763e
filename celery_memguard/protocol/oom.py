"""Every OOM kill counted exactly: the kernel's counter, matched to the children that died.

A pool child killed by SIGKILL that the daemon did not send was killed by the kernel's OOM
killer only if the kernel's ``oom_kill`` counter of its container moved; otherwise someone else
killed it. Each increment is claimed by one child death; increments that no child claims
within ``RETIRE_SECONDS`` were other processes of the container (the main process, a task's
own subprocess) and are left to the container's counter. Pure: times and counter values are
arguments.

Both sides apply it: the daemon to count OOM kills by task (the counter from the worker's
agent and from its own reading of the cgroup), and the worker's main process, which sees a
child die before the task is redelivered, to quarantine a task that keeps killing its child.
"""

from __future__ import annotations

from collections import deque

RETIRE_SECONDS = 10.0


class OomLedger:
    def __init__(self) -> None:
        self._seen: dict[str, int] = {}  # container -> the counter's value last folded in
        self._unclaimed: dict[str, deque[float]] = {}  # container -> when each new kill was seen

    def observe(self, container: str, value: int | None, now: float) -> None:
        """A reading of a container's counter. The first one is the baseline: kills before the
        daemon knew the container are not its to attribute."""
        if value is None:
            return
        seen = self._seen.get(container)
        self._seen[container] = value
        queue = self._unclaimed.setdefault(container, deque())
        if seen is not None and value > seen:
            queue.extend([now] * min(value - seen, 1024))
        while queue and now - queue[0] > RETIRE_SECONDS:
            queue.popleft()

    def claim(self, container: str, value: int | None, now: float) -> bool | None:
        """A child of this container died of a SIGKILL the daemon did not send: True if the
        kernel counted an OOM kill for it, False if it did not, None if no counter is known."""
        self.observe(container, value, now)
        if container not in self._seen:
            return None
        queue = self._unclaimed.get(container)
        if queue:
            queue.popleft()
            return True
        return False

    def forget(self, container: str) -> None:
        self._seen.pop(container, None)
        self._unclaimed.pop(container, None)
