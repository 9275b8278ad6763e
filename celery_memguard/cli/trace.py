"""``celery-memguard trace TASK``: have one child trace the next calls of a task name now, and
print where what they leave behind is kept.

The request goes over the daemon's agent socket (whoever may connect to it may ask: the same
group the workers run in); its progress and result are read from /status. Exit 0 with the
result (a partial one says so), 1 with the reason when no child ran the task in time or the
daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery_memguard.protocol import messages

EX_OK, EX_FAILURE = 0, 1
POLL_SECONDS = 0.25
GRACE_SECONDS = 40.0  # past --timeout: the daemon's wait for a last report, and a tick or two


def run_trace(args: argparse.Namespace, fetch: Callable[[], tuple[int, dict[str, Any] | None]],
              load: Callable[[str | None], Any], clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> int:
    """Send the request, then follow it in /status until it ends or the time is up."""
    if args.calls is not None and not 0 < args.calls <= 1000:
        print("--calls must be between 1 and 1000", file=sys.stderr)
        return 2
    path = args.socket or str(load(args.config).agent.socket)
    rid = f"cli-{uuid.uuid4().hex[:12]}"
    request = messages.TraceRequest(pid=os.getpid(), id=rid, task=args.task, calls=args.calls,
                                    worker=args.worker, timeout_ms=int(args.timeout * 1000))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.send(messages.encode(request))
    except OSError as exc:
        print(f"cannot reach the daemon's socket {path} ({exc.strerror or exc}): is "
              f"'celery-memguard run' running, and may this user connect to it?", file=sys.stderr)
        return EX_FAILURE
    deadline = clock() + args.timeout + GRACE_SECONDS
    trace: dict[str, Any] | None = None
    while clock() < deadline:
        code, document = fetch()
        if document is None:
            return code
        trace = next((t for t in document.get("forensics", {}).get("traces", [])
                      if t.get("id") == rid), trace)
        if trace is not None and trace["state"] in ("done", "failed"):
            break
        sleep(POLL_SECONDS)
    if trace is None:
        print(f"the daemon did not take the request for {args.task} (is it older than this "
              f"command, or are forensics off?)", file=sys.stderr)
        return EX_FAILURE
    if trace["state"] != "done":
        print(f"no trace of {args.task}: {trace['reason'] or 'no child ran it in time'}",
              file=sys.stderr)
        return EX_FAILURE
    if args.json:
        print(json.dumps(trace["result"], indent=1))
    else:
        from celery_memguard.cli.render import leak_sites  # noqa: PLC0415 - rich, only here

        leak_sites(trace["result"])
    return EX_OK
