"""What the daemon does with what arrives: fold it into the state, decide, act, publish a view.

The loop (loop.py) hands the supervisor each datagram the agents send and, once per
``sampling.interval``, runs its tick in three steps: ``sample`` (the loop reads the reports
that wait between workers), ``decide_all`` (the policy, then the actor) and ``publish``. The
supervisor owns the state and is the only caller of the policy and of the actor. A task-end
report is decided on the moment it arrives (a child that runs hundreds of tasks a second must
not overshoot by more than a task or two); the tick samples every child's RSS for the children
that send nothing, and decides for all. No sockets, no threads, no signals here: ``procs``
(the OS seam) and the clock are injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery_memguard.daemon import policy, reports, sampler, view
from celery_memguard.daemon.actions import Actor
from celery_memguard.daemon.config import Config, LimitsByName, LimitsConfig
from celery_memguard.daemon.containers import Containers
from celery_memguard.daemon.decision import Decision
from celery_memguard.daemon.forensics import Forensics
from celery_memguard.daemon.inbox import Datagram
from celery_memguard.daemon.metrics import Metrics
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.publisher import Publisher
from celery_memguard.daemon.records import Rejected, WorkerRec
from celery_memguard.daemon.snapshot import Snapshot
from celery_memguard.daemon.state import State
from celery_memguard.daemon.view import View
from celery_memguard.protocol import messages

FULL_SCAN_EVERY = 12  # scans between two that re-read every command line
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
        self.memory = procs.memory_limit()  # what percentages in the config resolved against
        self.by_name = LimitsByName(config, self.memory)
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
        self.connections: Callable[[], int] = lambda: 0  # agent connections, from the loop's inbox
        self.stall_triggers: Callable[[], dict[str, Any]] = dict  # the loop's (pressure.py)
        self.started_at = time.time()
        self.last_tick = clock()
        self._next_scan = 0.0
        self._scans = 0
        self._storms: set[str] = set()  # workers whose storm was already logged
        self._revision = 0  # the state's revision the published view shows
        self.containers = Containers(procs, self.state, self.limits_for)
        self._tick_started = 0.0
        self._quarantine_published = 0
        self._drop_logged: OrderedDict[int, None] = OrderedDict()  # sender pids, logged once
        self.view = self._make_view(clock())

    # -- config ---------------------------------------------------------------------------------

    def limits_for(self, worker: str) -> LimitsConfig:
        return self.by_name.limits(worker)

    def _soft_hard(self, worker: str) -> tuple[int, int]:
        limits = self.limits_for(worker)
        return limits.soft, limits.hard

    def reload(self, new: Config, publish: bool) -> None:
        """Apply a new config; ``publish``: rewrite the agents' settings file (when running)."""
        self.state.task_names.limit = new.metrics.max_task_names
        self.config = new
        self.by_name = LimitsByName(new, self.memory)
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
        if worker is not None and not worker.room_made and (
                isinstance(message, messages.ChildHello)  # a pool's children start first
                or (isinstance(message, messages.WorkerHello) and message.pool == "prefork")):
            self.publisher.read_room(worker.proc.pid, (worker.proc.pid, worker.proc.start))
            worker.room_made = True  # its children share what their tasks need there
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

    def tick(self, now: float) -> None:
        """A whole tick at once, the reports that arrive meanwhile left waiting (the loop runs
        the steps itself, reading them between workers)."""
        for _ in self.sample(now):
            pass
        self.decide_all(now)
        self.publish(now)

    def sample(self, now: float) -> Iterator[None]:
        """Scan when due; read every worker, its container and its children's RSS. Yields
        between workers and every ``DRAIN_EVERY`` children, where the loop reads the reports
        waiting meanwhile: a large host does not leave them waiting for the whole tick."""
        self._tick_started = self.clock()
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
            yield
            live = self.procs.stat(pid)
            if live is None or live.proc != rec.proc:
                self.state.drop_worker(pid)
                self.containers.forget(pid)
                self.publisher.remove_grant(pid)
                self.log.info("worker_gone", worker=rec.name, pid=pid)
                continue
            rec.rss = self.procs.rss(pid) or 0
            rec.may_signal = self.procs.may_signal(pid)
            self.containers.read(rec, now, find=self._scans % FULL_SCAN_EVERY == 1)
            self._refresh_children(rec, now)
            for n, child in enumerate(list(rec.children.values()), 1):
                rss = self.procs.rss(child.proc.pid)
                if rss:  # None: gone; 0: exited, not yet reaped
                    self.state.observe(rec, child, rss, now)
                if n % DRAIN_EVERY == 0:
                    yield
            limits = self.limits_for(rec.name or "")
            self.sampler.sample(rec, limits, self.config.recycle, now)
            sampler.total_clock(rec, limits, now)

    def decide_all(self, now: float) -> None:
        """Judge the trends, decide for every worker and act; place or end leak traces."""
        self.state.assess_trends()
        self.decide(now, None)
        self.forensics.tick(now, self.view.snapshot, self.view.ranking)

    def publish(self, now: float) -> None:
        """What the tick did, for scrapes, logs and the children; the tick's time."""
        self.view = replace(self.view, leak_sites=self.forensics.documents(),
                            forensics=self.forensics.status(),
                            stall_triggers=self.stall_triggers())
        self._log_events()
        self.publish_quarantine()
        self.procs.sweep()
        self.last_tick = now
        self.metrics.tick_seconds.observe(self.clock() - self._tick_started)

    def on_stall(self, fired: list[Path], now: float) -> None:
        """A stall trigger fired (pressure.py): decide now for the workers of the containers
        it measures, read afresh, not at the next tick."""
        for rec in self.containers.stalled(fired, self.state.workers.values(), now):
            reading = rec.container_reading
            self.log.info("memory_stall", worker=rec.name, pid=rec.proc.pid,
                          some_avg10=reading.pressure.some_avg10
                          if reading and reading.pressure else None,
                          working_set_bytes=reading.working_set if reading else None,
                          limit_bytes=reading.limit if reading else None)
            self.decide(now, rec)

    def watch_containers(self, now: float) -> float:
        """Between ticks: a container past its hard line is decided on at once (its growing
        task is interrupted). Returns when to look again (containers.py)."""
        over, due = self.containers.watch(list(self.state.workers.values()), now,
                                          self.config.sampling.interval)
        for rec in over:
            self.decide(now, rec)
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
        """Said once per storm (policy.new_storms): the soft limit is likely too low."""
        for worker in policy.new_storms(snapshot, self.limits_for, self.config.recycle,
                                        self._storms):
            self.log.warning(
                "recycle_storm", worker=worker.name, children=len(worker.children),
                soft_bytes=self.limits_for(worker.name).soft, fresh_child_bytes=worker.fresh_rss,
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

    def _make_view(self, now: float, snapshot: Snapshot | None = None) -> View:
        return view.build(self.state, snapshot if snapshot is not None
                          else self.state.snapshot(now, trends=True),
                          self.config, self.limits_for, self.by_name.sources, now=now,
                          started_at=self.started_at, memory=self.memory,
                          connections=self.connections(), leak_sites=self.forensics.documents(),
                          forensics=self.forensics.status(), stall_triggers=self.stall_triggers())
