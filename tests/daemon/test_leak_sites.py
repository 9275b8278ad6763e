"""A trace's result: per-call figures, shares, the untraced part, its file. Tables."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from celery_memguard.daemon import leak_sites
from celery_memguard.daemon.leak_sites import Result, Site
from celery_memguard.protocol import messages
from tests.builders import MiB

SITE = Site(filename="app/helpers.py", lineno=12, function="", code="_store.append(b)",
            frames=(("app/helpers.py", 12, ""), ("app/tasks.py", 30, "")), size=20 * MiB,
            blocks=20, grew=20)
RESULT = Result(id="r1", task="app.leak", worker="w@h", pid=11, index=0, tool="tracemalloc",
                calls=20, wanted=20, rss_growth=30 * MiB, traced_growth=25 * MiB,
                tracer_bytes=300_000, reason="done", finished_at=1700000000.25, on_demand=False,
                sites=(SITE, replace(SITE, lineno=40, size=MiB // 2)))


@pytest.mark.parametrize(("rss", "traced", "untraced"), [
    (20 * MiB, 20 * MiB, 0.0),
    (20 * MiB, 2 * MiB, 0.9),
    (20 * MiB, -MiB, 1.0),  # the traced calls freed more than they kept
    (20 * MiB, 25 * MiB, 0.0),  # kept in memory RSS already held: nothing is untraced
    (0, MiB, None),  # RSS did not grow: no share of nothing
    (-MiB, 0, None),
])
def test_the_untraced_share_of_the_rss_growth(rss: int, traced: int, untraced: float | None) -> None:
    result = replace(RESULT, rss_growth=rss, traced_growth=traced)
    assert result.untraced_share == (None if untraced is None else pytest.approx(untraced))


def test_the_document_gives_figures_per_call_and_each_sites_share() -> None:
    doc = leak_sites.document(RESULT)
    assert (doc["rss_growth_per_call"], doc["traced_growth_per_call"]) == (
        round(1.5 * MiB), round(1.25 * MiB))
    assert doc["untraced_share"] == pytest.approx(1 / 6, abs=1e-4)
    first, second = doc["sites"]  # of the 25 MiB traced, the sites not reported kept 4.5
    assert (first["filename"], first["lineno"], first["bytes_per_call"], first["share"]) == (
        "app/helpers.py", 12, MiB, 0.8)
    assert second["share"] == pytest.approx(0.02)
    assert first["traceback"][1] == {"filename": "app/tasks.py", "lineno": 30, "function": ""}
    assert doc["complete"] is True
    assert doc["advice"] is None


def test_shares_never_pass_one_when_the_sites_add_up_to_more_than_the_net_growth() -> None:
    doc = leak_sites.document(replace(RESULT, traced_growth=10 * MiB))  # sites: 20.5 MiB
    assert sum(site["share"] for site in doc["sites"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(("tool", "rss", "traced", "says"), [
    ("tracemalloc", 20 * MiB, 0, "memray"),
    ("memray", 20 * MiB, 0, "ctypes"),
    ("tracemalloc", 20 * MiB, 19 * MiB, None),
    ("tracemalloc", 0, 0, None),
])
def test_advice_when_most_growth_is_out_of_the_tools_sight(tool: str, rss: int, traced: int,
                                                           says: str | None) -> None:
    advice = leak_sites.advice(replace(RESULT, tool=tool, rss_growth=rss, traced_growth=traced))
    assert (advice is None) if says is None else (says in (advice or ""))


def test_a_document_reads_back_as_the_same_result() -> None:
    doc = json.loads(json.dumps(leak_sites.document(RESULT)))
    assert leak_sites.from_document(doc) == RESULT


@pytest.mark.parametrize("change", [
    {"v": 2}, {"calls": "20"}, {"finished_at": True}, {"on_demand": 1}, {"sites": [{}]},
    {"sites": [{"filename": 1}]}, {"task": None},
])
def test_a_malformed_document_reads_as_none(change: dict[str, object]) -> None:
    doc = {**leak_sites.document(RESULT), **change}
    assert leak_sites.from_document(doc) is None
    assert leak_sites.from_document([doc]) is None


def test_file_names_are_safe_sortable_and_tell_task_names_apart() -> None:
    odd = replace(RESULT, task="../../etc/passwd app.ünï", id="a/b")
    name = leak_sites.file_name(odd)
    assert "/" not in name
    assert name.startswith(leak_sites.task_prefix(odd.task) + ".")
    later = leak_sites.file_name(replace(odd, finished_at=odd.finished_at + 0.001))
    assert sorted([later, name]) == [name, later]
    assert leak_sites.task_prefix("app.a b") != leak_sites.task_prefix("app.a_b")


def _site(trace: str, rank: int, lineno: int) -> messages.LeakSite:
    return messages.LeakSite(pid=11, ppid=10, index=0, trace=trace, rank=rank, filename="a.py",
                             lineno=lineno, function="", code="", frames=(), size=1, blocks=1,
                             grew=1)


def test_a_result_takes_its_own_traces_sites_in_rank_order_up_to_the_count_it_names() -> None:
    trace = messages.LeakTrace(pid=11, ppid=10, index=0, trace="r1", task="app.leak",
                               tool="tracemalloc", calls=2, wanted=20, rss_growth=2, traced_growth=2,
                               sites=2, tracer_bytes=0, done=False, reason="tracing")
    sites = [_site("r1", 1, 20), _site("r0", 0, 99), _site("r1", 0, 10), _site("r1", 2, 30)]
    result = leak_sites.assemble(trace, sites, "w@h", 5.0, on_demand=True)
    assert [s.lineno for s in result.sites] == [10, 20]
    assert (result.complete, result.on_demand, result.worker) == (False, True, "w@h")
