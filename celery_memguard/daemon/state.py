"""What the daemon knows: workers, their pool children, counters. No I/O.

The supervisor feeds it agent messages (reports.py folds them in) and process-table
readings, and asks it for immutable snapshots that the policy decides on and the metrics
render. A restart rebuilds it from a scan and from the
agents' periodic hellos; the counters restart, as Prometheus counters may.
"""

from __future__ import annotations

import signal
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable

from celery_memguard.daemon.leak_trend import recommend_max_tasks, seconds_to_limit, tasks_to_limit
from celery_memguard.daemon.readings import FoundWorker, ProcId, ProcStat
from celery_memguard.daemon.records import BoundedNames, ChildRec, WorkerRec
from celery_memguard.daemon.snapshot import Child, Leak, Snapshot, Worker
from celery_memguard.daemon.task_growth import TaskGrowth
from celery_memguard.protocol import hooks, quarantine, rules
from celery_memguard.protocol.oom import OomLedger
from celery_memguard.protocol.quarantine import Entry

StatFn = Callable[[int], ProcStat | None]
LimitsFn = Callable[[str], tuple[int, int]]


class State:
    """The registry of supervised workers; ``stat`` looks a pid up in the process table."""

    def __init__(self, stat: StatFn, limits: LimitsFn | None = None, jitter: float = 0.0,
                 max_share: float | None = None,
                 max_task_names: int = 50,
                 age: Callable[[ProcId], float | None] | None = None,
                 wall: Callable[[], float] = lambda: 0.0) -> None:
        self.stat = stat
        self.wall = wall  # the wall clock, for what is shown with a date (quarantines)
        self._age = age or (lambda proc: None)  # seconds a process has lived, where known
        # (soft, hard) bytes for a worker name: the over-soft and over-hard clocks, time to the
        # soft limit and the max-tasks advice are measured against them
        self.limits: LimitsFn = limits or (lambda name: (0, 0))
        self.jitter = jitter
        self.max_share = max_share  # with the pool size, whether the jitter applies (rules)
        self.workers: dict[int, WorkerRec] = {}
        self.recycles: Counter[tuple[str, str]] = Counter()  # (worker, reason)
        self.dry_run_recycles: Counter[tuple[str, str]] = Counter()
        self.interrupted: Counter[tuple[str, str, str]] = Counter()  # (worker, task, reason)
        self.oom_kills: Counter[tuple[str, str]] = Counter()  # (worker, task); task "" unknown
        self.oom = OomLedger()  # the kernel's OOM kill counters, matched to dead children
        self.holds: Counter[tuple[str, str]] = Counter()  # (worker, outcome): room, gave_up
        self.needs: dict[str, int] = {}  # task name -> most a run raised a child's RSS
        self.hold_seconds: defaultdict[str, float] = defaultdict(float)  # by worker
        self.stalls: Counter[str] = Counter()  # memory stall triggers fired, by worker
        self.quarantine_after = 0  # incidents that quarantine a task id (0: off)
        self.incidents: OrderedDict[str, tuple[str, int, int]] = OrderedDict()  # id -> (task,
        # OOM kills, interrupts) of the task ids that were running at one
        self.quarantined: dict[str, Entry] = {}  # the task ids no child may run again
        self.quarantine_revision = 0
        self.restarts: Counter[tuple[str, str]] = Counter()  # whole workers, (worker, reason)
        self.messages: Counter[str] = Counter()  # by message type
        self.dropped: Counter[str] = Counter()  # by reason
        self.requests: dict[str, deque[float]] = {}  # recent recycle requests per worker name
        self.task_names = BoundedNames(max_task_names)
        self.growth: dict[str, TaskGrowth] = {}  # by bounded task name
        self.events: list[tuple[str, dict[str, object]]] = []  # for the daemon to log
        self.revision = 0  # counts recycles the children did on their own: the view is stale
        self.gone: OrderedDict[int, tuple[str, ChildRec]] = OrderedDict()  # recent exits
        self.sigkilled: OrderedDict[int, float] = OrderedDict()  # pids we sent SIGKILL

    def incident(self, task_id: str | None, task: str | None, oom: int, interrupt: int,
                 wall: float) -> None:
        """Task ``task_id`` was running at an OOM kill or a memory interrupt of its process;
        at ``quarantine_after`` of them it is quarantined."""
        if not task_id or task is None or task_id in self.quarantined:
            return
        _, ooms, interrupts = self.incidents.pop(task_id, (task, 0, 0))
        ooms, interrupts = ooms + oom, interrupts + interrupt
        self.incidents[task_id] = (task, ooms, interrupts)
        if len(self.incidents) > 4096:
            self.incidents.popitem(last=False)
        if 0 < self.quarantine_after <= ooms + interrupts:
            self.quarantined[task_id] = Entry(task, ooms, interrupts, wall)
            while len(self.quarantined) > quarantine.MAX_ENTRIES:
                del self.quarantined[next(iter(self.quarantined))]
            self.quarantine_revision += 1
            self.events.append(("task_quarantined", {
                "task": task, "task_id": task_id, "oom_kills": ooms, "interrupts": interrupts,
                "after": self.quarantine_after}))

    def observe(self, worker: WorkerRec, child: ChildRec, rss: int, now: float,
                end: bool = False) -> None:
        """A fresh RSS reading (``end``: from a task-end report); keeps the clocks of how long
        the child has been over its soft threshold and over the hard limit."""
        child.rss = rss
        child.reported_end = end
        hard = self.limits(worker.name or "")[1]
        threshold = self._threshold(worker, child)
        if 0 < threshold <= rss:
            if child.over_soft_since is None:
                child.over_soft_since = now
        else:
            child.over_soft_since = None
        if 0 < hard < rss:
            if child.over_hard_since is None:
                child.over_hard_since = now
        else:
            child.over_hard_since = None

    def _threshold(self, worker: WorkerRec, child: ChildRec) -> int:
        soft = self.limits(worker.name or "")[0]
        return rules.child_threshold(soft, self.jitter, self.max_share,
                                     worker.jitter_pool or worker.concurrency,
                                     child.proc.pid, child.proc.start)

    def unique_name(self, name: str, pid: int) -> str:
        """Two workers must not share a label set: a clash gets the pid appended."""
        for other_pid, other in self.workers.items():
            if other_pid != pid and other.name == name:
                return f"{name}#{pid}"
        return name

    # -- process-table readings --------------------------------------------------------------

    def found(self, found: FoundWorker, now: float | None = None) -> WorkerRec:
        """A worker seen by the scan: known ones keep their agent data; new ones are observe-only.
        ``now`` dates its new children (``born``); without it their age is unknown."""
        rec = self.workers.get(found.stat.pid)
        if rec is not None and rec.proc != found.stat.proc:
            rec = None  # the pid was reused by another worker
        if rec is None:
            rec = self.workers[found.stat.pid] = WorkerRec(proc=found.stat.proc, name=None)
        if rec.name is None:
            rec.name = self.unique_name(found.name, found.stat.pid)
        if not rec.agent:
            rec.concurrency = len(found.children)
        self.sync_children(rec, found.children, now)
        return rec

    def sync_children(self, rec: WorkerRec, stats: list[ProcStat] | tuple[ProcStat, ...],
                      now: float | None = None) -> list[ChildRec]:
        """Make the worker's children those the process table lists (with identities, as the
        scan reads them); return the ones gone."""
        live = {s.pid: s for s in stats}
        gone = [c for pid, c in rec.children.items() if pid not in live or live[pid].proc != c.proc]
        return self._replace_children(rec, gone, live, now)

    def sync_child_pids(self, rec: WorkerRec, pids: list[int],
                        now: float | None = None) -> list[ChildRec]:
        """The tick's cheaper form: known pids keep their identity (every signal re-checks it),
        only new pids are looked up (``now`` dates them, ``_born``); return those gone."""
        listed = set(pids)
        gone = [c for pid, c in rec.children.items() if pid not in listed]
        live: dict[int, ProcStat] = {}
        for pid in listed - rec.children.keys():
            stat = self.stat(pid)
            if stat is not None and stat.ppid == rec.proc.pid:
                live[pid] = stat
        return self._replace_children(rec, gone, live, now)

    def _replace_children(self, rec: WorkerRec, gone: list[ChildRec],
                          new: dict[int, ProcStat], now: float | None = None) -> list[ChildRec]:
        for child in gone:
            del rec.children[child.proc.pid]
            self.gone[child.proc.pid] = (rec.name or "", child)
            if len(self.gone) > 256:
                self.gone.popitem(last=False)
        for pid, stat in new.items():
            if pid not in rec.children:
                index = rec.kid_index.get(pid)
                if index is None and not rec.agent:
                    index = _free_slot(rec)
                rec.children[pid] = ChildRec(
                    proc=stat.proc, ppid=rec.proc.pid, index=index,
                    born=None if now is None else self.born(stat.proc, now))
        return gone

    def born(self, proc: ProcId, now: float) -> float:
        """When a child started, on the daemon's clock: from its age where the process table
        tells it (so a restarted daemon does not take old children for young), else now."""
        age = self._age(proc)
        return now if age is None else now - age

    def name_unannounced(self, now: float, after: float) -> list[WorkerRec]:
        """The workers known only from their children's reports ``after`` seconds on (a hello
        would have come by then): each is marked as missing its hello, and those whose
        children gave no nodename either are named by their pid, so that they are shown and
        supervised rather than hidden. Returns those named."""
        named = []
        for pid, rec in self.workers.items():
            if rec.announced or rec.first_report is None or now - rec.first_report < after:
                continue
            rec.hello_overdue = True
            if rec.name is None:
                rec.name = self.unique_name(f"pid-{pid}", pid)
                named.append(rec)
        return named

    def drop_worker(self, pid: int) -> WorkerRec | None:
        return self.workers.pop(pid, None)

    # -- decisions taken -----------------------------------------------------------------------

    def requested(self, worker: str, pid: int, now: float) -> None:
        """A recycle request was delivered to this child."""
        child = self._child_named(worker, pid)
        if child is not None:
            child.requested_at = now
        self.count_request(worker, child, now)

    def noted(self, worker: str, pid: int, now: float) -> None:
        """A dry run counted this child: the same rate limit applies, the child stays."""
        child = self._child_named(worker, pid)
        if child is not None:
            child.noted = True
        self.count_request(worker, child, now)

    def count_request(self, worker: str, child: ChildRec | None, now: float) -> None:
        """A recycle towards the worker's rate limit, unless the child grew to its limit over
        many tasks (rules.grown: a leak, not a storm), which the rate limit does not hold."""
        if child is not None:
            rec = self.workers.get(child.ppid)
            fresh = rec.fresh_median if rec is not None else None
            if rules.grown(child.tasks, child.rss, fresh, self.limits(worker)[0]):
                return
        self.requests.setdefault(worker, deque(maxlen=1024)).append(now)

    def signalled(self, worker: str, pid: int, signum: int, now: float) -> None:
        """Kill escalation: remember SIGTERM/SIGKILL so we neither repeat nor count it as OOM."""
        child = self._child_named(worker, pid)
        if child is None:
            return
        if signum == signal.SIGKILL:
            child.killed_at = now
            self.sigkilled[pid] = now
            if len(self.sigkilled) > 256:
                self.sigkilled.popitem(last=False)
        else:
            child.terminated_at = now

    def worker_signalled(self, pid: int, signum: int, now: float) -> None:
        """A whole-worker restart was sent to this main process."""
        rec = self.workers.get(pid)
        if rec is not None:
            rec.restart_sent, rec.restart_at = signum, now
            if rec.name is not None:
                self.requests.setdefault(rec.name, deque(maxlen=1024)).append(now)

    def task_killed(self, worker: str, pid: int) -> tuple[str | None, str | None]:
        """Count the task a child was running when kill escalation hit it; (name, id)."""
        child = self._child_named(worker, pid)
        if child is None or child.task is None:
            return None, None
        self.interrupted[(worker, self.task_names.label(child.task), "kill")] += 1
        return child.task, child.task_id

    def _child_named(self, worker: str, pid: int) -> ChildRec | None:
        for rec in self.workers.values():
            if rec.name == worker and pid in rec.children:
                return rec.children[pid]
        return None

    # -- views -------------------------------------------------------------------------------

    def assess_trends(self) -> None:
        """Mark the children whose trend is a leak (once a tick): the USS sampler reads a
        leaking child now and then, between ticks too."""
        for rec in self.workers.values():
            for child in rec.children.values():
                child.leaking = child.history.trend().leaking

    def snapshot(self, now: float, only: WorkerRec | None = None, trends: bool = False) -> Snapshot:
        """Immutable views; ``trends`` computes each child's leak trend (the tick does, once per
        new sample; the per-report decision does not need it)."""
        recs = [only] if only is not None else list(self.workers.values())
        return Snapshot(taken_at=now, workers=tuple(
            _worker_view(rec, self.limits(rec.name)[0] if trends else None)
            for rec in recs if rec.name is not None
        ))


