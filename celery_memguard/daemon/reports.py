"""How each agent message changes what the daemon knows. No I/O but the state's ``stat``.

The supervisor hands every message here once it has been decoded and checked against the
sender's kernel credentials; a message naming a process that is not what it claims is
refused with ``Rejected`` (counted under ``messages_dropped_total{reason}``).
"""

from __future__ import annotations

import signal

from celery_memguard.daemon.leak_trend import History
from celery_memguard.daemon.records import ChildRec, Rejected, WorkerRec
from celery_memguard.daemon.state import State
from celery_memguard.daemon.task_growth import TaskGrowth
from celery_memguard.protocol import grants, messages, signals
from celery_memguard.protocol.cgroups import ContainerReading


def fold(state: State, message: messages.Message, now: float) -> WorkerRec | None:
    """Fold one message into the state; return the worker it concerns, if any."""
    if isinstance(message, messages.WorkerHello):
        worker = _worker_hello(state, message)
        state.oom.observe(worker.container_key, message.oom_kills, now)
        return worker
    if isinstance(message, messages.WorkerBye):
        if message.pid not in state.workers:
            raise Rejected("unknown_worker")
        return state.workers.pop(message.pid)
    if isinstance(message, messages.ChildDied):
        return _child_died(state, message, now)
    if isinstance(message, messages.TraceRequest):
        return None  # about no process: the supervisor hands it to forensics
    worker, child = _child_of(state, message, now)
    child.agent = True
    if not worker.agent:  # its children speak, so its app installed the agent; the main
        worker.agent = True  # process's hello (every 2 s) fills in the rest
        worker.recycle_signal = worker.recycle_signal or signals.RECYCLE_SIGNAL
    _child_report(state, worker, child, message, now)
    return worker


def _child_report(state: State, worker: WorkerRec, child: ChildRec, message: messages.Message,
                  now: float) -> None:
    if isinstance(message, messages.TaskStart):  # every task's start, as earlier agents sent
        child.task, child.task_id, child.task_seq = message.task, message.id, child.tasks
        state.observe(worker, child, message.rss, now)
    elif isinstance(message, messages.TaskBatch):
        for offset, (slot, before, after, _ok, age) in enumerate(message.ends):
            _task_end(state, child, message.first + offset, message.names[slot], before,
                      after, now - age / 1000)
        state.observe(worker, child, message.ends[-1][2], now, end=True)
        child.rest_rss = message.ends[-1][2]
    elif isinstance(message, messages.TaskRunning):
        if message.tasks >= child.tasks:  # else its end was counted already: stale
            child.task, child.task_id, child.task_seq = message.task, message.id, message.tasks
        state.observe(worker, child, message.rss, now)
    elif isinstance(message, messages.TaskEnd):  # one task end, as agents before batching sent
        _task_end(state, child, message.tasks, message.task, message.rss_before, message.rss, now)
        state.observe(worker, child, message.rss, now, end=True)
        child.rest_rss = message.rss
    elif isinstance(message, messages.ChildHello):
        _child_hello(state, worker, child, message)
        child.tasks = message.tasks
        state.observe(worker, child, message.rss, now)
        child.rest_rss = message.rss  # sent between tasks
        if message.tasks == 0:
            worker.fresh_rss.append(message.rss)
    elif isinstance(message, messages.TaskInterrupted):
        _task_interrupted(state, worker, child, message, now)
    elif isinstance(message, messages.ChildExit):
        _child_exit(state, worker, child, message, now)
    elif isinstance(message, messages.TaskHeld):
        _task_held(state, worker, child, message)


def _child_hello(state: State, worker: WorkerRec, child: ChildRec,
                 message: messages.ChildHello) -> None:
    """What a child knows of its worker stands in for the hello of a main process that never
    said one (a worker embedded without the agent's consumer step): its nodename, its pool."""
    child.missing = message.missing
    if not worker.announced:
        if worker.name is None and message.node:
            worker.name = state.unique_name(message.node, worker.proc.pid)
        worker.jitter_pool = message.jitter_pool or worker.jitter_pool


