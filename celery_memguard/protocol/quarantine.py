"""The quarantine file: task ids the daemon will not let run again, and why.

A task whose message is redelivered after it killed its worker process (``task_acks_late`` with
``task_reject_on_worker_lost``, or a broker's visibility timeout) can OOM a worker forever. The
daemon counts, per task id, the OOM kills and the hard-limit interrupts it was running at; at
``quarantine.after`` it lists the id in ``<socket>.quarantine.json`` (paths.quarantine_path),
and a child given that id again fails it at once with MemoryLimitExceeded. The file outlives
the daemon: a restarted daemon reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

VERSION = 1
MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    task: str  # its name
    oom_kills: int  # OOM kills of the process that ran it
    interrupts: int  # hard-limit (and container) interrupts
    since: float  # wall-clock time it was quarantined

    def why(self, after: int) -> str:
        parts = []
        if self.oom_kills:
            parts.append(f"{self.oom_kills} OOM kill{'s' if self.oom_kills > 1 else ''}")
        if self.interrupts:
            parts.append(f"{self.interrupts} memory interrupt{'s' if self.interrupts > 1 else ''}")
        return (f"it was running at {' and '.join(parts) or 'memory incidents'} of its worker "
                f"process (quarantine.after: {after})")


def encode(entries: dict[str, Entry], after: int) -> bytes:
    return json.dumps({"v": VERSION, "after": after, "tasks": {
        task_id: [e.task, e.oom_kills, e.interrupts, e.since] for task_id, e in entries.items()
    }}).encode()


def decode(data: bytes) -> tuple[dict[str, Entry], int] | None:
    """(entries, after), or None for anything malformed (a reader keeps what it had)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if (not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != VERSION
            or type(body.get("after")) is not int or not isinstance(body.get("tasks"), dict)):
        return None
    entries: dict[str, Entry] = {}
    for task_id, value in list(body["tasks"].items())[:MAX_ENTRIES]:
        if not (isinstance(value, list) and len(value) == 4 and isinstance(value[0], str)
                and type(value[1]) is int and type(value[2]) is int
                and isinstance(value[3], int | float) and not isinstance(value[3], bool)):
            return None
        entries[task_id] = Entry(value[0], value[1], value[2], float(value[3]))
    return entries, body["after"]
