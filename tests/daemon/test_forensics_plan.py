"""Which task names are traced, and in which child. Tables."""

from __future__ import annotations

import pytest

from celery_memguard.daemon.forensics_plan import Target, choose, due
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.task_growth import Ranked
from tests.builders import child, worker

A0 = child(0, rss_mib=80)
A1 = child(1, rss_mib=60)
W = worker(A0, A1)
OTHER = worker(child(0, rss_mib=40, worker="v@h", proc=ProcId(200, 2000), ppid=20),
               name="v@h", proc=ProcId(20, 1900))


def _target(w: object, c: object) -> Target:
    return Target(w.name, w.pid, w.proc.start, c.pid, c.proc.start, c.index)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("workers", "ran", "busy", "pattern", "any_child", "expected"), [
    # the child that ran it; of those, the one with the least memory
    ([W], {A0.pid: {"app.leak": 3}, A1.pid: {"app.leak": 4}}, [], None, False, _target(W, A1)),
    ([W], {A0.pid: {"app.leak": 1}}, [], None, False, _target(W, A0)),
    ([W], {A0.pid: {"app.x": 1}}, [], None, False, "no pool child that can trace now has run app.leak"),
    # ... but not one that ran it less than half as often as another: the pool may keep
    # handing the name to the other, and the chosen child would trace nothing
    ([W], {A0.pid: {"app.leak": 9}, A1.pid: {"app.leak": 2}}, [], None, False, _target(W, A0)),
    ([W], {A0.pid: {"app.leak": 9}, A1.pid: {"app.leak": 5}}, [], None, False, _target(W, A1)),
    # asked by hand: any child, those that ran it first
    ([W], {}, [], None, True, _target(W, A1)),
    ([W], {A0.pid: {"app.leak": 1}}, [], None, True, _target(W, A0)),
    # the task it runs now counts as run
    ([worker(A0._replace(task="app.leak"), A1)], {}, [], None, False, _target(W, A0)),
    # one trace per worker
    ([W], {A0.pid: {"app.leak": 1}}, [W.pid], None, False,
     "every worker that could trace it is tracing another task (one at a time)"),
    ([W, OTHER], {A0.pid: {"app.leak": 1}, 200: {"app.leak": 1}}, [W.pid], None, False,
     _target(OTHER, OTHER.children[0])),
    # --worker
    ([W, OTHER], {}, [], "v@*", True, _target(OTHER, OTHER.children[0])),
    ([W], {}, [], "nobody@*", True, "no worker named nobody@* is supervised"),
    ([], {}, [], None, True, "no worker on this host is supervised"),
    ([worker(A0, A1, agent=False)], {}, [], None, True,
     "no worker on this host runs a prefork pool with the agent (celery_memguard.install(app))"),
    ([worker(A0, A1, pool="solo")], {}, [], None, True,
     "no worker on this host runs a prefork pool with the agent (celery_memguard.install(app))"),
    # children on their way out, or without the agent, are passed over
    ([worker(A0._replace(leaving=True), A1._replace(requested_at=1.0))], {}, [], None, True,
     "no pool child can trace now (each is leaving or being recycled)"),
    ([worker(A0._replace(agent=False), A1)], {}, [], None, True, _target(W, A1)),
    ([worker(A0, A1._replace(killed_at=3.0))], {}, [], None, True, _target(W, A0)),
])
def test_the_child_chosen_or_why_none(workers: list[object], ran: dict[int, dict[str, int]],
                                      busy: list[int], pattern: str | None, any_child: bool,
                                      expected: Target | str) -> None:
    assert choose(workers, "app.leak", ran, busy, pattern, any_child) == expected  # type: ignore[arg-type]


def test_a_child_to_avoid_is_not_chosen_again() -> None:
    """A trace moved off a child that never got the task again goes to another, or nowhere."""
    ran = {A0.pid: {"app.leak": 1}, A1.pid: {"app.leak": 9}}
    assert choose([W], "app.leak", ran, [], avoid=(A1.pid,)) == _target(W, A0)
    assert choose([W], "app.leak", {A1.pid: {"app.leak": 9}}, [], avoid=(A1.pid,)) == (
        "no pool child that can trace now has run app.leak")


def _ranked(task: str, leaky: bool) -> Ranked:
    return Ranked(task=task, calls=10, median_bytes=1.0, mean_bytes=1.0, total_bytes=10,
                  leaky=leaky)


@pytest.mark.parametrize(("ranking", "traced_at", "active", "now", "expected"), [
    ([_ranked("a", True), _ranked("b", False)], {}, [], 100.0, ["a"]),
    ([_ranked("a", True)], {"a": 50.0}, [], 100.0, []),  # within the cooldown of 60
    ([_ranked("a", True)], {"a": 39.0}, [], 100.0, ["a"]),
    ([_ranked("a", True)], {}, ["a"], 100.0, []),  # being traced
    ([_ranked("other", True)], {}, [], 100.0, []),  # many names under one label: no task
    ([_ranked("a", True), _ranked("c", True)], {}, [], 0.0, ["a", "c"]),
])
def test_task_names_due_for_an_automatic_trace(ranking: list[Ranked], traced_at: dict[str, float],
                                               active: list[str], now: float,
                                               expected: list[str]) -> None:
    assert due(ranking, traced_at, active, now, cooldown=60.0) == expected
