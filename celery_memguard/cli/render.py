"""Terminal tables for ``status`` (and the demo), drawn with rich; the daemon never imports it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from celery_memguard.daemon.units import format_bytes


def status_table(document: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    limits = document.get("limits", {})
    soft, hard = limits.get("soft"), limits.get("hard")
    console.print(
        f"celery-memguard {document.get('version')}  measure={document.get('measure')}  "
        f"soft={format_bytes(soft or 0)}  hard={format_bytes(hard or 0)}"
        + ("  [yellow]dry run[/yellow]" if document.get("dry_run") else ""))
    if not document.get("workers"):
        console.print("no workers found: is a Celery worker running on this host, and does its "
                      "app call celery_memguard.install(app)?")
        return
    for worker in document["workers"]:
        recycles = ", ".join(f"{k}={v}" for k, v in sorted(worker["recycles"].items())) or "none"
        agent = _agent(worker)
        table = Table(title=f"{worker['name']} (pid {worker['pid']}, {worker['pool']}, "
                            f"concurrency {worker['concurrency']}, {agent}; recycles: {recycles})",
                      title_justify="left")
        for column in ("index", "pid", "RSS", "% of soft", "tasks", "state", "task"):
            table.add_column(column, justify="right" if column in ("RSS", "tasks") else "left")
        for child in worker["children"]:
            share = f"{100 * child['rss_bytes'] / soft:.0f}%" if soft else "-"
            table.add_row(str(child["index"]), str(child["pid"]), format_bytes(child["rss_bytes"]),
                          share, str(child["tasks"]), child["state"], child["task"] or "")
        console.print(table)
        if worker.get("missing_hooks"):
            console.print(f"[red]{worker['name']}: agent degraded: "
                          f"{', '.join(worker['missing_hooks'])} missing; run "
                          f"celery-memguard doctor for what is lost and the fix[/red]")


def _agent(worker: dict[str, Any]) -> str:
    """The worker's agent as the title says it: full, degraded (naming what is missing), none."""
    state = worker.get("agent_state") or ("full" if worker["agent"] else "none")
    if state == "none":
        return "[yellow]no agent: observe-only[/yellow]"
    if state == "degraded":
        return "[red]agent degraded[/red]"
    return "agent"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def report_tables(document: dict[str, Any], console: Console | None = None) -> None:
    """The leak report: task names by memory left per call, child trends, max-tasks advice."""
    console = console or Console()
    soft = document.get("limits", {}).get("soft") or 0
    tasks = Table(title="Task names by memory left behind per call (median)", title_justify="left")
    for column in ("task", "calls", "median per call", "mean per call", "total", "verdict"):
        tasks.add_column(column, justify="left" if column in ("task", "verdict") else "right")
    for task in document.get("tasks", []):
        tasks.add_row(task["task"], str(task["calls"]), format_bytes(task["median_growth_bytes"]),
                      format_bytes(task["mean_growth_bytes"]), format_bytes(task["total_growth_bytes"]),
                      "[red]leaks[/red]" if task["leaky"] else "")
    console.print(tasks)
    leaking = [t for t in document.get("tasks", []) if t["leaky"]]
    console.print(f"leaking task: {leaking[0]['task']}" if leaking else "no task name leaks so far")
    children = Table(title=f"Child trends (soft limit {format_bytes(soft)})", title_justify="left")
    for column in ("worker", "index", "RSS", "tasks", "per task", "per second", "trend",
                   "tasks to soft", "time to soft"):
        children.add_column(column)
    for worker in document.get("workers", []):
        for child in worker["children"]:
            per_task = child.get("leak_bytes_per_task")
            trend = ("[red]leaking[/red]" if child.get("leaking")
                     else "plateau" if child.get("plateau") else "-" if per_task is None else "flat")
            to_soft = child.get("tasks_to_soft")
            children.add_row(
                worker["name"], str(child["index"]), format_bytes(child["rss_bytes"]),
                str(child["tasks"]), "-" if per_task is None else format_bytes(per_task),
                "-" if child.get("leak_bytes_per_second") is None
                else format_bytes(child["leak_bytes_per_second"]) + "/s",
                trend, "-" if to_soft is None else f"{to_soft:.0f}",
                _duration(child.get("seconds_to_soft")))
    console.print(children)
    shown = set()
    for task in document.get("tasks", []):
        if task.get("sites") or task.get("trace"):
            leak_sites({**task["trace"], "sites": task["sites"]}, console)
            shown.add(task["task"])
    for result in document.get("leak_sites", []):
        if result["task"] not in shown:
            leak_sites(result, console)
    for worker in document.get("workers", []):
        advice = worker.get("recommended_max_tasks_per_child")
        fresh = worker.get("fresh_child_rss_bytes")
        if advice:
            console.print(f"{worker['name']}: --max-tasks-per-child {advice} keeps a fresh child "
                          f"({format_bytes(fresh or 0)}) under the soft limit at the fastest "
                          f"leak observed; celery-memguard recycles by measurement instead.")
        elif advice == 0:
            console.print(f"{worker['name']}: a fresh child plus one task already reaches the soft "
                          f"limit: raise limits.soft.")


def _where(filename: str, keep: int = 3) -> str:
    """A site's file as a table shows it: its last ``keep`` path parts, so that a deep path
    is not folded across lines in a narrow terminal (``--json`` has the whole path)."""
    parts = filename.split("/")
    return filename if len(parts) <= keep + 1 else "…/" + "/".join(parts[-keep:])


def leak_sites(result: dict[str, Any], console: Console | None = None) -> None:
    """A trace's result: the sites that keep what the traced calls left, the untraced part."""
    console = console or Console()
    calls = result["calls"]
    state = ("complete" if result["complete"]
             else f"[yellow]partial: {calls} of {result['calls_wanted']} calls, "
                  f"{escape(result['reason'])}[/yellow]")
    untraced = result.get("untraced_share")
    table = Table(
        title=(f"{escape(result['task'])}: where {calls} traced calls left their memory "
               f"({escape(result['worker'])}, child {result['index']}, {result['tool']}, {state})"),
        caption=(f"RSS {format_bytes(result['rss_growth_per_call'])} per call, traced "
                 f"{format_bytes(result['traced_growth_per_call'])} per call"
                 + ("" if untraced is None else f", untraced {untraced:.0%}")),
        title_justify="left", caption_justify="left")
    for column in ("share", "per call", "blocks", "site"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for site in result["sites"]:
        where = [f"[bold]{escape(_where(site['filename']))}:{site['lineno']}[/bold]"]
        if site["code"]:
            where.append(f"  {escape(site['code'])}")
        where += [f"  [dim]from {escape(_where(frame['filename']))}:{frame['lineno']}[/dim]"
                  for frame in site["traceback"][1:]]
        table.add_row(f"{site['share']:.0%}", format_bytes(site["bytes_per_call"]),
                      f"{site['blocks_per_call']:g}", "\n".join(where))
    if not result["sites"]:
        table.add_row("-", "-", "-", "no allocation site kept memory the tracer saw")
    console.print(table)
    if result.get("advice"):
        console.print(f"[yellow]{escape(result['advice'])}[/yellow]")
