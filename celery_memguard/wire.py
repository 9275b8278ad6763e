"""The datagram format shared by the agent and the daemon: encode, decode, validate.

One datagram is one compact JSON object with a version ``v`` and a type ``t``. Decoding is
strict (types, ranges, sizes) because the socket is a trust boundary: anything malformed is
refused with a short reason the daemon counts, and never reaches the state.
"""

from __future__ import annotations

import fnmatch
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeGuard

VERSION = 1
RECYCLE_SIGNAL = int(signal.SIGRTMIN) + 4  # leave after the current task; neither Celery nor billiard uses it
SOCKET_ENV = "CELERY_MEMGUARD_SOCKET"
DEFAULT_SOCKET = "/tmp/celery-memguard/agent.sock"  # noqa: S108 - documented default; the daemon checks the directory's owner
MAX_DATAGRAM = 16384
MAX_NAME = 200
MAX_KIDS = 1024
MAX_BATCH = 256  # task ends in one TaskBatch
MAX_BATCH_NAMES = 64  # distinct task names in one TaskBatch
SELF_REASONS = ("soft", "predicted")  # why a child left on its own, under a grant


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
class TaskRunning:
    """Sent by a child whose task has been running for a while (short tasks are never announced:
    their ends arrive in a TaskBatch). ``tasks`` counts the tasks it finished before this one, so
    an announcement that arrives after its task's end is recognised as stale."""

    pid: int
    ppid: int
    index: int
    task: str
    id: str
    rss: int
    tasks: int
    t: str = "r"


@dataclass(frozen=True, slots=True)
class TaskBatch:
    """The ends of a child's recent tasks, sent together (every few hundred milliseconds, and at
    once when one of them calls for a decision). ``ends`` holds one entry per task, in order:
    (index into ``names``, RSS before, RSS after, 1 if it succeeded, milliseconds since it ended);
    the first entry is the child's task number ``first``, the next ``first + 1``, and so on."""

    pid: int
    ppid: int
    index: int
    first: int
    names: tuple[str, ...]
    ends: tuple[tuple[int, int, int, int, int], ...]
    t: str = "k"


@dataclass(frozen=True, slots=True)
class ChildExit:
    """Sent by a child just before it leaves through billiard's recycle path."""

    pid: int
    ppid: int
    index: int
    tasks: int
    reason: str  # requested (by the daemon's signal), hard, or one of SELF_REASONS
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


Message = (WorkerHello | WorkerBye | ChildHello | TaskStart | TaskEnd | TaskRunning | TaskBatch
           | ChildExit | TaskInterrupted | ChildDied)

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
    "r": (TaskRunning, {"pid": "pid", "ppid": "pid", "index": "count", "task": "name",
                        "id": "name", "rss": "count", "tasks": "count"}),
    "k": (TaskBatch, {"pid": "pid", "ppid": "pid", "index": "count", "first": "count",
                      "names": "names", "ends": "ends"}),
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
    """Serialise a message. A child's batch of task ends, most of what agents send, is
    formatted directly: a generic encoder is several times slower."""
    if type(message) is TaskBatch:
        b = message
        ends = ",".join(f"[{n},{before},{after},{ok},{age}]" for n, before, after, ok, age in b.ends)
        return (f'{{"pid":{b.pid},"ppid":{b.ppid},"index":{b.index},"first":{b.first},'
                f'"names":[{",".join(_text(name) for name in b.names)}],"ends":[{ends}],'
                f'"t":"k","v":{VERSION}}}').encode()
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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # [[[[... nests too deep
        raise WireError("not_json", str(exc)[:80]) from None
    if not isinstance(body, dict):
        raise WireError("not_object")
    if type(body.get("v")) is not int or body["v"] != VERSION:  # 1.0 and true equal 1
        raise WireError("bad_version", repr(body.get("v"))[:20])
    kind = body.get("t")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise WireError("unknown_type", repr(kind)[:20])
    cls, fields = _FIELDS[kind]
    extra = set(body) - set(fields) - {"v", "t"}
    if extra:
        raise WireError("unknown_field", ",".join(sorted(extra))[:80])
    values: dict[str, Any] = {}
    for name, kind_of in fields.items():
        if name not in body:
            raise WireError("missing_field", name)
        values[name] = _check(name, kind_of, body[name])
    if kind == "k" and any(end[0] >= len(values["names"]) for end in values["ends"]):
        raise WireError("bad_field", "ends")  # a name index past the batch's table
    return cls(**values)  # type: ignore[no-any-return]


def _int_in(low: int, high: int) -> Callable[[object], bool]:
    return lambda v: type(v) is int and low <= v < high


def _names(value: object) -> bool:
    return (isinstance(value, list) and 0 < len(value) <= MAX_BATCH_NAMES
            and all(_name(v) for v in value))


def _name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME and value.isprintable()


def _ends(value: object) -> bool:
    """Shape and ranges only; name indexes are checked against ``names`` in ``decode``."""
    return isinstance(value, list) and 0 < len(value) <= MAX_BATCH and all(
        isinstance(item, list) and len(item) == 5 and all(type(x) is int for x in item)
        and 0 <= item[0] < MAX_BATCH_NAMES and 0 <= item[1] < 2**62 and 0 <= item[2] < 2**62
        and item[3] in (0, 1) and 0 <= item[4] < 2**31
        for item in value)


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
    "name": _name,
    "kids": _kids,
    "names": _names,
    "ends": _ends,
}


