"""When a child's task-end report rings the daemon's bell: the decision it calls for."""

from __future__ import annotations

from celery_memguard.agent import _ChildAgent

MiB = 1024 * 1024


def _agent(threshold_mib: float, ahead: int = 0) -> _ChildAgent:
    agent = _ChildAgent(0)
    agent.soft_threshold = int(threshold_mib * MiB)
    agent.ahead = ahead
    return agent


def _ends(agent: _ChildAgent, before_mib: float, after_mib: float) -> bool:
    agent.rss_before = int(before_mib * MiB)
    return agent.calls_for_decision(int(after_mib * MiB))


def test_a_report_under_the_threshold_does_not_ring() -> None:
    agent = _agent(100)
    assert [_ends(agent, n, n + 1) for n in range(90, 99)] == [False] * 9
    assert agent.verdict_due is False


def test_the_first_report_past_the_threshold_rings_and_awaits_the_verdict() -> None:
    agent = _agent(100)
    assert _ends(agent, 99, 100) is True
    assert agent.verdict_due is True


def test_after_the_verdict_wait_reports_past_the_threshold_are_routine() -> None:
    """A held recycle is looked at again with the batched reports, not once per task."""
    agent = _agent(100)
    assert _ends(agent, 99, 101) is True
    agent.await_verdict()  # the daemon held it: the wait runs out
    assert [_ends(agent, 101 + n, 102 + n) for n in range(5)] == [False] * 5


def test_predictive_recycling_rings_once_when_the_next_tasks_would_cross() -> None:
    """With a look-ahead of two tasks of 2 MiB, 97 MiB against 100 MiB is near enough."""
    agent = _agent(100, ahead=2)
    assert _ends(agent, 93, 95) is False  # 95 + 2 * 2 < 100
    assert _ends(agent, 95, 97) is True  # 97 + 2 * 2 >= 100
    assert agent.verdict_due is False  # not crossed yet: nothing to wait for
    assert _ends(agent, 97, 98) is False  # rang already for the prediction
    assert _ends(agent, 98, 100) is True  # the crossing itself still rings


def test_without_a_published_soft_limit_nothing_rings() -> None:
    agent = _agent(0)
    assert _ends(agent, 1000, 2000) is False
