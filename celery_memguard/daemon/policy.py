"""The pure recycle policy: a snapshot and the config in, decisions out.

No clock, no I/O: ``now`` and the recent request times are arguments, so every rule here is
tested with tables. The supervisor has the decisions carried out (actions.py).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence

from celery_memguard.daemon import container_policy
from celery_memguard.daemon.config import LimitsConfig, RecycleConfig
from celery_memguard.daemon.decision import Decision, Hold, Reason
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.snapshot import Child, Snapshot, Worker
from celery_memguard.protocol import rules

RATE_WINDOW = 60.0
_GRACED_BY_THEIR_OWN = (Reason.WORKER_TOTAL, Reason.CONTAINER)  # their clocks, not the child's


def threshold_of(limits: LimitsConfig, recycle: RecycleConfig, proc: ProcId, pool: int) -> int:
    """The soft limit lowered by this child's stable share of its pool's jitter (``pool``: the
    worker's Worker.threshold_pool, 0 when unknown), never raised above it: rules.child_threshold,
    which the child's agent computes too."""
    return rules.child_threshold(limits.soft, recycle.jitter, recycle.max_share, pool,
                                 proc.pid, proc.start)


def measured(child: Child, measure: str) -> int:
    """The figure the limits compare: USS/PSS when configured and sampled, else RSS.

    RSS is an upper bound of both, so a child whose dear figure was not sampled (because its
    RSS is under the limit) is compared by RSS and is correctly under.
    """
    if measure == "uss" and child.uss is not None:
        return child.uss
    if measure == "pss" and child.pss is not None:
        return child.pss
    return child.rss


def share_cap(worker: Worker, recycle: RecycleConfig) -> int:
    """How many children of this pool may be asked to recycle and still be running at once."""
    return rules.at_once(recycle.max_share, max(worker.concurrency, len(worker.children), 1))


def decide(
    snapshot: Snapshot,
    limits: LimitsConfig | Callable[[str], LimitsConfig],
    recycle: RecycleConfig,
    requests: Mapping[str, Sequence[float]],
    now: float,
    term_grace: float = 1.0,
) -> list[Decision]:
    """Return the recycles to request now and the holds that explain the others.

    ``requests`` holds the times of recent recycle requests per worker name (rate limit);
    ``term_grace`` is how long a SIGTERM gets before SIGKILL (the daemon passes one tick).
    """
    decisions: list[Decision] = []
    restarting = sum(1 for w in snapshot.workers if w.restart_sent is not None)
    for worker in snapshot.workers:
        limits_of = limits if isinstance(limits, LimitsConfig) else limits(worker.name)
        recent = requests.get(worker.name, ())
        if not worker.has_children:
            whole = _decide_whole(worker, limits_of, recycle, recent, now, restarting)
            restarting += sum(1 for d in whole if d.acts and worker.restart_sent is None)
            decisions.extend(whole)
            continue
        decisions.extend(_kills(worker, limits_of, now, term_grace))
        interrupts = container_policy.interrupt(worker, limits_of,
                                                [c for c in worker.children if _available(c)])
        decisions.extend(interrupts)
        decisions.extend(_decide_worker(worker, limits_of, recycle, recent, now,
                                        container=not interrupts))
    return decisions


def _decide_whole(worker: Worker, limits: LimitsConfig, recycle: RecycleConfig,
                  recent: Sequence[float], now: float, restarting: int) -> list[Decision]:
    """A pool without children (solo, threads, gevent, eventlet) is one unit: past soft it gets
    a warm shutdown (SIGTERM: running tasks finish), past hard a cold one (SIGQUIT); its process
    manager starts it again. Opt-in per worker, one restart per host at a time, so the workers
    of a host never all stop together."""
    soft = threshold_of(limits, recycle, worker.proc, 0)  # workers of a host: full jitter
    if worker.rss >= limits.hard:
        signum, threshold, reason = signal.SIGQUIT, limits.hard, Reason.HARD
    elif worker.rss >= soft:
        signum, threshold, reason = signal.SIGTERM, soft, Reason.SOFT
    else:
        return []
    if worker.restart_sent in (signum, signal.SIGQUIT):
        return []  # already sent this level (or the stronger one)
    hold = None
    if not (worker.agent and worker.restartable):
        hold = Hold.NOT_OPTED_IN
    elif worker.restart_sent is None and restarting > 0:
        hold = Hold.HOST_RESTARTING
    elif worker.restart_sent is None and (
            sum(1 for t in recent if now - t < RATE_WINDOW) >= recycle.max_per_minute):
        hold = Hold.RATE_LIMIT
    return [Decision(worker=worker.name, worker_pid=worker.pid, index=-1, proc=worker.proc,
                     ppid=0, measured=worker.rss, threshold=threshold, reason=reason, hold=hold,
                     signal=int(signum), whole=True)]


def _kills(worker: Worker, limits: LimitsConfig, now: float, term_grace: float) -> list[Decision]:
    """The last resort, outside every rate limit: a child still above the hard limit
    ``kill_after`` after it crossed it (stuck in C code, or swallowing the interrupt) gets
    SIGTERM, and SIGKILL one grace period later. Only children whose agent has spoken."""
    if not (worker.agent and worker.recycle_signal):
        return []
    decisions = []
    for child in worker.children:
        if not child.agent or child.over_hard_since is None or child.killed_at is not None:
            continue
        if child.terminated_at is None:
            if now - child.over_hard_since < limits.kill_after:
                continue
            signum = signal.SIGTERM
        elif now - child.terminated_at >= term_grace:
            signum = signal.SIGKILL
        else:
            continue
        decisions.append(Decision(
            worker=worker.name, worker_pid=worker.pid, index=child.index, proc=child.proc,
            ppid=child.ppid, measured=child.rss, threshold=limits.hard, reason=Reason.KILL,
            signal=int(signum)))
    return decisions


def _decide_worker(
    worker: Worker,
    limits: LimitsConfig,
    recycle: RecycleConfig,
    recent: Sequence[float],
    now: float,
    container: bool = True,
) -> list[Decision]:
    """``container``: also the container's soft line (not while a task is being interrupted
    for its hard line: one container action at a time)."""
    candidates = (_over_soft(worker, limits, recycle)
                  or _over_worker_total(worker, limits, recycle, now)
                  or (container_policy.candidates(worker, limits, recycle, now,
                                                  [c for c in worker.children if _available(c)])
                      if container else []))
    if not candidates:
        return []
    in_flight, serving, used = _room(worker, recent, now)
    cap = share_cap(worker, recycle)
    decisions = []
    for child, value, threshold, reason in candidates:
        grown = rules.grown(child.tasks, child.rss, worker.fresh_rss, limits.soft)
        hold = None
        if not (worker.agent and child.agent and worker.recycle_signal):
            hold = Hold.NO_AGENT
        elif reason not in _GRACED_BY_THEIR_OWN and not _graced(child, recycle, now):
            hold = Hold.GRACE
        elif child.tasks == 0 and value < limits.hard:
            hold = Hold.FRESH
        elif child.born is not None and rules.too_young(now - child.born, recycle.min_lifetime,
                                                        child.rss, limits.hard):
            hold = Hold.MIN_LIFETIME
        elif rules.max_tasks_soon(child.tasks, worker.max_tasks, recycle.skip_within_tasks):
            hold = Hold.MAX_TASKS_SOON
        elif serving - 1 < recycle.min_serving:
            hold = Hold.FLOOR
        elif in_flight >= cap:
            hold = Hold.SHARE_CAP
        elif used >= recycle.max_per_minute and not grown:  # the rate is for storms
            hold = Hold.RATE_LIMIT
        else:
            in_flight += 1
            used += 0 if grown else 1
            serving -= 1
        decisions.append(Decision(
            worker=worker.name, worker_pid=worker.pid, index=child.index, proc=child.proc,
            ppid=child.ppid, measured=value, threshold=threshold, reason=reason, hold=hold,
            signal=worker.recycle_signal,
        ))
    return decisions


def grant_sizes(snapshot: Snapshot, limits: LimitsConfig | Callable[[str], LimitsConfig],
           recycle: RecycleConfig, requests: Mapping[str, Sequence[float]], now: float,
           decisions: Sequence[Decision] = ()) -> dict[str, int]:
    """Per worker, how many children may recycle themselves past their soft threshold before
    the daemon looks again (protocol.grants): what the rate limit, the share cap and the floor leave
    once ``decisions`` (just taken) are carried out. The per-child holds (fresh, too young,
    --max-tasks-per-child soon) the child applies itself, with the same rules. None where the
    soft limit compares USS or PSS, which a child does not read."""
    out: dict[str, int] = {}
    for worker in snapshot.workers:
        limits_of = limits if isinstance(limits, LimitsConfig) else limits(worker.name)
        if (recycle.dry_run or limits_of.measure != "rss" or not worker.has_children
                or not (worker.agent and worker.recycle_signal)):
            out[worker.name] = 0
            continue
        acting = sum(1 for d in decisions if d.worker == worker.name and d.acts
                     and not d.whole and d.reason is not Reason.KILL)
        in_flight, serving, used = _room(worker, requests.get(worker.name, ()), now)
        out[worker.name] = max(0, min(recycle.max_per_minute - used - acting,
                                      share_cap(worker, recycle) - in_flight - acting,
                                      serving - acting - recycle.min_serving))
    return out


def _room(worker: Worker, recent: Sequence[float], now: float) -> tuple[int, int, int]:
    """(asked and still running their last task, serving, requests in the rate window): what
    the share cap, the floor and the rate limit are measured against, by decide and grants."""
    in_flight = sum(1 for c in worker.children if c.requested_at is not None and not c.leaving)
    serving = sum(1 for c in worker.children if _available(c))
    used = sum(1 for t in recent if now - t < RATE_WINDOW)
    return in_flight, serving, used


def _graced(child: Child, recycle: RecycleConfig, now: float) -> bool:
    """A task-end report acts at once; a tick sample only once it has lasted recycle.grace."""
    if child.reported_end:
        return True
    return child.over_soft_since is not None and now - child.over_soft_since >= recycle.grace


def _available(child: Child) -> bool:
    """Not already on its way out (asked, leaving, noted by a dry run, or being killed)."""
    return not (child.requested_at is not None or child.leaving or child.noted
                or child.terminated_at is not None)


def _over_soft(worker: Worker, limits: LimitsConfig,
               recycle: RecycleConfig) -> list[tuple[Child, int, int, Reason]]:
    over = []
    for child in worker.children:
        if not _available(child) or child.task is not None:
            # A busy child is judged on the RSS its task leaves behind, reported at the task's
            # end: memory a task takes and frees before it returns is no reason to recycle.
            continue
        threshold = threshold_of(limits, recycle, child.proc, worker.threshold_pool)
        value = measured(child, limits.measure)
        if value >= threshold:
            over.append((child, value, threshold, Reason.SOFT))
        elif recycle.predictive and rules.predicts_crossing(
                value, child.growth_per_task, recycle.predictive_tasks, threshold):
            over.append((child, value, threshold, Reason.PREDICTED))
    over.sort(key=lambda item: item[1], reverse=True)
    return over


def worker_total(worker: Worker) -> int:
    """The sum the worker-wide limit compares: USS where sampled (RSS counts shared pages twice)."""
    return sum(c.uss if c.uss is not None else c.rss for c in worker.children)


def _over_worker_total(worker: Worker, limits: LimitsConfig, recycle: RecycleConfig,
                       now: float) -> list[tuple[Child, int, int, Reason]]:
    """Past limits.worker_total for recycle.grace: the largest child goes first, one at a time,
    since each recycle frees a child's worth and the sum is looked at again on the next tick."""
    if limits.worker_total is None or any(
            c.requested_at is not None and not c.leaving for c in worker.children):
        return []
    if worker.total_over_since is None or now - worker.total_over_since < recycle.grace:
        return []
    total = worker_total(worker)
    if total < limits.worker_total:
        return []
    available = [c for c in worker.children if _available(c)]
    if not available:
        return []
    largest = max(available, key=lambda c: c.uss if c.uss is not None else c.rss)
    return [(largest, total, limits.worker_total, Reason.WORKER_TOTAL)]


def new_storms(snapshot: Snapshot, limits_for: Callable[[str], LimitsConfig],
               recycle: RecycleConfig, storming: set[str]) -> list[Worker]:
    """The workers whose every child is now over its soft threshold, and were not before
    (``storming``, kept by the caller, is updated): the limit is likely too low. Recycling
    goes on at the rate limit; a storm is said once, until the pool calms down."""
    started: list[Worker] = []
    for worker in snapshot.workers:
        if not worker.has_children:
            storming.discard(worker.name)
            continue
        if not worker.children:
            continue  # between recycles and their replacements: not a pool that calmed down
        limits = limits_for(worker.name)
        over = [c for c in worker.children if measured(c, limits.measure)
                >= threshold_of(limits, recycle, c.proc, worker.threshold_pool)]
        if len(over) < len(worker.children):
            storming.discard(worker.name)
        elif worker.name not in storming:
            storming.add(worker.name)
            started.append(worker)
    return started
