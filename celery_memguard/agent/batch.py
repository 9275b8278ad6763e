"""A pool child's task ends waiting to be sent to the daemon as one TaskBatch."""

from __future__ import annotations

import json

from celery_memguard.protocol import messages

FLUSH_SECONDS = 0.25  # the oldest task end in a batch waits at most this long (and idle)
FLUSH_ENTRIES = 128
FLUSH_BYTES = 12_000  # a batch is sent before it nears messages.MAX_DATAGRAM
MAX_AGE_MS = 2**31 - 1  # what the message takes
ENTRY_BYTES = 60  # an encoded task end at most: five numbers, the largest the codec allows


class Batch:
    """Task ends waiting to be sent, with the table of the names they use."""

    __slots__ = ("ends", "first", "names", "opened", "size", "table")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.names: list[str] = []
        self.table: dict[str, int] = {}
        self.ends: list[tuple[int, int, int, int, float]] = []  # (name, before, after, ok, at)
        self.first = 0
        self.opened = 0.0
        self.size = 0

    def add(self, tasks: int, name: str, before: int, after: int, ok: bool, at: float) -> None:
        if not self.ends:
            self.first, self.opened = tasks, at
        slot = self.table.get(name)
        if slot is None:
            slot = self.table[name] = len(self.names)
            self.names.append(name)
            self.size += len(json.dumps(name)) + 1
        self.ends.append((slot, before, after, 1 if ok else 0, at))
        self.size += ENTRY_BYTES

    def due(self, now: float) -> bool:
        return bool(self.ends) and (
            now - self.opened >= FLUSH_SECONDS or len(self.ends) >= FLUSH_ENTRIES
            or self.size >= FLUSH_BYTES or len(self.names) >= messages.MAX_BATCH_NAMES)

    def take(self, pid: int, ppid: int, index: int, now: float) -> messages.TaskBatch:
        message = messages.TaskBatch(
            pid=pid, ppid=ppid, index=index, first=self.first, names=tuple(self.names),
            ends=tuple((n, before, after, ok, min(int((now - at) * 1000), MAX_AGE_MS))
                       for n, before, after, ok, at in self.ends))
        self.clear()
        return message
