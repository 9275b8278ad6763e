"""What the agent does where a hook is missing, and the figures it takes from its worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import signals

from celery_memguard.agent import pool_child, task_signals
from celery_memguard.agent.child_agent import ChildAgent
from celery_memguard.agent.context import POOL_ENV, jitter_pool
from celery_memguard.protocol import grants, hooks
from tests.builders import MiB


@pytest.mark.parametrize(("controller", "environ", "expected"), [
    (SimpleNamespace(max_concurrency=8, pool=SimpleNamespace(num_processes=2)), "", 8),
    (SimpleNamespace(max_concurrency=None, pool=SimpleNamespace(num_processes=3)), "", 3),
    (SimpleNamespace(max_concurrency=None, pool=None), "5", 0),  # a controller: its own figure
    (None, "6", 6),  # a spawned child: what its parent put in the environment
    (None, "", 0),
    (None, "x", 0),
])
def test_the_jitter_pool_is_the_autoscale_maximum_else_the_pool_size(
        monkeypatch: pytest.MonkeyPatch, controller: Any, environ: str, expected: int) -> None:
    monkeypatch.setenv(POOL_ENV, environ)
    assert jitter_pool(controller) == expected


@pytest.mark.parametrize(("initargs", "node"), [
    (("app", "w1@host"), "w1@host"),  # Celery 5.3-5.7: (app, hostname)
    (("app",), ""),
    (("app", None), ""),
    (None, ""),
])
def test_a_child_takes_its_nodename_from_billiards_initargs(initargs: Any, node: str) -> None:
    assert pool_child._initargs_node(SimpleNamespace(initargs=initargs)) == node


@pytest.mark.parametrize(("missing", "can_leave"), [
    ((), True),
    ((hooks.PREPARE_RESULT,), True),
    ((hooks.PROCESS_DOWN, hooks.NODENAME), True),
    ((hooks.WAIT_FOR_JOB,), False),
    ((hooks.POOL_WORKER,), False),
])
def test_a_child_without_a_safe_point_to_leave_never_takes_a_grant(
        tmp_path: Path, missing: tuple[str, ...], can_leave: bool) -> None:
    agent = ChildAgent(0, str(tmp_path / "agent.sock"), missing=missing)
    agent.soft_threshold, agent.born = 100 * MiB, -1000.0
    assert grants.exchange(agent.grant_path, agent.worker, 1) == []
    assert agent.can_leave is can_leave
    assert agent.verdict(150 * MiB, 0.0) == ("self" if can_leave else None)


class Task:
    """What the task signals carry as sender and task: hashable, with a name."""

    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
def fallback(tmp_path: Path) -> Iterator[ChildAgent]:
    """A child agent following its tasks through Celery's task signals (both ends)."""
    agent = ChildAgent(0, str(tmp_path / "agent.sock"), missing=(hooks.POOL_WORKER,))
    task_signals.connect(agent, begins=True, ends=True, run_code=lambda task: None)
    yield agent
    uid = f"celery_memguard.fallback.{agent.pid}"
    signals.task_prerun.disconnect(dispatch_uid=uid + ".prerun")
    signals.task_postrun.disconnect(dispatch_uid=uid + ".postrun")


def test_task_signals_stand_in_for_billiards_loop_counting_the_outermost_task_once(
        fallback: ChildAgent) -> None:
    outer, inner = Task("app.outer"), Task("app.inner")
    ended: list[bool] = []
    end = fallback.end
    fallback.end = lambda ok: (ended.append(ok), end(ok))[1]  # type: ignore[method-assign]
    signals.task_prerun.send(sender=outer, task_id="t-1", task=outer)
    assert (fallback.running, fallback.task_name, fallback.task_id) == (True, "app.outer", "t-1")
    signals.task_prerun.send(sender=inner, task_id="t-2", task=inner)  # apply() inside it
    signals.task_postrun.send(sender=inner, task_id="t-2", task=inner, state="SUCCESS")
    assert (fallback.running, fallback.tasks) == (True, 0)
    signals.task_postrun.send(sender=outer, task_id="t-1", task=outer, state="FAILURE")
    assert (fallback.running, fallback.tasks, ended) == (False, 1, [False])  # as its state said