def _free_slot(rec: WorkerRec) -> int:
    used = {c.index for c in rec.children.values()}
    slot = 0
    while slot in used:
        slot += 1
    return slot


def _worker_view(rec: WorkerRec, soft: int | None) -> Worker:
    assert rec.name is not None
    children = []
    for c in sorted(rec.children.values(), key=lambda c: c.index or 0):
        if c.index is None:
            continue
        leak = None
        if soft is not None:
            trend = c.history.trend()  # cached until the child's next sample
            if trend.samples >= 8:
                leak = Leak(trend=trend, tasks_to_soft=tasks_to_limit(trend, c.rss, soft),
                            seconds_to_soft=seconds_to_limit(trend, c.rss, soft))
        children.append(Child(
            worker=rec.name, index=c.index, proc=c.proc, ppid=c.ppid, rss=c.rss, uss=c.uss,
            pss=c.pss, tasks=c.tasks, task=c.task,
            agent=c.agent and not hooks.BLOCK_RECYCLE.intersection(c.missing),
            requested_at=c.requested_at,
            noted=c.noted, leaving=c.leaving, over_hard_since=c.over_hard_since,
            terminated_at=c.terminated_at, killed_at=c.killed_at,
            reported_end=c.reported_end, over_soft_since=c.over_soft_since, born=c.born,
            growth_per_task=rules.growth_per_task(c.growth), leak=leak, rest_rss=c.rest_rss))
    recommended = None
    fresh = rec.fresh_median
    if soft is not None:
        rates = [c.leak.trend.bytes_per_task for c in children if c.leak and c.leak.trend.leaking]
        if rates and fresh is not None:
            recommended = recommend_max_tasks(max(rates), fresh, soft)
    return Worker(name=rec.name, proc=rec.proc, pool=rec.pool, concurrency=rec.concurrency,
                  max_tasks=rec.max_tasks, max_memory_kib=rec.max_memory_kib, agent=rec.agent,
                  recycle_signal=rec.recycle_signal, rss=rec.rss, children=tuple(children),
                  restartable=rec.restartable, restart_sent=rec.restart_sent,
                  restart_at=rec.restart_at, recommended_max_tasks=recommended,
                  total_over_since=rec.total_over_since,
                  fresh_rss=fresh,
                  container=rec.container_reading,
                  container_over_since=rec.container_over_since,
                  jitter_pool=rec.jitter_pool, max_concurrency=rec.max_concurrency,
                  missing=_missing(rec), versions=rec.versions, socket=rec.socket,
                  may_signal=rec.may_signal)


def _missing(rec: WorkerRec) -> tuple[str, ...]:
    """The hooks a worker's agents could not join: its main process's, its children's, and the
    hello itself where its children speak and its main process never did."""
    if not rec.agent:
        return ()
    found = set(rec.missing)
    for child in rec.children.values():
        found.update(child.missing)
    if rec.hello_overdue and not rec.announced:  # not while a worker starts: its hello is due
        found.add(hooks.HELLO)
    return tuple(sorted(found))
