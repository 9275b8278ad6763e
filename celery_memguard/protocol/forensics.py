"""The trace request file: which pool child traces which task name, and how.

A task name the daemon finds leaking (or one an operator asks about with ``celery-memguard
trace``) is traced in one child of a worker at a time. The daemon writes the request as
``<socket>.trace.<worker pid>`` (paths.trace_path), then sends that child ``TRACE_SIGNAL``;
the child's handler only sets a flag, and the child reads the file before its next task. The
file names the worker by pid and start time and the child by pid and start time, so neither a
reused pid nor a sibling acts on it. Whatever the child cannot read or understand is ignored:
it traces nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

VERSION = 1
TOOLS = ("tracemalloc", "memray")
MAX_CALLS = 1000
MAX_FRAMES = 100
MAX_ID = 64


@dataclass(frozen=True, slots=True)
class Request:
    id: str  # names the trace in the child's reports
    task: str  # the task name whose calls are traced
    child: tuple[int, int]  # (pid, start ticks) of the one child that traces
    calls: int  # calls of ``task`` to trace
    frames: int  # frames kept per allocation
    tool: str  # one of TOOLS
    until: float  # wall-clock time after which the child stops and reports what it has


def encode(worker: tuple[int, int], request: Request) -> bytes:
    return json.dumps({"v": VERSION, "worker": list(worker), "id": request.id,
                       "task": request.task, "child": list(request.child),
                       "calls": request.calls, "frames": request.frames, "tool": request.tool,
                       "until": request.until}).encode()


def _pair(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(type(x) is int and x >= 0 for x in value))


def decode(data: bytes, worker: tuple[int, int]) -> Request | None:
    """The request, when the file is well formed and for this worker; else None."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if (not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != VERSION
            or body.get("worker") != list(worker) or not _pair(body.get("child"))):
        return None
    rid, task, tool = body.get("id"), body.get("task"), body.get("tool")
    calls, frames, until = body.get("calls"), body.get("frames"), body.get("until")
    if (not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID or not isinstance(task, str)
            or not task or tool not in TOOLS or type(calls) is not int
            or not 0 < calls <= MAX_CALLS or type(frames) is not int
            or not 0 < frames <= MAX_FRAMES or isinstance(until, bool)
            or not isinstance(until, int | float)):
        return None
    child = body["child"]
    return Request(id=rid, task=task, child=(child[0], child[1]), calls=calls, frames=frames,
                   tool=tool, until=float(until))
