"""The files the daemon keeps beside its socket for the agents to read.

``<socket>.settings.json`` (protocol.settings), rewritten atomically at start and on reload;
``<socket>.grant.<worker pid>`` (protocol.grants), exchanged on every decision. Both are
removed when the daemon stops: without a daemon, children no longer recycle themselves.
``<socket>.quarantine.json`` (protocol.quarantine) stays: a restarted daemon reads it back;
so do the rooms ``<socket>.room.<worker pid>`` (protocol.room) of workers still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from celery_memguard.daemon.config import Config
from celery_memguard.protocol import grants, paths, quarantine, room, settings

SETTINGS_MODE = 0o644  # every child reads it; only the daemon writes it


class Publisher:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    def settings(self, config: Config) -> None:
        """Write what every child's agent needs before any task, atomically."""
        limits, recycle = config.limits, config.recycle
        data = settings.encode(settings.AgentSettings(
            hard=limits.hard, watch_interval=limits.watch_interval, soft=limits.soft,
            jitter=recycle.jitter, max_share=recycle.max_share,
            ahead=recycle.predictive_tasks if recycle.predictive else 0,
            measure=limits.measure, dry_run=recycle.dry_run, min_lifetime=recycle.min_lifetime,
            skip_within_tasks=recycle.skip_within_tasks,
            container_soft=limits.container_soft, container_hold=limits.container_hold,
            workers=tuple((w.match, w.limits.hard, w.limits.soft, w.limits.measure,
                           w.limits.container_soft) for w in config.workers)))
        self._write(paths.settings_path(self.socket), data)

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, SETTINGS_MODE)
        os.replace(tmp, path)

    def write_quarantine(self, entries: dict[str, quarantine.Entry], after: int) -> None:
        """Write the quarantined task ids, atomically; the file outlives the daemon."""
        self._write(paths.quarantine_path(self.socket), quarantine.encode(entries, after))

    def load_quarantine(self) -> dict[str, quarantine.Entry]:
        """What a previous daemon quarantined (nothing, when there is no valid file)."""
        try:
            with open(paths.quarantine_path(self.socket), "rb") as fh:
                decoded = quarantine.decode(fh.read(1 << 22))
        except OSError:
            return {}
        return decoded[0] if decoded is not None else {}

    def exchange(self, worker_pid: int, identity: tuple[int, int],
                 grant: int) -> list[tuple[int, str]] | None:
        """Publish a worker's grant; return the (pid, reason) of the units taken since the last
        exchange (None: the file was busy, try on the next tick)."""
        return grants.exchange(paths.grant_path(self.socket, worker_pid), identity, grant)

    def remove_grant(self, worker_pid: int) -> None:
        """A worker is gone: its grant and room files go with it."""
        grants.remove(paths.grant_path(self.socket, worker_pid))
        room.remove(paths.room_path(self.socket, worker_pid))

    def read_room(self, worker_pid: int, identity: tuple[int, int]) -> room.Room | None:
        """A worker's room file (made when missing): what its tasks need at their peak."""
        path = paths.room_path(self.socket, worker_pid)
        found = room.read(path, identity)
        if found is None and room.create(path, identity):
            found = room.read(path, identity)
        return found

    def prune_rooms(self, alive: Callable[[int, int], bool]) -> None:
        """Room files outlive the daemon (what tasks need is worth keeping); those of workers
        that are gone are removed at start."""
        directory = Path(self.socket).parent
        for path in directory.glob(paths.room_glob(self.socket)):
            try:
                pid = int(path.name.rsplit(".", 1)[1])
                body = json.loads(path.read_bytes())
                worker = body["worker"]
                keep = alive(pid, int(worker[1])) and int(worker[0]) == pid
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                keep = False
            if not keep:
                room.remove(str(path))

    def remove_grants(self) -> None:
        """Every worker's grant file, also a previous daemon's."""
        directory = Path(self.socket).parent
        for path in directory.glob(paths.grant_glob(self.socket)):
            grants.remove(str(path))

    def remove_all(self) -> None:
        self.remove_grants()
        with contextlib.suppress(OSError):
            os.unlink(paths.settings_path(self.socket))
