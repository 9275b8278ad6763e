"""What the daemon knows: workers, their pool children, counters. No I/O.

The daemon feeds it agent messages (already decoded and checked against the sender's
credentials) and process-table readings, and asks it for immutable snapshots that the
policy decides on and the metrics render. A restart rebuilds it from a scan and from the
agents' periodic hellos; the counters restart, as Prometheus counters may.
"""

from __future__ import annotations

import signal
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from celery_memguard.daemon.leak_trend import (
    History,
    recommend_max_tasks,
    seconds_to_limit,
    tasks_to_limit,
)
from celery_memguard.daemon.readings import FoundWorker, ProcId, ProcStat
from celery_memguard.daemon.snapshot import Child, Leak, Snapshot, Worker
from celery_memguard.daemon.task_growth import TaskGrowth
from celery_memguard.protocol import grants, messages, rules, signals

StatFn = Callable[[int], ProcStat | None]
LimitsFn = Callable[[str], tuple[int, int]]


class Rejected(Exception):
    """A well-formed message the state refuses (it names a process that is not what it claims)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ChildRec:
    proc: ProcId
    ppid: int
    index: int | None
    rss: int = 0
    uss: int | None = None
    pss: int | None = None
    tasks: int = 0
    task: str | None = None
    task_id: str | None = None
    task_seq: int = 0  # tasks it had finished when the running task was announced
    born: float | None = None  # when it started, on the daemon's clock (None: as good as old)
    agent: bool = False
    requested_at: float | None = None
    noted: bool = False  # a dry run has counted it already
    leaving: bool = False
    over_hard_since: float | None = None  # first time seen above the hard limit, this spell
    terminated_at: float | None = None  # SIGTERM sent (kill escalation)
    killed_at: float | None = None  # SIGKILL sent
    history: History = field(default_factory=History)  # task-boundary RSS, for the trend
    growth: deque[int] = field(default_factory=lambda: deque(maxlen=8))  # recent per-task growth
    leaking: bool = False  # the trend said so at the last tick (State.assess_trends)
    uss_read_at: float | None = None  # when USS/PSS were last read (smaps_rollup)
    reported_end: bool = False  # the last RSS reading came from a task-end report
    over_soft_since: float | None = None


@dataclass
class WorkerRec:
    proc: ProcId
    name: str | None
    pool: str = "prefork"
    concurrency: int = 0
    max_tasks: int | None = None
    max_memory_kib: int | None = None
    agent: bool = False
    recycle_signal: int | None = None
    rss: int = 0
    kid_index: dict[int, int] = field(default_factory=dict)
    children: dict[int, ChildRec] = field(default_factory=dict)
    restartable: bool = False
    restart_sent: int | None = None
    restart_at: float | None = None
    fresh_rss: deque[int] = field(default_factory=lambda: deque(maxlen=16))  # children at 0 tasks
    total_over_since: float | None = None


class State:
    """The registry of supervised workers; ``stat`` looks a pid up in the process table."""

    def __init__(self, stat: StatFn, limits: LimitsFn | None = None, jitter: float = 0.0,
                 max_share: float | None = None,
                 max_task_names: int = 50,
                 age: Callable[[ProcId], float | None] | None = None) -> None:
        self._stat = stat
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
        self.oom_kills: Counter[str] = Counter()  # by worker
        self.restarts: Counter[tuple[str, str]] = Counter()  # whole workers, (worker, reason)
        self.messages: Counter[str] = Counter()  # by message type
        self.dropped: Counter[str] = Counter()  # by reason
        self.requests: dict[str, deque[float]] = {}  # recent recycle requests per worker name
        self.task_names = BoundedNames(max_task_names)
        self.growth: dict[str, TaskGrowth] = {}  # by bounded task name
        self.events: list[tuple[str, dict[str, object]]] = []  # for the daemon to log
        self.revision = 0  # counts recycles the children did on their own: the view is stale
        self._gone: OrderedDict[int, tuple[str, ChildRec]] = OrderedDict()  # recent exits
        self._killed: OrderedDict[int, float] = OrderedDict()  # pids we sent SIGKILL

    # -- agent messages ----------------------------------------------------------------------

    def apply(self, message: messages.Message, now: float) -> WorkerRec | None:
        """Fold one message into the state; return the worker it concerns, if any."""
        if isinstance(message, messages.WorkerHello):
            return self._worker_hello(message)
        if isinstance(message, messages.WorkerBye):
            rec = self.workers.pop(message.pid, None)
            return None if rec is None else rec
        if isinstance(message, messages.ChildDied):
            return self._child_died(message)
        worker, child = self._child_of(message, now)
        child.agent = True
        if not worker.agent:  # its children speak, so its app installed the agent; the main
            worker.agent = True  # process's hello (every 2 s) fills in the rest
            worker.recycle_signal = worker.recycle_signal or signals.RECYCLE_SIGNAL
        self._child_report(worker, child, message, now)
        return worker

    def _child_report(self, worker: WorkerRec, child: ChildRec, message: messages.Message,
                      now: float) -> None:
        if isinstance(message, messages.TaskStart):  # every task's start, as earlier agents sent
            child.task, child.task_id, child.task_seq = message.task, message.id, child.tasks
            self.observe(worker, child, message.rss, now)
        elif isinstance(message, messages.TaskBatch):
            for offset, (slot, before, after, _ok, age) in enumerate(message.ends):
                self._task_end(child, message.first + offset, message.names[slot], before,
                               after, now - age / 1000)
            self.observe(worker, child, message.ends[-1][2], now, end=True)
        elif isinstance(message, messages.TaskRunning):
            if message.tasks >= child.tasks:  # else its end was counted already: stale
                child.task, child.task_id, child.task_seq = message.task, message.id, message.tasks
            self.observe(worker, child, message.rss, now)
        elif isinstance(message, messages.TaskEnd):  # one task end, as agents before batching sent
            self._task_end(child, message.tasks, message.task, message.rss_before, message.rss, now)
            self.observe(worker, child, message.rss, now, end=True)
        elif isinstance(message, messages.ChildHello):
            child.tasks = message.tasks
            self.observe(worker, child, message.rss, now)
            if message.tasks == 0:
                worker.fresh_rss.append(message.rss)
        elif isinstance(message, messages.TaskInterrupted):
            self.observe(worker, child, message.rss, now)
            name = self.task_names.label(message.task)
            self.interrupted[(worker.name or "", name, "hard")] += 1
            self.events.append(("task_interrupted", {
                "worker": worker.name, "index": child.index, "pid": child.proc.pid,
                "task": message.task, "task_id": message.id, "rss_bytes": message.rss,
                "limit_bytes": message.limit, "reason": "hard"}))
        elif isinstance(message, messages.ChildExit):
            self._child_exit(worker, child, message, now)

    def _child_exit(self, worker: WorkerRec, child: ChildRec, message: messages.ChildExit,
                    now: float) -> None:
        """A child says it leaves: after the daemon's request, the hard limit, or a grant."""
        child.leaving = True
        child.tasks = message.tasks
        if message.reason == "hard":
            self.recycles[(worker.name or "", "hard")] += 1
            if child.requested_at is None:  # a unit it took meanwhile is this recycle too
                child.requested_at = now
        elif message.reason in grants.SELF_REASONS:
            self.granted(worker, child, message.reason, now)

    def _task_end(self, child: ChildRec, tasks: int, name: str, before: int, after: int,
                  at: float) -> None:
        """One task's end: the task count, the leak history, the growth of its task name."""
        if child.task is not None and tasks > child.task_seq:
            child.task = child.task_id = None
        child.tasks = tasks
        child.growth.append(after - before)
        last = child.history.last_at
        try:  # ages are measured by the child, times here: keep them in order
            child.history.add(tasks, after, at if last is None else max(at, last))
        except ValueError:  # a counter that went back: not the process we knew
            child.history = History()
            child.history.add(tasks, after, at)
        label = self.task_names.label(name)
        self.growth.setdefault(label, TaskGrowth()).add(after - before)

    def granted(self, worker: WorkerRec, child: ChildRec, reason: str, now: float) -> None:
        """A child left under a grant (its exit message, or the grant file, says so first):
        counted once, as a request the daemon made at that moment would be."""
        if child.requested_at is not None:
            return  # the daemon asked it too, and counted it then
        child.requested_at = now
        name = worker.name or ""
        self.requests.setdefault(name, deque(maxlen=1024)).append(now)
        self.recycles[(name, reason)] += 1
        self.revision += 1
        self.events.append(("recycle_requested", {
            "worker": name, "index": child.index, "pid": child.proc.pid, "reason": reason,
            "by": "agent", "measured_bytes": child.rss, "tasks": child.tasks}))

    def grants_taken(self, worker: WorkerRec, taken: list[tuple[int, str]], now: float) -> None:
        """The children the grant file lists as having taken a unit since the last exchange,
        also those already gone (their exit message may have been lost)."""
        for pid, reason in taken:
            child = worker.children.get(pid)
            if child is None:
                gone = self._gone.get(pid)
                child = gone[1] if gone is not None and gone[0] == (worker.name or "") else None
            if child is not None:
                self.granted(worker, child, reason, now)

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
        return rules.child_threshold(soft, self.jitter, self.max_share, worker.concurrency,
                                     child.proc.pid, child.proc.start)

    def _child_died(self, msg: messages.ChildDied) -> WorkerRec | None:
        """The main process reaped a child: a SIGKILL we did not send is counted as an OOM kill."""
        worker = self.workers.get(msg.pid)
        if worker is None or worker.name is None:
            raise Rejected("unknown_worker")
        if msg.exitcode != -signal.SIGKILL or self._killed.pop(msg.child, None) is not None:
            return worker
        self.oom_kills[worker.name] += 1
        child = worker.children.get(msg.child)
        if child is None:
            gone = self._gone.get(msg.child)
            child = gone[1] if gone is not None else None
        if child is not None and child.task is not None:
            self.interrupted[(worker.name, self.task_names.label(child.task), "oom")] += 1
        self.events.append(("child_oom_killed", {
            "worker": worker.name, "index": msg.index, "pid": msg.child,
            "task": child.task if child else None, "task_id": child.task_id if child else None,
            "rss_bytes": child.rss if child else None}))
        return worker

    def _worker_hello(self, msg: messages.WorkerHello) -> WorkerRec:
        rec = self.workers.get(msg.pid)
        if rec is None:
            stat = self._stat(msg.pid)
            if stat is None:
                raise Rejected("gone")
            rec = self.workers[msg.pid] = WorkerRec(proc=stat.proc, name=None)
        rec.name = self._unique_name(msg.node, msg.pid)
        rec.pool, rec.concurrency = msg.pool, msg.concurrency
        rec.max_tasks, rec.max_memory_kib = msg.max_tasks, msg.max_memory_kib
        rec.agent, rec.recycle_signal = True, msg.recycle_signal
        rec.restartable = msg.restart
        rec.kid_index = dict(msg.kids)
        for pid, index in rec.kid_index.items():
            if pid in rec.children:
                rec.children[pid].index = index
        return rec

    def _child_of(self, msg: messages.ChildReport, now: float) -> tuple[WorkerRec, ChildRec]:
        worker = self.workers.get(msg.ppid)
        child = worker.children.get(msg.pid) if worker is not None else None
        if worker is not None and child is not None:
            child.index = msg.index  # the agent knows its pool slot; a scan could only guess
            return worker, child
        stat = self._stat(msg.pid)
        if stat is None:
            raise Rejected("gone")
        if stat.ppid != msg.ppid:
            raise Rejected("not_a_child")
        if worker is None:
            parent = self._stat(msg.ppid)
            if parent is None:
                raise Rejected("gone")
            worker = self.workers[msg.ppid] = WorkerRec(proc=parent.proc, name=None)
        child = worker.children[msg.pid] = ChildRec(proc=stat.proc, ppid=msg.ppid, index=msg.index,
                                                    born=self._born(stat.proc, now))
        return worker, child

    def _unique_name(self, name: str, pid: int) -> str:
        """Two workers must not share a label set: a clash gets the pid appended."""
        for other_pid, other in self.workers.items():
            if other_pid != pid and other.name == name:
                return f"{name}#{pid}"
        return name

    # -- process-table readings --------------------------------------------------------------

    def found(self, found: FoundWorker, now: float | None = None) -> WorkerRec:
        """A worker seen by the scan: known ones keep their agent data; new ones are observe-only.
        ``now`` dates its new children (``_born``); without it their age is unknown."""
        rec = self.workers.get(found.stat.pid)
        if rec is not None and rec.proc != found.stat.proc:
            rec = None  # the pid was reused by another worker
        if rec is None:
            rec = self.workers[found.stat.pid] = WorkerRec(proc=found.stat.proc, name=None)
        if rec.name is None:
            rec.name = self._unique_name(found.name, found.stat.pid)
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
            stat = self._stat(pid)
            if stat is not None and stat.ppid == rec.proc.pid:
                live[pid] = stat
        return self._replace_children(rec, gone, live, now)

    def _replace_children(self, rec: WorkerRec, gone: list[ChildRec],
                          new: dict[int, ProcStat], now: float | None = None) -> list[ChildRec]:
        for child in gone:
            del rec.children[child.proc.pid]
            self._gone[child.proc.pid] = (rec.name or "", child)
            if len(self._gone) > 256:
                self._gone.popitem(last=False)
        for pid, stat in new.items():
            if pid not in rec.children:
                index = rec.kid_index.get(pid)
                if index is None and not rec.agent:
                    index = _free_slot(rec)
                rec.children[pid] = ChildRec(
                    proc=stat.proc, ppid=rec.proc.pid, index=index,
                    born=None if now is None else self._born(stat.proc, now))
        return gone

    def _born(self, proc: ProcId, now: float) -> float:
        """When a child started, on the daemon's clock: from its age where the process table
        tells it (so a restarted daemon does not take old children for young), else now."""
        age = self._age(proc)
        return now if age is None else now - age

    def drop_worker(self, pid: int) -> WorkerRec | None:
        return self.workers.pop(pid, None)

    # -- decisions taken -----------------------------------------------------------------------

    def requested(self, worker: str, pid: int, now: float) -> None:
        """A recycle request was delivered to this child."""
        child = self._child_named(worker, pid)
        if child is not None:
            child.requested_at = now
        self.requests.setdefault(worker, deque(maxlen=1024)).append(now)

    def noted(self, worker: str, pid: int, now: float) -> None:
        """A dry run counted this child: the same rate limit applies, the child stays."""
        child = self._child_named(worker, pid)
        if child is not None:
            child.noted = True
        self.requests.setdefault(worker, deque(maxlen=1024)).append(now)

    def signalled(self, worker: str, pid: int, signum: int, now: float) -> None:
        """Kill escalation: remember SIGTERM/SIGKILL so we neither repeat nor count it as OOM."""
        child = self._child_named(worker, pid)
        if child is None:
            return
        if signum == signal.SIGKILL:
            child.killed_at = now
            self._killed[pid] = now
            if len(self._killed) > 256:
                self._killed.popitem(last=False)
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


