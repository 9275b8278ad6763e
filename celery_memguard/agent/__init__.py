"""The agent: the part of celery-memguard that runs inside Celery's processes.

``install`` connects it to an app (install.py). In the worker's main process it announces the
worker and reports reaped children (main_process.py) and has the pool replace an exited child
promptly (prompt_join.py); in every pool child it joins billiard's own job loop (pool_child.py)
and keeps the child's books (child_agent.py: reports in batches, recycling itself under a
grant), watches its RSS while a task runs (watch.py) and talks to the daemon (sender.py).

It imports the standard library, Celery, billiard and ``celery_memguard.protocol`` only (a test
checks it), and it must never slow or break a worker: every hook swallows its own errors, sends
never block, and nothing here waits.
"""

from celery_memguard.agent.install import install

__all__ = ["install"]