def _task_interrupted(state: State, worker: WorkerRec, child: ChildRec,
                      message: messages.TaskInterrupted, now: float) -> None:
    """A task interrupted for memory (counted towards its quarantine), or refused because it
    is quarantined already."""
    reason = message.reason if message.reason in ("hard", "container", "quarantined") else "hard"
    name = state.task_names.label(message.task)
    state.interrupted[(worker.name or "", name, reason)] += 1
    if reason == "quarantined":
        state.events.append(("task_refused", {
            "worker": worker.name, "index": child.index, "pid": child.proc.pid,
            "task": message.task, "task_id": message.id, "reason": reason}))
        return
    # The task is running: it names it even when it was too short to be announced, so that
    # a kill escalation that follows is counted against it.
    child.task, child.task_id, child.task_seq = message.task, message.id, child.tasks
    state.observe(worker, child, message.rss, now)
    state.incident(message.id, message.task, 0, 1, state.wall())
    state.events.append(("task_interrupted", {
        "worker": worker.name, "index": child.index, "pid": child.proc.pid,
        "task": message.task, "task_id": message.id, "rss_bytes": message.rss,
        "limit_bytes": message.limit, "reason": reason}))


def _task_held(state: State, worker: WorkerRec, child: ChildRec,
               message: messages.TaskHeld) -> None:
    """A child waited for its container to have room before it started a task."""
    name = worker.name or ""
    state.holds[(name, "gave_up" if message.gave_up else "room")] += 1
    state.hold_seconds[name] += message.waited_ms / 1000
    if message.gave_up or message.waited_ms >= 1000:
        state.events.append(("task_held", {
            "worker": name, "index": child.index, "pid": child.proc.pid, "task": message.task,
            "task_id": message.id, "waited_seconds": message.waited_ms / 1000,
            "working_set_bytes": message.working_set, "line_bytes": message.line,
            "gave_up": message.gave_up}))


def _child_exit(state: State, worker: WorkerRec, child: ChildRec, message: messages.ChildExit,
                now: float) -> None:
    """A child says it leaves: after the daemon's request, the hard limit, or a grant."""
    child.leaving = True
    child.tasks = message.tasks
    if message.reason == "hard":
        state.recycles[(worker.name or "", "hard")] += 1
        if child.requested_at is None:  # a unit it took meanwhile is this recycle too
            child.requested_at = now
    elif message.reason in grants.SELF_REASONS:
        granted(state, worker, child, message.reason, now)


