"""The datagram format: every message round-trips; anything malformed is refused with a reason."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_memguard.protocol import messages, settings

MESSAGES: list[messages.Message] = [
    messages.WorkerHello(pid=10, node="celery@host", pool="prefork", concurrency=4, max_tasks=100,
                     max_memory_kib=None, recycle_signal=38, kids=((11, 0), (12, 1)), agent="0.1.0"),
    messages.WorkerBye(pid=10),
    messages.ChildHello(pid=11, ppid=10, index=0, tasks=0, rss=50_000_000),
    messages.TaskStart(pid=11, ppid=10, index=0, task="app.tasks.report", id="abc-123", rss=1),
    messages.TaskEnd(pid=11, ppid=10, index=0, task="app.tasks.report", id="abc-123",
                 rss_before=1, rss=3, tasks=7, ok=True),
    messages.TaskRunning(pid=11, ppid=10, index=0, task="app.tasks.report", id="abc-123", rss=1,
                     tasks=6),
    messages.TaskBatch(pid=11, ppid=10, index=0, first=5, names=("app.a", "app.b"),
                   ends=((0, 1, 3, 1, 250), (1, 3, 3, 0, 12), (0, 3, 5, 1, 0))),
    messages.ChildExit(pid=11, ppid=10, index=0, tasks=7, reason="requested"),
    messages.TaskInterrupted(pid=11, ppid=10, index=0, task="app.big", id="x", rss=5, limit=4),
    messages.ChildDied(pid=10, child=11, index=0, exitcode=-9),
    messages.LeakSite(pid=11, ppid=10, index=0, trace="t1", rank=0, filename="app/h.py", lineno=12,
                      function="keep", code="_kept.append(b)", frames=(("app/h.py", 12, "keep"),),
                      size=1048576, blocks=-2, grew=19),
    messages.LeakTrace(pid=11, ppid=10, index=0, trace="t1", task="app.leak", tool="tracemalloc",
                       calls=20, wanted=20, rss_growth=-4096, traced_growth=20971520, sites=1,
                       tracer_bytes=90000, done=True, reason="done"),
    messages.TraceRequest(pid=30, id="r1", task="app.leak", calls=None, worker="w@h",
                          timeout_ms=60000),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: messages.Message) -> None:
    data = messages.encode(message)
    # a worker's hello, every 2 s, also carries its container, versions and missing hooks
    assert len(data) < (600 if isinstance(message, messages.WorkerHello) else 300)
    assert messages.decode(data) == message


def _body(**changes: object) -> bytes:
    body = json.loads(messages.encode(MESSAGES[4]))  # a TaskEnd
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"x" * (messages.MAX_DATAGRAM + 1), "oversized"),
    (b"\xff\xfe", "not_json"),
    (b'{"v":1,"t":"e"', "not_json"),
    (b"[1,2]", "not_object"),
    (_body(v=2), "bad_version"),
    (_body(v=1.0), "bad_version"),
    (_body(v=True), "bad_version"),
    (_body(t="z"), "unknown_type"),
    (_body(extra=1), "unknown_field"),
    (_body(rss=...), "missing_field"),
    (_body(rss="12"), "bad_field"),
    (_body(rss=-1), "bad_field"),
    (_body(pid=0), "bad_field"),
    (_body(pid=True), "bad_field"),
    (_body(ok=1), "bad_field"),
    (_body(task="x" * 500), "bad_field"),
    (_body(task="bad\nname"), "bad_field"),
    (_body(tasks=2**70), "bad_field"),
])
def test_malformed_datagrams_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(messages.MessageError) as info:
        messages.decode(data)
    assert info.value.reason == reason


@pytest.mark.parametrize("kids", [[[0, 1]], [[1]], "x", [[1, -1]], [[1, 2, 3]], [[True, 1]]])
def test_bad_kid_lists_are_refused(kids: object) -> None:
    body = json.loads(messages.encode(MESSAGES[0]))
    body["kids"] = kids
    with pytest.raises(messages.MessageError, match="bad_field"):
        messages.decode(json.dumps(body).encode())


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    with contextlib.suppress(messages.MessageError):
        messages.decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@given(st.sampled_from(MESSAGES), st.sampled_from(["pid", "ppid", "rss", "task", "kids", "ok", "t"]),
       json_values)
def test_any_field_replaced_by_any_json_decodes_or_is_refused(
        message: messages.Message, field: str, value: object) -> None:
    """Wrong types in any field are refused, never crash the decoder or pass unchecked."""
    body = json.loads(messages.encode(message))
    body[field] = value
    try:
        decoded = messages.decode(json.dumps(body).encode())
    except messages.MessageError:
        return
    for name in ("pid", "ppid", "rss"):
        if hasattr(decoded, name):
            assert isinstance(getattr(decoded, name), int)


@given(st.lists(st.text(max_size=60), min_size=1, max_size=4), st.integers(0, 2**40),
       st.booleans())
def test_the_batch_encoder_produces_what_json_would(names: list[str], rss: int, ok: bool) -> None:
    """Names with quotes, backslashes or any unicode survive the hand-formatted encoder."""
    batch = messages.TaskBatch(pid=5, ppid=4, index=1, first=3, names=tuple(names),
                           ends=tuple((i, rss, rss + i, int(ok), i) for i in range(len(names))))
    body = json.loads(messages.encode(batch))
    assert body == {"pid": 5, "ppid": 4, "index": 1, "first": 3, "names": names,
                    "ends": [list(end) for end in batch.ends], "t": "k", "v": 1}
    if all(name.isprintable() for name in names):
        assert messages.decode(messages.encode(batch)) == batch


def _batch(**changes: object) -> bytes:
    body = json.loads(messages.encode(MESSAGES[6]))  # a TaskBatch
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("changes", "why"), [
    ({"names": []}, "no names"),
    ({"names": ["ok", "bad\n"]}, "an unprintable name"),
    ({"names": [f"n{i}" for i in range(messages.MAX_BATCH_NAMES + 1)]}, "too many names"),
    ({"ends": []}, "no task ends"),
    ({"ends": [[2, 1, 3, 1, 0]]}, "a name index past the table"),
    ({"ends": [[-1, 1, 3, 1, 0]]}, "a negative name index"),
    ({"ends": [[0, 1, 3, 2, 0]]}, "ok neither 0 nor 1"),
    ({"ends": [[0, 1, 3, 1, -5]]}, "a negative age"),
    ({"ends": [[0, 1, 3, 1]]}, "an entry too short"),
    ({"ends": [[0, 1.5, 3, 1, 0]]}, "a float"),
    ({"ends": [[0, True, 3, 1, 0]]}, "a boolean for a size"),
    ({"ends": [[0, 1, 3, 1, 0]] * (messages.MAX_BATCH + 1)}, "too many entries"),
    ({"first": -1}, "a negative task number"),
])
def test_malformed_batches_are_refused(changes: dict[str, object], why: str) -> None:
    with pytest.raises(messages.MessageError) as error:
        messages.decode(_batch(**changes))
    assert error.value.reason == "bad_field", why


def _site(**changes: object) -> bytes:
    body = json.loads(messages.encode(MESSAGES[10]))  # a LeakSite
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("changes", "why"), [
    ({"frames": [["a.py", 1]]}, "a frame without its function"),
    ({"frames": [["a.py", -1, "f"]]}, "a negative line"),
    ({"frames": [["a.py", 1.0, "f"]]}, "a float line"),
    ({"frames": [["a\nb.py", 1, "f"]]}, "an unprintable file name"),
    ({"frames": [["a.py", 1, "f"]] * (messages.MAX_FRAMES + 1)}, "too many frames"),
    ({"frames": {"a.py": 1}}, "not a list"),
    ({"size": -1}, "a negative size"),
    ({"blocks": 2**63}, "blocks out of range"),
    ({"code": "x" * 201}, "a code line too long"),
])
def test_malformed_leak_sites_are_refused(changes: dict[str, object], why: str) -> None:
    with pytest.raises(messages.MessageError) as error:
        messages.decode(_site(**changes))
    assert error.value.reason == "bad_field", why


def test_json_nested_too_deep_is_refused_not_raised() -> None:
    """One packet of brackets must not take the daemon down with a RecursionError."""
    with pytest.raises(messages.MessageError) as error:
        messages.decode(b"[" * 10000)
    assert error.value.reason == "not_json"
    assert settings.decode(b"[" * 10000) is None
