"""Generated malformed messages through a real SOCK_SEQPACKET connection to a running daemon:
random bytes and near-valid messages (wrong types, missing and extra fields, out-of-range
numbers, empty, oversized, truncated) are each dropped and counted, none is acted on, and
the daemon serves on."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from celery_memguard.daemon import config
from celery_memguard.daemon.loop import Daemon
from celery_memguard.protocol import messages, signals
from tests.builders import MiB
from tests.fakes import RecordingProcs
from tests.support import daemon_on_a_thread, free_port, wait_for

pytestmark = pytest.mark.slow

ME, PARENT = os.getpid(), os.getppid()
# Valid messages in this process's own name (the sender pid the kernel attaches), so one the
# decoder let through would be accepted and could act: the task end is over the soft limit.
VALID: list[messages.Message] = [
    messages.WorkerHello(pid=ME, node="fuzz@test", pool="prefork", concurrency=2, max_tasks=100,
                     max_memory_kib=None, recycle_signal=signals.RECYCLE_SIGNAL, kids=((ME, 0),),
                     agent="0.1.0"),
    messages.WorkerBye(pid=ME),
    messages.ChildHello(pid=ME, ppid=PARENT, index=0, tasks=0, rss=50 * MiB),
    messages.TaskStart(pid=ME, ppid=PARENT, index=0, task="app.leak", id="t-1", rss=50 * MiB),
    messages.TaskEnd(pid=ME, ppid=PARENT, index=0, task="app.leak", id="t-1", rss_before=50 * MiB,
                 rss=900 * MiB, tasks=7, ok=True),
    messages.ChildExit(pid=ME, ppid=PARENT, index=0, tasks=7, reason="requested"),
    messages.TaskInterrupted(pid=ME, ppid=PARENT, index=0, task="app.big", id="t-2", rss=900 * MiB,
                         limit=800 * MiB),
    messages.ChildDied(pid=ME, child=PARENT, index=0, exitcode=-9, task="app.big", id="t-2",
                       oom_kills=3),
    messages.TaskHeld(pid=ME, ppid=PARENT, index=0, task="app.big", id="t-3", waited_ms=1500,
                      working_set=400 * MiB, line=440 * MiB, gave_up=False),
    messages.LeakSite(pid=ME, ppid=PARENT, index=0, trace="t-4", rank=0, filename="app/h.py",
                      lineno=12, function="keep", code="kept.append(b)",
                      frames=(("app/h.py", 12, "keep"), ("app/tasks.py", 30, "run")),
                      size=20 * MiB, blocks=20, grew=20),
    messages.LeakTrace(pid=ME, ppid=PARENT, index=0, trace="t-4", task="app.leak",
                       tool="tracemalloc", calls=20, wanted=20, rss_growth=21 * MiB,
                       traced_growth=20 * MiB, sites=1, tracer_bytes=MiB, done=True, reason="done"),
    messages.TraceRequest(pid=ME, id="t-5", task="app.leak", calls=5, worker="fuzz@test",
                          timeout_ms=1000),
]
TYPES = {"w", "b", "c", "s", "e", "r", "k", "x", "h", "g", "d", "l", "f", "q"}
# The wire format, stated here independently of the decoder: each field's kind.
KIND = {"pid": "pid", "ppid": "pid", "child": "pid", "index": "count", "tasks": "count",
        "rss": "count", "rss_before": "count", "concurrency": "count", "recycle_signal": "count",
        "limit": "count", "max_tasks": "count?", "max_memory_kib": "count?", "exitcode": "code",
        "node": "name", "pool": "name", "agent": "name", "task": "name", "id": "name",
        "reason": "name", "ok": "bool", "restart": "bool", "kids": "kids",
        "oom_kills": "count?", "container_usage": "count?", "container_working_set": "count?",
        "container_limit": "count?", "waited_ms": "count", "working_set": "count",
        "line": "count", "gave_up": "bool", "max_concurrency": "count?", "missing": "hooks",
        "celery": "name", "billiard": "name", "python": "name", "socket": "name",
        "jitter_pool": "count",
        "trace": "name", "rank": "count",
        "filename": "name", "lineno": "count", "function": "name", "code": "name",
        "frames": "frames", "size": "count", "blocks": "delta", "grew": "count", "tool": "name",
        "calls": "count", "wanted": "count", "rss_growth": "delta", "traced_growth": "delta",
        "sites": "count", "tracer_bytes": "count", "done": "bool", "worker": "name?",
        "timeout_ms": "count"}
# Where a field's kind depends on the message: null is a valid task name only where none is known.
KIND_IN = {("d", "task"): "name?", ("d", "id"): "name?", ("q", "calls"): "count?"}
# Fields added in later releases, with a default: a message of an older agent lacks them.
MAY_LACK = {("w", "restart"), ("w", "oom_kills"), ("w", "container_usage"),
            ("w", "container_working_set"), ("w", "container_limit"), ("d", "task"), ("d", "id"),
            ("d", "oom_kills"), ("h", "reason"), ("w", "max_concurrency"), ("w", "missing"),
            ("w", "celery"), ("w", "billiard"), ("w", "python"), ("w", "socket"), ("c", "node"),
            ("c", "jitter_pool"), ("c", "missing")}


def kind(body: dict[str, Any], name: str) -> str | None:
    return KIND_IN.get((body.get("t"), name), KIND.get(name))
DECODER_REASONS = {"empty", "oversized", "not_json", "not_object", "bad_version", "unknown_type",
                   "unknown_field", "missing_field", "bad_field"}

_ints = st.integers(-(2**80), 2**80)  # JSON numbers, well short of Python's 4300-digit limit
_floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | _ints | _floats | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
_containers = st.lists(_ints, max_size=2) | st.dictionaries(st.text(max_size=3), _ints, max_size=2)
_not_int = st.text(max_size=5) | _floats | st.booleans() | _containers
WRONG_TYPE = {
    "pid": _not_int | st.none(), "count": _not_int | st.none(), "count?": _not_int,
    "delta": _not_int | st.none(),
    "frames": _ints | st.text(max_size=5) | _floats | st.booleans() | st.none()
    | st.dictionaries(st.text(max_size=3), _ints, max_size=2),
    "code": _not_int | st.none(),
    "name": _ints | _floats | st.booleans() | st.none() | _containers,
    "name?": _ints | _floats | st.booleans() | _containers,
    "bool": _ints | st.text(max_size=5) | _floats | st.none() | _containers,
    "kids": _ints | st.text(max_size=5) | st.none()
    | st.dictionaries(st.text(max_size=3), _ints, max_size=2),
    "hooks": _ints | st.text(max_size=5) | st.none() | st.booleans()
    | st.dictionaries(st.text(max_size=3), _ints, max_size=2)
    | st.lists(_ints | st.none() | st.booleans(), min_size=1, max_size=2),
}
_unprintable = st.sampled_from(["\n", "\x00", "\t", "\x7f", "\u2028"])
OUT_OF_RANGE = {
    "pid": st.integers(-(2**80), 0) | st.integers(2**62, 2**80),
    "count": st.integers(-(2**80), -1) | st.integers(2**62, 2**80),
    "count?": st.integers(-(2**80), -1) | st.integers(2**62, 2**80),
    "delta": st.integers(-(2**80), -(2**62) - 1) | st.integers(2**62, 2**80),
    "frames": st.sampled_from([[["a.py", 1]], [["a.py", -1, "f"]], [["a\n.py", 1, "f"]],
                               [["a.py", 2**31, "f"]], [[1, 1, "f"]], [["a.py", True, "f"]],
                               [["a.py", 1, "f"]] * 33, [7]]),
    "code": st.integers(-(2**80), -256) | st.integers(256, 2**80),
    "name": st.text(min_size=201, max_size=260)
    | st.tuples(st.text(max_size=5), _unprintable).map("".join),
    "name?": st.text(min_size=201, max_size=260),
    "kids": st.sampled_from([[[0, 1]], [[1]], [[1, -1]], [[1, 2, 3]], [[True, 1]], [["1", 2]],
                             [[1, 2**31]], [[1, 1.0]], [7]]),
    "hooks": st.lists(st.just("a.hook"), min_size=messages.MAX_HOOKS + 1, max_size=40)
    | st.lists(st.text(min_size=201, max_size=260), min_size=1, max_size=2)
    | st.lists(_unprintable, min_size=1, max_size=2),
}

Sample = tuple[bytes, str | None]  # a datagram, and the reason it is dropped for (None: any)


def _encode(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _wrong_type(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    name = draw(st.sampled_from(sorted(set(body) - {"v", "t"})))
    body[name] = draw(WRONG_TYPE[str(kind(body, name))])
    return _encode(body), "bad_field"


def _out_of_range(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    name = draw(st.sampled_from(sorted(f for f in body if kind(body, f) in OUT_OF_RANGE)))
    body[name] = draw(OUT_OF_RANGE[str(kind(body, name))])
    return _encode(body), "bad_field"


def _missing(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    name = draw(st.sampled_from(sorted(f for f in body if (body["t"], f) not in MAY_LACK)))
    del body[name]
    return _encode(body), {"v": "bad_version", "t": "unknown_type"}.get(name, "missing_field")


def _extra(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    body[draw(st.text(max_size=10).filter(lambda k: k not in body))] = draw(json_values)
    return _encode(body), "unknown_field"


def _version(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    body["v"] = draw(_ints.filter(lambda v: v != 1) | st.text(max_size=5) | st.none()
                     | st.lists(_ints, max_size=2) | st.sampled_from([1.0, True]))
    return _encode(body), "bad_version"


def _type(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    body["t"] = draw(st.text(max_size=3).filter(lambda t: t not in TYPES) | _ints | st.none())
    return _encode(body), "unknown_type"


def _not_object(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    return _encode(draw(st.lists(json_values, max_size=3) | _ints | st.text(max_size=10)
                        | st.none() | st.booleans())), "not_object"


def _truncated(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    return data[: draw(st.integers(1, len(data) - 1))], "not_json"


def _oversized(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    """Valid JSON, padded past the 4096-byte packet limit."""
    padding = draw(st.integers(messages.MAX_DATAGRAM + 1 - len(data), 3 * messages.MAX_DATAGRAM))
    return data + b" " * padding, "oversized"


def _empty(draw: st.DrawFn, body: dict[str, Any], data: bytes) -> Sample:
    return b"", "empty"


Mutation = Callable[[st.DrawFn, dict[str, Any], bytes], Sample]
MUTATIONS: list[Mutation] = [_wrong_type, _out_of_range, _missing, _extra, _version, _type,
                             _not_object, _truncated, _oversized, _empty]


@st.composite
def near_valid(draw: st.DrawFn) -> Sample:
    """A valid message with one thing wrong, and the reason the daemon must give."""
    data = messages.encode(draw(st.sampled_from(VALID)))
    mutate: Mutation = draw(st.sampled_from(MUTATIONS))
    return mutate(draw, json.loads(data), data)


samples = st.lists(near_valid() | st.binary(max_size=600).map(lambda b: (b, None)),
                   min_size=1, max_size=6)


@dataclass
class Running:
    daemon: Daemon
    procs: RecordingProcs
    socket_path: str
    url: str

    def counters(self) -> tuple[Counter[str], Counter[str]]:
        """Messages dropped by reason and accepted by type, as /metrics shows them."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            page = response.read().decode()
        dropped: Counter[str] = Counter()
        accepted: Counter[str] = Counter()
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == "celery_memguard_messages_dropped_total":
                    dropped[sample.labels["reason"]] += int(sample.value)
                elif sample.name == "celery_memguard_messages_total":
                    accepted[sample.labels["type"]] += int(sample.value)
        return dropped, accepted


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A daemon's real loop on a thread, on a real socket, with HTTP; stopped afterwards."""
    procs = RecordingProcs()
    port = free_port()
    path = str(tmp_path / "agent.sock")
    cfg = config.parse({"agent": {"socket": path}, "metrics": {"listen": f"127.0.0.1:{port}"},
                        "limits": {"soft": "100MiB", "hard": "1GiB"},
                        "sampling": {"interval": "50ms", "scan_interval": "1h"}}, env={})
    with daemon_on_a_thread(cfg, procs) as daemon:
        yield Running(daemon, procs, path, f"http://127.0.0.1:{port}")


