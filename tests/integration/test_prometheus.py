"""A real Prometheus scrapes a daemon that supervises a real worker; promtool checks /metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import Daemon, Worker, free_port, kill_group

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package prometheus): run scripts/ensure-tools")
    return path


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_promtool_accepts_a_live_metrics_page(start_daemon: Callable[..., Daemon],
                                              start_worker: Callable[..., Worker]) -> None:
    promtool = _tool("promtool")
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    for result in [worker.send("keep", 2) for _ in range(60)]:
        result.get(timeout=30)
    page = daemon.get("/metrics")
    assert "celery_memguard_child_rss_bytes{" in page
    done = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""  # no lint complaints either


def test_prometheus_scrapes_child_rss_and_the_recycle_counter(
        tmp_path: Path, start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker]) -> None:
    binary = _tool("prometheus")
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: celery-memguard\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{daemon.port}']}}]\n")
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                if _query(base, 'up{job="celery-memguard"} == 1'):
                    break
            except OSError:
                pass
            time.sleep(0.25)
        for result in [worker.send("keep", 2) for _ in range(120)]:
            result.get(timeout=30)
        deadline = time.monotonic() + 30
        while True:
            recycles = _query(base, 'celery_memguard_recycles_total{reason="soft"}')
            rss = _query(base, f'celery_memguard_child_rss_bytes{{worker="{worker.name}"}}')
            if recycles and float(recycles[0]["value"][1]) >= 1 and len(rss) == 2:
                break
            assert time.monotonic() < deadline, (recycles, rss)
            time.sleep(0.5)
        assert sorted(s["metric"]["index"] for s in rss) == ["0", "1"]
        assert all(float(s["value"][1]) > 20 * 1024 * 1024 for s in rss)
        assert recycles[0]["metric"]["worker"] == worker.name
    finally:
        kill_group(prom)
        log.close()
