"""A child's look at its container before each task: wait for room, never forever."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_memguard.agent.headroom import FIRST_RUN_WAIT, STEP, Headroom
from celery_memguard.protocol import paths, room
from celery_memguard.protocol.cgroups import Cgroups
from tests.builders import MiB


class Container:
    """A v2 cgroup tree whose usage and page cache a test sets; time passes as it sleeps."""

    def __init__(self, tmp: Path, limit: int | None = 1000 * MiB, **room: Any) -> None:
        self.cgroup = tmp / "cgroup" / "pod" / "worker"
        self.cgroup.mkdir(parents=True)
        (tmp / "cgroup" / "cgroup.controllers").write_text("memory\n")
        (tmp / "proc" / "self").mkdir(parents=True)
        (tmp / "proc" / "self" / "cgroup").write_text("0::/pod/worker\n")
        (self.cgroup / "memory.max").write_text(f"{limit}\n" if limit else "max\n")
        self.now = 0.0
        self.frees: list[tuple[float, int]] = []  # (at, usage from then on)
        self.then: list[tuple[float, Callable[[], object]]] = []  # (at, what happens)
        self.set(100 * MiB)
        self.headroom = Headroom(cgroups=Cgroups(root=str(tmp / "cgroup"), proc=str(tmp / "proc")),
                                 clock=lambda: self.now, sleep=self.sleep, **room)

    def set(self, usage: int, inactive: int = 0) -> None:
        (self.cgroup / "memory.current").write_text(f"{usage}\n")
        (self.cgroup / "memory.stat").write_text(f"anon {usage}\ninactive_file {inactive}\n")

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        while self.frees and self.frees[0][0] <= self.now:
            self.set(self.frees.pop(0)[1])
        while self.then and self.then[0][0] <= self.now:
            self.then.pop(0)[1]()


def test_under_the_line_a_task_starts_at_once(tmp_path: Path) -> None:
    box = Container(tmp_path)
    box.headroom.configure(0.85, 30.0)
    assert box.headroom.line == 850 * MiB
    assert box.headroom.hold("app.t", 50 * MiB) is None
    assert box.now == 0.0


def test_past_the_line_the_next_task_waits_until_another_frees_its_memory(tmp_path: Path) -> None:
    box = Container(tmp_path)
    box.headroom.configure(0.85, 30.0)
    box.set(900 * MiB)
    box.frees.append((1.5, 500 * MiB))  # a sibling's task ends and gives its memory back
    held = box.headroom.hold("app.t", 50 * MiB)
    assert held is not None
    assert not held.gave_up
    assert 1.5 <= held.seconds < 1.5 + 2 * STEP
    assert held.working_set == 500 * MiB


def test_a_task_runs_anyway_after_container_hold(tmp_path: Path) -> None:
    box = Container(tmp_path)
    box.headroom.configure(0.85, 3.0)
    box.set(900 * MiB)
    held = box.headroom.hold("app.t", 50 * MiB)
    assert held is not None
    assert held.gave_up
    assert 3.0 <= held.seconds < 3.0 + 2 * STEP


def test_what_a_task_name_needed_before_counts(tmp_path: Path) -> None:
    """Under the line by 100 MiB, a task that rose by 150 MiB here before waits; one that
    never needed anything does not."""
    box = Container(tmp_path)
    box.headroom.configure(0.85, 30.0)
    box.headroom.learn("app.big", 150 * MiB)
    box.headroom.learn("app.big", 20 * MiB)  # the most it ever needed is what counts
    box.set(750 * MiB)
    box.frees.append((0.5, 600 * MiB))
    assert box.headroom.hold("app.small", 50 * MiB) is None
    held = box.headroom.hold("app.big", 50 * MiB)
    assert held is not None
    assert 0.5 <= held.seconds < 0.5 + 2 * STEP


def test_page_cache_the_kernel_would_drop_is_not_held_against_a_task(tmp_path: Path) -> None:
    box = Container(tmp_path)
    box.headroom.configure(0.85, 30.0)
    box.set(950 * MiB, inactive=300 * MiB)
    assert box.headroom.hold("app.t", 50 * MiB) is None


def test_no_limit_or_no_line_means_no_hold(tmp_path: Path) -> None:
    unlimited = Container(tmp_path / "a", limit=None)
    unlimited.headroom.configure(0.85, 30.0)
    unlimited.set(10_000 * MiB)
    assert unlimited.headroom.hold("app.t", 50 * MiB) is None
    off = Container(tmp_path / "b")
    off.headroom.configure(None, 30.0)
    off.set(990 * MiB)
    assert off.headroom.hold("app.t", 50 * MiB) is None


def test_far_under_the_line_the_usage_is_not_read_before_task(tmp_path: Path) -> None:
    """700 MiB under the line: a container growing 16 GiB/s needs 43 ms to get there."""
    box = Container(tmp_path)
    box.headroom.configure(0.85, 30.0)
    assert box.headroom.hold("app.t", 50 * MiB) is None
    box.set(990 * MiB)  # not seen: too soon to look again
    box.now = 0.02
    assert box.headroom.hold("app.t", 50 * MiB) is None
    box.now = 0.05
    assert box.headroom.hold("app.t", 50 * MiB) is not None


def test_a_task_another_child_just_started_counts_until_it_has_allocated(tmp_path: Path) -> None:
    """Children that read their jobs together all see the same usage: each reserves its need
    in the worker's room file, and the others count what is not yet allocated of it."""
    sock = str(tmp_path / "agent.sock")
    worker = (4242, 1)
    path = paths.room_path(sock, 4242)
    assert room.create(path, worker)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
        box.headroom.configure(0.85, 30.0)
        box.headroom.learn("app.big", 150 * MiB)
        sibling_rss = box.headroom._rss(sibling.pid)
        assert sibling_rss is not None
        assert room.update(path, worker, lambda r: r.starting.append(
            (sibling.pid, 150 * MiB, sibling_rss))) is None
        box.set(600 * MiB)  # 600 + 150 not yet allocated by the sibling + 150 >= 850
        box.frees.append((0.3, 500 * MiB))
        held = box.headroom.hold("app.big", 50 * MiB)
        assert held is not None
        assert 0.3 <= held.seconds < 0.3 + 2 * STEP
        shared = room.read(path, worker)
        assert shared is not None
        assert (os.getpid(), 150 * MiB, 50 * MiB) in shared.starting
        assert shared.needs == {"app.big": 150 * MiB}  # learnt before: told to the worker
        box.headroom.learn("app.big", 180 * MiB)  # the task ends: reservation gone, need grown
        shared = room.read(path, worker)
        assert shared is not None
        assert [s[0] for s in shared.starting] == [sibling.pid]
        assert shared.needs == {"app.big": 180 * MiB}
    finally:
        sibling.kill()
        sibling.wait()


