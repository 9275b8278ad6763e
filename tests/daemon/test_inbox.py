"""The agent socket: safe binding, sender credentials, refusal of a live or foreign socket."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from celery_memguard.daemon.inbox import Datagram, Inbox, SocketError
from celery_memguard.protocol.messages import MAX_DATAGRAM


def drain_all(inbox: Inbox, want: int = 1, timeout: float = 5.0) -> list[Datagram]:
    """Accept and read until ``want`` messages came (the first drain may only accept)."""
    import time  # noqa: PLC0415

    got: list[Datagram] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got.extend(inbox.drain(100))
        time.sleep(0.01)
    got.extend(inbox.drain(100))
    return got


def test_bind_is_not_world_writable_and_credentials_name_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "run" / "agent.sock"
    inbox = Inbox(path)
    inbox.open()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o660
        assert not stat.S_IMODE(path.parent.stat().st_mode) & stat.S_IWOTH
        subprocess.run([sys.executable, "-c",
                        "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET);"
                        "s.connect(sys.argv[1]); s.send(b'hello'); print(__import__('os').getpid())",
                        str(path)], check=True, capture_output=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sender:
            sender.connect(str(path))
            sender.send(b"from me")
            got = drain_all(inbox, want=2)
        assert sorted(d.data for d in got) == [b"from me", b"hello"]
        got.sort(key=lambda d: d.data != b"hello")
        assert got[1].pid == os.getpid()
        assert got[0].pid not in (0, os.getpid())
        assert got[1].uid == os.getuid()
        bell = Path(f"{path}.bell")
        assert stat.S_IMODE(bell.stat().st_mode) == 0o660
    finally:
        inbox.close()
    assert not path.exists()
    assert not bell.exists()


def test_the_bell_counts_its_rings_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    """Rings carry nothing and are only counted; a bell left by a dead daemon is rebound."""
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(f"{path}.bell")
    stale.close()
    inbox = Inbox(path)
    inbox.open()
    try:
        assert inbox.silence() == 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ringer:
            for _ in range(3):
                ringer.sendto(b"!", f"{path}.bell")
        assert inbox.silence() == 3
        assert inbox.silence() == 0
    finally:
        inbox.close()


def test_an_oversized_datagram_is_marked_truncated(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "a.sock")
    inbox.open()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sender:
            sender.connect(str(tmp_path / "a.sock"))
            sender.send(b"x" * (MAX_DATAGRAM + 5000))
            [got] = drain_all(inbox)
        assert got.truncated
    finally:
        inbox.close()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = Inbox(path)
    first.open()
    try:
        with pytest.raises(SocketError, match="another celery-memguard daemon"):
            Inbox(path).open()
    finally:
        first.close()


def test_a_regular_file_in_the_way_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    path.write_text("important")
    with pytest.raises(SocketError, match="not a socket"):
        Inbox(path).open()
    assert path.read_text() == "important"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    with pytest.raises(SocketError, match="belongs to uid 65534"):
        Inbox(directory / "a.sock").open()


def test_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(SocketError, match="writable by every user"):
        Inbox(directory / "a.sock").open()


def test_an_unwritable_location_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SocketError, match="CELERY_MEMGUARD_SOCKET"):
        Inbox(blocker / "sub" / "a.sock").open()
