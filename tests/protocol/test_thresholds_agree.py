"""The agent and the daemon compute the same soft threshold for the same child and settings.

A child recycles itself under a grant at its own threshold (agent/child_agent.py, from the
settings file); the daemon's policy and state judge it at theirs (daemon/policy.py,
daemon/state.py). Both must come out equal, jitter and pool size included, or a child would
leave too early or wait for a signal that the daemon has no reason to send.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from celery_memguard.agent.child_agent import ChildAgent
from celery_memguard.daemon import config, policy
from celery_memguard.daemon.publisher import Publisher
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.records import ChildRec, WorkerRec
from celery_memguard.daemon.state import State
from tests.builders import MiB

CASES = [  # (top-level limits, recycle, workers, node, pool size)
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": "5%"}, [], "w@h", 2),
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": "20%"}, [], "w@h", 8),
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": "20%", "max_share": "25%"}, [], "w@h", 7),
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": "20%", "max_share": "100%"}, [], "w@h", 2),
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": "10%"}, [], "w@h", 0),
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": 0}, [], "w@h", 4),
    ({"soft": "100MiB", "hard": "200MiB"}, {"jitter": "30%"},
     [{"match": "big@*", "limits": {"soft": "1GiB", "hard": "2GiB"}}], "big@h", 16),
]


@pytest.mark.parametrize(("limits", "recycle", "workers", "node", "pool"), CASES)
def test_the_child_and_the_daemon_agree_on_its_threshold(
        tmp_path: Path, limits: dict[str, object], recycle: dict[str, object],
        workers: list[dict[str, object]], node: str, pool: int) -> None:
    socket = str(tmp_path / "agent.sock")
    cfg = config.parse({"agent": {"socket": socket}, "limits": limits, "recycle": recycle,
                        "workers": workers}, memory_total=64 * 1024 * MiB, env={})
    Publisher(socket).settings(cfg)
    agent = ChildAgent(0, socket, node=node, pool=pool)
    agent.load_settings()

    me = ProcId(os.getpid(), agent.start_ticks)
    limits_of = cfg.limits_for(node)
    by_policy = policy.threshold_of(limits_of, cfg.recycle, me, pool)
    state = State(lambda pid: None, limits=lambda name: (limits_of.soft, limits_of.hard),
                  jitter=cfg.recycle.jitter, max_share=cfg.recycle.max_share)
    rec = WorkerRec(proc=ProcId(os.getppid(), 1), name=node, concurrency=pool)
    child = ChildRec(proc=me, ppid=os.getppid(), index=0)
    state.observe(rec, child, by_policy, 0.0)  # exactly at the threshold the policy computed
    assert agent.soft_threshold == by_policy
    assert child.over_soft_since == 0.0  # the state's clock starts at that very figure
    state.observe(rec, child, by_policy - 1, 1.0)
    assert child.over_soft_since is None
    assert 0 < agent.soft_threshold <= limits_of.soft