def test_a_reservation_of_a_child_that_is_gone_is_dropped(tmp_path: Path) -> None:
    sock = str(tmp_path / "agent.sock")
    worker = (4242, 1)
    path = paths.room_path(sock, 4242)
    assert room.create(path, worker)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    room.update(path, worker, lambda r: r.starting.append((gone.pid, 500 * MiB, 0)))
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 30.0)
    box.headroom.learn("app.big", 150 * MiB)
    box.set(600 * MiB)
    assert box.headroom.hold("app.big", 50 * MiB) is None  # 600 + 150 < 850: no wait
    shared = room.read(path, worker)
    assert shared is not None
    assert [s[0] for s in shared.starting] == [os.getpid()]


@pytest.fixture
def sibling() -> Iterator[int]:
    """Another live process: a pool child of the same worker, as the room file sees it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _worker_room(tmp_path: Path) -> tuple[str, tuple[int, int]]:
    worker = (4242, 1)
    path = paths.room_path(str(tmp_path / "agent.sock"), 4242)
    assert room.create(path, worker)
    return path, worker


def test_a_name_no_child_ran_yet_waits_for_the_first_run_to_end(
        tmp_path: Path, sibling: int) -> None:
    """Three children start a 150 MiB task no child of the worker ran yet, in a container with
    room for two: one runs it first, and the others wait until that run ends (at most
    FIRST_RUN_WAIT), then judge with what it took. The figure its watch writes mid-allocation
    (60 MiB at 0.3 s) does not release them: with it they would have started together."""
    path, worker = _worker_room(tmp_path)
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 30.0)
    room.update(path, worker, lambda r: r.first.append((sibling, "app.big", 0)))
    box.set(750 * MiB)  # the sibling's run is allocating

    def ended(shared: room.Room) -> None:
        shared.first.clear()
        shared.needs["app.big"] = 150 * MiB

    box.then.append((0.3, lambda: room.update(path, worker, lambda r: r.needs.update(
        {"app.big": 60 * MiB}))))  # its watch, mid-allocation
    box.then.append((0.6, lambda: room.update(path, worker, ended)))  # its run has ended
    box.frees.append((0.6, 600 * MiB))
    held = box.headroom.hold("app.big", 50 * MiB)
    assert held is not None
    assert 0.6 <= held.seconds < 0.6 + 2 * STEP


def test_the_first_child_to_start_a_name_runs_it_at_once_and_tells_the_others_at_its_end(
        tmp_path: Path) -> None:
    path, worker = _worker_room(tmp_path)
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 30.0)
    assert box.headroom.hold("app.new", 50 * MiB) is None
    shared = room.read(path, worker)
    assert shared is not None
    assert shared.first == [(os.getpid(), "app.new", 0)]
    box.headroom.learn("app.new", 0)  # it ended, needing nothing: known to need nothing
    shared = room.read(path, worker)
    assert shared is not None
    assert (shared.first, shared.needs) == ([], {"app.new": 0})


def test_a_first_run_that_shows_nothing_holds_the_others_only_a_moment(
        tmp_path: Path, sibling: int) -> None:
    path, worker = _worker_room(tmp_path)
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 30.0)
    room.update(path, worker, lambda r: r.first.append((sibling, "app.slow", 0)))
    held = box.headroom.hold("app.slow", 50 * MiB)
    assert held is not None
    assert FIRST_RUN_WAIT <= held.seconds < FIRST_RUN_WAIT + 2 * STEP
    assert not held.gave_up


def test_a_first_run_of_a_child_that_is_gone_holds_nobody(tmp_path: Path) -> None:
    path, worker = _worker_room(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    room.update(path, worker, lambda r: r.first.append((gone.pid, "app.big", 0)))
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 30.0)
    assert box.headroom.hold("app.big", 50 * MiB) is None
    shared = room.read(path, worker)
    assert shared is not None
    assert shared.first == [(os.getpid(), "app.big", 0)]  # this child's first run, now


def test_in_a_dry_run_nobody_waits_for_a_first_run(tmp_path: Path, sibling: int) -> None:
    path, worker = _worker_room(tmp_path)
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 0.0)  # a dry run publishes no wait
    room.update(path, worker, lambda r: r.first.append((sibling, "app.big", 0)))
    assert box.headroom.hold("app.big", 50 * MiB) is None


def test_a_childs_first_task_waits_a_moment_for_the_daemon_to_make_the_room(
        tmp_path: Path) -> None:
    """A fresh worker's first tasks can start before the daemon has made its room file: the
    first task of each child waits for it (here it appears after 0.2 s), at most ROOM_WAIT,
    and then marks its first run there. Later tasks do not wait for it again."""
    worker = (4242, 1)
    path = paths.room_path(str(tmp_path / "agent.sock"), 4242)
    box = Container(tmp_path / "c", room_path=path, worker=worker, pool=3)
    box.headroom.configure(0.85, 30.0)
    box.then.append((0.2, lambda: room.create(path, worker)))
    assert box.headroom.hold("app.new", 50 * MiB) is None
    assert 0.2 <= box.now < 0.2 + 2 * STEP
    shared = room.read(path, worker)
    assert shared is not None
    assert [f[1] for f in shared.first] == ["app.new"]
    os.unlink(path)
    now = box.now
    box.headroom.hold("app.other", 50 * MiB)
    assert box.now == now
