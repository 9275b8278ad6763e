"""The daemon loop: receive -> sample -> decide -> act -> publish.

One thread owns the state. It waits on the agent socket and a signal wake-up pipe until the
next tick, so a task-end report is decided on the moment it arrives (a child that runs
hundreds of tasks a second must not overshoot by more than a task or two), and the tick
samples every child's RSS for the children that send nothing. Signal handlers only enqueue;
the loop dispatches them. The clock and the process table are injected for tests.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery_memguard import growth, policy
from celery_memguard.actions import Actor
from celery_memguard.config import Config, ConfigError, LimitsConfig, split_listen
from celery_memguard.inbox import Datagram, Inbox, raise_fd_limit
from celery_memguard.metrics import HttpServer, Metrics, View, status_document
from celery_memguard.model import Decision, Snapshot
from celery_memguard.procs import Procs
from celery_memguard.protocol import grants, messages, paths, settings
from celery_memguard.state import Rejected, State, WorkerRec

DRAIN_BATCH = 512  # datagrams read before the loop looks at its clock again
FULL_SCAN_EVERY = 12  # scans between two that re-read every command line
DRAIN_EVERY = 128  # children sampled between two looks at waiting reports
BATCH_GAP = 0.05  # seconds routine reports wait to be read together; the bell cuts it short
LEAKING_USS_EVERY = 10.0  # seconds between USS reads of a leaking child far from any limit
_EVENT_LEVELS = {"recycle_requested": "info"}  # the state's other events are warnings


class ListenError(Exception):
    """The metrics address cannot be bound; the message says what to do."""


class Daemon:
    def __init__(
        self,
        config: Config,
        procs: Procs | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
        reload: Callable[[], Config] | None = None,
        batch_gap: float = BATCH_GAP,
    ) -> None:
        from celery_memguard import log as logmod  # noqa: PLC0415 - avoids a cycle at import

        self.config = config
        self._limits: dict[str, LimitsConfig] = {}  # limits_for, per worker name
        self.procs = procs if procs is not None else Procs()
        self.clock = clock
        self.log = log if log is not None else logmod.get()
        self._reload = reload
        self.batch_gap = batch_gap
        self.state = State(self.procs.stat, limits=self._soft_hard, jitter=config.recycle.jitter,
                           max_share=config.recycle.max_share,
                           max_task_names=config.metrics.max_task_names,
                           age=lambda proc: self.procs.age(proc.start))
        self.actor = Actor(self.procs, self.state, self.log, config.recycle.dry_run)
        self.metrics = Metrics(lambda: self.view)
        self.stopping = threading.Event()
        self.signals: deque[int] = deque()
        self.last_tick = clock()
        self._next_scan = 0.0
        self._started_wall = time.time()
        self.memory = self.procs.memory_limit()  # what percentages in the config resolved against
        self.inbox: Inbox | None = None
        self.view = self._make_view(clock())
        self.http: HttpServer | None = None
        self._storms: set[str] = set()  # workers whose storm was already logged
        self._revision = 0  # the state's revision the published view shows
        self._scans = 0
        self.between_workers: Callable[[], int] | None = None  # set by the loop: drain reports
        self._wake_r, self._wake_w = -1, -1

    # -- life cycle ----------------------------------------------------------------------------

    def run(self, ready: Callable[[Daemon], None] | None = None) -> int:
        """Bind, serve and loop until SIGTERM/SIGINT or ``stop()``; returns an exit code."""
        inbox = Inbox(self.config.agent.socket)
        inbox.open()
        self.inbox = inbox
        raise_fd_limit()
        self._remove_grants()  # a previous daemon's: each worker's is written anew on its tick
        self._publish_settings()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            host, port = split_listen(self.config.metrics.listen)
            self.http = HttpServer(host, port, self.metrics, lambda: self.view, self.healthy,
                                   status_document)
        except OSError as exc:
            inbox.close()
            raise ListenError(
                f"cannot listen on {self.config.metrics.listen} for /metrics: {exc.strerror}. "
                f"Is another daemon running? Set metrics.listen to a free address.") from None
        previous = self._install_signal_handlers()
        self.http.start()
        self.log.info("daemon_started", socket=str(self.config.agent.socket),
                      listen="{}:{}".format(*self.http.address), soft_bytes=self.config.limits.soft,
                      hard_bytes=self.config.limits.hard, measure=self.config.limits.measure,
                      interval_seconds=self.config.sampling.interval,
                      dry_run=self.config.recycle.dry_run, pid=os.getpid())
        if ready is not None:
            ready(self)
        try:
            self._loop(inbox)
        finally:
            self._restore_signal_handlers(previous)
            self.http.stop()
            inbox.close()
            self.procs.close()
            self._remove_grants()  # no daemon, no recycles: children no longer leave on their own
            with contextlib.suppress(OSError):
                os.unlink(paths.settings_path(str(self.config.agent.socket)))
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.log.info("daemon_stopped")
        return 0

    def stop(self) -> None:
        self.stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def healthy(self) -> bool:
        return self.clock() - self.last_tick < max(5.0, 3 * self.config.sampling.interval)

    def _loop(self, inbox: Inbox) -> None:
        """Wait for the tick, the bell, signals and reports; read routine reports in batches.

        Waking for every report cost the daemon more CPU than the reports themselves on a
        busy host (each wake-up ran cold, between the worker's processes), and that CPU is
        taken from the workers. After reading, the reports' descriptor is left out of the
        wait for ``batch_gap``; a child whose report calls for a decision rings the bell,
        which is always watched, and everything waiting is read at once.
        """
        selector = selectors.DefaultSelector()

        def drain() -> int:
            read = 0
            for datagram in inbox.drain(DRAIN_BATCH):
                self.receive(datagram, self.clock())
                read += 1
            return read

        self.between_workers = drain
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        if inbox.bell is not None:
            selector.register(inbox.bell.fileno(), selectors.EVENT_READ, "bell")
        selector.register(inbox.fileno(), selectors.EVENT_READ, "inbox")
        resume_at: float | None = None  # reports are left out of the wait until then
        next_tick = self.clock()
        try:
            while not self.stopping.is_set():
                now = self.clock()
                if now >= next_tick:
                    self.tick(now)
                    interval = self.config.sampling.interval
                    next_tick += interval
                    if next_tick <= now:  # fell behind: skip, do not burst
                        next_tick = now + interval
                if resume_at is not None and self.clock() >= resume_at:
                    selector.register(inbox.fileno(), selectors.EVENT_READ, "inbox")
                    resume_at = None
                until = next_tick if resume_at is None else min(next_tick, resume_at)
                for key, _ in selector.select(max(0.0, until - self.clock())):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 512)
                    elif key.data == "bell":
                        inbox.silence()
                        drain()
                    else:
                        read = drain()
                        # Reports read and none left: let the next ones gather. (A full batch
                        # means more are waiting; a new connection alone read nothing yet.)
                        if 0 < read < DRAIN_BATCH and resume_at is None and self.batch_gap > 0:
                            selector.unregister(inbox.fileno())
                            resume_at = self.clock() + self.batch_gap
                while self.signals:
                    self._dispatch_signal(self.signals.popleft())
        finally:
            self.between_workers = None
            selector.close()

    # -- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # embedded in a test or the demo: stop() is the way out
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._on_signal)
        previous[-1] = signal.set_wakeup_fd(self._wake_w)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            if signum == -1:
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def _dispatch_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.log.info("stop_requested", signal=signal.Signals(signum).name)
            self.stopping.set()
        elif signum == signal.SIGHUP:
            self.handle_reload()

    def handle_reload(self) -> None:
        """Re-read the config file; a bad one is refused and the old config stays."""
        if self._reload is None:
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            self.log.error("config_reload_refused", key=exc.key, why=exc.reason)
            return
        fixed = ("agent", "log")
        if (any(getattr(new, name) != getattr(self.config, name) for name in fixed)
                or new.metrics.listen != self.config.metrics.listen):
            self.log.warning("config_reload_partial",
                             why="agent.socket, metrics.listen and log.* change only on restart")
            new = new.model_copy(update={
                "agent": self.config.agent, "log": self.config.log,
                "metrics": new.metrics.model_copy(update={"listen": self.config.metrics.listen})})
        self.state.task_names.limit = new.metrics.max_task_names
        self.config = new
        self._limits.clear()
        self.actor.dry_run = new.recycle.dry_run
        self.state.jitter, self.state.max_share = new.recycle.jitter, new.recycle.max_share
        if self.http is not None:  # running: the agents re-read the file within seconds
            self._publish_settings()
        self._decide(self.clock(), None)  # the grants at once: a dry run, lower caps
        self.log.info("config_reloaded", soft_bytes=new.limits.soft, hard_bytes=new.limits.hard,
                      dry_run=new.recycle.dry_run)

    # -- messages ------------------------------------------------------------------------------

    def receive(self, datagram: Datagram, now: float) -> None:
        """Fold one datagram in; a task-end report is decided on at once."""
        state = self.state
        if datagram.truncated:
            state.dropped["oversized"] += 1
            return
        try:
            message = messages.decode(datagram.data)
        except messages.MessageError as exc:
            state.dropped[exc.reason] += 1
            return
        if datagram.pid != message.pid:
            state.dropped["forged_sender"] += 1  # the kernel says another process sent it
            return
        try:
            worker = state.apply(message, now)
        except Rejected as exc:
            state.dropped[exc.reason] += 1
            return
        state.messages[message.EVENT] += 1
        self._log_events()
        if isinstance(message, messages.WorkerHello) and worker is not None:
            self._refresh_children(worker, now)
        if isinstance(message, messages.WorkerBye):
            grants.remove(self._grant_path(message.pid))
        if worker is None:
            return
        if isinstance(message, messages.ChildExit):
            self._decide(now, worker)  # one fewer in flight: a new grant may be due
        elif (isinstance(message, messages.TaskBatch | messages.TaskEnd | messages.ChildHello)
                and self._near_a_limit(worker, message.pid)):
            self._measure_near_limit(worker, now)
            self._decide(now, worker)

    # -- tick ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Scan when due, sample every child, decide for all workers, publish."""
        started = self.clock()
        if now >= self._next_scan:
            self._scans += 1
            self._scan(full=self._scans % FULL_SCAN_EVERY == 1, now=now)
            self._next_scan = now + self.config.sampling.scan_interval
        for pid, rec in list(self.state.workers.items()):
            if self.between_workers is not None:
                self.between_workers()  # reports waiting meanwhile are decided on now
            live = self.procs.stat(pid)
            if live is None or live.proc != rec.proc:
                self.state.drop_worker(pid)
                grants.remove(self._grant_path(pid))
                self.log.info("worker_gone", worker=rec.name, pid=pid)
                continue
            rec.rss = self.procs.rss(pid) or 0
            self._refresh_children(rec, now)
            for n, child in enumerate(list(rec.children.values()), 1):
                rss = self.procs.rss(child.proc.pid)
                if rss:  # None: gone; 0: exited, not yet reaped
                    self.state.observe(rec, child, rss, now)
                if n % DRAIN_EVERY == 0 and self.between_workers is not None:
                    self.between_workers()  # a large pool must not leave reports waiting
            self._measure_near_limit(rec, now)
            self._total_clock(rec, now)
        self._decide(now, None)
        self._log_events()
        self.procs.sweep()
        self.last_tick = now
        self.metrics.tick_seconds.observe(self.clock() - started)

    def _scan(self, full: bool, now: float) -> None:
        for found in self.procs.scan_workers(full=full):
            known = found.stat.pid in self.state.workers
            rec = self.state.found(found, now)
            if not known:
                self.log.info("worker_found", worker=rec.name, pid=found.stat.pid,
                              agent=rec.agent, children=len(found.children))

    def _refresh_children(self, rec: WorkerRec, now: float) -> None:
        for child in self.state.sync_child_pids(rec, self.procs.child_pids(rec.proc.pid), now):
            self.log.info("child_gone", worker=rec.name, index=child.index, pid=child.proc.pid,
                          tasks=child.tasks, rss_bytes=child.rss,
                          requested=child.requested_at is not None)

    def limits_for(self, worker: str) -> LimitsConfig:
        """The config's limits for a worker name, remembered: a tick asks for every child."""
        limits = self._limits.get(worker)
        if limits is None:
            if len(self._limits) > 4096:
                self._limits.clear()
            limits = self._limits[worker] = self.config.limits_for(worker)
        return limits

    def _soft_hard(self, worker: str) -> tuple[int, int]:
        limits = self.limits_for(worker)
        return limits.soft, limits.hard

    def _total_clock(self, rec: WorkerRec, now: float) -> None:
        """Since when the children's sum (USS where sampled) has been over worker_total."""
        limit = self.limits_for(rec.name or "").worker_total
        total = sum(c.uss if c.uss is not None else c.rss for c in rec.children.values())
        if limit is not None and total >= limit:
            if rec.total_over_since is None:
                rec.total_over_since = now
        else:
            rec.total_over_since = None

    def _near_a_limit(self, rec: WorkerRec, pid: int) -> bool:
        """Whether the report of child ``pid`` can lead to a decision: most cannot, and this is
        the hot path, so only that child is looked at (the others changed on the tick, which
        decides for all). RSS bounds USS and PSS from above, so a child under the lowest soft
        threshold by RSS needs no snapshot; worker_total, when set, sums the pool."""
        limits = self.limits_for(rec.name or "")
        child = rec.children.get(pid)
        if child is not None:
            floor = limits.soft * (1.0 - self.config.recycle.jitter)
            ahead = (self.config.recycle.predictive_tasks * max(child.growth, default=0)
                     if self.config.recycle.predictive else 0)
            if child.rss + ahead >= floor:
                return True
        return (limits.worker_total is not None
                and sum(c.rss for c in rec.children.values()) >= limits.worker_total)

    def _measure_near_limit(self, rec: WorkerRec, now: float) -> None:
        """Read USS/PSS (about 30x dearer than RSS) only where it decides something, and now
        and then for a leaking child, whose USS is what recycling it would free.

        RSS bounds both from above: a child under its soft limit by RSS is under by USS, and
        a worker whose children's RSS sum is under worker_total is under by USS too. A leaking
        child's figure is only shown, so it is read every ``LEAKING_USS_EVERY``: on every
        tick, 200 leaking children cost 12-14 ms of the daemon's second.
        """
        limits = self.limits_for(rec.name or "")
        whole = (limits.worker_total is not None
                 and sum(c.rss for c in rec.children.values()) >= limits.worker_total)
        floor = (limits.soft * (1.0 - self.config.recycle.jitter) if limits.measure != "rss"
                 else float("inf"))
        for child in rec.children.values():
            shown_due = child.leaking and (child.uss_read_at is None
                                           or now - child.uss_read_at >= LEAKING_USS_EVERY)
            if whole or child.rss >= floor or shown_due:
                figures = self.procs.uss_pss(child.proc.pid)
                if figures is not None:
                    child.uss, child.pss = figures
                    child.uss_read_at = now
            elif not child.leaking:  # a leaking child keeps its last figure until the next read
                child.uss = child.pss = child.uss_read_at = None

    def _decide(self, now: float, only: WorkerRec | None) -> None:
        """Decide for one worker (a report) or all (the tick, which also publishes the view)."""
        snapshot = self.state.snapshot(now, only=only, trends=only is None)
        decisions = policy.decide(snapshot, self.limits_for, self.config.recycle,
                                  self.state.requests, now,
                                  term_grace=self.config.sampling.interval)
        # The grant goes out first, less what these decisions use: no child may take a unit
        # the daemon is about to spend. A child that took one meanwhile is leaving already.
        taken = self._grant(snapshot, decisions, now)
        if decisions:
            self.actor.carry_out([d for d in decisions if d.proc.pid not in taken], now)
        if only is None:
            self._warn_storms(snapshot)
        # Published at once when something was done: by the daemon, or by a child under its
        # grant (counted when its exit arrives or its unit is collected).
        changed = any(d.acts for d in decisions) or self.state.revision != self._revision
        if only is None and not changed:
            self.view = self._make_view(now, snapshot)  # nothing changed since the snapshot
        elif changed:
            self.view = self._make_view(now)
            self._revision = self.state.revision

    def _grant(self, snapshot: Snapshot, decisions: list[Decision], now: float) -> set[int]:
        """Publish each agent worker's grant (policy.grants) and collect the units its children
        took since the last exchange, which count as recycles from then on; return their pids."""
        allowed = policy.grants(snapshot, self.limits_for, self.config.recycle,
                                self.state.requests, now, decisions)
        collected: set[int] = set()
        for worker in snapshot.workers:
            rec = self.state.workers.get(worker.pid)
            if rec is None or not rec.agent or not worker.has_children:
                continue
            taken = grants.exchange(self._grant_path(worker.pid), (worker.pid, worker.proc.start),
                                    allowed.get(worker.name, 0))
            if taken:
                self.state.grants_taken(rec, taken, now)
                collected.update(pid for pid, _ in taken)
        return collected

    def _grant_path(self, worker_pid: int) -> str:
        return paths.grant_path(str(self.config.agent.socket), worker_pid)

    def _remove_grants(self) -> None:
        socket_path = self.config.agent.socket
        for path in socket_path.parent.glob(socket_path.name + ".grant.*"):
            grants.remove(str(path))

    def _warn_storms(self, snapshot: Snapshot) -> None:
        """Every child of a pool over its soft threshold at once: the limit is likely too low.
        Recycling goes on at the rate limit; this is said once, until the pool calms down."""
        for worker in snapshot.workers:
            if not worker.has_children:
                self._storms.discard(worker.name)
                continue
            if not worker.children:
                continue  # between recycles and their replacements: not a pool that calmed down
            limits = self.limits_for(worker.name)
            over = [c for c in worker.children if policy.measured(c, limits.measure)
                    >= policy.soft_threshold(limits, self.config.recycle, c.proc,
                                              worker.concurrency)]
            if len(over) < len(worker.children):
                self._storms.discard(worker.name)
            elif worker.name not in self._storms:
                self._storms.add(worker.name)
                self.log.warning(
                    "recycle_storm", worker=worker.name, children=len(worker.children),
                    soft_bytes=limits.soft, fresh_child_bytes=worker.fresh_rss,
                    rss_bytes=[c.rss for c in worker.children],
                    max_per_minute=self.config.recycle.max_per_minute,
                    advice="every child is over the soft limit: raise limits.soft above what a "
                           "child needs; recycles continue at recycle.max_per_minute")

    def _log_events(self) -> None:
        events = self.state.events
        while events:
            name, fields = events.pop(0)
            getattr(self.log, _EVENT_LEVELS.get(name, "warning"))(name, **fields)

    def _publish_settings(self) -> None:
        """Write the hard limit beside the socket, where every child's agent reads it."""
        path = paths.settings_path(str(self.config.agent.socket))
        limits, recycle = self.config.limits, self.config.recycle
        data = settings.encode(settings.AgentSettings(
            hard=limits.hard, watch_interval=limits.watch_interval, soft=limits.soft,
            jitter=recycle.jitter, max_share=recycle.max_share,
            ahead=recycle.predictive_tasks if recycle.predictive else 0,
            measure=limits.measure, dry_run=recycle.dry_run, min_lifetime=recycle.min_lifetime,
            skip_within_tasks=recycle.skip_within_tasks,
            workers=tuple((w.match, w.limits.hard, w.limits.soft, w.limits.measure)
                          for w in self.config.workers)))
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _make_view(self, now: float, snapshot: Snapshot | None = None) -> View:
        state = self.state
        return View(
            snapshot=snapshot if snapshot is not None else state.snapshot(now, trends=True),
            limits={"soft": self.config.limits.soft, "hard": self.config.limits.hard},
            worker_limits={w.name: {"soft": self.limits_for(w.name).soft,
                                    "hard": self.limits_for(w.name).hard}
                           for w in (snapshot or state.snapshot(now)).workers},
            measure=self.config.limits.measure, dry_run=self.config.recycle.dry_run,
            recycles=dict(state.recycles), dry_run_recycles=dict(state.dry_run_recycles),
            interrupted=dict(state.interrupted), oom_kills=dict(state.oom_kills),
            restarts=dict(state.restarts),
            growth={task: (g.cumulative(), g.total) for task, g in state.growth.items()},
            ranking=tuple(growth.rank(state.growth)),
            messages=dict(state.messages), dropped=dict(state.dropped),
            published_at=now, started_at=self._started_wall, memory=self.memory,
            connections=self.inbox.connections if self.inbox is not None else 0,
        )

