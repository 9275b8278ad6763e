"""The datagrams agents send the daemon: one frozen class each, and their codec.

One datagram is one compact JSON object with a version ``v``, a type ``t`` (the class's
``TYPE``) and the class's fields. Each field's annotation says what the field may hold
(``Pid``, ``Count``, ``Name``, ...): the decoder derives its checks from the classes, so a
message's fields are written once. Decoding is strict (types, ranges, sizes) because the socket
is a trust boundary: anything malformed is refused with a short reason the daemon counts, and
never reaches the state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any, ClassVar, TypeVar, get_type_hints

VERSION = 1
MAX_DATAGRAM = 16384
MAX_NAME = 200
MAX_KIDS = 1024
MAX_BATCH = 256  # task ends in one TaskBatch
MAX_BATCH_NAMES = 64  # distinct task names in one TaskBatch
MAX_HOOKS = 16  # names of missing hooks in one hello (protocol.hooks)
MAX_FRAMES = 32  # frames of one allocation site's traceback in a LeakSite


class MessageError(ValueError):
    """A datagram that is not a valid message; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- what a field may hold ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Kind:
    """A field's check and its conversion from JSON (lists become tuples)."""

    check: Callable[[object], bool]
    convert: Callable[[Any], Any] = lambda value: value
    optional: bool = False


def _int_in(low: int, high: int) -> Callable[[object], bool]:
    return lambda v: type(v) is int and low <= v < high


def _name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME and value.isprintable()


def clean_name(name: str) -> str:
    """A task name as a message may carry it: printable and bounded."""
    return "".join(ch for ch in name if ch.isprintable())[:MAX_NAME] or "unknown"


def _names(value: object) -> bool:
    return (isinstance(value, list) and 0 < len(value) <= MAX_BATCH_NAMES
            and all(_name(v) for v in value))


def _ends(value: object) -> bool:
    """Shape and ranges only; name indexes are checked against ``names`` in ``decode``."""
    return isinstance(value, list) and 0 < len(value) <= MAX_BATCH and all(
        isinstance(item, list) and len(item) == 5 and all(type(x) is int for x in item)
        and 0 <= item[0] < MAX_BATCH_NAMES and 0 <= item[1] < 2**62 and 0 <= item[2] < 2**62
        and item[3] in (0, 1) and 0 <= item[4] < 2**31
        for item in value)


