"""What the daemon does with what arrives: fold it into the state, decide, act, publish a view.

The loop (loop.py) hands the supervisor each datagram the agents send and calls its tick once
per ``sampling.interval``; the supervisor owns the state and is the only caller of the policy
and of the actor. A task-end report is decided on the moment it arrives (a child that runs
hundreds of tasks a second must not overshoot by more than a task or two); the tick samples
every child's RSS for the children that send nothing, and decides for all. No sockets, no
threads, no signals here: ``procs`` (the OS seam) and the clock are injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery_memguard.daemon import container_policy, policy, reports, sampler, task_growth
from celery_memguard.daemon.actions import Actor
from celery_memguard.daemon.config import Config, LimitsConfig
from celery_memguard.daemon.decision import Decision
from celery_memguard.daemon.forensics import Forensics
from celery_memguard.daemon.inbox import Datagram
from celery_memguard.daemon.metrics import Metrics
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.publisher import Publisher
from celery_memguard.daemon.records import Rejected, WorkerRec
from celery_memguard.daemon.snapshot import Snapshot, Worker
from celery_memguard.daemon.state import State
from celery_memguard.daemon.view import View
from celery_memguard.protocol import messages
from celery_memguard.protocol.cgroups import Container, ContainerReading

FULL_SCAN_EVERY = 12  # scans between two that re-read every command line
FASTEST_CONTAINER_GROWTH = 4 << 30  # bytes a second a container's working set may grow
CONTAINER_CHECK_MIN = 0.01  # seconds: the closest two looks at a container near its hard line
DRAIN_EVERY = 128  # children sampled between two looks at waiting reports
HELLO_GRACE = 4.0  # seconds a worker known only from its children waits for a hello to name it
DROP_LOG_SENDERS = 4096  # senders whose dropped messages were logged (each once)
_EVENT_LEVELS = {"recycle_requested": "info", "task_held": "info"}  # the others: warnings


class Supervisor:
    def __init__(self, config: Config, procs: Procs, clock: Callable[[], float], log: Any) -> None:
        self.config = config
        self.procs = procs
        self.clock = clock
        self.log = log
        self._limits: dict[str, LimitsConfig] = {}  # limits_for, per worker name
        self._sources: dict[str, dict[str, str]] = {}  # where each limit comes from, per name
        self.state = State(procs.stat, limits=self._soft_hard, jitter=config.recycle.jitter,
                           max_share=config.recycle.max_share,
                           max_task_names=config.metrics.max_task_names,
                           age=lambda proc: procs.age(proc.start), wall=time.time)
        self.state.quarantine_after = config.quarantine.after
        self.actor = Actor(procs, self.state, log, config.recycle.dry_run)
        self.sampler = sampler.UssSampler(procs)
        self.forensics = Forensics(config, self.actor, log, time.time)
        self.publisher = Publisher(str(config.agent.socket))
        self.metrics = Metrics(lambda: self.view)
        self.memory = procs.memory_limit()  # what percentages in the config resolved against
        self.connections: Callable[[], int] = lambda: 0  # agent connections, from the loop's inbox
        self.started_at = time.time()
        self.last_tick = clock()
        self._next_scan = 0.0
        self._scans = 0
        self._storms: set[str] = set()  # workers whose storm was already logged
        self._revision = 0  # the state's revision the published view shows
        self._containers: dict[int, Container | None] = {}  # worker pid -> its memory cgroup
        self._container_reads: dict[tuple[Path, Path, Path | None],
                                    tuple[float, ContainerReading | None]] = {}
        self._quarantine_published = 0
        self._drop_logged: OrderedDict[int, None] = OrderedDict()  # sender pids, logged once
        self.view = self._make_view(clock())

    # -- config ---------------------------------------------------------------------------------

    def limits_for(self, worker: str) -> LimitsConfig:
        """The config's limits for a worker name, remembered: a tick asks for every child."""
        limits = self._limits.get(worker)
        if limits is None:
            if len(self._limits) > 4096:
                self._limits.clear()
            limits = self._limits[worker] = self.config.limits_for(worker)
        return limits

    def _limit_sources(self, worker: str) -> dict[str, str]:
        sources = self._sources.get(worker)
        if sources is None:
            if len(self._sources) > 4096:
                self._sources.clear()
            sources = self._sources[worker] = self.config.limit_sources(worker, self.memory)
        return sources

    def _soft_hard(self, worker: str) -> tuple[int, int]:
        limits = self.limits_for(worker)
        return limits.soft, limits.hard

    def reload(self, new: Config, publish: bool) -> None:
        """Apply a new config; ``publish``: rewrite the agents' settings file (when running)."""
        self.state.task_names.limit = new.metrics.max_task_names
        self.config = new
        self._limits.clear()
        self._sources.clear()
        self.actor.dry_run = new.recycle.dry_run
        self.state.jitter, self.state.max_share = new.recycle.jitter, new.recycle.max_share
        self.state.quarantine_after = new.quarantine.after
        self.forensics.config = new
        if publish:  # the agents re-read the files within seconds
            self.publisher.settings(new)
            self.publisher.write_quarantine(self.state.quarantined, new.quarantine.after)
        self.decide(self.clock(), None)  # the grants at once: a dry run, lower caps
        self.log.info("config_reloaded", soft_bytes=new.limits.soft, hard_bytes=new.limits.hard,
                      dry_run=new.recycle.dry_run)

    # -- messages -------------------------------------------------------------------------------

    def receive(self, datagram: Datagram, now: float) -> None:
        """Fold one datagram in; a task-end report is decided on at once."""
        state = self.state
        if datagram.truncated:
            self._drop("oversized", datagram)
            return
        try:
            message = messages.decode(datagram.data)
        except messages.MessageError as exc:
            self._drop(exc.reason, datagram)
            return
        if datagram.pid != message.pid:
            self._drop("forged_sender", datagram, message)  # the kernel says another sent it
            return
        try:
            worker = reports.fold(state, message, now)
        except Rejected as exc:
            self._drop(exc.reason, datagram, message)
            return
        state.messages[message.EVENT] += 1
        self.forensics.receive(message, worker, now)
        self._log_events()
        self.publish_quarantine()
        if isinstance(message, messages.WorkerHello) and worker is not None:
            self._refresh_children(worker, now)
            if message.pool == "prefork":  # its children share what their tasks need there
                self.publisher.read_room(worker.proc.pid, (worker.proc.pid, worker.proc.start))
        if isinstance(message, messages.WorkerBye):
            self.publisher.remove_grant(message.pid)
        if worker is None:
            return
        limits = self.limits_for(worker.name or "")
        if isinstance(message, messages.ChildExit):
            self.decide(now, worker)  # one fewer in flight: a new grant may be due
        elif (isinstance(message, messages.TaskBatch | messages.TaskEnd | messages.ChildHello)
                and sampler.near_a_limit(worker, message.pid, limits, self.config.recycle)):
            self.sampler.sample(worker, limits, self.config.recycle, now)
            self.decide(now, worker)

    def _drop(self, reason: str, datagram: Datagram, message: messages.Message | None = None,
              ) -> None:
        """Count a message the daemon cannot use, and say so once per sending process."""
        self.state.dropped[reason] += 1
        if datagram.pid in self._drop_logged:
            return
        self._drop_logged[datagram.pid] = None
        if len(self._drop_logged) > DROP_LOG_SENDERS:
            self._drop_logged.popitem(last=False)
        claims = {"claimed_parent": message.ppid} if isinstance(message, messages.ChildReport) else {}
        self.log.warning("message_dropped", reason=reason, sender_pid=datagram.pid,
                         sender_uid=datagram.uid,
                         message=message.EVENT if message is not None else None, **claims,
                         advice="later messages from this process are counted, not logged: "
                                "see celery_memguard_messages_dropped_total")

    # -- tick -----------------------------------------------------------------------------------

    def tick(self, now: float, drain: Callable[[], object] | None = None) -> None:
        """Scan when due, sample every child, decide for all workers, publish. ``drain`` reads
        the reports waiting meanwhile, between workers and every ``DRAIN_EVERY`` children, so
        that a large host does not leave them waiting for the whole tick."""
        started = self.clock()
        if now >= self._next_scan:
            self._scans += 1
            self._scan(full=self._scans % FULL_SCAN_EVERY == 1, now=now)
            self._next_scan = now + self.config.sampling.scan_interval
        for rec in self.state.name_unannounced(now, HELLO_GRACE):
            self.log.warning("worker_without_hello", worker=rec.name, pid=rec.proc.pid,
                             children=len(rec.children),
                             advice="its children speak but its main process never said hello "
                                    "nor its children its nodename: shown under its pid")
        for pid, rec in list(self.state.workers.items()):
            if drain is not None:
                drain()
            live = self.procs.stat(pid)
            if live is None or live.proc != rec.proc:
                self.state.drop_worker(pid)
                self._containers.pop(pid, None)
                self.publisher.remove_grant(pid)
                self.log.info("worker_gone", worker=rec.name, pid=pid)
                continue
            rec.rss = self.procs.rss(pid) or 0
            rec.may_signal = self.procs.may_signal(pid)
            self._read_container(rec, now)
            self._refresh_children(rec, now)
            for n, child in enumerate(list(rec.children.values()), 1):
                rss = self.procs.rss(child.proc.pid)
                if rss:  # None: gone; 0: exited, not yet reaped
                    self.state.observe(rec, child, rss, now)
                if n % DRAIN_EVERY == 0 and drain is not None:
                    drain()
            limits = self.limits_for(rec.name or "")
            self.sampler.sample(rec, limits, self.config.recycle, now)
            sampler.total_clock(rec, limits, now)
        self.state.assess_trends()
        self.decide(now, None)
        self.forensics.tick(now, self.view.snapshot, self.view.ranking)
        self.view = replace(self.view, leak_sites=self.forensics.documents(),
                            forensics=self.forensics.status())  # what the tick just did
        self._log_events()
        self.publish_quarantine()
        self.procs.sweep()
        self.last_tick = now
        self.metrics.tick_seconds.observe(self.clock() - started)

    def _read_container(self, rec: WorkerRec, now: float) -> None:
        """The worker's memory cgroup: found once (again on each full scan), read every tick;
        its OOM kill counter is what tells an OOM kill from another SIGKILL."""
        pid = rec.proc.pid
        if pid not in self._containers or self._scans % FULL_SCAN_EVERY == 1:
            self._containers[pid] = self.procs.container(pid)
        container = self._containers[pid]
        rec.container = container.path if container is not None else None
        reading = self._container_reading(container, now) if container is not None else None
        if reading is None:  # not visible from here: as the worker's agent read it (its hello)
            reading = rec.reported_container
        rec.container_reading = reading
        if reading is None:
            rec.container_over_since = None
            return
        self.state.oom.observe(rec.container_key, reading.events.get("oom_kill"), now)
        if not container_policy.over_soft(reading, self.limits_for(rec.name or "")):
            rec.container_over_since = None
        elif rec.container_over_since is None:
            rec.container_over_since = now

    def _container_reading(self, container: Container, now: float) -> ContainerReading | None:
        """One read of a cgroup serves every worker in it, and the tick and the watch that
        follows it at once: a reading younger than half the closest look is used again."""
        key = (container.directory, container.own, container.pressure_file)
        kept = self._container_reads.get(key)
        if kept is not None and 0 <= now - kept[0] < CONTAINER_CHECK_MIN / 2:
            return kept[1]
        reading = self.procs.read_container(container)
        if len(self._container_reads) > 4096:
            self._container_reads.clear()
        self._container_reads[key] = (now, reading)
        return reading

    def watch_containers(self, now: float) -> float:
        """Between ticks: read the containers that have a hard line; one past it is decided on
        at once (its growing task is interrupted). Returns when to look again: sooner the
        closer a container is to its line, as a child growing ``FASTEST_CONTAINER_GROWTH``
        could reach it."""
        due = now + self.config.sampling.interval
        for rec in list(self.state.workers.values()):
            container = self._containers.get(rec.proc.pid)
            limits = self.limits_for(rec.name or "")
            if container is None or limits.container_hard is None:
                continue  # unseen, or known from the worker's hellos only: the tick will do
            self._read_container(rec, now)
            reading = rec.container_reading
            if reading is None or reading.limit is None:
                continue
            if container_policy.over_hard(reading, limits):
                self.decide(now, rec)
            headroom = reading.limit * limits.container_hard - reading.working_set
            due = min(due, now + max(CONTAINER_CHECK_MIN, headroom / FASTEST_CONTAINER_GROWTH))
        return due

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

    # -- decide, act, publish -------------------------------------------------------------------

    def decide(self, now: float, only: WorkerRec | None) -> None:
        """Decide for one worker (a report) or all (the tick, which also publishes the view)."""
        snapshot = self.state.snapshot(now, only=only, trends=only is None)
        decisions = policy.decide(snapshot, self.limits_for, self.config.recycle,
                                  self.state.requests, now,
                                  term_grace=self.config.sampling.interval)
        # The grant goes out first, less what these decisions use: no child may take a unit
        # the daemon is about to spend. A child that took one meanwhile is leaving already.
        taken = self._grant(snapshot, decisions, now, only)
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

    def publish_quarantine(self) -> None:
        """Write the quarantined task ids for the children, when the list changed."""
        if self.state.quarantine_revision != self._quarantine_published:
            self._quarantine_published = self.state.quarantine_revision
            self.publisher.write_quarantine(self.state.quarantined, self.config.quarantine.after)

    def alive(self, pid: int, start: int) -> bool:
        """Whether a process with this pid and start time still runs."""
        stat = self.procs.stat(pid)
        return stat is not None and stat.start == start

    def _grant(self, snapshot: Snapshot, decisions: list[Decision], now: float,
               only: WorkerRec | None) -> set[int]:
        """Publish each agent worker's grant (policy.grant_sizes) and collect the units its
        children took since the last exchange, which count as recycles from then on; return
        their pids."""
        allowed = policy.grant_sizes(snapshot, self.limits_for, self.config.recycle,
                                     self.state.requests, now, decisions)
        collected: set[int] = set()
        for worker in snapshot.workers:
            rec = self.state.workers.get(worker.pid)
            if rec is None or not rec.agent or not worker.has_children:
                continue
            taken = self.publisher.exchange(worker.pid, (worker.pid, worker.proc.start),
                                            allowed.get(worker.name, 0))
            if only is None:  # the tick: what its tasks need, as its children share it
                found = self.publisher.read_room(worker.pid, (worker.pid, worker.proc.start))
                if found is not None:
                    for task, need in found.needs.items():
                        self.state.needs[self.state.task_names.label(task)] = need
            if taken:
                reports.units_taken(self.state, rec, taken, now)
                collected.update(pid for pid, _ in taken)
        return collected

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
                    >= policy.threshold_of(limits, self.config.recycle, c.proc,
                                                         worker.threshold_pool)]
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
                           "child needs; recycles continue at recycle.max_per_minute (a child "
                           "that grew to the limit over 20 tasks or more is recycled regardless)")

    def _log_events(self) -> None:
        events = self.state.events
        while events:
            name, fields = events.pop(0)
            getattr(self.log, _EVENT_LEVELS.get(name, "warning"))(name, **fields)

    def _limits_shown(self, worker: Worker) -> dict[str, int]:
        """A worker's limits in bytes by level, with its container's lines where it has one."""
        limits = self.limits_for(worker.name)
        shown = {"soft": limits.soft, "hard": limits.hard}
        if worker.container is not None:
            soft, hard = container_policy.lines(worker.container, limits)
            shown.update({k: v for k, v in (("container_soft", soft), ("container_hard", hard))
                          if v is not None})
        return shown

    def _make_view(self, now: float, snapshot: Snapshot | None = None) -> View:
        state = self.state
        if snapshot is None:
            snapshot = state.snapshot(now, trends=True)
        return View(
            snapshot=snapshot,
            limits={"soft": self.config.limits.soft, "hard": self.config.limits.hard},
            worker_limits={w.name: self._limits_shown(w) for w in snapshot.workers},
            measure=self.config.limits.measure, dry_run=self.config.recycle.dry_run,
            recycles=dict(state.recycles), dry_run_recycles=dict(state.dry_run_recycles),
            interrupted=dict(state.interrupted), oom_kills=dict(state.oom_kills),
            restarts=dict(state.restarts), holds=dict(state.holds),
            hold_seconds=dict(state.hold_seconds), quarantined=len(state.quarantined),
            needs=dict(state.needs),
            growth={task: (g.cumulative(), g.total) for task, g in state.growth.items()},
            ranking=tuple(task_growth.rank(state.growth)),
            messages=dict(state.messages), dropped=dict(state.dropped),
            published_at=now, started_at=self.started_at, memory=self.memory,
            connections=self.connections(), socket=str(self.config.agent.socket),
            socket_source=self.config.socket_source,
            limit_sources={w.name: self._limit_sources(w.name) for w in snapshot.workers},
            leak_sites=self.forensics.documents(), forensics=self.forensics.status(),
        )