def _check(name: str, kind: str, value: Any) -> object:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    if not _CHECKS[kind](value):
        raise WireError("bad_field", name)
    if kind == "kids":
        return tuple((item[0], item[1]) for item in value)
    if kind == "names":
        return tuple(value)
    if kind == "ends":
        return tuple(tuple(item) for item in value)
    return value


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """A worker's limits as its children see them."""

    hard: int  # bytes; 0 disables the in-child watch
    soft: int  # bytes; with jitter, each child's own soft threshold (0: unknown)
    measure: str = "rss"  # what the soft limit compares; a child reads only its RSS cheaply


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """What the daemon tells every child through a small file beside the socket.

    Messages flow only from agents to the daemon; what a child needs before any task (the hard
    limit its own watch enforces, the rules under which it may recycle itself) is published as
    ``<socket>.settings.json``.
    """

    hard: int  # bytes; 0 disables the in-child watch
    watch_interval: float  # seconds between two RSS reads while a task runs
    soft: int = 0  # bytes; with jitter, each child's own soft threshold (0: unknown)
    jitter: float = 0.0
    max_share: float | None = None  # with the pool size, whether the jitter applies (rules)
    workers: tuple[tuple[str, int, int, str], ...] = ()  # (nodename pattern, hard, soft, measure)
    ahead: int = 0  # predictive recycling looks this many tasks ahead (0: off)
    measure: str = "rss"
    dry_run: bool = False  # a child never recycles itself in a dry run
    min_lifetime: float = 0.0  # seconds a child lives before a soft recycle
    skip_within_tasks: int = 0  # left to --max-tasks-per-child within this many tasks

    def for_worker(self, node: str) -> WorkerLimits:
        """The limits for a worker's nodename: its workers entry, else the top level."""
        for pattern, hard, soft, measure in self.workers:
            if fnmatch.fnmatchcase(node, pattern):
                return WorkerLimits(hard, soft, measure)
        return WorkerLimits(self.hard, self.soft, self.measure)


def settings_path(socket_path: str) -> str:
    return socket_path + ".settings.json"


def bell_path(socket_path: str) -> str:
    """The daemon's doorbell: a datagram socket beside the agents' socket. Reports reach the
    daemon in batches; a child whose report calls for a decision rings it to be heard now."""
    return socket_path + ".bell"


_MEASURES = ("rss", "uss", "pss")


def encode_settings(settings: AgentSettings) -> bytes:
    return json.dumps({"v": VERSION, "hard": settings.hard,
                       "watch_interval": settings.watch_interval, "soft": settings.soft,
                       "jitter": settings.jitter, "max_share": settings.max_share,
                       "ahead": settings.ahead,
                       "measure": settings.measure, "dry_run": settings.dry_run,
                       "min_lifetime": settings.min_lifetime,
                       "skip_within_tasks": settings.skip_within_tasks,
                       "workers": [list(entry) for entry in settings.workers]}).encode()


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _worker_entry(w: object) -> bool:
    """(pattern, hard, soft) from a daemon of the previous format, or with the measure."""
    return (isinstance(w, list) and len(w) in (3, 4) and isinstance(w[0], str)
            and type(w[1]) is int and type(w[2]) is int and w[1] >= 0 and w[2] >= 0
            and (len(w) == 3 or w[3] in _MEASURES))


def decode_settings(data: bytes) -> AgentSettings | None:
    """The settings, or None for anything malformed (the agent then keeps what it had)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != VERSION:
        return None
    hard, interval = body.get("hard"), body.get("watch_interval")
    soft, jitter = body.get("soft", 0), body.get("jitter", 0.0)
    max_share = body.get("max_share")
    workers, ahead = body.get("workers", []), body.get("ahead", 0)
    measure, dry_run = body.get("measure", "rss"), body.get("dry_run", False)
    min_lifetime, skip = body.get("min_lifetime", 0.0), body.get("skip_within_tasks", 0)
    if (type(hard) is not int or type(soft) is not int or type(ahead) is not int
            or type(skip) is not int or not _number(interval) or not _number(jitter)
            or not _number(min_lifetime) or not isinstance(dry_run, bool)
            or not (max_share is None or (_number(max_share) and 0 <= max_share <= 1))
            or measure not in _MEASURES):
        return None
    if (hard < 0 or soft < 0 or not 0 <= ahead <= 1000 or not 0 <= skip <= 10**6
            or not 0.001 <= interval <= 10 or not 0 <= jitter <= 1
            or not 0 <= min_lifetime <= 86400
            or not isinstance(workers, list) or not all(_worker_entry(w) for w in workers)):
        return None
    return AgentSettings(
        hard=hard, watch_interval=float(interval), soft=soft, jitter=float(jitter),
        max_share=None if max_share is None else float(max_share), ahead=ahead,
        measure=measure, dry_run=dry_run, min_lifetime=float(min_lifetime), skip_within_tasks=skip,
        workers=tuple((w[0], w[1], w[2], w[3] if len(w) == 4 else "rss") for w in workers))
