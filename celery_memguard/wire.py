"""The datagram format shared by the agent and the daemon: encode, decode, validate.

One datagram is one compact JSON object with a version ``v`` and a type ``t``. Decoding is
strict (types, ranges, sizes) because the socket is a trust boundary: anything malformed is
refused with a short reason the daemon counts, and never reaches the state.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import signal
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

VERSION = 1
RECYCLE_SIGNAL = int(signal.SIGRTMIN) + 4  # leave after the current task; neither Celery nor billiard uses it
SOCKET_ENV = "CELERY_MEMGUARD_SOCKET"
DEFAULT_SOCKET = "/tmp/celery-memguard/agent.sock"  # noqa: S108 - documented default; the daemon checks the directory's owner
MAX_DATAGRAM = 4096
MAX_NAME = 200
MAX_KIDS = 1024


class WireError(ValueError):
    """A datagram that is not a valid message; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WorkerHello:
    """Sent by a worker's main process at start and then periodically (its heartbeat)."""

    pid: int
    node: str
    pool: str
    concurrency: int
    max_tasks: int | None
    max_memory_kib: int | None
    recycle_signal: int
    kids: tuple[tuple[int, int], ...]  # (pid, pool index) of the live pool children
    agent: str
    restart: bool = False  # opted in to whole-worker restarts (pools without children)
    t: str = "w"


@dataclass(frozen=True, slots=True)
class WorkerBye:
    """Sent by a worker's main process when it shuts down."""

    pid: int
    t: str = "b"


@dataclass(frozen=True, slots=True)
class ChildHello:
    """Sent by a pool child when its agent is ready, and again now and then while idle."""

    pid: int
    ppid: int
    index: int
    tasks: int
    rss: int
    t: str = "c"


@dataclass(frozen=True, slots=True)
class TaskStart:
    pid: int
    ppid: int
    index: int
    task: str
    id: str
    rss: int
    t: str = "s"


@dataclass(frozen=True, slots=True)
class TaskEnd:
    pid: int
    ppid: int
    index: int
    task: str
    id: str
    rss_before: int
    rss: int
    tasks: int
    ok: bool
    t: str = "e"


@dataclass(frozen=True, slots=True)
class ChildExit:
    """Sent by a child just before it leaves through billiard's recycle path."""

    pid: int
    ppid: int
    index: int
    tasks: int
    reason: str
    t: str = "x"


@dataclass(frozen=True, slots=True)
class TaskInterrupted:
    """Sent by a child whose watch found it past the hard limit during a task."""

    pid: int
    ppid: int
    index: int
    task: str
    id: str
    rss: int
    limit: int
    t: str = "h"


@dataclass(frozen=True, slots=True)
class ChildDied:
    """Sent by a worker's main process when it reaps a pool child, with its exit code."""

    pid: int  # the main process (the sender)
    child: int
    index: int
    exitcode: int  # negative: killed by that signal
    t: str = "d"


Message = (WorkerHello | WorkerBye | ChildHello | TaskStart | TaskEnd | ChildExit
           | TaskInterrupted | ChildDied)

_FIELDS: dict[str, tuple[type[Any], dict[str, str]]] = {
    "w": (WorkerHello, {"pid": "pid", "node": "name", "pool": "name", "concurrency": "count",
                        "max_tasks": "count?", "max_memory_kib": "count?",
                        "recycle_signal": "count", "kids": "kids", "agent": "name",
                        "restart": "bool"}),
    "b": (WorkerBye, {"pid": "pid"}),
    "c": (ChildHello, {"pid": "pid", "ppid": "pid", "index": "count", "tasks": "count",
                       "rss": "count"}),
    "s": (TaskStart, {"pid": "pid", "ppid": "pid", "index": "count", "task": "name",
                      "id": "name", "rss": "count"}),
    "e": (TaskEnd, {"pid": "pid", "ppid": "pid", "index": "count", "task": "name", "id": "name",
                    "rss_before": "count", "rss": "count", "tasks": "count", "ok": "bool"}),
    "x": (ChildExit, {"pid": "pid", "ppid": "pid", "index": "count", "tasks": "count",
                      "reason": "name"}),
    "h": (TaskInterrupted, {"pid": "pid", "ppid": "pid", "index": "count", "task": "name",
                            "id": "name", "rss": "count", "limit": "count"}),
    "d": (ChildDied, {"pid": "pid", "child": "pid", "index": "count", "exitcode": "code"}),
}


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _text(value: str) -> str:
    return _ENCODER.encode(value)


def encode(message: Message) -> bytes:
    """Serialise a message. The two sent for every task are formatted directly: they are the
    agent's whole per-task cost, and a generic encoder is several times slower."""
    if type(message) is TaskEnd:
        m = message
        return (f'{{"pid":{m.pid},"ppid":{m.ppid},"index":{m.index},"task":{_text(m.task)},'
                f'"id":{_text(m.id)},"rss_before":{m.rss_before},"rss":{m.rss},'
                f'"tasks":{m.tasks},"ok":{"true" if m.ok else "false"},"t":"e","v":{VERSION}}}'
                ).encode()
    if type(message) is TaskStart:
        m2 = message
        return (f'{{"pid":{m2.pid},"ppid":{m2.ppid},"index":{m2.index},"task":{_text(m2.task)},'
                f'"id":{_text(m2.id)},"rss":{m2.rss},"t":"s","v":{VERSION}}}').encode()
    cls = type(message)
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in fields(cls))
    body = {name: getattr(message, name) for name in names}
    body["v"] = VERSION
    if cls is WorkerHello:
        body["kids"] = [list(kid) for kid in body["kids"]]
    return _ENCODER.encode(body).encode()


