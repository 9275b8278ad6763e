"""The container's lines, as tables: who is interrupted past hard, who is recycled past soft."""

from __future__ import annotations

import pytest

from celery_memguard.daemon import policy
from celery_memguard.daemon.decision import Hold, Reason
from celery_memguard.protocol.cgroups import ContainerReading, Pressure
from celery_memguard.protocol.signals import CONTAINER_SIGNAL
from tests.builders import MiB, child, limits, recycle, snapshot, worker

LIMIT = 1000 * MiB  # soft line 850 MiB, hard line 950 MiB by default


def container(working_set_mib: float, some: float = 0.0, limit: int | None = LIMIT) -> ContainerReading:
    return ContainerReading(usage=int(working_set_mib * MiB) + 50 * MiB,
                            working_set=int(working_set_mib * MiB), limit=limit, high=None,
                            events={}, pressure=Pressure(some, 0.0, 0.0, 0.0))


def decide(*children: object, ws: float, since: float | None = -100.0, now: float = 0.0,
           requests: dict[str, list[float]] | None = None, **kw: object) -> list[policy.Decision]:
    w = worker(*children, container=container(ws, **kw), container_over_since=since,  # type: ignore[arg-type]
               fresh_rss=50 * MiB)
    return policy.decide(snapshot(w), limits(soft="2GiB", hard="3GiB"), recycle(),
                         requests or {}, now)


def busy(index: int, rss_mib: float, grown_mib: float, **kw: object) -> object:
    return child(index, rss_mib, task="app.t", rest_rss=int((rss_mib - grown_mib) * MiB), **kw)


def test_past_the_hard_line_the_task_that_grows_most_is_interrupted() -> None:
    [d] = decide(busy(0, 300, 40), busy(1, 400, 200), busy(2, 500, 0), ws=960)
    assert (d.index, d.reason, d.signal, d.interrupt, d.hold) == (
        1, Reason.CONTAINER, CONTAINER_SIGNAL, True, None)
    assert (d.measured, d.threshold) == (960 * MiB, 950 * MiB)


def test_past_the_hard_line_outside_the_rate_limit() -> None:
    """Like the kill escalation, an interrupt is not held by recycle.max_per_minute."""
    [d] = decide(busy(0, 400, 200), busy(1, 100, 0), ws=960, requests={"w@h": [-1.0] * 6})
    assert d.interrupt
    assert d.hold is None


@pytest.mark.parametrize("children", [
    pytest.param((busy(0, 400, 4), busy(1, 500, 0)), id="nothing-grows-8MiB"),
    pytest.param((busy(0, 400, 200, requested_at=-1.0), busy(1, 300, 100)), id="one-on-its-way"),
])
def test_no_interrupt_when_nothing_grows_or_one_is_on_its_way(children: tuple[object, ...]) -> None:
    assert [d for d in decide(*children, ws=960) if d.interrupt] == []


def test_under_the_hard_line_nothing_is_interrupted() -> None:
    assert [d for d in decide(busy(0, 400, 200), ws=940, since=None) if d.interrupt] == []


def test_past_the_soft_line_for_grace_the_fastest_grower_is_recycled_after_its_task() -> None:
    """Born at -100 s: child 1 gained 300 MiB over a fresh child, child 0 100 MiB."""
    [d] = decide(child(0, 150, born=-100.0), child(1, 350, born=-100.0), ws=900)
    assert (d.index, d.reason, d.interrupt, d.hold) == (1, Reason.CONTAINER, False, None)
    assert (d.measured, d.threshold) == (900 * MiB, 850 * MiB)


def test_past_the_soft_line_the_recycle_keeps_to_the_rate_limit() -> None:
    [d] = decide(child(0, 350, born=-100.0), ws=900, requests={"w@h": [-1.0] * 6})
    assert d.hold is Hold.RATE_LIMIT


@pytest.mark.parametrize(("kw", "since"), [
    pytest.param({"ws": 900}, -1.0, id="not-yet-grace"),
    pytest.param({"ws": 800}, -100.0, id="back-under"),
    pytest.param({"ws": 900, "limit": None}, -100.0, id="no-limit"),
])
def test_no_container_recycle(kw: dict[str, float], since: float) -> None:
    assert decide(child(0, 350, born=-100.0), since=since, **kw) == []  # type: ignore[arg-type]


def test_sustained_pressure_alone_recycles_the_fastest_grower() -> None:
    [d] = decide(child(0, 350, born=-100.0), ws=500, some=0.5)
    assert d.reason is Reason.CONTAINER


def test_a_child_no_larger_than_a_fresh_one_is_not_recycled_for_the_container() -> None:
    """Recycling it frees nothing: the line is held by its tasks, not by what it kept."""
    assert decide(child(0, 60, born=-100.0), child(1, 55, born=-100.0), ws=900) == []


def test_lines_turned_off_do_nothing() -> None:
    w = worker(busy(0, 400, 200), container=container(990), container_over_since=-100.0,
               fresh_rss=50 * MiB)
    off = limits(soft="2GiB", hard="3GiB", container_soft=None, container_hard=None,
                 container_pressure=None)
    assert policy.decide(snapshot(w), off, recycle(), {}, 0.0) == []
