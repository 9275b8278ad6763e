"""``celery-memguard doctor``: the one command to run when something seems off.

It asks the daemon for its /status and looks at the socket from where it runs, then says, one
line per fact, ok, warn or fail, with the fix for each that is not ok. ``diagnose`` is pure: a
status document and what this process saw in, checks out.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from celery_memguard.daemon.status import socket_facts
from celery_memguard.daemon.units import format_bytes
from celery_memguard.protocol import hooks

CELERY_TESTED = ((5, 3), (5, 7))  # the minors the test command runs end to end
BILLIARD_TESTED = ((4, 3), (4, 3))  # what every tested minor pulls in; 4.2 never ran


@dataclass(frozen=True)
class Check:
    level: str  # ok, warn or fail
    subject: str  # daemon, socket, or a worker's name
    what: str
    fix: str = ""


def diagnose(document: dict[str, Any] | None, url: str, reach_error: str = "",
             here: dict[str, Any] | None = None) -> list[Check]:
    """The checks for a daemon's /status ``document`` (None: unreachable, ``reach_error``
    says why) and ``here``: the socket as this process sees it (socket_facts, plus
    ``connect``: None or why connecting failed)."""
    if document is None:
        return [Check("fail", "daemon", f"no daemon answers at {url} ({reach_error})",
                      "start it with 'celery-memguard run --config FILE', or point doctor at it "
                      "with --url or --config (metrics.listen)"), *_here(here, None)]
    daemon = document.get("daemon", {})
    checks = [Check("ok", "daemon", f"reachable at {url} (celery-memguard "
                                    f"{document.get('version')}, pid {daemon.get('pid')}, "
                                    f"uid {daemon.get('uid')})")]
    bound = daemon.get("socket", {})
    checks.append(_bound_socket(bound))
    checks.extend(_here(here, bound))
    total, source = document.get("memory_total_bytes"), document.get("memory_total_source")
    found = "its cgroup" if source == "cgroup" else "the host: no cgroup limit"
    checks.append(Check("ok", "daemon", f"memory limit found: {format_bytes(total or 0)} "
                                        f"({found}); percentage limits resolve against it"))
    workers = document.get("workers", [])
    if not workers:
        checks.append(Check("warn", "workers", "the daemon sees no worker",
                            "start a worker on this host whose app calls "
                            "celery_memguard.install(app), with CELERY_MEMGUARD_SOCKET="
                            f"{bound.get('path')} in its environment"))
    for worker in workers:
        checks.extend(_worker(worker, bound.get("path", "")))
    return checks


def _bound_socket(bound: dict[str, Any]) -> Check:
    where = f"{bound.get('path')} (from {bound.get('source')})"
    if not bound.get("exists"):
        return Check("fail", "socket", f"{where} is missing as the daemon sees it "
                                       f"({bound.get('error')})",
                     "the daemon binds it at start: see its log (cannot_start) and agent.socket")
    if not bound.get("is_socket"):
        return Check("fail", "socket", f"{where} is not a socket",
                     "remove the file; the daemon binds the socket when it starts")
    return Check("ok", "socket", f"{where}: mode {bound.get('mode')}, uid {bound.get('uid')}, "
                                 f"gid {bound.get('gid')} as the daemon sees it; workers "
                                 f"connect as that uid or a member of that gid")


def _here(here: dict[str, Any] | None, bound: dict[str, Any] | None) -> list[Check]:
    if here is None:
        return []
    path = here.get("path")
    if not here.get("exists"):
        return [Check("warn" if bound else "fail", "socket",
                      f"{path} is not visible from here ({here.get('error')})",
                      "run doctor where the daemon runs (its container), or set "
                      "CELERY_MEMGUARD_SOCKET to the path this side mounts")]
    if here.get("connect"):
        return [Check("fail", "socket", f"{path}: cannot connect from here as uid {os.geteuid()} "
                                        f"({here['connect']})",
                      "connecting needs write permission on the socket (mode 0660): run the "
                      "workers as the daemon's user, or in the socket's group")]
    return [Check("ok", "socket", f"{path}: this process (uid {os.geteuid()}) connects")]


def _worker(worker: dict[str, Any], bound_path: str) -> list[Check]:
    name = str(worker.get("name"))
    state = worker.get("agent_state", "full" if worker.get("agent") else "none")
    checks: list[Check] = []
    if state == "none":
        checks.append(Check("warn", name, "no agent: observe-only (shown, never recycled)",
                            "call celery_memguard.install(app) in the module that defines the "
                            f"app, with CELERY_MEMGUARD_SOCKET={bound_path} in the worker's "
                            "environment"))
    elif state == "degraded":
        for hook in worker.get("missing_hooks", []):
            lost, fix = hooks.effect(hook)
            checks.append(Check("fail", name, f"agent degraded: {hook} missing: {lost}", fix))
    else:
        checks.append(Check("ok", name, "agent: every hook joined"))
    checks.extend(_versions(name, worker.get("versions") or {}))
    pool = worker.get("pool")
    if pool == "prefork":
        checks.append(Check("ok", name, f"pool prefork, concurrency {worker.get('concurrency')}"
                            + (f" (autoscale up to {worker['max_concurrency']})"
                               if worker.get("max_concurrency") else "")))
    elif not worker.get("restartable"):
        checks.append(Check("warn", name, f"pool {pool}: no pool children to recycle",
                            "use the prefork pool, or install(app, restart_worker=True) to let "
                            "the daemon restart the whole worker under a process manager"))
    used = worker.get("socket")
    if used and used != bound_path:
        checks.append(Check("warn", name, f"its agent uses {used}, the daemon binds {bound_path}",
                            "fine only where both name one file (a volume shared by two "
                            "containers); otherwise set CELERY_MEMGUARD_SOCKET alike on both"))
    elif used:
        checks.append(Check("ok", name, f"its agent uses the daemon's socket {used}"))
    checks.append(_limits(name, worker))
    limit = worker.get("container_limit_bytes")
    checks.append(Check("ok", name, f"container memory limit {format_bytes(limit)}"
                        if limit else "no container memory limit found: the container lines "
                                      "(limits.container_*) do not apply"))
    may = worker.get("may_signal")
    if may is False:
        checks.append(Check("fail", name, "the daemon may not signal this worker's processes: "
                                          "nothing can be recycled or interrupted",
                            "run the daemon as the workers' user or as root (or with CAP_KILL)"))
    elif may:
        checks.append(Check("ok", name, "the daemon may signal its processes"))
    return checks


def _versions(name: str, versions: dict[str, str]) -> list[Check]:
    celery, billiard = versions.get("celery", ""), versions.get("billiard", "")
    if not celery:
        return []
    said = f"Celery {celery}, billiard {billiard}, Python {versions.get('python')}"
    if _within(celery, CELERY_TESTED) and _within(billiard, BILLIARD_TESTED):
        return [Check("ok", name, said)]
    return [Check("warn", name, f"{said}: outside the tested {hooks.TESTED}",
                  "run a tested pair, or watch this worker's agent state")]


def _within(version: str, bounds: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    try:
        minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return bounds[0] <= minor <= bounds[1]


def _limits(name: str, worker: dict[str, Any]) -> Check:
    limits, sources = worker.get("limits", {}), worker.get("limit_sources", {})
    said = "; ".join(f"{level} {format_bytes(size)} from {sources.get(level, '?')}"
                     for level, size in limits.items())
    shares = "; ".join(f"{level} from {sources[level]}" for level in ("container_soft",
                                                                      "container_hard")
                       if level in sources)
    return Check("ok", name, f"limits in force: {said}" + (f"; {shares}" if shares else ""))


# -- the command ---------------------------------------------------------------------------

def look_here(path: str) -> dict[str, Any]:
    """The socket as this process sees it, and whether it can connect as an agent does."""
    facts = socket_facts(path)
    if facts.get("exists"):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError as exc:
            facts["connect"] = exc.strerror or str(exc)
        else:
            facts["connect"] = None
        finally:
            probe.close()
    return facts


def fetch(url: str) -> tuple[dict[str, Any] | None, str]:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as response:  # noqa: S310 - the user's own daemon
            return dict(json.load(response)), ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc))


def run(url: str, socket_path: str | None, as_json: bool) -> int:
    """Print the checks; 1 if any failed."""
    document, why = fetch(url)
    path = socket_path or (document or {}).get("daemon", {}).get("socket", {}).get("path")
    checks = diagnose(document, url, why, look_here(path) if path else None)
    failed = any(check.level == "fail" for check in checks)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        for check in checks:
            print(f"{check.level.upper() if check.level != 'ok' else 'ok':<5} "
                  f"{check.subject:<20} {check.what}")
            if check.fix:
                print(f"{'':<26} fix: {check.fix}")
        print("doctor: " + ("FAIL" if failed else "ok"))
    return 1 if failed else 0
