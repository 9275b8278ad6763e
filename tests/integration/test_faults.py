"""Faults of a real deployment, survived: daemon killed and restarted, worker restarted, broker
restarted, a child killed from outside, a forged message, secrets kept out of logs."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_memguard.daemon.procs import Procs
from celery_memguard.protocol import messages
from tests.builders import MiB
from tests.support import Daemon, PrivateRedis, RssSampler, Worker, answers, wait_for

pytestmark = pytest.mark.slow


def children_in_status(daemon: Daemon, worker: Worker) -> set[int]:
    try:
        status = daemon.status()
    except OSError:
        return set()
    return {c["pid"] for w in status["workers"] if w["pid"] == worker.pid for c in w["children"]}


def first_tick_listing_every_child(daemon: Daemon, worker: Worker, timeout: float) -> int:
    """Poll /status until it lists every live child of ``worker``; return the latest tick that
    status document can be from: the ticks /metrics counts as done just after it was read, plus
    the one that may have been under way (a tick publishes its view, then counts itself)."""
    procs = Procs()
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no status listed every child: {daemon.output()}"
        before = {c.pid for c in procs.children(worker.pid)}
        try:
            listed = children_in_status(daemon, worker)
            done = daemon.metric("celery_memguard_tick_seconds_count")
        except OSError:
            continue
        alive = before & {c.pid for c in procs.children(worker.pid)}  # throughout the request
        if alive and alive <= listed:
            return int(done) + 1


def test_daemon_killed_and_restarted_under_load_finds_every_child_and_loses_nothing(
        tmp_path: Path, start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker]) -> None:
    """SIGKILL the daemon mid-run; a new one on the same socket finds all children in two ticks."""
    config = {"limits": {"soft": "120MiB", "hard": "1GiB"},
              "sampling": {"interval": "250ms", "scan_interval": "250ms"}}
    daemon = start_daemon(**config)
    worker = start_worker(socket_path=daemon.socket_path)
    results = [worker.send("keep", 1) for _ in range(300)]
    time.sleep(0.3)
    daemon.proc.kill()
    daemon.proc.wait()
    restarted = Daemon(tmp_path / "again", config, socket_path=daemon.socket_path)
    try:
        tick = first_tick_listing_every_child(restarted, worker, 5)
        assert tick <= 2, f"the first status listing every child can be from tick {tick}"
        assert all(r.get(timeout=60) for r in results)
        runs = worker.runs()
        assert len(runs) == 300
        assert [t for t, n in Counter(runs).items() if n > 1] == []
        # the new daemon controls the children again: the leak still gets recycled
        more = [worker.send("keep", 2) for _ in range(120)]
        assert all(r.get(timeout=60) for r in more)
        assert restarted.metric("celery_memguard_recycles_total", reason="soft") >= 1, (
            [line for line in restarted.get("/metrics").splitlines() if "recycles" in line])
    finally:
        restarted.stop()


def test_a_restarted_worker_loses_its_old_series_and_gains_new_ones(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    daemon = start_daemon(sampling={"interval": "250ms", "scan_interval": "250ms"})
    first = start_worker(socket_path=daemon.socket_path, name="restarting@memguard-test")
    wait_for(lambda: len(children_in_status(daemon, first)) == 2, 5, "first worker not seen")
    old = {c.pid for c in Procs().children(first.pid)}
    first.stop()
    second = start_worker(socket_path=daemon.socket_path, name="restarting@memguard-test")
    wait_for(lambda: len(children_in_status(daemon, second)) == 2, 5, "second worker not seen")
    time.sleep(0.6)
    status = daemon.status()
    mine = [w for w in status["workers"] if w["name"] == "restarting@memguard-test"]
    assert [w["pid"] for w in mine] == [second.pid]
    assert {c["pid"] for c in mine[0]["children"]}.isdisjoint(old)
    page = daemon.get("/metrics")
    series = [line for line in page.splitlines()
              if line.startswith("celery_memguard_child_rss_bytes{")
              and 'worker="restarting@memguard-test"' in line]
    assert len(series) == 2  # the new children, under the same labels as the old ones


def test_the_broker_restarting_does_not_disturb_supervision(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A private Redis is stopped and started again mid-run; every task still completes."""
    redis = PrivateRedis(tmp_path)
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"}, sampling={"interval": "250ms"})
    url = f"redis://127.0.0.1:{redis.port}"
    worker = Worker(tmp_path, f"{url}/0", f"{url}/1", socket_path=daemon.socket_path)
    try:
        worker.wait_ready()
        first = [worker.send("keep", 2) for _ in range(60)]
        assert all(r.get(timeout=60) for r in first)
        port = redis.port
        redis.stop()
        time.sleep(2)
        redis = PrivateRedis(tmp_path, port=port)
        def pings() -> bool:
            try:
                return bool(worker.client.control.ping(destination=[worker.name], timeout=0.5))
            except Exception:
                return False

        wait_for(pings, 60, "the worker did not reconnect")
        second = [worker.send("keep", 2) for _ in range(60)]
        assert all(r.get(timeout=60) for r in second)
        assert daemon.healthy()
        assert daemon.metric("celery_memguard_recycles_total", reason="soft") >= 1
        # Both children may be between leaving and their replacements' hellos just now.
        wait_for(lambda: daemon.metric("celery_memguard_child_rss_bytes", worker=worker.name) > 0,
                 5, "the worker's children are not supervised any more")
    finally:
        worker.stop()
        redis.stop()


