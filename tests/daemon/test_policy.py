"""The pure recycle policy: who is recycled, who is held and why."""

from __future__ import annotations

import signal

import pytest

from celery_memguard.daemon import policy
from celery_memguard.daemon.decision import Hold, Reason
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.snapshot import Worker
from tests.builders import MiB, child, limits, recycle, snapshot, worker


def test_children_under_the_soft_limit_are_left_alone() -> None:
    snap = snapshot(worker(child(0, 99), child(1, 50)))
    assert policy.decide(snap, limits(), recycle(), {}, now=0.0) == []


def test_a_child_over_the_soft_limit_is_recycled_with_its_figures() -> None:
    snap = snapshot(worker(child(0, 101), child(1, 50)))
    [decision] = policy.decide(snap, limits(), recycle(), {}, now=0.0)
    assert decision.acts
    assert decision.reason is Reason.SOFT
    assert (decision.index, decision.proc, decision.ppid) == (0, ProcId(100, 1000), 10)
    assert decision.measured == 101 * MiB
    assert decision.threshold == 100 * MiB
    assert decision.signal == 38
    assert decision.worker_pid == 10


def test_a_busy_child_over_soft_waits_for_its_task_end_report() -> None:
    """Mid-task RSS can be a spike the task frees; the end-of-task figure decides."""
    snap = snapshot(worker(child(0, 150, task="app.report")))
    assert policy.decide(snap, limits(), recycle(), {}, now=0.0) == []
    done = snapshot(worker(child(0, 150, task=None)))
    [decision] = policy.decide(done, limits(), recycle(), {}, now=0.0)
    assert decision.acts


def test_jitter_lowers_each_threshold_stably_and_never_raises_it() -> None:
    procs = [ProcId(pid, 5) for pid in range(1000, 1200)]
    thresholds = [policy.threshold_of(limits(), recycle(jitter=0.1), p, 8) for p in procs]
    assert all(90 * MiB <= t <= 100 * MiB for t in thresholds)
    assert len(set(thresholds)) > 150  # spread, not lock-step
    again = [policy.threshold_of(limits(), recycle(jitter=0.1), p, 8) for p in procs]
    assert again == thresholds


@pytest.mark.parametrize(("share", "pool", "jittered"), [
    (0.5, 2, False), (0.5, 3, False), (0.5, 4, True), (0.5, 16, True),
    (1.0, 2, True), (1.0, 1, False), (0.25, 7, False), (0.25, 8, True),
    (0.5, 0, True),  # the pool size is unknown: the full jitter
])
def test_jitter_applies_only_where_two_children_may_recycle_at_once(
        share: float, pool: int, jittered: bool) -> None:
    """Children of a pool that recycles one child at a time cannot recycle together: the
    jitter would only lower their thresholds."""
    procs = [ProcId(pid, 5) for pid in range(1000, 1050)]
    config = recycle(jitter=0.1, max_share=share)
    thresholds = {policy.threshold_of(limits(), config, p, pool) for p in procs}
    assert (thresholds != {100 * MiB}) is jittered
    assert all(90 * MiB <= t <= 100 * MiB for t in thresholds)


def test_a_pool_that_recycles_one_at_a_time_is_judged_at_the_limit_itself() -> None:
    """At concurrency 2 and the default share, a child 1 MiB under the limit stays; the same
    child in a pool of 8 is over its jittered threshold."""
    config = recycle(jitter=0.1)
    over = 99 * MiB  # the child below
    pid = next(p for p in range(1000, 2000)
               if policy.threshold_of(limits(), config, ProcId(p, 5), 8) < over)
    two = snapshot(worker(child(0, 99, proc=ProcId(pid, 5)), concurrency=2))
    assert policy.decide(two, limits(), config, {}, now=0.0) == []
    eight = snapshot(worker(child(0, 99, proc=ProcId(pid, 5)), concurrency=8))
    [decision] = policy.decide(eight, limits(), config, {}, now=0.0)
    assert decision.acts


def test_children_already_asked_leaving_or_noted_are_not_asked_again() -> None:
    snap = snapshot(worker(child(0, 150, requested_at=1.0), child(1, 150, leaving=True),
                           child(2, 150, noted=True), concurrency=8))
    assert policy.decide(snap, limits(), recycle(), {}, now=2.0) == []


def test_a_worker_without_agent_is_held_observe_only() -> None:
    snap = snapshot(worker(child(0, 150, agent=False), agent=False, recycle_signal=None))
    [decision] = policy.decide(snap, limits(), recycle(), {}, now=0.0)
    assert decision.hold is Hold.NO_AGENT
    assert not decision.acts


