"""The daemon's HTTP endpoints: /metrics, /healthz and /status, served from a thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from celery_memguard._version import __version__
from celery_memguard.daemon.metrics import Metrics
from celery_memguard.daemon.view import View


class HttpServer:
    """Serves /metrics, /healthz and /status from a daemon thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, view: Callable[[], View],
                 healthy: Callable[[], bool], status: Callable[[View], dict[str, Any]]) -> None:
        handler = _make_handler(metrics, view, healthy, status)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="memguard-http",
                                        kwargs={"poll_interval": 0.25}, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_handler(metrics: Metrics, view: Callable[[], View], healthy: Callable[[], bool],
                  status: Callable[[View], dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"celery-memguard/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.render())
            elif path == "/healthz":
                ok = healthy()
                self._send(200 if ok else 503, "text/plain; charset=utf-8",
                           b"ok\n" if ok else b"sampling loop stalled\n")
            elif path == "/status":
                body = json.dumps(status(view()), indent=1).encode()
                self._send(200, "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
