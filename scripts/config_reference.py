"""Renders docs/configuration.md from the config models, so the reference cannot drift.

``python scripts/config_reference.py > docs/configuration.md``; a test checks that
the committed file is what this prints.
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from celery_memguard.daemon.config import Config, WorkerLimits
from celery_memguard.daemon.units import format_bytes
from celery_memguard.protocol.paths import SOCKET_ENV

_SIZES = {"soft", "hard", "worker_total"}
_DURATIONS = {"interval", "scan_interval", "kill_after", "watch_interval", "container_hold",
              "cooldown", "timeout"}
_PERCENTS = {"jitter", "max_share", "container_soft", "container_hard", "container_pressure"}


def _default(section: str, key: str, value: object) -> str:
    if value is None:
        return "unset"
    if key in _SIZES and isinstance(value, int):
        return f"{format_bytes(value)} ({value} bytes)"
    if key in _DURATIONS and isinstance(value, float):
        return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
    if key in _PERCENTS and isinstance(value, float):
        return f"{value * 100:g}%"
    return f"{value}"


def _kind(key: str, annotation: object) -> str:
    if key in _SIZES:
        return "size: bytes, `512MiB`, `1.5GB` or a percentage of memory"
    if key in _DURATIONS:
        return "duration: seconds, `250ms`, `30s`, `5m`"
    if key in _PERCENTS:
        return "percentage: `5%` or a fraction"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return {"Path": "path", "str": "text", "int": "integer", "bool": "true/false",
            "pathlib.Path | None": "path"}.get(text, text)


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `celery_memguard/daemon/config.py` by "
        "`python scripts/config_reference.py`; do not edit by hand.",
        "",
        "Every key is optional. Unknown keys are refused, so a typo cannot silently disable a "
        "limit. Percentages of memory resolve against the container's cgroup memory limit, "
        "else the host's memory (exported as `celery_memguard_memory_total_bytes`). "
        f"`{SOCKET_ENV}`, when set, overrides `agent.socket`. "
        "`celery-memguard check-config FILE` validates a file (exit 0, or 2 naming the key).",
        "",
    ]
    defaults = Config()
    for section, field in Config.model_fields.items():
        model = field.annotation
        if section == "workers":
            lines += [f"## `{section}`", "", field.description or "", "",
                      "| key | meaning |", "|---|---|"]
            lines += [f"| `workers[].{key}` | {info.description or ''} |"
                      for key, info in WorkerLimits.model_fields.items()]
            lines += ["", "```yaml", "workers:", "  - match: \"reports@*\"",
                      "    limits: {soft: 2GiB, hard: 3GiB}", "```", ""]
            continue
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        lines += [f"## `{section}`", "", "| key | default | type | meaning |", "|---|---|---|---|"]
        current = getattr(defaults, section)
        for key, info in model.model_fields.items():
            default = getattr(current, key) if info.default is not PydanticUndefined else None
            lines.append(f"| `{section}.{key}` | {_default(section, key, default)} | "
                         f"{_kind(key, info.annotation)} | {info.description or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
