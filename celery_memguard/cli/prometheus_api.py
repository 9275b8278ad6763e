"""Instant queries through Prometheus's HTTP API, for the fleet report.

Only the command line asks Prometheus anything: the daemon is scraped and needs no client.
Errors are sorted by what the user can do about them: nothing answers at the URL, something
answers that is not Prometheus, or Prometheus refused or failed the query.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    """One element of an instant vector: its labels (the metric name, if kept, under
    ``__name__``) and its value."""

    labels: Mapping[str, str]
    value: float


class Unreachable(Exception):
    """Nothing answers HTTP at the URL."""


class NotPrometheus(Exception):
    """Something answers at the URL, but not Prometheus's query API."""


class QueryError(Exception):
    """Prometheus answered with an error: ``bad_data`` for a query it cannot parse,
    ``execution``, ``timeout`` or ``canceled`` for one it could not run."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


class PrometheusAPI:
    """Prometheus (or anything that serves its ``/api/v1/query``, such as Thanos Query or
    Mimir) at a base URL; a path prefix such as ``/prometheus`` is kept."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, expr: str, at: float) -> list[Sample]:
        """The instant vector ``expr`` evaluates to at Unix time ``at``. POST, so that long
        expressions never meet a URL length limit."""
        body = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"}).encode()
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url + "/api/v1/query", data=body, method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                document = _json(response.read())
        except urllib.error.HTTPError as exc:
            # Prometheus answers a bad query with 400 (422, 503 for failed ones) and a JSON body.
            document = _json(exc.read())
            if document is None or document.get("status") != "error":
                raise NotPrometheus(f"HTTP {exc.code} from {self.url}/api/v1/query") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(str(getattr(exc, "reason", exc))) from exc
        if document is None or document.get("status") not in ("success", "error"):
            raise NotPrometheus(f"{self.url}/api/v1/query did not answer with Prometheus's JSON")
        if document["status"] == "error":
            raise QueryError(str(document.get("errorType", "error")), str(document.get("error", "")))
        data = document.get("data") or {}
        if data.get("resultType") != "vector":
            raise QueryError("bad_data", f"expected an instant vector, got {data.get('resultType')}")
        return [Sample(labels=dict(item["metric"]), value=float(item["value"][1]))
                for item in data.get("result", [])]


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