def test_a_child_whose_agent_never_spoke_is_held() -> None:
    snap = snapshot(worker(child(0, 150, agent=False)))
    [decision] = policy.decide(snap, limits(), recycle(), {}, now=0.0)
    assert decision.hold is Hold.NO_AGENT


def test_max_tasks_per_child_that_will_recycle_soon_is_left_to_do_it() -> None:
    snap = snapshot(worker(child(0, 150, tasks=98), child(1, 150, tasks=97), max_tasks=100,
                           concurrency=4))
    first, second = policy.decide(snap, limits(), recycle(skip_within_tasks=2), {}, now=0.0)
    assert first.hold is Hold.MAX_TASKS_SOON
    assert second.acts


def test_the_share_cap_holds_the_rest_of_a_pool_and_takes_the_largest_first() -> None:
    snap = snapshot(worker(*(child(i, 110 + i) for i in range(4)), concurrency=4))
    decisions = policy.decide(snap, limits(), recycle(max_share=0.5), {}, now=0.0)
    acting = [d.index for d in decisions if d.acts]
    held = [(d.index, d.hold) for d in decisions if not d.acts]
    assert acting == [3, 2]
    assert held == [(1, Hold.SHARE_CAP), (0, Hold.SHARE_CAP)]


def test_children_still_running_after_a_request_count_against_the_share_cap() -> None:
    snap = snapshot(worker(child(0, 150, requested_at=0.5), child(1, 150), concurrency=2))
    [decision] = policy.decide(snap, limits(), recycle(max_share=0.5), {}, now=1.0)
    assert decision.hold is Hold.SHARE_CAP


def test_a_child_that_said_it_is_leaving_frees_its_place_under_the_cap() -> None:
    snap = snapshot(worker(child(0, 150, requested_at=0.5, leaving=True), child(1, 150)))
    [decision] = policy.decide(snap, limits(), recycle(max_share=0.5), {}, now=1.0)
    assert decision.acts


def test_the_share_cap_allows_at_least_one_child() -> None:
    snap = snapshot(worker(child(0, 150), concurrency=1))
    [decision] = policy.decide(snap, limits(), recycle(max_share=0.1), {}, now=0.0)
    assert decision.acts


def test_the_rate_limit_counts_requests_of_the_last_minute() -> None:
    snap = snapshot(worker(child(0, 150), concurrency=2))
    recent = {"w@h": [100.0, 130.0, 150.0]}
    [held] = policy.decide(snap, limits(), recycle(max_per_minute=3), recent, now=155.0)
    assert held.hold is Hold.RATE_LIMIT
    [acts] = policy.decide(snap, limits(), recycle(max_per_minute=3), recent, now=161.0)
    assert acts.acts


def test_uss_is_compared_when_configured_and_sampled() -> None:
    shared_heavy = child(0, 150, uss=80 * MiB)
    snap = snapshot(worker(shared_heavy))
    assert policy.decide(snap, limits(measure="uss"), recycle(), {}, now=0.0) == []
    [decision] = policy.decide(snap, limits(measure="rss"), recycle(), {}, now=0.0)
    assert decision.acts


def test_pss_falls_back_to_rss_when_not_sampled() -> None:
    snap = snapshot(worker(child(0, 150, pss=None)))
    [decision] = policy.decide(snap, limits(measure="pss"), recycle(), {}, now=0.0)
    assert decision.measured == 150 * MiB



def test_a_child_over_hard_gets_sigterm_only_after_kill_after() -> None:
    """Kill escalation waits kill_after from the crossing, then SIGTERM, outside rate limits."""
    over = child(0, 250, over_hard_since=100.0)
    snap = snapshot(worker(over))
    early = policy.decide(snap, limits(kill_after=10), recycle(max_per_minute=1),
                          {"w@h": [99.0]}, now=109.0)
    assert [d.reason for d in early] == [Reason.SOFT]  # soft held by the rate limit, no kill yet
    decisions = policy.decide(snap, limits(kill_after=10), recycle(max_per_minute=1),
                              {"w@h": [99.0]}, now=110.0)
    kills = [d for d in decisions if d.reason is Reason.KILL]
    assert [(k.signal, k.acts) for k in kills] == [(signal.SIGTERM, True)]