def _task_end(state: State, child: ChildRec, tasks: int, name: str, before: int, after: int,
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
    label = state.task_names.label(name)
    state.growth.setdefault(label, TaskGrowth()).add(after - before)


def granted(state: State, worker: WorkerRec, child: ChildRec, reason: str, now: float) -> None:
    """A child left under a grant (its exit message, or the grant file, says so first):
    counted once, as a request the daemon made at that moment would be."""
    if child.requested_at is not None:
        return  # the daemon asked it too, and counted it then
    child.requested_at = now
    name = worker.name or ""
    state.count_request(name, child, now)
    state.recycles[(name, reason)] += 1
    state.revision += 1
    state.events.append(("recycle_requested", {
        "worker": name, "index": child.index, "pid": child.proc.pid, "reason": reason,
        "by": "agent", "measured_bytes": child.rss, "tasks": child.tasks}))


def units_taken(state: State, worker: WorkerRec, taken: list[tuple[int, str]],
                now: float) -> None:
    """The children the grant file lists as having taken a unit since the last exchange,
    also those already gone (their exit message may have been lost)."""
    for pid, reason in taken:
        child = worker.children.get(pid)
        if child is None:
            gone = state.gone.get(pid)
            child = gone[1] if gone is not None and gone[0] == (worker.name or "") else None
        if child is not None:
            granted(state, worker, child, reason, now)


def _child_died(state: State, msg: messages.ChildDied, now: float) -> WorkerRec | None:
    """The main process reaped a child. A SIGKILL the daemon did not send is an OOM kill when
    the kernel's counter of the worker's container moved, else a kill by someone else."""
    worker = state.workers.get(msg.pid)
    if worker is None or worker.name is None:
        raise Rejected("unknown_worker")
    if msg.exitcode != -signal.SIGKILL or state.sigkilled.pop(msg.child, None) is not None:
        state.oom.observe(worker.container_key, msg.oom_kills, now)
        return worker
    child = worker.children.get(msg.child)
    if child is None:
        gone = state.gone.get(msg.child)
        child = gone[1] if gone is not None else None
    # The pool's record of the job names the task even where the child never announced it.
    task = msg.task or (child.task if child is not None else None)
    task_id = msg.id or (child.task_id if child is not None else None)
    oom = state.oom.claim(worker.container_key, msg.oom_kills, now)
    cause = "oom" if oom else "killed" if oom is False else "sigkill"
    label = state.task_names.label(task) if task is not None else ""
    if oom:
        state.oom_kills[(worker.name, label)] += 1
        state.incident(task_id, task, 1, 0, state.wall())
    if task is not None:
        state.interrupted[(worker.name, label, cause)] += 1
    state.events.append(("child_oom_killed" if oom else "child_killed", {
        "worker": worker.name, "index": msg.index, "pid": msg.child, "task": task,
        "task_id": task_id, "rss_bytes": child.rss if child else None, "cause": cause}))
    return worker


def _worker_hello(state: State, msg: messages.WorkerHello) -> WorkerRec:
    rec = state.workers.get(msg.pid)
    if rec is None:
        stat = state.stat(msg.pid)
        if stat is None:
            raise Rejected("gone")
        rec = state.workers[msg.pid] = WorkerRec(proc=stat.proc, name=None)
    rec.name = state.unique_name(msg.node, msg.pid)
    rec.announced = True
    rec.pool, rec.concurrency = msg.pool, msg.concurrency
    rec.max_concurrency, rec.jitter_pool = msg.max_concurrency, msg.max_concurrency or msg.concurrency
    rec.missing, rec.socket = msg.missing, msg.socket
    rec.versions = (msg.celery, msg.billiard, msg.python)
    rec.max_tasks, rec.max_memory_kib = msg.max_tasks, msg.max_memory_kib
    rec.agent, rec.recycle_signal = True, msg.recycle_signal
    rec.restartable = msg.restart
    rec.kid_index = dict(msg.kids)
    if msg.container_usage is not None and msg.container_working_set is not None:
        rec.reported_container = ContainerReading(
            usage=msg.container_usage, working_set=msg.container_working_set,
            limit=msg.container_limit, high=None,
            events={} if msg.oom_kills is None else {"oom_kill": msg.oom_kills}, pressure=None)
    for pid, child in rec.children.items():
        index = rec.kid_index.get(pid)
        if index is not None:
            child.index = index
        elif not child.agent:  # not a pool slot: a slot the scan guessed before the hello,
            child.index = None  # e.g. for billiard's semaphore tracker under spawn
    return rec


def _child_of(state: State, msg: messages.ChildReport, now: float) -> tuple[WorkerRec, ChildRec]:
    """The worker and the child a child's report is about, verified against the process table
    the first time: the child exists and its parent is the ``ppid`` it claims."""
    worker = state.workers.get(msg.ppid)
    child = worker.children.get(msg.pid) if worker is not None else None
    if worker is not None and child is not None:
        child.index = msg.index  # the agent knows its pool slot; a scan could only guess
        return worker, child
    stat = state.stat(msg.pid)
    if stat is None:
        raise Rejected("gone")
    if stat.ppid != msg.ppid:
        raise Rejected("not_a_child")
    if worker is None:
        parent = state.stat(msg.ppid)
        if parent is None:
            raise Rejected("gone")
        worker = state.workers[msg.ppid] = WorkerRec(proc=parent.proc, name=None, first_report=now)
    child = worker.children[msg.pid] = ChildRec(proc=stat.proc, ppid=msg.ppid, index=msg.index,
                                                born=state.born(stat.proc, now))
    return worker, child
