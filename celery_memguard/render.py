"""Terminal tables for ``status`` (and the demo), drawn with rich; the daemon never imports it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from celery_memguard.units import format_bytes


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
        agent = "agent" if worker["agent"] else "[yellow]no agent: observe-only[/yellow]"
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
