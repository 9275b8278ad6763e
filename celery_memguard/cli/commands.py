"""The composition root: argument parsing, config, logging, daemon; named exit codes."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from celery_memguard._version import __version__

EX_OK = 0
EX_FAILURE = 1  # a runtime failure: socket or port unusable, daemon unreachable
EX_CONFIG = 2  # the config or the command line is invalid


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EX_CONFIG
    handler = {"run": _run, "check-config": _check_config, "status": _status,
               "report": _report, "demo": _demo, "doctor": _doctor,
               "trace": _trace}[args.command]
    code: int = handler(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-memguard",
        description="Supervises the memory of Celery prefork workers and recycles leaking children safely.")
    parser.add_argument("--version", action="version", version=f"celery-memguard {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the daemon next to your workers")
    run.add_argument("--config", "-c", metavar="FILE", help="YAML config (every key optional)")
    check = sub.add_parser("check-config", help="validate a config file: exit 0 valid, 2 invalid")
    check.add_argument("file", metavar="FILE")
    status = sub.add_parser("status", help="show the workers and children a running daemon sees")
    report = sub.add_parser("report", help="which tasks leak, each child's trend, max-tasks advice")
    doctor = sub.add_parser("doctor", help="check the daemon, the socket and every worker's agent: "
                                           "ok/warn/fail with the fix; exit 1 on any fail")
    for command in (status, report, doctor):
        command.add_argument("--config", "-c", metavar="FILE",
                             help="read metrics.listen (and agent.socket) from this config")
        command.add_argument("--url", help="the daemon's base URL (default: from metrics.listen)")
        command.add_argument("--json", action="store_true",
                             help="print JSON" if command is doctor else "print the raw /status JSON")
    report.add_argument("--prometheus", metavar="URL",
                        help="report on every sidecar this Prometheus scrapes instead of one daemon")
    report.add_argument("--selector", metavar="MATCHERS",
                        help='with --prometheus: PromQL label matchers, e.g. \'namespace="prod"\'')
    report.add_argument("--window", metavar="DURATION",
                        help="with --prometheus: the time range to report on (default 1h)")
    _trace_parser(sub)
    demo = sub.add_parser("demo", help="run a leaking worker under supervision, no broker needed")
    demo.add_argument("--duration", type=float, default=25.0, help="seconds of workload (default 25)")
    demo.add_argument("--no-live", action="store_true", help="plain output instead of a live view")
    return parser


def _load(path: str | None) -> Any:
    from celery_memguard.daemon import config  # noqa: PLC0415 - keeps --version fast
    from celery_memguard.daemon.procs import Procs  # noqa: PLC0415

    total = Procs().memory_total()
    if path is None:
        return config.parse({}, memory_total=total)
    return config.load(path, memory_total=total)


def _check_config(args: argparse.Namespace) -> int:
    from celery_memguard.daemon.config import ConfigError  # noqa: PLC0415

    try:
        cfg = _load(args.file)
    except ConfigError as exc:
        print(f"{args.file}: invalid: {exc.key}: {exc.reason}", file=sys.stderr)
        return EX_CONFIG
    why = _unusable_listen(cfg.metrics.listen)
    if why is not None:
        print(f"{args.file}: invalid: metrics.listen: {why}", file=sys.stderr)
        return EX_CONFIG
    print(f"{args.file}: valid (soft {cfg.limits.soft} bytes, hard {cfg.limits.hard} bytes, "
          f"socket {cfg.agent.socket}, listen {cfg.metrics.listen})")
    return EX_OK


def _unusable_listen(listen: str) -> str | None:
    """Why metrics.listen cannot be bound on this host (an address it does not have), or None.
    The port itself is not tried: the daemon this file configures may be running on it."""
    import socket  # noqa: PLC0415

    from celery_memguard.daemon.config import split_listen  # noqa: PLC0415

    host, _port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        return f"{host} is not an address of this host ({exc.strerror})"
    return None


def _run(args: argparse.Namespace) -> int:
    from celery_memguard.cli import logs  # noqa: PLC0415
    from celery_memguard.daemon.config import ConfigError  # noqa: PLC0415
    from celery_memguard.daemon.inbox import SocketError  # noqa: PLC0415
    from celery_memguard.daemon.loop import Daemon, ListenError  # noqa: PLC0415

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid: {exc.key}: {exc.reason}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(cfg.log.format, cfg.log.level)
    daemon = Daemon(cfg, reload=(lambda: _load(args.config)) if args.config else None)
    try:
        return daemon.run()
    except (SocketError, ListenError) as exc:
        logs.get().error("cannot_start", why=str(exc))
        return EX_FAILURE


def _daemon_url(args: argparse.Namespace) -> tuple[str | None, Any]:
    """The daemon's base URL (--url, else the config's metrics.listen) and the config, if read;
    None when the config is invalid (said on stderr)."""
    from celery_memguard.daemon.config import ConfigError, split_listen  # noqa: PLC0415

    try:
        cfg = _load(args.config) if args.url is None or args.config else None
    except ConfigError as exc:
        print(f"{args.config}: invalid: {exc.key}: {exc.reason}", file=sys.stderr)
        return None, None
    url = args.url
    if url is None:
        assert cfg is not None
        host, port = split_listen(cfg.metrics.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return url, cfg


def _fetch_status(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """The daemon's /status document, or an exit code and a message saying what to do."""
    url, _cfg = _daemon_url(args)
    if url is None:
        return EX_CONFIG, None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as response:  # noqa: S310 - the user's own daemon
            return EX_OK, dict(json.load(response))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"no celery-memguard daemon answers at {url} ({reason}). Start one with "
              f"'celery-memguard run --config FILE', or pass --url/--config to point at it.",
              file=sys.stderr)
        return EX_FAILURE, None


