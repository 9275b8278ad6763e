"""``celery-memguard trace``: the request it sends, and what it prints of the answer."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from celery_memguard.cli import main, render
from celery_memguard.cli.trace import run_trace
from celery_memguard.daemon import leak_sites
from celery_memguard.daemon.config import parse
from celery_memguard.protocol import messages
from tests.daemon.test_leak_sites import RESULT
from tests.support import free_port

DONE = leak_sites.document(RESULT)


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A listening SOCK_SEQPACKET socket where the daemon's would be."""
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(5)
        yield path, listener


def _args(path: str, **kw: Any) -> argparse.Namespace:
    values = {"task": "app.leak", "calls": 7, "worker": "w@*", "timeout": 3.0, "config": None,
              "url": None, "socket": path, "json": False}
    values.update(kw)
    return argparse.Namespace(**values)


def _answers(states: list[dict[str, Any] | None]) -> Any:
    """/status as the daemon would show the trace over successive polls (None: not yet)."""
    sent: list[str] = []

    def fetch() -> tuple[int, dict[str, Any]]:
        trace = states.pop(0) if len(states) > 1 else states[0]
        traces = [] if trace is None else [{**trace, "id": sent[0]}]
        return 0, {"forensics": {"traces": traces}}

    return fetch, sent


def _received(listener: socket.socket) -> messages.TraceRequest:
    conn, _ = listener.accept()
    with conn:
        message = messages.decode(conn.recv(messages.MAX_DATAGRAM))
    assert isinstance(message, messages.TraceRequest)
    return message


def test_the_request_names_the_task_calls_worker_and_timeout_then_the_result_prints(
        daemon_socket: tuple[str, socket.socket], capsys: pytest.CaptureFixture[str]) -> None:
    path, listener = daemon_socket
    tracing = {"state": "tracing", "reason": "", "result": None}
    done = {"state": "done", "reason": "", "result": DONE}
    fetch, sent = _answers([None, tracing, done])

    def fetch_after_reading() -> tuple[int, dict[str, Any]]:
        if not sent:
            request = _received(listener)
            sent.append(request.id)
            assert (request.task, request.calls, request.worker, request.timeout_ms) == (
                "app.leak", 7, "w@*", 3000)
        return fetch()  # type: ignore[no-any-return]

    code = run_trace(_args(path), fetch_after_reading, lambda _: None, sleep=lambda _: None)
    assert code == 0
    out = capsys.readouterr().out
    assert "app/helpers.py:12" in out
    assert "_store.append(b)" in out
    assert "80%" in out


def test_json_prints_the_result_document(daemon_socket: tuple[str, socket.socket],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path, listener = daemon_socket
    fetch, sent = _answers([{"state": "done", "reason": "", "result": DONE}])

    def fetch_after_reading() -> tuple[int, dict[str, Any]]:
        if not sent:
            sent.append(_received(listener).id)
        return fetch()  # type: ignore[no-any-return]

    assert run_trace(_args(path, json=True), fetch_after_reading, lambda _: None,
                     sleep=lambda _: None) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sites"][0]["share"] == 0.8


def test_no_child_running_the_task_in_time_exits_1_with_the_reason(
        daemon_socket: tuple[str, socket.socket], capsys: pytest.CaptureFixture[str]) -> None:
    path, listener = daemon_socket
    failed = {"state": "failed", "reason": "no pool child ran app.leak in time", "result": None}
    fetch, sent = _answers([failed])

    def fetch_after_reading() -> tuple[int, dict[str, Any]]:
        if not sent:
            sent.append(_received(listener).id)
        return fetch()  # type: ignore[no-any-return]

    assert run_trace(_args(path), fetch_after_reading, lambda _: None, sleep=lambda _: None) == 1
    assert "no trace of app.leak: no pool child ran app.leak in time" in capsys.readouterr().err


def test_without_a_daemon_the_command_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["trace", "app.leak", "--socket", str(tmp_path / "none.sock"),
                 "--url", f"http://127.0.0.1:{free_port()}"])
    assert code == 1
    assert "cannot reach the daemon's socket" in capsys.readouterr().err


def test_the_socket_comes_from_the_config_when_not_given(
        daemon_socket: tuple[str, socket.socket], capsys: pytest.CaptureFixture[str]) -> None:
    path, listener = daemon_socket
    config = parse({"agent": {"socket": path}}, env={})
    fetch, sent = _answers([{"state": "failed", "reason": "why", "result": None}])

    def fetch_after_reading() -> tuple[int, dict[str, Any]]:
        if not sent:
            sent.append(_received(listener).id)
        return fetch()  # type: ignore[no-any-return]

    assert run_trace(_args(None, config="x.yaml"), fetch_after_reading,  # type: ignore[arg-type]
                     lambda _: config, sleep=lambda _: None) == 1


@pytest.mark.parametrize("calls", [0, 1001])
def test_calls_out_of_range_are_refused(calls: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "app.leak", "--calls", str(calls), "--socket", "/nonexistent"]) == 2
    assert "--calls must be between 1 and 1000" in capsys.readouterr().err


def test_a_partial_result_with_untraced_growth_says_so_and_what_to_do() -> None:
    console = Console(record=True, width=160)
    partial = leak_sites.document(replace(RESULT, reason="leaving", calls=4, traced_growth=0,
                                          rss_growth=40 * 1024 * 1024, sites=()))
    render.leak_sites(partial, console)
    text = console.export_text()
    assert "partial: 4 of 20 calls, leaving" in text
    assert "untraced 100%" in text
    assert "no allocation site kept memory the tracer saw" in text
    assert "forensics.tool: memray" in text


def test_a_deep_site_path_is_shown_whole_in_an_80_column_terminal() -> None:
    """A deep path is shortened to its last parts rather than folded across lines, so that
    FILE:LINE reads as one; --json keeps the whole path."""
    deep = "/tmp/build.x1y2z3/checkout/of/the/project/app/helpers.py"
    result = leak_sites.document(replace(RESULT, sites=(replace(RESULT.sites[0], filename=deep),)))
    console = Console(record=True, width=80)
    render.leak_sites(result, console)
    text = console.export_text()
    assert "…/project/app/helpers.py:12" in text, text
    assert result["sites"][0]["filename"] == deep