def test_a_child_killed_by_a_sigkill_sent_by_hand_is_counted_as_killed_not_as_an_oom(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """A SIGKILL the kernel did not count (its container's oom_kill counter did not move) is a
    kill by someone else: counted with the task it stopped, never as an OOM kill."""
    daemon = start_daemon(sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    result = worker.send("sleep_then_keep", 30, 1)
    victim = wait_for_task_start(daemon, worker)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: daemon.metric("celery_memguard_interrupted_tasks_total",
                                   task="tests.apps.leaky.sleep_then_keep", reason="killed") == 1,
             10, daemon.output())
    assert daemon.metric("celery_memguard_oom_kills_total", worker=worker.name) == 0
    [event] = [e for e in daemon.events() if e.get("event") == "child_killed"]
    assert (event["pid"], event["task_id"], event["cause"]) == (victim, result.id, "killed")
    assert worker.send("noop").get(timeout=20)


def wait_for_task_start(daemon: Daemon, worker: Worker) -> int:
    busy: list[int] = []

    def started() -> bool:
        busy[:] = [c["pid"] for w in daemon.status()["workers"] if w["pid"] == worker.pid
                   for c in w["children"] if c["state"] == "busy"]
        return bool(busy)

    wait_for(started, 10, "the task never started")
    return busy[0]


def test_a_forged_message_from_another_local_process_causes_nothing(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """This process claims to be a worker's child, over its limit: dropped, nothing signalled."""
    daemon = start_daemon(limits={"soft": "100MiB", "hard": "1GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    kids = Procs().children(worker.pid)
    forged = [messages.TaskEnd(pid=kid.pid, ppid=worker.pid, index=i, task="x", id="forged",
                           rss_before=0, rss=900 * MiB, tasks=99, ok=True)
              for i, kid in enumerate(kids)]
    as_itself = messages.TaskEnd(pid=os.getpid(), ppid=worker.pid, index=0, task="x", id="mine",
                             rss_before=0, rss=900 * MiB, tasks=99, ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket_path))
        for message in [*forged, as_itself] * 20:
            sock.send(messages.encode(message))
    time.sleep(1.0)
    assert {c.pid for c in Procs().children(worker.pid)} == {k.pid for k in kids}
    assert daemon.metric("celery_memguard_messages_dropped_total", reason="forged_sender") == 40
    assert daemon.metric("celery_memguard_messages_dropped_total", reason="not_a_child") == 20
    assert daemon.metric("celery_memguard_recycles_total") == 0


def test_random_datagrams_are_dropped_and_counted_while_the_daemon_serves(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    rng = __import__("random").Random(11)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket_path))
        sock.setblocking(False)
        sent = 0
        for _ in range(3000):
            data = rng.randbytes(rng.randint(1, 300)) if rng.random() < 0.7 else b'{"v":1,"t":"e"}'
            try:
                sock.send(data)
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
    results = [worker.send("keep", 2) for _ in range(100)]
    assert all(r.get(timeout=60) for r in results)
    time.sleep(0.5)
    assert daemon.healthy()
    assert daemon.metric("celery_memguard_messages_dropped_total") == sent
    assert daemon.metric("celery_memguard_recycles_total", reason="soft") >= 1


@pytest.mark.skipif(not answers("127.0.0.1", 5672), reason="no RabbitMQ answers on 127.0.0.1:5672")
def test_broker_credentials_never_reach_logs_metrics_or_status(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    daemon = start_daemon(sampling={"interval": "250ms", "scan_interval": "250ms"})
    worker = start_worker(broker="amqp://guest:guest@127.0.0.1:5672//",
                          socket_path=daemon.socket_path,
                          global_args=("-b", "amqp://guest:guest@127.0.0.1:5672//"))
    assert all(r.get(timeout=30) for r in [worker.send("keep", 1) for _ in range(20)])
    time.sleep(0.6)
    for text in (daemon.output(), daemon.get("/metrics"), daemon.get("/status")):
        assert "guest:guest" not in text
        assert "amqp://" not in text


def test_a_task_that_spikes_past_soft_and_frees_it_is_not_recycled(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """Celery's --max-memory-per-child would recycle after each (it reads the lifetime peak)."""
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"}, sampling={"interval": "100ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    with RssSampler(worker.pid, period=0.02) as sampler:
        assert all(r.get(timeout=60) for r in [worker.send("spiky", 200) for _ in range(10)])
        time.sleep(0.5)
    assert sampler.max_rss > 200 * MiB  # the spikes really crossed the limit
    assert len(sampler.peak) == worker.concurrency
    assert daemon.metric("celery_memguard_recycles_total") == 0



def test_several_workers_on_one_host_keep_their_own_limits(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """A small and a large worker leak side by side; each is held to its own soft limit."""
    daemon = start_daemon(limits={"soft": "100MiB", "hard": "1GiB"}, sampling={"interval": "250ms"},
                          workers=[{"match": "big@*", "limits": {"soft": "200MiB"}}])
    small = start_worker(socket_path=daemon.socket_path, name="small@memguard-test")
    big = start_worker(socket_path=daemon.socket_path, name="big@memguard-test")
    with RssSampler(small.pid) as small_rss, RssSampler(big.pid) as big_rss:
        jobs = [w.send("keep", 2) for _ in range(120) for w in (small, big)]
        assert all(r.get(timeout=120) for r in jobs)
        time.sleep(0.3)
    assert small_rss.max_rss <= 108 * MiB, small_rss.max_rss / MiB
    assert big_rss.max_rss > 110 * MiB  # above the small worker's limit: its own applies
    assert big_rss.max_rss <= 208 * MiB, big_rss.max_rss / MiB
    assert daemon.metric("celery_memguard_limit_bytes", worker=big.name, level="soft") == 200 * MiB
    assert daemon.metric("celery_memguard_limit_bytes", worker=small.name, level="soft") == 100 * MiB
    assert daemon.metric("celery_memguard_recycles_total", worker=small.name) >= 1


def test_sighup_reloads_a_valid_config_and_keeps_the_old_one_when_invalid(
        start_daemon: Callable[..., Daemon]) -> None:
    """A real SIGHUP: a valid file takes effect (limits exported), a broken one is refused."""
    import yaml  # noqa: PLC0415

    daemon = start_daemon(limits={"soft": "100MiB", "hard": "1GiB"},
                          sampling={"interval": "100ms"})
    config = yaml.safe_load(daemon.config_path.read_text())
    config["limits"]["soft"] = "200MiB"
    daemon.config_path.write_text(yaml.safe_dump(config))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.status()["limits"]["soft"] == 200 * MiB, 5, daemon.output())
    daemon.config_path.write_text("limits: {soft: 3GiB, hard: 1GiB}\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "config_reload_refused" for e in daemon.events()), 5,
             daemon.output())
    [refused] = [e for e in daemon.events() if e.get("event") == "config_reload_refused"]
    assert refused["key"] == "limits.soft"
    time.sleep(0.3)
    assert daemon.status()["limits"]["soft"] == 200 * MiB
    assert daemon.healthy()
