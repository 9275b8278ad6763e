"""The loop's control without its socket: reloads, /healthz, and the settings file it writes."""

from __future__ import annotations

from typing import Any

import structlog

from celery_memguard.daemon import config
from celery_memguard.daemon.loop import Daemon
from celery_memguard.protocol import settings
from tests.builders import MiB
from tests.daemon.harness import make, make_config
from tests.fakes import Clock, FakeProcs


def test_reload_applies_a_valid_config_and_keeps_the_old_one_on_error(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """SIGHUP re-reads the file: a refused one is logged with its key and changes nothing."""
    results: list[Any] = [config.ConfigError("limits.soft", "bad"),
                          config.parse({"limits": {"soft": "50MiB", "hard": "200MiB"}}, env={})]

    def reload() -> config.Config:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[no-any-return]

    daemon = Daemon(make_config(), procs=procs, clock=Clock(), log=structlog.get_logger(),
                    reload=reload)
    daemon.handle_reload()
    assert daemon.config.limits.soft == 100 * MiB
    assert [e["key"] for e in logs if e["event"] == "config_reload_refused"] == ["limits.soft"]
    daemon.handle_reload()
    assert daemon.config.limits.soft == 50 * MiB


def test_a_reload_keeps_the_socket_and_the_listen_address(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """What is bound at start changes only on restart; the rest of the new file applies."""
    moved = make_config(agent={"socket": "/elsewhere/agent.sock"},
                        metrics={"listen": "127.0.0.1:1"}, limits={"soft": "60MiB"})
    daemon = Daemon(make_config(), procs=procs, clock=Clock(), log=structlog.get_logger(),
                    reload=lambda: moved)
    before = daemon.config
    daemon.handle_reload()
    assert daemon.config.agent == before.agent
    assert daemon.config.metrics.listen == before.metrics.listen
    assert daemon.config.limits.soft == 60 * MiB
    assert [e["event"] for e in logs if e["event"].startswith("config_reload")] == [
        "config_reload_partial", "config_reloaded"]


def test_healthz_turns_unhealthy_when_the_loop_stops_ticking(procs: FakeProcs) -> None:
    clock = Clock(0.0)
    daemon = Daemon(make_config(), procs=procs, clock=clock, log=structlog.get_logger())
    daemon.supervisor.tick(clock())
    assert daemon.healthy()
    clock.advance(30)
    assert not daemon.healthy()


def test_the_hard_limit_is_published_for_the_agents(procs: FakeProcs, tmp_path: Any) -> None:
    """The children read their limits, and the rules under which they may leave on their own,
    from a file beside the socket."""
    sup = make(procs, agent={"socket": str(tmp_path / "a.sock")},
               limits={"watch_interval": "20ms"},
               recycle={"min_lifetime": "3s", "skip_within_tasks": 4, "dry_run": True},
               workers=[{"match": "big@*", "limits": {"soft": "150MiB", "measure": "uss"}}])
    sup.publisher.settings(sup.config)
    data = (tmp_path / "a.sock.settings.json").read_bytes()
    assert settings.decode(data) == settings.AgentSettings(
        hard=200 * MiB, watch_interval=0.02, soft=100 * MiB, jitter=0.0, max_share=0.5,
        dry_run=True, min_lifetime=3.0, skip_within_tasks=4, container_soft=0.85,
        container_hold=30.0, workers=(("big@*", 200 * MiB, 150 * MiB, "uss", 0.85),))