def test_sigkill_follows_sigterm_after_the_grace_and_only_once() -> None:
    termed = child(0, 250, over_hard_since=100.0, terminated_at=110.0)
    snap = snapshot(worker(termed))
    assert policy.decide(snap, limits(kill_after=10), recycle(), {}, now=110.5, term_grace=1.0) == []
    [kill] = policy.decide(snap, limits(kill_after=10), recycle(), {}, now=111.0, term_grace=1.0)
    assert kill.signal == signal.SIGKILL
    killed = child(0, 250, over_hard_since=100.0, terminated_at=110.0, killed_at=111.0)
    assert policy.decide(snapshot(worker(killed)), limits(kill_after=10), recycle(), {},
                         now=130.0) == []


def test_no_kill_for_a_child_without_agent_or_back_under_hard() -> None:
    silent = child(0, 250, over_hard_since=0.0, agent=False)
    assert [d for d in policy.decide(snapshot(worker(silent)), limits(), recycle(), {}, now=100.0)
            if d.reason is Reason.KILL] == []
    recovered = child(0, 150, over_hard_since=None)
    assert [d for d in policy.decide(snapshot(worker(recovered)), limits(), recycle(), {},
                                     now=100.0) if d.reason is Reason.KILL] == []


def test_worker_total_recycles_the_largest_child_by_uss() -> None:
    """The sum uses USS where sampled; the child holding most of its own memory goes first."""
    kids = [child(0, 95, uss=40 * MiB), child(1, 90, uss=70 * MiB), child(2, 80, uss=60 * MiB)]
    snap = snapshot(worker(*kids, concurrency=3))
    [decision] = policy.decide(snap, limits(worker_total="160MiB"), recycle(), {}, now=0.0)
    assert (decision.reason, decision.index, decision.acts) == (Reason.WORKER_TOTAL, 1, True)
    assert decision.measured == 170 * MiB
    assert decision.threshold == 160 * MiB


def test_worker_total_under_by_uss_does_nothing_although_rss_sums_over() -> None:
    kids = [child(0, 95, uss=40 * MiB), child(1, 90, uss=50 * MiB)]
    snap = snapshot(worker(*kids))
    assert policy.decide(snap, limits(worker_total="160MiB"), recycle(), {}, now=0.0) == []


def test_worker_total_waits_for_a_recycle_in_flight() -> None:
    kids = [child(0, 95, requested_at=1.0), child(1, 90), child(2, 90)]
    snap = snapshot(worker(*kids, concurrency=3))
    assert policy.decide(snap, limits(worker_total="160MiB"), recycle(max_share=1), {},
                         now=2.0) == []


def test_soft_recycles_come_before_the_worker_total() -> None:
    kids = [child(0, 120), child(1, 90)]
    snap = snapshot(worker(*kids))
    decisions = policy.decide(snap, limits(worker_total="160MiB"), recycle(), {}, now=0.0)
    assert [(d.reason, d.index) for d in decisions] == [(Reason.SOFT, 0)]


def whole(name: str = "solo@h", rss_mib: float = 50, pid: int = 30, **kw: object) -> Worker:
    values: dict[str, object] = {"pool": "thread", "restartable": True, "name": name,
                                 "proc": ProcId(pid, pid * 10), "rss": int(rss_mib * MiB)}
    values.update(kw)
    return worker(**values)


def test_a_pool_without_children_past_soft_gets_a_warm_shutdown() -> None:
    [d] = policy.decide(snapshot(whole(rss_mib=120)), limits(), recycle(), {}, now=0.0)
    assert (d.whole, d.acts, d.signal, d.reason, d.proc) == (
        True, True, signal.SIGTERM, Reason.SOFT, ProcId(30, 300))


def test_past_hard_it_gets_a_cold_shutdown_even_during_a_warm_one() -> None:
    [d] = policy.decide(snapshot(whole(rss_mib=250, restart_sent=signal.SIGTERM, restart_at=0.0)),
                        limits(), recycle(), {}, now=1.0)
    assert (d.signal, d.reason, d.acts) == (signal.SIGQUIT, Reason.HARD, True)
    assert policy.decide(snapshot(whole(rss_mib=250, restart_sent=signal.SIGQUIT)), limits(),
                         recycle(), {}, now=2.0) == []


def test_a_worker_not_opted_in_is_only_held() -> None:
    [d] = policy.decide(snapshot(whole(rss_mib=120, restartable=False)), limits(), recycle(), {},
                        now=0.0)
    assert d.hold is Hold.NOT_OPTED_IN


