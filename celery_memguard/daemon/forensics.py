"""Leak forensics in the daemon: ask one child per worker to trace a leaking task name, fold
its reports into results, keep them as files, show them.

forensics_plan.py decides what to trace and where; this module carries it out. It writes the
worker's request file (protocol.forensics), has the actor signal the verified child, and folds
the child's LeakSite and LeakTrace reports into a Result (leak_sites.py). A final result is
logged as one ``leak_sites`` event and kept as a JSON file in the forensics directory
(forensics_store.py), the newest ``forensics.keep`` per task name: the files outlive recycles
and restarts, and are read back by the next daemon (which also takes the last report of a
trace an earlier daemon asked for). A child that leaves mid-trace reports what it has; one
killed mid-trace has reported after each of its traced calls, and the last of those becomes
its result.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from celery_memguard.daemon import forensics_store
from celery_memguard.daemon.actions import Actor
from celery_memguard.daemon.config import Config
from celery_memguard.daemon.forensics_plan import Target, choose, due
from celery_memguard.daemon.leak_sites import Result, assemble, document
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.records import WorkerRec
from celery_memguard.daemon.snapshot import Snapshot
from celery_memguard.daemon.task_growth import Ranked
from celery_memguard.protocol import forensics as request_file
from celery_memguard.protocol import messages, paths
from celery_memguard.protocol.signals import TRACE_SIGNAL

REPORT_GRACE = 30.0  # seconds past its deadline a trace's last report is waited for
KEEP_ENDED = 64  # ended traces shown in /status (``celery-memguard trace`` reads its own there)
NAMES_PER_CHILD = 64  # task names remembered per child, to pick one that ran a task
MOVE_AFTER = 10  # calls run by other children while the tracing child ran none: move the trace


@dataclass
class Trace:
    """One trace, from the request to its result or its failure."""

    id: str
    task: str
    calls: int
    on_demand: bool
    deadline: float  # monotonic: until then the child traces (and, asked for, one is sought)
    pattern: str | None = None  # the workers it may run in (asked for with --worker)
    state: str = "waiting"  # then tracing, then done or failed
    reason: str = ""  # why it waits, or failed
    target: Target | None = None
    pid: int | None = None  # the child whose reports count (a previous daemon's trace: the first)
    partial: Result | None = None  # its report so far
    result: Result | None = None
    elsewhere: int = 0  # calls other children ran while its child, tracing, had run none

    @property
    def active(self) -> bool:
        return self.state in ("waiting", "tracing")

    def status(self) -> dict[str, Any]:
        shown = self.result or self.partial
        return {"id": self.id, "task": self.task, "state": self.state, "reason": self.reason,
                "on_demand": self.on_demand, "calls_wanted": self.calls,
                "worker": self.target.worker if self.target else None,
                "index": self.target.index if self.target else None,
                "pid": self.target.pid if self.target else self.pid,
                "calls": shown.calls if shown else 0,
                "result": document(shown) if shown is not None else None}


class Forensics:
    def __init__(self, config: Config, actor: Actor, log: Any,
                 wall: Callable[[], float]) -> None:
        self.config = config
        self.actor = actor
        self.log = log
        self.wall = wall  # the wall clock: results carry a date
        self.traces: OrderedDict[str, Trace] = OrderedDict()  # by id: active, then recent ended
        self._documents: dict[str, dict[str, Any]] = {}  # task -> its newest result's document
        self.traced_at: dict[str, float] = {}  # task -> when a trace of it began (monotonic)
        self.ran: dict[int, dict[str, int]] = {}  # child pid -> task name -> runs (by recency)
        self._awaiting: dict[str, Trace] = {}  # by id: placed, and no call traced yet
        self._sites: dict[tuple[int, str], list[messages.LeakSite]] = {}  # of reports to come
        self._started = False
        self._unwritable = False  # the directory refused a file (said once)

    @property
    def directory(self) -> Path:
        return self.config.forensics_dir

    # -- reports ------------------------------------------------------------------------------

    def receive(self, message: messages.Message, worker: WorkerRec | None, now: float) -> None:
        """What a message tells forensics: the task names a child runs, a trace's reports, a
        request from ``celery-memguard trace``."""
        if isinstance(message, messages.TaskBatch):
            runs = [0] * len(message.names)
            for end in message.ends:
                if 0 <= end[0] < len(runs):
                    runs[end[0]] += 1
            self._ran(message.pid, zip(message.names, runs, strict=True))
        elif isinstance(message, messages.TaskEnd):
            self._ran(message.pid, [(message.task, 1)])
        elif isinstance(message, messages.TaskRunning | messages.TaskStart):
            self._ran(message.pid, [(message.task, 0)])  # its end counts it
        elif isinstance(message, messages.LeakSite):
            sites = self._sites.setdefault((message.pid, message.trace), [])
            if len(sites) < 64:
                sites.append(message)
            if len(self._sites) > 256:  # sites of reports that never came
                del self._sites[next(iter(self._sites))]
        elif isinstance(message, messages.LeakTrace) and worker is not None:
            self._report(message, worker.name or "", now)
        elif isinstance(message, messages.TraceRequest):
            self.ask(message, now)

    def _ran(self, pid: int, runs: Iterable[tuple[str, int]]) -> None:
        known = self.ran.setdefault(pid, {})
        for name, count in runs:
            known[name] = known.pop(name, 0) + count
            if count:
                self._ran_elsewhere(pid, name, count)
        while len(known) > NAMES_PER_CHILD:
            del known[next(iter(known))]

    def _ran_elsewhere(self, pid: int, name: str, count: int) -> None:
        """Calls of a task being traced that another child ran, before the tracing child's
        first: a pool that keeps handing the name to others (tick moves the trace)."""
        for trace in self._awaiting.values():
            if trace.task == name and trace.target is not None and trace.target.pid != pid:
                trace.elsewhere += count

    def _report(self, message: messages.LeakTrace, worker: str, now: float) -> None:
        sites = self._sites.pop((message.pid, message.trace), [])
        trace = self.traces.get(message.trace)
        if trace is None:  # asked for by a previous daemon: its child reports to this one
            trace = Trace(id=message.trace, task=message.task, calls=message.wanted,
                          on_demand=False, deadline=now + self.config.forensics.timeout,
                          state="tracing", pid=message.pid)
            self._remember(trace)
            self.traced_at[trace.task] = now
        expected = trace.target.pid if trace.target is not None else trace.pid
        if not trace.active or message.pid != expected:
            return  # late, or from a child it no longer counts on
        result = assemble(message, sites, worker, self.wall(), trace.on_demand)
        if message.done:
            self._finish(trace, result, now)
        else:
            trace.state, trace.partial = "tracing", result
            self._awaiting.pop(trace.id, None)  # its child runs it: it stays

    # -- requests -----------------------------------------------------------------------------

    def ask(self, message: messages.TraceRequest, now: float) -> None:
        """``celery-memguard trace``: a trace of the task now, in any child that runs it."""
        if message.id in self.traces:
            return
        cfg = self.config.forensics
        timeout = message.timeout_ms / 1000 if message.timeout_ms else cfg.timeout
        trace = Trace(id=message.id, task=message.task,
                      calls=min(message.calls or cfg.calls, request_file.MAX_CALLS),
                      on_demand=True, deadline=now + timeout, pattern=message.worker)
        self._remember(trace)
        if not cfg.enabled:
            self._fail(trace, "forensics.enabled is false in the daemon's config", now)
        else:
            trace.reason = "waiting for the daemon's next tick"
            self.log.info("trace_asked", trace=trace.id, task=trace.task, worker=trace.pattern,
                          calls=trace.calls, timeout_seconds=timeout)

    def tick(self, now: float, snapshot: Snapshot, ranking: tuple[Ranked, ...]) -> None:
        """Follow the traces under way, place those waiting, start the ones due."""
        if not self._started:
            self._start(now)
        live = {child.pid for worker in snapshot.workers for child in worker.children}
        for pid in [pid for pid in self.ran if pid not in live]:
            del self.ran[pid]
        for trace in [t for t in self.traces.values() if t.active]:
            self._follow(trace, live, now)
        busy = {t.target.worker_pid for t in self.traces.values()
                if t.state == "tracing" and t.target is not None}
        for trace in [t for t in self._awaiting.values() if t.elsewhere >= MOVE_AFTER]:
            self._move(trace, snapshot, busy, now)
        for trace in [t for t in self.traces.values() if t.state == "waiting"]:
            choice = choose(snapshot.workers, trace.task, self.ran, busy, trace.pattern,
                            any_child=True)
            if isinstance(choice, str):
                trace.reason = choice
            elif self._place(trace, choice, now):
                busy.add(choice.worker_pid)
        cfg = self.config.forensics
        if not (cfg.enabled and cfg.auto):
            return
        active = {t.task for t in self.traces.values() if t.active}
        for task in due(ranking, self.traced_at, active, now, cfg.cooldown):
            choice = choose(snapshot.workers, task, self.ran, busy)
            if isinstance(choice, Target):
                trace = Trace(id=uuid.uuid4().hex[:16], task=task, calls=cfg.calls,
                              on_demand=False, deadline=now + cfg.timeout)
                self._remember(trace)
                if self._place(trace, choice, now):
                    busy.add(choice.worker_pid)
                else:
                    del self.traces[trace.id]  # tried again on a later tick

    def _follow(self, trace: Trace, live: set[int], now: float) -> None:
        """A child gone mid-trace leaves its last report as the result; one gone before its
        first traced call is replaced while there is time; past the deadline (and a grace for
        the last report) the trace ends with what it has."""
        target = trace.target
        gone = target is not None and target.pid not in live
        partial = trace.partial if trace.partial is not None and trace.partial.calls else None
        if trace.state == "tracing" and gone:
            if partial is not None:
                self._finish(trace, replace(partial, reason="child gone"), now)
            elif now < trace.deadline:
                self._withdraw(trace)
                trace.state, trace.target = "waiting", None
                trace.reason = "its child left before its first traced call; asking another"
            else:
                self._fail(trace, f"its child left before running {trace.task}", now)
        elif trace.state == "tracing" and now > trace.deadline + REPORT_GRACE:
            if partial is not None:
                self._finish(trace, replace(partial, reason="expired"), now)
            else:
                where = (f"the chosen child ({target.worker}, index {target.index})"
                         if target is not None else "its child")
                self._fail(trace, f"{where} ran no call of {trace.task} in time", now)
        elif trace.state == "waiting" and now > trace.deadline:
            self._fail(trace, trace.reason or f"no pool child ran {trace.task} in time", now)

    def _place(self, trace: Trace, target: Target, now: float) -> bool:
        """Write the worker's request and signal the child; True when it was delivered."""
        cfg = self.config.forensics
        request = request_file.Request(
            id=trace.id, task=trace.task, child=(target.pid, target.start), calls=trace.calls,
            frames=cfg.frames, tool=cfg.tool, until=self.wall() + max(0.0, trace.deadline - now))
        path = paths.trace_path(str(self.config.agent.socket), target.worker_pid)
        try:
            forensics_store.write(Path(path), request_file.encode(
                (target.worker_pid, target.worker_start), request))
        except OSError as exc:
            trace.reason = f"cannot write {path}: {exc.strerror}"
            return False
        if not self.actor.ask_to_trace(target.worker, ProcId(target.pid, target.start),
                                       target.worker_pid, TRACE_SIGNAL):
            forensics_store.remove(path)
            trace.reason = "the chosen child could not be signalled"
            return False
        trace.state, trace.target, trace.reason = "tracing", target, ""
        self._awaiting[trace.id] = trace
        self.traced_at[trace.task] = now
        self.log.info("trace_started", trace=trace.id, task=trace.task, worker=target.worker,
                      index=target.index, pid=target.pid, calls=trace.calls, tool=cfg.tool,
                      on_demand=trace.on_demand)
        return True

    def _move(self, trace: Trace, snapshot: Snapshot, busy: set[int], now: float) -> None:
        """Its child never got the task again while others ran it: trace it in one of them,
        and tell the first child (signalled again, it finds no request naming it) to stop."""
        old = trace.target
        if old is None:
            return
        trace.elsewhere = 0
        choice = choose(snapshot.workers, trace.task, self.ran, busy - {old.worker_pid},
                        trace.pattern, avoid=(old.pid,))
        if isinstance(choice, str):
            return  # no better child: it stays, and the deadline ends it as before
        self.log.info("trace_moved", trace=trace.id, task=trace.task, worker=old.worker,
                      index=old.index, pid=old.pid, to_worker=choice.worker,
                      to_index=choice.index, to_pid=choice.pid, calls_elsewhere=MOVE_AFTER)
        self._withdraw(trace)
        busy.discard(old.worker_pid)
        trace.state, trace.target = "waiting", None
        if self._place(trace, choice, now):
            busy.add(choice.worker_pid)
        self.actor.ask_to_trace(old.worker, ProcId(old.pid, old.start), old.worker_pid,
                                TRACE_SIGNAL)

    def _withdraw(self, trace: Trace) -> None:
        self._awaiting.pop(trace.id, None)
        if trace.target is not None:
            forensics_store.remove(paths.trace_path(str(self.config.agent.socket),
                                                    trace.target.worker_pid))

    # -- results ------------------------------------------------------------------------------

    def _finish(self, trace: Trace, result: Result, now: float) -> None:
        if not result.calls:
            why = (f"the child could not trace: {result.reason}"
                   if result.reason.startswith("error") else
                   f"the child ran no call of {trace.task} ({result.reason})")
            self._fail(trace, why, now)
            return
        trace.state, trace.result, trace.partial, trace.reason = "done", result, None, ""
        self._withdraw(trace)
        doc = self._documents[result.task] = document(result)
        kept = self._keep(result, doc)
        self.log.warning(
            "leak_sites", task=result.task, worker=result.worker, index=result.index,
            pid=result.pid, trace=result.id, tool=result.tool, calls=result.calls,
            complete=result.complete, reason=result.reason,
            rss_growth_per_call=doc["rss_growth_per_call"],
            traced_growth_per_call=doc["traced_growth_per_call"],
            untraced_share=doc["untraced_share"], advice=doc["advice"],
            sites=[{"site": f"{s['filename']}:{s['lineno']}", "code": s["code"],
                    "bytes_per_call": s["bytes_per_call"], "share": s["share"]}
                   for s in doc["sites"][:3]],
            file=str(kept) if kept is not None else None)

    def _fail(self, trace: Trace, why: str, now: float) -> None:
        trace.state, trace.reason = "failed", why
        self._withdraw(trace)
        self.log.info("trace_failed", trace=trace.id, task=trace.task, why=why,
                      on_demand=trace.on_demand)

    def _remember(self, trace: Trace) -> None:
        self.traces[trace.id] = trace
        ended = [t.id for t in self.traces.values() if not t.active]
        for old in ended[: max(0, len(ended) - KEEP_ENDED)]:
            del self.traces[old]

    def _keep(self, result: Result, doc: dict[str, Any]) -> Path | None:
        try:
            return forensics_store.keep(self.directory, result, doc, self.config.forensics.keep)
        except OSError as exc:
            if not self._unwritable:  # said once
                self._unwritable = True
                self.log.error("leak_sites_not_kept", directory=str(self.directory),
                               why=exc.strerror or str(exc))
            return None

    def _start(self, now: float) -> None:
        """Read back the results kept (their dates restart the cooldowns) and remove the
        request files an earlier daemon left."""
        self._started = True
        socket = Path(self.config.agent.socket)
        for stale in socket.parent.glob(paths.trace_glob(str(socket))):
            forensics_store.remove(stale)
        wall = self.wall()
        for task, result in forensics_store.newest(self.directory).items():
            self._documents[task] = document(result)
            self.traced_at[task] = now - max(0.0, wall - result.finished_at)

    def documents(self) -> tuple[dict[str, Any], ...]:
        """The newest result of every task name, newest first."""
        return tuple(sorted(self._documents.values(), key=lambda d: -float(d["finished_at"])))

    def status(self) -> dict[str, Any]:
        cfg = self.config.forensics
        return {"enabled": cfg.enabled, "auto": cfg.auto, "tool": cfg.tool,
                "directory": str(self.directory),
                "traces": [trace.status() for trace in self.traces.values()]}

