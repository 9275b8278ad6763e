"""Task boundaries from Celery's task signals, where billiard's loop could not be joined.

A pool child whose billiard worker lacks ``wait_for_job`` (where a task begins) or
``prepare_result`` (where it ends) follows its tasks through ``task_prerun`` and
``task_postrun`` instead, so that its reports and its hard-limit watch go on. Only the
outermost task counts: a task that runs another with ``apply()`` sends both signals again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import CodeType
from typing import Any

from celery import signals

from celery_memguard.agent.child_agent import CHILD_HELLO_SECONDS, ChildAgent
from celery_memguard.protocol import messages


def connect(agent: ChildAgent, begins: bool, ends: bool,
            run_code: Callable[[Any], CodeType | None]) -> None:
    """Take the beginnings (``begins``) and/or the ends (``ends``) of tasks from the signals."""
    depth = [0]

    def prerun(task_id: Any = None, task: Any = None, **_: Any) -> None:
        depth[0] += 1
        if begins and depth[0] == 1:
            with contextlib.suppress(Exception):
                name = getattr(task, "name", None)
                agent.begin(messages.clean_name(name) if isinstance(name, str) else "unknown",
                            str(task_id)[: messages.MAX_NAME], run_code(task))

    def postrun(state: Any = None, **_: Any) -> None:
        depth[0] = max(0, depth[0] - 1)
        if depth[0] or not ends:
            return
        with contextlib.suppress(Exception):
            if agent.running:
                agent.end(state == "SUCCESS")
            if time.monotonic() - agent.last_hello > CHILD_HELLO_SECONDS:
                agent.hello()

    uid = f"celery_memguard.fallback.{agent.pid}"
    signals.task_prerun.connect(prerun, weak=False, dispatch_uid=uid + ".prerun")
    signals.task_postrun.connect(postrun, weak=False, dispatch_uid=uid + ".postrun")