def test_only_one_worker_of_a_host_restarts_at_a_time() -> None:
    """Workers over the limit together are restarted one after the other, never all at once."""
    a, b = whole("a@h", 120, pid=30), whole("b@h", 130, pid=31)
    first, second = policy.decide(snapshot(a, b), limits(), recycle(), {}, now=0.0)
    assert first.acts
    assert second.hold is Hold.HOST_RESTARTING
    busy = whole("a@h", 120, pid=30, restart_sent=signal.SIGTERM, restart_at=0.0)
    [held] = policy.decide(snapshot(busy, b), limits(), recycle(), {}, now=1.0)
    assert (held.worker, held.hold) == ("b@h", Hold.HOST_RESTARTING)


def test_predictive_recycling_acts_before_the_next_tasks_would_cross() -> None:
    """Growing 2 MiB a task at 97 MiB: two more tasks reach 100 MiB, so it goes now."""
    growing = child(0, 97, growth_per_task=2 * MiB)
    [d] = policy.decide(snapshot(worker(growing)), limits(), recycle(predictive=True), {}, now=0.0)
    assert (d.reason, d.acts) == (Reason.PREDICTED, True)
    assert policy.decide(snapshot(worker(growing)), limits(), recycle(predictive=False), {},
                         now=0.0) == []
    assert policy.decide(snapshot(worker(child(0, 90, growth_per_task=2 * MiB))), limits(),
                         recycle(predictive=True), {}, now=0.0) == []


def test_predictive_recycling_ignores_children_that_do_not_grow() -> None:
    flat = child(0, 99, growth_per_task=0.0)
    assert policy.decide(snapshot(worker(flat)), limits(), recycle(predictive=True), {}, now=0.0) == []


def test_a_tick_sample_over_soft_waits_for_the_grace_a_task_end_report_does_not() -> None:
    sampled = child(0, 150, reported_end=False, over_soft_since=10.0)
    [early] = policy.decide(snapshot(worker(sampled)), limits(), recycle(grace=2), {}, now=11.0)
    assert early.hold is Hold.GRACE
    [late] = policy.decide(snapshot(worker(sampled)), limits(), recycle(grace=2), {}, now=12.0)
    assert late.acts
    reported = child(0, 150, reported_end=True, over_soft_since=11.9)
    [now] = policy.decide(snapshot(worker(reported)), limits(), recycle(grace=2), {}, now=12.0)
    assert now.acts


def test_a_fresh_child_over_soft_is_held_unless_past_hard() -> None:
    """A child that has run no task would be replaced by one as large: the limit is too low."""
    [held] = policy.decide(snapshot(worker(child(0, 150, tasks=0))), limits(), recycle(), {}, now=0.0)
    assert held.hold is Hold.FRESH
    [kill_or_recycle] = [d for d in policy.decide(snapshot(worker(child(0, 250, tasks=0))),
                                                  limits(), recycle(), {}, now=0.0)
                         if d.reason is Reason.SOFT]
    assert kill_or_recycle.acts


def test_min_serving_keeps_a_floor_of_serving_children() -> None:
    """With one child already leaving and a floor of one, the last serving child stays."""
    kids = [child(0, 150, requested_at=0.0, leaving=True), child(1, 150)]
    [held] = policy.decide(snapshot(worker(*kids)), limits(), recycle(min_serving=1, max_share=1),
                           {}, now=1.0)
    assert held.hold is Hold.FLOOR
    [acts] = policy.decide(snapshot(worker(*kids)), limits(), recycle(min_serving=0, max_share=1),
                           {}, now=1.0)
    assert acts.acts


def test_a_storm_recycles_at_the_rate_limit_and_never_below_the_floor() -> None:
    """Every child over the limit: at most max_per_minute requests, never below min_serving."""
    kids = [child(i, 150 + i) for i in range(8)]
    decisions = policy.decide(snapshot(worker(*kids, concurrency=8)), limits(),
                              recycle(max_per_minute=3, max_share=1, min_serving=6), {}, now=0.0)
    assert len([d for d in decisions if d.acts]) == 2  # 8 serving, floor 6
    decisions = policy.decide(snapshot(worker(*kids, concurrency=8)), limits(),
                              recycle(max_per_minute=3, max_share=1, min_serving=0), {}, now=0.0)
    assert len([d for d in decisions if d.acts]) == 3  # the rate limit


def test_a_child_younger_than_min_lifetime_is_held_unless_past_the_hard_limit() -> None:
    snap = snapshot(worker(child(0, 150, born=10.0), child(1, 250, born=10.0), concurrency=4))
    young = policy.decide(snap, limits(), recycle(min_lifetime=5), {}, now=12.0)
    assert [(d.index, d.hold) for d in young] == [(1, None), (0, Hold.MIN_LIFETIME)]
    grown = policy.decide(snap, limits(), recycle(min_lifetime=5), {}, now=15.0)
    assert [(d.index, d.hold) for d in grown] == [(1, None), (0, None)]


