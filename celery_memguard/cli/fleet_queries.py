"""The PromQL behind ``report --prometheus``: every sidecar's series, folded by worker group.

A *worker group* is the name part of a worker's Celery nodename, before the ``@``:
``reports@host-1`` and ``reports@host-2`` are group ``reports``, together with the ``cluster``
and ``namespace`` labels where the scrape adds them (Kubernetes), so that ``reports`` in two
namespaces are two groups. deploy/prometheus/fleet_rules.yaml records the same groups with
the same regex (a test holds them together).

Counts over the window: a counter series that already existed when the window began counts
its ``increase()``; one that appeared inside it (the daemon exports a counter from its first
increment) counts its last value, which ``increase()`` would miss the first step of. Pure: text
in, text out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP_LABEL = "worker_group"
GROUP_REGEX = "([^@]*)(@.*)?"  # Celery splits a nodename at its first "@"
GROUP = f"cluster, namespace, {GROUP_LABEL}"  # absent labels group as empty: no harm
SIDECAR = "cluster, job, instance"  # one scrape target: one daemon
WORKER = f"{SIDECAR}, worker"
CHILD = f"{WORKER}, index"

_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_STRING = r'"(?:[^"\\\n]|\\.)*"' + r"|'(?:[^'\\\n]|\\.)*'" + r"|`[^`]*`"
_MATCHER = re.compile(rf"\s*({_NAME})\s*(=~|!~|!=|=)\s*({_STRING})\s*")
_DURATION = re.compile(r"(?:[0-9]+(?:ms|[smhdwy]))+")


class BadArgument(ValueError):
    """A selector or window that is not valid PromQL; the message says what is expected."""


@dataclass(frozen=True, slots=True)
class Selector:
    """PromQL label matchers, without braces, each as the user wrote it."""

    matchers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Selector:
        """``namespace="prod", pod=~"reports-.*"``, with or without the braces."""
        body = (text or "").strip()
        if body.startswith("{") and body.endswith("}"):
            body = body[1:-1]
        matchers: list[str] = []
        position = 0
        while body[position:].strip():
            found = _MATCHER.match(body, position)
            if found is None:
                raise BadArgument(
                    f"invalid --selector {text!r}: expected label matchers such as "
                    f"namespace=\"prod\" or pod=~\"reports-.*\" at {body[position:].strip()!r}")
            matchers.append(f"{found.group(1)}{found.group(2)}{found.group(3)}")
            position = found.end()
            if position < len(body):
                if body[position] != ",":
                    raise BadArgument(f"invalid --selector {text!r}: matchers are separated by commas")
                position += 1
        return cls(tuple(matchers))

    def series(self, metric: str, *extra: str) -> str:
        """``metric{these matchers, extra ones}``."""
        return f"{metric}{{{', '.join((*self.matchers, *extra))}}}"

    def __str__(self) -> str:
        return "{" + ", ".join(self.matchers) + "}"


def check_window(window: str) -> str:
    """A Prometheus duration such as 30m, 6h, 7d or 1h30m."""
    if not _DURATION.fullmatch(window) or not any(c in "123456789" for c in window):
        raise BadArgument(f"invalid --window {window!r}: a Prometheus duration such as 30m, 6h, "
                          f"7d or 1h30m")
    return window


def grouped(expr: str) -> str:
    """``expr`` with each series' worker group as label ``worker_group``."""
    return f'label_replace({expr}, "{GROUP_LABEL}", "$1", "worker", "{GROUP_REGEX}")'


def counted(selector: Selector, metric: str, window: str) -> str:
    """What a counter counted in the window, per series (see the module's docstring)."""
    series = selector.series(metric)
    return (f"(increase({series}[{window}]) and {series} offset {window}) "
            f"or last_over_time({series}[{window}])")


def queries(selector: Selector, window: str) -> dict[str, str]:
    """Every query of the report, by name; each one is evaluated at the window's end."""
    sel, w = selector, window

    def last(metric: str, *extra: str) -> str:
        return f"last_over_time({sel.series(metric, *extra)}[{w}])"

    def count(metric: str) -> str:
        return counted(sel, metric, w)

    # Workers whose agent reports to the sidecar. A worker that a sidecar only found in its
    # process scan (another sidecar's, on a shared host) is counted by that other sidecar.
    agent = last("celery_memguard_worker_info", 'agent="true"')
    observed = last("celery_memguard_worker_info", 'agent="false"')
    leaked = f"max_over_time({sel.series('celery_memguard_child_leaking')}[{w}]) == 1"
    slots = f"{last('celery_memguard_child_rss_bytes')} and on ({WORKER}) {agent}"
    leaking = f"({leaked}) and on ({WORKER}) {agent}"
    fastest = (f"max_over_time({sel.series('celery_memguard_child_leak_bytes_per_task')}[{w}]) "
               f"and on ({CHILD}) ({leaked})")
    advice = f"min_over_time({sel.series('celery_memguard_recommended_max_tasks_per_child')}[{w}])"
    growth = "celery_memguard_task_memory_growth_bytes"
    return {
        "sidecars": f"group by ({SIDECAR}) ({last('celery_memguard_build_info')})",
        "workers": f"group by (namespace, {WORKER}, {GROUP_LABEL}) ({grouped(agent)})",
        "observe_only": f"group by (worker) ({observed}) unless on (worker) group by (worker) ({agent})",
        "task_calls": f"sum by ({SIDECAR}, task) ({count(growth + '_count')})",
        "task_growth": f"sum by (task) ({count(growth + '_sum')})",
        # ">= 0" drops the NaN of a task with no call in the window.
        "task_median": f"histogram_quantile(0.5, sum by (task, le) ({count(growth + '_bucket')})) >= 0",
        "children": f"count by ({GROUP}) ({grouped(slots)})",
        "leaking": f"count by ({GROUP}) ({grouped(leaking)})",
        "fastest_leak": f"max by ({GROUP}) ({grouped(fastest)})",
        "recommended": f"min by ({GROUP}) ({grouped(advice)})",
        "recycles": f"sum by ({GROUP}, reason) ({grouped(count('celery_memguard_recycles_total'))}) > 0",
        "interrupted": (f"sum by ({GROUP}, task, reason) "
                        f"({grouped(count('celery_memguard_interrupted_tasks_total'))}) > 0"),
        "oom_kills": f"sum by ({GROUP}, task) ({grouped(count('celery_memguard_oom_kills_total'))}) > 0",
    }