def decode(data: bytes) -> Message:
    """Parse and validate one datagram, or raise WireError with a countable reason."""
    if not data:
        raise WireError("empty")
    if len(data) > MAX_DATAGRAM:
        raise WireError("oversized", f"{len(data)} bytes")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError("not_json", str(exc)[:80]) from None
    if not isinstance(body, dict):
        raise WireError("not_object")
    if body.get("v") != VERSION:
        raise WireError("bad_version", repr(body.get("v"))[:20])
    kind = body.get("t")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise WireError("unknown_type", repr(kind)[:20])
    cls, fields = _FIELDS[kind]
    extra = set(body) - set(fields) - {"v", "t"}
    if extra:
        raise WireError("unknown_field", ",".join(sorted(extra))[:80])
    values = {}
    for name, kind_of in fields.items():
        if name not in body:
            raise WireError("missing_field", name)
        values[name] = _check(name, kind_of, body[name])
    return cls(**values)  # type: ignore[no-any-return]


def _int_in(low: int, high: int) -> Callable[[object], bool]:
    return lambda v: type(v) is int and low <= v < high


def _kids(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_KIDS and all(
        isinstance(item, list) and len(item) == 2
        and all(type(x) is int and 0 <= x < 2**31 for x in item) and item[0] != 0
        for item in value)


_CHECKS: dict[str, Callable[[object], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "pid": _int_in(1, 2**62),
    "count": _int_in(0, 2**62),
    "code": _int_in(-255, 256),
    "name": lambda v: isinstance(v, str) and len(v) <= MAX_NAME and v.isprintable(),
    "kids": _kids,
}


def _check(name: str, kind: str, value: object) -> object:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    if not _CHECKS[kind](value):
        raise WireError("bad_field", name)
    if kind == "kids":
        return tuple((item[0], item[1]) for item in value)  # type: ignore[attr-defined]
    return value


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """What the daemon tells every child through a small file beside the socket.

    Datagrams flow only from agents to the daemon; the settings a child needs before any
    task (the hard limit its own watch enforces) are published as ``<socket>.settings.json``.
    """

    hard: int  # bytes; 0 disables the in-child watch
    watch_interval: float  # seconds between two RSS reads while a task runs
    soft: int = 0  # bytes; with jitter, each child's own soft threshold (0: unknown)
    jitter: float = 0.0
    workers: tuple[tuple[str, int, int], ...] = ()  # (nodename pattern, hard, soft): first match
    ahead: int = 0  # predictive recycling looks this many tasks ahead (0: off): when to ring

    def for_worker(self, node: str) -> tuple[int, int]:
        """(hard, soft) for a worker's nodename: its workers entry, else the top level."""
        for pattern, hard, soft in self.workers:
            if fnmatch.fnmatchcase(node, pattern):
                return hard, soft
        return self.hard, self.soft


def jitter_fraction(pid: int, start: int) -> float:
    """A stable number in [0, 1) per process (pid and start time in clock ticks), shared by the
    daemon's policy and the child's agent so both compute the same threshold."""
    return zlib.crc32(f"{pid}:{start}".encode()) / 2**32


@functools.lru_cache(maxsize=8192)
def soft_threshold(soft: int, jitter: float, pid: int, start: int) -> int:
    """The soft limit lowered by this process's share of the jitter, never raised above it.
    Cached: a tick asks it several times for every child."""
    return int(soft * (1.0 - jitter * jitter_fraction(pid, start)))


def settings_path(socket_path: str) -> str:
    return socket_path + ".settings.json"


def bell_path(socket_path: str) -> str:
    """The daemon's doorbell: a datagram socket beside the agents' socket. Reports reach the
    daemon in batches; a child whose report calls for a decision rings it to be heard now."""
    return socket_path + ".bell"


def encode_settings(settings: AgentSettings) -> bytes:
    return json.dumps({"v": VERSION, "hard": settings.hard,
                       "watch_interval": settings.watch_interval, "soft": settings.soft,
                       "jitter": settings.jitter, "ahead": settings.ahead,
                       "workers": [list(entry) for entry in settings.workers]}).encode()


def decode_settings(data: bytes) -> AgentSettings | None:
    """The settings, or None for anything malformed (the agent then keeps what it had)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        return None
    hard, interval = body.get("hard"), body.get("watch_interval")
    soft, jitter = body.get("soft", 0), body.get("jitter", 0.0)
    workers, ahead = body.get("workers", []), body.get("ahead", 0)
    if type(ahead) is not int or not 0 <= ahead <= 1000:
        return None
    if (not isinstance(hard, int) or not isinstance(soft, int)
            or not isinstance(interval, int | float) or not isinstance(jitter, int | float)
            or any(isinstance(v, bool) for v in (hard, soft, interval, jitter))):
        return None
    if (hard < 0 or soft < 0 or not 0.001 <= interval <= 10 or not 0 <= jitter <= 1
            or not isinstance(workers, list) or not all(
                isinstance(w, list) and len(w) == 3 and isinstance(w[0], str)
                and type(w[1]) is int and type(w[2]) is int for w in workers)):
        return None
    return AgentSettings(hard=hard, watch_interval=float(interval), soft=soft, jitter=float(jitter),
                         workers=tuple((w[0], w[1], w[2]) for w in workers), ahead=ahead)