def _hooks(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_HOOKS and all(_name(v) for v in value)


def _kids(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_KIDS and all(
        isinstance(item, list) and len(item) == 2
        and all(type(x) is int and 0 <= x < 2**31 for x in item) and item[0] != 0
        for item in value)


def _frames(value: object) -> bool:
    """(file, line, function) triples, innermost first."""
    return isinstance(value, list) and len(value) <= MAX_FRAMES and all(
        isinstance(item, list) and len(item) == 3 and _name(item[0])
        and type(item[1]) is int and 0 <= item[1] < 2**31 and _name(item[2])
        for item in value)


Pid = Annotated[int, Kind(_int_in(1, 2**62))]
Count = Annotated[int, Kind(_int_in(0, 2**62))]
Delta = Annotated[int, Kind(_int_in(-(2**62), 2**62))]  # a change, which may be negative
MaybeCount = Annotated[int | None, Kind(_int_in(0, 2**62), optional=True)]
ExitCode = Annotated[int, Kind(_int_in(-255, 256))]  # negative: killed by that signal
Name = Annotated[str, Kind(_name)]
MaybeName = Annotated[str | None, Kind(_name, optional=True)]
Flag = Annotated[bool, Kind(lambda v: isinstance(v, bool))]
Kids = Annotated[tuple[tuple[int, int], ...],
                 Kind(_kids, lambda v: tuple((item[0], item[1]) for item in v))]
Names = Annotated[tuple[str, ...], Kind(_names, tuple)]
Hooks = Annotated[tuple[str, ...], Kind(_hooks, tuple)]
Frames = Annotated[tuple[tuple[str, int, str], ...],
                   Kind(_frames, lambda v: tuple((item[0], item[1], item[2]) for item in v))]
Ends = Annotated[tuple[tuple[int, int, int, int, int], ...],
                 Kind(_ends, lambda v: tuple(tuple(item) for item in v))]

_SPECS: dict[str, tuple[type[Any], tuple[tuple[str, Kind, bool], ...]]] = {}
_NAMES: dict[type[Any], tuple[str, ...]] = {}
_M = TypeVar("_M")


def _message(cls: type[_M]) -> type[_M]:
    """Register a message class under its TYPE, with the kinds its annotations name."""
    hints = get_type_hints(cls, include_extras=True)
    spec = tuple((f.name, hints[f.name].__metadata__[0], f.default is not MISSING)
                 for f in fields(cls))  # type: ignore[arg-type]
    kind = cls.TYPE  # type: ignore[attr-defined]
    assert kind not in _SPECS, kind
    _SPECS[kind] = (cls, spec)
    _NAMES[cls] = tuple(name for name, _, _ in spec)
    return cls


# -- the messages ---------------------------------------------------------------------------

@_message
@dataclass(frozen=True, slots=True)
class WorkerHello:
    """Sent by a worker's main process at start and then periodically (its heartbeat)."""

    TYPE: ClassVar[str] = "w"
    EVENT: ClassVar[str] = "worker_hello"
    pid: Pid
    node: Name
    pool: Name
    concurrency: Count
    max_tasks: MaybeCount
    max_memory_kib: MaybeCount
    recycle_signal: Count
    kids: Kids  # (pid, pool index) of the live pool children
    agent: Name
    restart: Flag = False  # opted in to whole-worker restarts (pools without children)
    oom_kills: MaybeCount = None  # the kernel's OOM kill counter of the worker's container
    # The worker's container as its main process reads it: for a daemon that cannot see the
    # worker's cgroup (a sidecar with a cgroup namespace of its own).
    container_usage: MaybeCount = None
    container_working_set: MaybeCount = None
    container_limit: MaybeCount = None
    max_concurrency: MaybeCount = None  # --autoscale's maximum: the pool size the jitter uses
    missing: Hooks = ()  # hooks the agent could not join (protocol.hooks)
    celery: Name = ""  # versions, for celery-memguard doctor
    billiard: Name = ""
    python: Name = ""
    socket: Name = ""  # the socket path as the worker sees it


@_message
@dataclass(frozen=True, slots=True)
class WorkerBye:
    """Sent by a worker's main process when it shuts down."""

    TYPE: ClassVar[str] = "b"
    EVENT: ClassVar[str] = "worker_bye"
    pid: Pid


@_message
@dataclass(frozen=True, slots=True)
class ChildHello:
    """Sent by a pool child when its agent is ready, and again now and then while idle."""

    TYPE: ClassVar[str] = "c"
    EVENT: ClassVar[str] = "child_hello"
    pid: Pid
    ppid: Pid
    index: Count
    tasks: Count
    rss: Count
    node: Name = ""  # its worker's nodename: names a worker whose main process never said hello
    jitter_pool: Count = 0  # the pool size its jitter was computed for (0: unknown)
    missing: Hooks = ()  # hooks this child's agent could not join (protocol.hooks)


@_message
@dataclass(frozen=True, slots=True)
class TaskStart:
    """Every task's start, as agents before batching sent it; still understood."""

    TYPE: ClassVar[str] = "s"
    EVENT: ClassVar[str] = "task_start"
    pid: Pid
    ppid: Pid
    index: Count
    task: Name
    id: Name
    rss: Count


@_message
@dataclass(frozen=True, slots=True)
class TaskEnd:
    """One task's end, as agents before batching sent it; still understood."""

    TYPE: ClassVar[str] = "e"
    EVENT: ClassVar[str] = "task_end"
    pid: Pid
    ppid: Pid
    index: Count
    task: Name
    id: Name
    rss_before: Count
    rss: Count
    tasks: Count
    ok: Flag


@_message
@dataclass(frozen=True, slots=True)
class TaskRunning:
    """Sent by a child whose task has been running for a while (short tasks are never announced:
    their ends arrive in a TaskBatch). ``tasks`` counts the tasks it finished before this one, so
    an announcement that arrives after its task's end is recognised as stale."""

    TYPE: ClassVar[str] = "r"
    EVENT: ClassVar[str] = "task_running"
    pid: Pid
    ppid: Pid
    index: Count
    task: Name
    id: Name
    rss: Count
    tasks: Count


@_message
@dataclass(frozen=True, slots=True)
class TaskBatch:
    """The ends of a child's recent tasks, sent together (every few hundred milliseconds, and at
    once when one of them calls for a decision). ``ends`` holds one entry per task, in order:
    (index into ``names``, RSS before, RSS after, 1 if it succeeded, milliseconds since it ended);
    the first entry is the child's task number ``first``, the next ``first + 1``, and so on."""

    TYPE: ClassVar[str] = "k"
    EVENT: ClassVar[str] = "task_batch"
    pid: Pid
    ppid: Pid
    index: Count
    first: Count
    names: Names
    ends: Ends


@_message
@dataclass(frozen=True, slots=True)
class ChildExit:
    """Sent by a child just before it leaves through billiard's recycle path."""

    TYPE: ClassVar[str] = "x"
    EVENT: ClassVar[str] = "child_exit"
    pid: Pid
    ppid: Pid
    index: Count
    tasks: Count
    reason: Name  # requested (by the daemon's signal), hard, or one of grants.SELF_REASONS


@_message
@dataclass(frozen=True, slots=True)
class TaskInterrupted:
    """Sent by a child whose task was interrupted (past the hard limit, or its container's
    hard line) or refused before it began (its id is quarantined)."""

    TYPE: ClassVar[str] = "h"
    EVENT: ClassVar[str] = "task_interrupted"
    pid: Pid
    ppid: Pid
    index: Count
    task: Name
    id: Name
    rss: Count
    limit: Count
    reason: Name = "hard"  # hard, container (the container's hard line), quarantined (refused)


@_message
@dataclass(frozen=True, slots=True)
class TaskHeld:
    """Sent by a child that waited for its container to have room before it started a task
    (``gave_up``: it started anyway after container_hold)."""

    TYPE: ClassVar[str] = "g"
    EVENT: ClassVar[str] = "task_held"
    pid: Pid
    ppid: Pid
    index: Count
    task: Name
    id: Name
    waited_ms: Count
    working_set: Count
    line: Count
    gave_up: Flag


@_message
@dataclass(frozen=True, slots=True)
class ChildDied:
    """Sent by a worker's main process when it reaps a pool child, with its exit code."""

    TYPE: ClassVar[str] = "d"
    EVENT: ClassVar[str] = "child_died"
    pid: Pid  # the main process (the sender)
    child: Pid
    index: Count
    exitcode: ExitCode
    task: MaybeName = None  # the task the pool had given the child and not seen finish
    id: MaybeName = None  # its task id
    oom_kills: MaybeCount = None  # the kernel's OOM kill counter of the worker's container


@_message
@dataclass(frozen=True, slots=True)
class LeakSite:
    """One allocation site of a trace (protocol.forensics): what the traced calls of a task
    left behind there, summed over them. Sent just before the LeakTrace it belongs to."""

    TYPE: ClassVar[str] = "l"
    EVENT: ClassVar[str] = "leak_site"
    pid: Pid
    ppid: Pid
    index: Count
    trace: Name  # the request's id
    rank: Count  # 0 for the site that kept the most
    filename: Name
    lineno: Count
    function: Name
    code: Name  # the source line, or the function where the source cannot be read
    frames: Frames  # a short traceback, innermost first
    size: Count  # bytes left behind
    blocks: Delta  # allocations left behind
    grew: Count  # traced calls after which the site held more than before


@_message
@dataclass(frozen=True, slots=True)
class LeakTrace:
    """A trace's result so far (``done``: its last), after its LeakSite messages. Growth is
    summed over the calls traced; the tracer's own memory is left out of ``rss_growth``."""

    TYPE: ClassVar[str] = "f"
    EVENT: ClassVar[str] = "leak_trace"
    pid: Pid
    ppid: Pid
    index: Count
    trace: Name
    task: Name
    tool: Name
    calls: Count  # traced so far
    wanted: Count  # asked for
    rss_growth: Delta
    traced_growth: Delta  # all that the tracer saw left behind, net of what it saw freed
    sites: Count  # the LeakSite messages sent for this report
    tracer_bytes: Count  # the tracer's own memory at its peak
    done: Flag
    reason: Name  # tracing, done, leaving, expired, cancelled or error


@_message
@dataclass(frozen=True, slots=True)
class TraceRequest:
    """Sent by ``celery-memguard trace``: trace the next calls of a task name now."""

    TYPE: ClassVar[str] = "q"
    EVENT: ClassVar[str] = "trace_request"
    pid: Pid
    id: Name
    task: Name
    calls: MaybeCount  # None: forensics.calls
    worker: MaybeName  # a nodename (or a pattern); None: any worker
    timeout_ms: Count


Message = (WorkerHello | WorkerBye | ChildHello | TaskStart | TaskEnd | TaskRunning | TaskBatch
           | ChildExit | TaskInterrupted | TaskHeld | ChildDied | LeakSite | LeakTrace
           | TraceRequest)
# A report about one pool child, sent by that child.
ChildReport = (ChildHello | TaskStart | TaskEnd | TaskRunning | TaskBatch | ChildExit
               | TaskInterrupted | TaskHeld | LeakSite | LeakTrace)

EVENTS: dict[str, str] = {cls.TYPE: cls.EVENT for cls, _ in _SPECS.values()}  # type letter -> name


# -- the codec ------------------------------------------------------------------------------

_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode(message: Message) -> bytes:
    """Serialise a message. A child's batch of task ends, most of what agents send, is
    formatted directly: a generic encoder is several times slower."""
    if type(message) is TaskBatch:
        b = message
        ends = ",".join(f"[{n},{before},{after},{ok},{age}]" for n, before, after, ok, age in b.ends)
        names = ",".join(_ENCODER.encode(name) for name in b.names)
        return (f'{{"pid":{b.pid},"ppid":{b.ppid},"index":{b.index},"first":{b.first},'
                f'"names":[{names}],"ends":[{ends}],"t":"k","v":{VERSION}}}').encode()
    body = {name: getattr(message, name) for name in _NAMES[type(message)]}
    body["t"], body["v"] = message.TYPE, VERSION
    return _ENCODER.encode(body).encode()


def decode(data: bytes) -> Message:
    """Parse and validate one datagram, or raise MessageError with a countable reason."""
    if not data:
        raise MessageError("empty")
    if len(data) > MAX_DATAGRAM:
        raise MessageError("oversized", f"{len(data)} bytes")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # [[[[... nests too deep
        raise MessageError("not_json", str(exc)[:80]) from None
    if not isinstance(body, dict):
        raise MessageError("not_object")
    if type(body.get("v")) is not int or body["v"] != VERSION:  # 1.0 and true equal 1
        raise MessageError("bad_version", repr(body.get("v"))[:20])
    kind = body.get("t")
    if not isinstance(kind, str) or kind not in _SPECS:
        raise MessageError("unknown_type", repr(kind)[:20])
    cls, spec = _SPECS[kind]
    extra = set(body) - set(_NAMES[cls]) - {"v", "t"}
    if extra:
        raise MessageError("unknown_field", ",".join(sorted(extra))[:80])
    values = _values(spec, body)
    if cls is TaskBatch and any(end[0] >= len(values["names"]) for end in values["ends"]):
        raise MessageError("bad_field", "ends")  # a name index past the batch's table
    return cls(**values)  # type: ignore[no-any-return]


def _values(spec: tuple[tuple[str, Kind, bool], ...], body: dict[str, Any]) -> dict[str, Any]:
    """Each field of the spec, checked and converted; a missing or bad one is refused. A
    field with a default came later: a message of an older agent may lack it."""
    values: dict[str, Any] = {}
    for name, kind, has_default in spec:
        if name not in body:
            if has_default:
                continue
            raise MessageError("missing_field", name)
        value = body[name]
        if value is None and kind.optional:
            values[name] = None
        elif kind.check(value):
            values[name] = kind.convert(value)
        else:
            raise MessageError("bad_field", name)
    return values
