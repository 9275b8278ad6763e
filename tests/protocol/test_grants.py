"""The grant file between the daemon and a worker's children: units published, taken, collected."""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

from celery_memguard.protocol import grants

WORKER = (4242, 777)


def test_the_daemon_publishes_children_take_and_the_daemon_collects(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock.grant.4242")
    assert grants.exchange(path, WORKER, 2) == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert grants.take(path, 101, WORKER, "soft")
    assert not grants.take(path, 101, WORKER, "soft")  # one unit per child
    assert grants.take(path, 102, WORKER, "predicted")
    assert not grants.take(path, 103, WORKER, "soft")  # none left
    assert grants.exchange(path, WORKER, 3) == [(101, "soft"), (102, "predicted")]
    assert grants.take(path, 103, WORKER, "soft")


def test_units_taken_since_the_grant_was_computed_count_against_it(tmp_path: Path) -> None:
    """The daemon computes a grant before it knows of the units taken meanwhile."""
    path = str(tmp_path / "g")
    grants.exchange(path, WORKER, 2)
    assert grants.take(path, 101, WORKER, "soft")
    assert grants.exchange(path, WORKER, 2) == [(101, "soft")]  # publishes 2 - 1
    assert grants.take(path, 102, WORKER, "soft")
    assert not grants.take(path, 103, WORKER, "soft")


def test_a_grant_for_an_earlier_worker_with_the_same_pid_is_not_taken(tmp_path: Path) -> None:
    path = str(tmp_path / "g")
    grants.exchange(path, WORKER, 5)
    assert not grants.take(path, 101, (4242, 778), "soft")
    assert grants.exchange(path, (4242, 778), 1) == []  # the new worker's: the old one's is gone
    assert grants.take(path, 101, (4242, 778), "soft")


def test_a_missing_or_malformed_file_grants_nothing(tmp_path: Path) -> None:
    path = tmp_path / "g"
    assert not grants.take(str(path), 101, WORKER, "soft")
    for text in ("", "{", "[]", '{"v":1,"worker":[4242,777],"grant":-1,"taken":[]}',
                 '{"v":1,"worker":[4242,777],"grant":3,"taken":[[1,"hard"]]}',
                 '{"v":2,"worker":[4242,777],"grant":3,"taken":[]}'):
        path.write_text(text)
        assert not grants.take(str(path), 101, WORKER, "soft"), text
        assert grants.exchange(str(path), WORKER, 1) == []  # the daemon writes it anew
        path.write_text(text)


def test_neither_side_waits_for_a_lock_held_elsewhere(tmp_path: Path) -> None:
    """A stopped daemon or child holding the lock cannot hold the other side up."""
    path = str(tmp_path / "g")
    grants.exchange(path, WORKER, 1)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        assert not grants.take(path, 101, WORKER, "soft")
        assert grants.exchange(path, WORKER, 1) is None
        assert time.monotonic() - started < 0.5
    finally:
        os.close(fd)
    assert grants.take(path, 101, WORKER, "soft")


def test_a_symlink_in_place_of_the_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    link = tmp_path / "g"
    link.symlink_to(target)
    assert grants.exchange(str(link), WORKER, 1) is None
    assert not grants.take(str(link), 101, WORKER, "soft")
    assert target.read_text() == "precious"


def test_a_grant_file_nested_too_deep_grants_nothing_and_raises_nothing(tmp_path: Path) -> None:
    """Anyone in the socket's group can write the file; neither side may crash on it."""
    path = tmp_path / "g"
    path.write_text("[" * 10000)
    assert not grants.take(str(path), 101, WORKER, "soft")
    assert grants.exchange(str(path), WORKER, 1) == []


def test_a_hard_link_in_place_of_the_file_is_not_written(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    os.link(target, tmp_path / "g")
    assert grants.exchange(str(tmp_path / "g"), WORKER, 1) is None
    assert target.read_text() == "precious"


def test_an_unchanged_grant_is_not_written_again(tmp_path: Path) -> None:
    """A tick that publishes what the file already says writes nothing; any change is written."""
    path = str(tmp_path / "agent.sock.grant.4242")
    assert grants.exchange(path, WORKER, 2) == []
    before = os.stat(path).st_mtime_ns
    time.sleep(0.01)
    assert grants.exchange(path, WORKER, 2) == []
    assert os.stat(path).st_mtime_ns == before
    assert grants.exchange(path, WORKER, 1) == []
    assert os.stat(path).st_mtime_ns != before
    assert grants.take(path, 101, WORKER, "soft")
    assert grants.exchange(path, WORKER, 1) == [(101, "soft")]  # collected: taken cleared
    assert not grants.take(path, 102, WORKER, "soft")  # 1 less the 1 taken meanwhile: none
    os.chmod(path, 0o600)
    assert grants.exchange(path, WORKER, 0) == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the mode is put right
