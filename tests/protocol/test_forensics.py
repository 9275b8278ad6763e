"""The trace request file round-trips for its worker; anything else reads as no request."""

from __future__ import annotations

import json

import pytest

from celery_memguard.protocol import forensics
from celery_memguard.protocol.forensics import Request

WORKER = (10, 900)
REQUEST = Request(id="r1", task="app.leak", child=(11, 1100), calls=20, frames=10,
                  tool="tracemalloc", until=1700000000.5)


def test_round_trip() -> None:
    assert forensics.decode(forensics.encode(WORKER, REQUEST), WORKER) == REQUEST


def test_the_file_of_another_worker_or_of_an_earlier_process_with_its_pid_is_ignored() -> None:
    data = forensics.encode(WORKER, REQUEST)
    assert forensics.decode(data, (10, 901)) is None
    assert forensics.decode(data, (11, 900)) is None


def _with(**changes: object) -> bytes:
    body = json.loads(forensics.encode(WORKER, REQUEST))
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", _with(v=2), _with(v=True), _with(id=""), _with(id="x" * 65),
    _with(task=""), _with(task=3), _with(tool="objgraph"), _with(calls=0), _with(calls=1001),
    _with(calls=True), _with(frames=0), _with(frames=101), _with(until="soon"),
    _with(until=True), _with(child=[11]), _with(child=[11, -1]), _with(child="11"),
])
def test_a_malformed_request_reads_as_none(data: bytes) -> None:
    assert forensics.decode(data, WORKER) is None