# The daemon is shared by the examples on purpose: each one measures its own increments.
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=samples)
def test_generated_malformed_messages_are_each_dropped_and_counted_and_never_acted_on(
        running: Running, sent: list[Sample]) -> None:
    """Every malformed packet is dropped and counted by its reason; nothing is signalled."""
    dropped_before, accepted_before = running.counters()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(running.socket_path)
        for data, _reason in sent:
            sock.send(data)
        # then valid ones, a worker's hello and goodbye: the daemon serves on
        sock.send(messages.encode(VALID[0]))
        sock.send(messages.encode(messages.WorkerBye(pid=ME)))
    counts: list[tuple[Counter[str], Counter[str]]] = []

    def answered() -> bool:
        counts[:] = [running.counters()]
        return counts[0][1]["worker_bye"] > accepted_before["worker_bye"]

    wait_for(answered, 10, "the valid message after the malformed ones was not accepted")
    dropped, accepted = counts[0]
    new_drops = dropped - dropped_before
    assert accepted - accepted_before == Counter(worker_hello=1, worker_bye=1)
    assert sum(new_drops.values()) == len(sent), (new_drops, sent)
    assert set(new_drops) <= DECODER_REASONS, new_drops
    expected = Counter(reason for _data, reason in sent if reason is not None)
    assert not expected - new_drops, (expected, new_drops)  # every known reason is counted as such
    assert running.procs.signals == []
    assert running.daemon.healthy()
