"""Terminal tables for ``report --prometheus``, in the shape of the one-daemon report."""

from __future__ import annotations

import datetime

from rich.console import Console
from rich.table import Table

from celery_memguard.cli.fleet import FleetReport
from celery_memguard.daemon.units import format_bytes

SHOWN_TASKS = 25  # the rest are in --json


def fleet_tables(report: FleetReport, console: Console | None = None) -> None:
    console = console or Console()
    at = datetime.datetime.fromtimestamp(report.at, tz=datetime.timezone.utc)
    console.print(f"{report.sidecars} sidecars through {report.prometheus}, selector "
                  f"{report.selector}, the {report.window} to {at:%Y-%m-%d %H:%M:%S} UTC")
    _tasks(report, console)
    _groups(report, console)
    _stopped(report, console)
    for group in report.groups:
        if group.recommended_max_tasks_per_child:
            console.print(f"{group.group}: --max-tasks-per-child {group.recommended_max_tasks_per_child} "
                          f"keeps a fresh child under the soft limit at the fastest leak its "
                          f"sidecars saw in the window; celery-memguard recycles by measurement "
                          f"instead.")
    if report.observe_only:
        console.print(f"{len(report.observe_only)} workers without the agent (observe-only) are left "
                      f"out: {', '.join(report.observe_only[:10])}"
                      + (" ..." if len(report.observe_only) > 10 else ""))


def _tasks(report: FleetReport, console: Console) -> None:
    table = Table(title="Task names across the fleet by memory left behind per call (median "
                        "estimated from the histogram's buckets)", title_justify="left")
    for column in ("task", "calls", "≈ median per call", "mean per call", "total", "verdict",
                   "worker groups"):
        table.add_column(column, justify="left" if column in ("task", "verdict", "worker groups")
                         else "right")
    for task in report.tasks[:SHOWN_TASKS]:
        table.add_row(task.task, str(task.calls), format_bytes(int(task.median_bytes)),
                      format_bytes(int(task.mean_bytes)), format_bytes(int(task.total_bytes)),
                      "[red]leaks[/red]" if task.leaky else "", ", ".join(map(str, task.groups)))
    console.print(table)
    if len(report.tasks) > SHOWN_TASKS:
        console.print(f"{len(report.tasks) - SHOWN_TASKS} more task names in --json")
    leaking = [t for t in report.tasks if t.leaky]
    console.print(f"leaking task: {leaking[0].task}" if leaking else "no task name leaks in the window")


def _groups(report: FleetReport, console: Console) -> None:
    table = Table(title="Worker groups (nodename before the @; namespace and cluster where labelled)",
                  title_justify="left")
    for column in ("worker group", "workers", "children", "leaking", "fastest leak",
                   "max-tasks advice", "recycles", "OOM kills"):
        table.add_column(column, justify="left" if column in ("worker group", "recycles") else "right")
    for group in report.groups:
        fastest = group.fastest_leak_bytes_per_task
        table.add_row(
            str(group.group), str(len(group.workers)), str(group.children),
            f"[red]{group.leaking_children}[/red]" if group.leaking_children else "0",
            "-" if fastest is None else format_bytes(int(fastest)),
            str(group.recommended_max_tasks_per_child or "-"),
            ", ".join(f"{reason}={n}" for reason, n in group.recycles.items()) or "none",
            str(sum(n for _, n in group.oom_kills)))
    console.print(table)


def _stopped(report: FleetReport, console: Console) -> None:
    table = Table(title="Tasks interrupted or OOM-killed in the window", title_justify="left")
    for column in ("worker group", "task", "reason", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for group in report.groups:
        for name, reason, n in group.interrupted:
            table.add_row(str(group.group), name or '""', reason, str(n))
        for name, n in group.oom_kills:
            table.add_row(str(group.group), name or '""', "OOM kill", str(n))
    if table.row_count:
        console.print(table)
    else:
        console.print("no task was interrupted or OOM-killed in the window")
