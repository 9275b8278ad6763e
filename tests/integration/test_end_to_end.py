"""End-to-end guarantees with a real prefork worker, a real broker and the real daemon."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from celery_memguard.daemon.procs import Procs
from tests.builders import MiB
from tests.support import Daemon, RssSampler, Worker, wait_for

pytestmark = pytest.mark.slow

SOFT = 120 * MiB
CEILING = 136 * MiB
CALLS = 200


def _leak_run(worker: Worker, daemon: Daemon) -> RssSampler:
    with RssSampler(worker.pid) as sampler:
        results = [worker.send("keep", 2) for _ in range(CALLS)]
        for result in results:
            result.get(timeout=60)
        time.sleep(0.3)  # let the last recycles finish under the sampler
    return sampler


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
@pytest.mark.parametrize("acks_late", [False, True], ids=["acks_early", "acks_late"])
def test_soft_limit_recycles_without_losing_or_repeating_tasks(
    request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon],
    start_worker: Callable[..., Worker], broker: str, acks_late: bool,
) -> None:
    """200 calls that keep 2 MiB each all return, none runs twice, children stay under 136 MiB."""
    broker_url = (request.getfixturevalue("rabbitmq_url") if broker == "rabbitmq"
                  else None)
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms"})
    worker = start_worker(broker=broker_url, socket_path=daemon.socket_path, acks_late=acks_late)

    sampler = _leak_run(worker, daemon)

    print(f"peak {sampler.max_rss / MiB:.1f} MiB, children {len(sampler.peak)}, "
          f"recycles {daemon.metric('celery_memguard_recycles_total')}")
    runs = worker.runs()
    assert len(runs) == CALLS, worker.output()
    assert [tid for tid, n in Counter(runs).items() if n > 1] == []
    assert daemon.metric("celery_memguard_recycles_total", reason="soft") >= 1, daemon.output()
    # The main process and every serving child hold a connection; a replacement child connects
    # when billiard has forked it, which can come a moment after the last result.
    wait_for(lambda: daemon.metric("celery_memguard_agent_connections") >= 1 + worker.concurrency,
             10, f"fewer than {1 + worker.concurrency} agent connections: {daemon.output()}")
    assert sampler.max_rss <= CEILING, (
        f"peak child RSS {sampler.max_rss / MiB:.1f} MiB > {CEILING / MiB:.0f} MiB")
    assert len(sampler.peak) > worker.concurrency  # children really were replaced


def test_dry_run_counts_would_be_recycles_and_recycles_nothing(
    start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
) -> None:
    """With dry_run the same leak recycles no child, but logs and counts what it would do."""
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms"}, recycle={"dry_run": True})
    worker = start_worker(socket_path=daemon.socket_path)
    first_children = {c.pid for c in Procs().children(worker.pid)}

    sampler = _leak_run(worker, daemon)

    assert set(sampler.peak) == first_children, "a child was replaced during a dry run"
    assert sampler.max_rss > SOFT  # the leak really crossed the limit
    assert daemon.metric("celery_memguard_recycles_total") == 0
    assert daemon.metric("celery_memguard_dry_run_recycles_total", reason="soft") >= 1
    would = [e for e in daemon.events() if e.get("event") == "recycle_would_request"]
    assert would, daemon.output()
    assert all(e["measured_bytes"] >= e["threshold_bytes"] for e in would)


def test_worker_without_agent_is_shown_and_never_recycled(
    start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
) -> None:
    """A worker whose app does not install the agent is found by the scan, observe-only."""
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms", "scan_interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path, agent=False)

    sampler = _leak_run(worker, daemon)

    status = daemon.status()
    mine = [w for w in status["workers"] if w["pid"] == worker.pid]
    assert len(mine) == 1, status
    assert mine[0]["agent"] is False
    assert len(mine[0]["children"]) == worker.concurrency
    assert sampler.max_rss > SOFT
    assert len(sampler.peak) == worker.concurrency, "a child of an agentless worker was replaced"
    assert daemon.metric("celery_memguard_recycles_total") == 0
    assert daemon.metric("celery_memguard_child_rss_bytes", worker=mine[0]["name"]) > 0
    held = [e for e in daemon.events()
            if e.get("event") == "recycle_held" and e.get("held_by") == "no_agent"]
    assert held


def test_a_child_past_its_threshold_leaves_on_its_own_right_after_that_task(
    start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
) -> None:
    """Under the daemon's published grant a child leaves on its own, without waiting for the
    daemon, before the task that would take it past its threshold (each call keeps 2 MiB): its
    peak stays under the soft limit itself."""
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"}, sampling={"interval": "1s"})
    worker = start_worker(socket_path=daemon.socket_path)

    sampler = _leak_run(worker, daemon)

    by_agent = [e for e in daemon.events()
                if e.get("event") == "recycle_requested" and e.get("by") == "agent"]
    assert by_agent, daemon.output()
    for event in by_agent:
        peak = sampler.peak.get(event["pid"], 0)
        assert peak <= SOFT, (event, peak / MiB)
    assert len(worker.runs()) == CALLS

    def counted_once() -> bool:  # a last exit may still be on its way: both settle together
        requested = {e["pid"] for e in daemon.events() if e.get("event") == "recycle_requested"}
        return daemon.metric("celery_memguard_recycles_total", reason="soft") == len(requested)

    wait_for(counted_once, 5, f"recycles counted other than once each: {daemon.output()}")


def test_a_storm_of_children_over_the_limit_recycles_at_the_rate_limit_only(
    start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
) -> None:
    """A soft limit below what a fresh child needs: every child crosses it at its first task.
    Children leave on their own only as often as recycle.max_per_minute allows, the storm is
    warned once, and every task still runs once."""
    daemon = start_daemon(limits={"soft": "20MiB", "hard": "1GiB"},
                          recycle={"max_per_minute": 3}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    results = [worker.send("noop") for _ in range(80)]
    pids = {r.get(timeout=60) for r in results}
    time.sleep(1.0)  # a few ticks: nothing more may leave
    assert daemon.metric("celery_memguard_recycles_total", worker=worker.name) == 3, daemon.output()
    assert len(pids) <= worker.concurrency + 3
    assert sorted(Counter(worker.runs()).values()) == [1] * 80
    # The scan also finds other workers on this host (observe-only): only ours is judged here.
    storms = [e for e in daemon.events()
              if e.get("event") == "recycle_storm" and e.get("worker") == worker.name]
    assert len(storms) == 1, storms
