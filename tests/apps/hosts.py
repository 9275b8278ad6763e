"""Programs that run a worker of tests.apps.leaky other than by ``celery worker``, the ways other
programs start or embed one: ``python -m tests.apps.hosts MODE``.

The queue, nodename and concurrency come from the environment (tests/support.py ``Worker``);
SIGTERM stops the worker. Modes: ``worker_main`` (``app.worker_main([...])``), ``app_worker``
(``app.Worker(...).start()``), ``workcontroller`` (a WorkController in a thread of this
program) and ``start_worker`` (celery.contrib.testing's, which runs one the same way).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from tests.apps.leaky import app


def main(mode: str) -> None:
    queue, name = os.environ["MEMGUARD_TEST_QUEUE"], os.environ["MEMGUARD_TEST_NAME"]
    concurrency = int(os.environ["MEMGUARD_TEST_CONCURRENCY"])
    options: dict[str, Any] = {
        "concurrency": concurrency, "queues": [queue], "hostname": name, "loglevel": "WARNING",
        "without_gossip": True, "without_mingle": True, "without_heartbeat": True}
    if mode == "worker_main":
        app.worker_main(["worker", "-c", str(concurrency), "-Q", queue, "-n", name,
                         "--loglevel", "warning", "--without-gossip", "--without-mingle",
                         "--without-heartbeat"])
    elif mode == "app_worker":
        app.Worker(**options).start()
    elif mode in ("workcontroller", "start_worker"):
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        if mode == "workcontroller":
            from celery.worker import WorkController  # noqa: PLC0415

            worker = WorkController(app=app, pool_cls="prefork", **options)
            thread = threading.Thread(target=worker.start, daemon=True)
            thread.start()
            done.wait()
            worker.stop()
            thread.join(15)
        else:
            from celery.contrib.testing.worker import start_worker  # noqa: PLC0415

            fixed = ("without_gossip", "without_mingle")  # start_worker sets them itself
            with start_worker(app, pool="prefork", perform_ping_check=False,
                              shutdown_timeout=15.0,
                              **{k: v for k, v in options.items() if k not in fixed}):
                done.wait()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1])