def test_min_lifetime_also_holds_the_worker_total() -> None:
    snap = snapshot(worker(child(0, 60, born=10.0), child(1, 60, born=10.0)))
    [held] = policy.decide(snap, limits(worker_total="100MiB"), recycle(min_lifetime=5), {},
                           now=12.0)
    assert (held.reason, held.hold) == (Reason.WORKER_TOTAL, Hold.MIN_LIFETIME)


def _grant(snap: object, now: float = 100.0, **kw: object) -> int:
    requests = kw.pop("requests", {})
    decisions = kw.pop("decisions", ())
    limits_of = kw.pop("limits", limits())
    [grant] = policy.grant_sizes(snap, limits_of, recycle(**kw), requests, now,  # type: ignore[arg-type]
                            decisions).values()  # type: ignore[arg-type]
    return grant


def test_the_grant_is_what_the_share_cap_leaves() -> None:
    """Half of a pool of four may be on its way out; one already is."""
    assert _grant(snapshot(worker(*(child(i) for i in range(4)), concurrency=4))) == 2
    asked = snapshot(worker(child(0, requested_at=99.0), *(child(i) for i in range(1, 4)),
                            concurrency=4))
    assert _grant(asked) == 1
    leaving = snapshot(worker(child(0, leaving=True), *(child(i) for i in range(1, 4)),
                              concurrency=4))
    assert _grant(leaving) == 2  # it finished its last task: no longer in flight


def test_the_grant_is_what_the_rate_limit_leaves() -> None:
    snap = snapshot(worker(*(child(i) for i in range(8)), concurrency=8))
    assert _grant(snap, requests={"w@h": [50.0, 60.0, 95.0]}, max_per_minute=4) == 1
    assert _grant(snap, requests={"w@h": [30.0, 60.0, 95.0, 99.0]}, max_per_minute=4) == 1
    assert _grant(snap, requests={"w@h": [60.0, 61.0, 95.0, 99.0]}, max_per_minute=4) == 0


def test_the_grant_is_what_the_floor_leaves() -> None:
    snap = snapshot(worker(child(0), child(1), child(2, leaving=True), concurrency=4))
    assert _grant(snap, min_serving=1) == 1
    assert _grant(snap, min_serving=2) == 0


def test_decisions_just_taken_count_against_the_grant() -> None:
    snap = snapshot(worker(*(child(i, 150) for i in range(4)), concurrency=4))
    decisions = policy.decide(snap, limits(), recycle(), {}, now=100.0)
    assert sum(d.acts for d in decisions) == 2
    assert _grant(snap, decisions=decisions) == 0


def test_no_grant_in_a_dry_run_or_for_a_worker_that_cannot_recycle() -> None:
    assert _grant(snapshot(worker(child(0), child(1))), dry_run=True) == 0
    assert _grant(snapshot(worker(child(0), child(1))), limits=limits(measure="uss")) == 0
    assert _grant(snapshot(worker(child(0), child(1), agent=False, recycle_signal=None))) == 0
    assert _grant(snapshot(worker(child(0), pool="solo"))) == 0


def test_the_rate_limit_holds_a_storm_not_a_child_that_grew_to_its_limit() -> None:
    """Past max_per_minute, a child that ran 20 tasks and grew at least half its way from a
    fresh child's size to the limit (a leak) is recycled all the same, and does not use up the
    rate; one over the limit after a few tasks, or over it from the start (a soft limit below a
    fresh child), is held."""
    recent = {"w@h": [100.0, 130.0, 150.0]}
    leaking = snapshot(worker(child(0, 101, tasks=40), child(1, 101, tasks=3),
                              child(2, 101, tasks=60), concurrency=8, fresh_rss=40 * MiB))
    grown, young, grown_too = policy.decide(leaking, limits(), recycle(max_per_minute=3, max_share=1),
                                            recent, now=155.0)
    assert (grown.acts, young.hold, grown_too.acts) == (True, Hold.RATE_LIMIT, True)
    storm = snapshot(worker(child(0, 101, tasks=40), concurrency=8, fresh_rss=120 * MiB))
    [held] = policy.decide(storm, limits(), recycle(max_per_minute=3), recent, now=155.0)
    assert held.hold is Hold.RATE_LIMIT
