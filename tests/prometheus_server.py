"""A real Prometheus server for the tests: a free loopback port, a temporary storage directory,
and a scrape config naming the test's own daemons (job celery-memguard, 1 s scrapes and rule
evaluations). Started in its own session, stopped by its pid, also when the test fails."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support import free_port, kill_group, tail


class PrometheusServer:
    def __init__(self, binary: str, tmp: Path, targets: Mapping[int, Mapping[str, str]],
                 rule_files: Sequence[Path] = ()) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{
                "job_name": "celery-memguard",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": dict(labels)}
                                   for port, labels in targets.items()],
            }],
        }
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def values(self, expr: str, by: str) -> dict[str, float]:
        """The samples of ``expr``, keyed by label ``by``."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def wait_up(self, targets: int, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if len(self.query('up{job="celery-memguard"} == 1')) == targets:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.25)

    def output(self) -> str:
        return tail(self.log, self.log_path)

    def stop(self) -> None:
        kill_group(self.proc)
        self.log.close()