def _status(args: argparse.Namespace) -> int:
    code, document = _fetch_status(args)
    if document is None:
        return code
    if args.json:
        print(json.dumps(document, indent=1))
        return EX_OK
    from celery_memguard.cli.render import status_table  # noqa: PLC0415

    status_table(document)
    return EX_OK


def _report(args: argparse.Namespace) -> int:
    if args.prometheus is not None:
        return _fleet_report(args)
    if args.selector is not None or args.window is not None:
        print("--selector and --window go with --prometheus URL", file=sys.stderr)
        return EX_CONFIG
    code, document = _fetch_status(args)
    if document is None:
        return code
    if args.json:
        print(json.dumps({"tasks": document["tasks"], "workers": document["workers"],
                          "leak_sites": document.get("leak_sites", [])}, indent=1))
        return EX_OK
    from celery_memguard.cli.render import report_tables  # noqa: PLC0415

    report_tables(document)
    return EX_OK


def _fleet_report(args: argparse.Namespace) -> int:
    """The report over every sidecar a Prometheus scrapes (cli/fleet.py)."""
    from celery_memguard.cli import fleet  # noqa: PLC0415

    try:
        report = fleet.collect(args.prometheus, args.selector, args.window or "1h")
    except fleet.FleetError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG if isinstance(exc, fleet.Refused) else EX_FAILURE
    if args.json:
        print(json.dumps(fleet.document(report), indent=1))
        return EX_OK
    from celery_memguard.cli.fleet_render import fleet_tables  # noqa: PLC0415

    fleet_tables(report)
    return EX_OK


def _doctor(args: argparse.Namespace) -> int:
    from celery_memguard.cli import doctor  # noqa: PLC0415

    url, cfg = _daemon_url(args)
    if url is None:
        return EX_CONFIG
    path = str(cfg.agent.socket) if cfg is not None and args.config else None
    return doctor.run(url, path, args.json)


def _trace_parser(sub: Any) -> None:
    trace = sub.add_parser("trace", help="trace a task's next calls in one child: the lines that "
                                         "keep what they leave behind")
    trace.add_argument("task", metavar="TASK", help="the task name, e.g. app.tasks.report")
    trace.add_argument("--calls", type=int, help="calls to trace (default: forensics.calls)")
    trace.add_argument("--worker", metavar="W",
                       help="only in this worker (a nodename, or a pattern such as 'reports@*')")
    trace.add_argument("--timeout", type=float, default=120.0,
                       help="seconds for a child to run TASK's calls (default 120)")
    trace.add_argument("--config", "-c", metavar="FILE",
                       help="read agent.socket and metrics.listen from this config")
    trace.add_argument("--url", help="the daemon's base URL (default: from metrics.listen)")
    trace.add_argument("--socket", help="the daemon's agent socket (default: agent.socket)")
    trace.add_argument("--json", action="store_true", help="print the result as JSON")


def _trace(args: argparse.Namespace) -> int:
    from celery_memguard.cli.trace import run_trace  # noqa: PLC0415
    from celery_memguard.daemon.config import ConfigError  # noqa: PLC0415

    try:
        return run_trace(args, lambda: _fetch_status(args), _load)
    except ConfigError as exc:
        print(f"{args.config}: invalid: {exc.key}: {exc.reason}", file=sys.stderr)
        return EX_CONFIG


def _demo(args: argparse.Namespace) -> int:
    from celery_memguard.cli.demo import run_demo  # noqa: PLC0415

    return run_demo(duration=args.duration, live=not args.no_live)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
