"""The daemon's HTTP server: Prometheus ``/metrics``, ``/healthz``, and a read-only web page.

One port (``metrics.bind:metrics.port``) serves everything, from the standard library only:

    /                 the page (web/index.html, app.js, style.css), polling the two JSON routes
    /api/status       the daemon's status, health, per-camera counters, experts' calibration
    /api/alarms       the latest alarm payloads, newest first
    /evidence/NAME    an alarm's evidence JPEG (frame or overlay); 404 for anything else
    /metrics          Prometheus text exposition
    /healthz          the health document: 200 when healthy, 503 otherwise

GET and HEAD only (other methods: 405), nothing writes. The server sees a ``WebSource`` (a few
callables), never the daemon. Evidence names are checked against a strict pattern before the
source is even asked (no separators, no dots leading, no percent-encoding), so no request can
reach a file outside the evidence folder.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from moleflow.edge.wirejson import finite_values

log = logging.getLogger("moleflow.http")
WEB = Path(__file__).resolve().parent / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
EVIDENCE_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.jpe?g")
PROMETHEUS_TYPE = "text/plain; version=0.0.4"
PAGE_POLICY = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class WebSource:
    """What the server may read: each callable is asked per request."""
    status: Callable[[], dict]                  # /api/status
    health: Callable[[], dict]                  # /healthz (its "healthy" sets 200 or 503)
    alarms: Callable[[], list]                  # /api/alarms, newest first
    evidence: Callable[[str], Path | None]      # a checked evidence name -> its JPEG, or None
    metrics: Any                                # has render() -> str (and maybe content_type)


def _json(doc: Any) -> bytes:
    return json.dumps(finite_values(doc), allow_nan=False, separators=(",", ":")).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def shutdown(self) -> None:
        """Stop serving and release the port."""
        super().shutdown()
        self.server_close()


def _handler(source: WebSource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "moleflow"
        sys_version = ""
        timeout = 15  # a client that sends nothing cannot hold a thread for longer

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def __getattr__(self, name: str):
            if name.startswith("do_"):  # any other method: 405, not http.server's 501
                return self._not_allowed
            raise AttributeError(name)

        def _not_allowed(self) -> None:
            self._send(405, b"method not allowed: GET and HEAD only\n", "text/plain",
                       True, {"Allow": "GET, HEAD"})

        def _answer(self, body: bool) -> None:
            try:
                code, payload, ctype, headers = self._route(urlsplit(self.path).path)
            except Exception as exc:  # noqa: BLE001 - a failing route must not end the server
                log.exception("HTTP %s %s failed", self.command, self.path)
                code, payload, ctype, headers = (500, _json({"error": repr(exc)}),
                                                 "application/json", {})
            self._send(code, payload, ctype, body, headers)

        def _route(self, path: str) -> tuple[int, bytes, str, dict]:
            nostore = {"Cache-Control": "no-store"}
            if path == "/metrics":
                ctype = getattr(source.metrics, "content_type", None) or PROMETHEUS_TYPE
                text = source.metrics.render()
                return 200, text if isinstance(text, bytes) else text.encode(), ctype, {}
            if path == "/healthz":
                state = source.health()
                code = 200 if state.get("healthy") else 503
                return code, json.dumps(state).encode(), "application/json", {}
            if path == "/api/status":
                return 200, _json(source.status()), "application/json", nostore
            if path == "/api/alarms":
                return 200, _json(list(source.alarms())), "application/json", nostore
            if path.startswith("/evidence/"):
                return self._evidence(path[len("/evidence/"):])
            if path in STATIC:
                name, ctype = STATIC[path]
                headers = {"Cache-Control": "no-cache"}
                if name == "index.html":
                    headers["Content-Security-Policy"] = PAGE_POLICY
                return 200, (WEB / name).read_bytes(), ctype, headers
            return 404, b"not found\n", "text/plain", {}

        def _evidence(self, name: str) -> tuple[int, bytes, str, dict]:
            missing = (404, b"no such evidence\n", "text/plain", {})
            if not EVIDENCE_NAME.fullmatch(name) or len(name) > 200:
                return missing
            path = source.evidence(name)
            if path is None:
                return missing
            path = Path(path)
            if path.name != name or not path.is_file():
                return missing
            try:
                data = path.read_bytes()
            except OSError:  # pruned between the check and the read
                return missing
            # evidence files never change once written: the browser may keep them
            return 200, data, "image/jpeg", {"Cache-Control": "private, max-age=3600"}

        def _send(self, code: int, payload: bytes, ctype: str, body: bool,
                  headers: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    return Handler


def serve_http(source: WebSource, bind: str, port: int) -> ThreadingHTTPServer:
    """Listen on ``bind:port`` and serve on a daemon thread; ``shutdown()`` stops and closes.
    Raises OSError when the port cannot be had (the caller names the config key)."""
    server = _Server((bind, port), _handler(source))
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