class BoundedNames:
    """Task names as metric labels: the first ``limit`` names seen keep theirs, later ones are
    'other', so a flood of generated task names cannot grow the series without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: set[str] = set()

    def label(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) < self.limit:
            self._names.add(name)
            return name
        return "other"


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
            pss=c.pss, tasks=c.tasks, task=c.task, agent=c.agent, requested_at=c.requested_at,
            noted=c.noted, leaving=c.leaving, over_hard_since=c.over_hard_since,
            terminated_at=c.terminated_at, killed_at=c.killed_at,
            reported_end=c.reported_end, over_soft_since=c.over_soft_since, born=c.born,
            growth_per_task=rules.growth_per_task(c.growth), leak=leak))
    recommended = None
    if soft is not None:
        rates = [c.leak.trend.bytes_per_task for c in children if c.leak and c.leak.trend.leaking]
        fresh = int(statistics.median(rec.fresh_rss)) if rec.fresh_rss else None
        if rates and fresh is not None:
            recommended = recommend_max_tasks(max(rates), fresh, soft)
    return Worker(name=rec.name, proc=rec.proc, pool=rec.pool, concurrency=rec.concurrency,
                  max_tasks=rec.max_tasks, max_memory_kib=rec.max_memory_kib, agent=rec.agent,
                  recycle_signal=rec.recycle_signal, rss=rec.rss, children=tuple(children),
                  restartable=rec.restartable, restart_sent=rec.restart_sent,
                  restart_at=rec.restart_at, recommended_max_tasks=recommended,
                  total_over_since=rec.total_over_since,
                  fresh_rss=int(statistics.median(rec.fresh_rss)) if rec.fresh_rss else None)
