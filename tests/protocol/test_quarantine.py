"""The quarantine file round-trips; anything malformed is ignored, never half read."""

from __future__ import annotations

import pytest

from celery_memguard.protocol import quarantine
from celery_memguard.protocol.quarantine import Entry


def test_round_trip() -> None:
    entries = {"id-1": Entry("app.huge", 2, 0, 1700000000.5), "id-2": Entry("app.t", 1, 1, 5.0)}
    assert quarantine.decode(quarantine.encode(entries, 2)) == (entries, 2)


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", b'{"v":2,"after":2,"tasks":{}}', b'{"v":1,"after":"2","tasks":{}}',
    b'{"v":1,"after":2,"tasks":{"x":["t",1,0]}}', b'{"v":1,"after":2,"tasks":{"x":["t",true,0,1]}}',
])
def test_a_malformed_file_reads_as_none(data: bytes) -> None:
    assert quarantine.decode(data) is None


def test_the_reason_says_what_happened_and_the_setting() -> None:
    assert Entry("app.t", 2, 1, 0).why(3) == (
        "it was running at 2 OOM kills and 1 memory interrupt of its worker process "
        "(quarantine.after: 3)")
