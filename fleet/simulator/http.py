"""The HTTP plumbing every simulated protocol shares, and the control endpoints.

Control endpoints (not part of any provider's API):
  POST /_sim/config   merge a JSON object into the settings (see SimConfig)
  POST /_sim/reset    clear the request log and the one-shot faults
  GET  /_sim/log      every request so far: path, time, status, inputs, options
  GET  /_sim/letta    the Letta subset's agents and PATCH counts
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler

from fleet.simulator.state import Simulator


def error_body(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> bytes:
    """OpenAI's error body shape."""
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


class BaseHandler(BaseHTTPRequestHandler):
    """Routes a request to the first protocol mixin whose `route` claims it; 404 otherwise."""

    protocol_version = "HTTP/1.1"
    sim: Simulator  # set on the class that `make_handler` builds
    raw_body: bytes | None = None

    def log_message(self, fmt, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.raw_body = raw  # for bodies that are not JSON (a multipart upload)
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return None

    def _auth_ok(self) -> bool:
        key = self.sim.config.api_key
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def route(self, method: str, body: dict | None) -> bool:
        """Overridden by each protocol mixin, which calls super() for paths it does not own."""
        return False

    def do_GET(self):
        self._dispatch("GET", None)

    def do_POST(self):
        self._dispatch("POST", self._body())

    def do_PATCH(self):
        self._dispatch("PATCH", self._body())

    def _dispatch(self, method: str, body: dict | None) -> None:
        if self.path.startswith("/_sim/"):
            self._control(method, body)
        elif method == "GET" and self.path in ("/health", "/v1/health", "/v1/health/"):
            self._send(200, b'{"status": "ok"}')
        elif not self.route(method, body):
            self._send(404, error_body(404, f"no route {self.path}"))

    def _control(self, method: str, body: dict | None) -> None:
        sim = self.sim
        if method == "GET" and self.path == "/_sim/log":
            with sim.lock:
                self._send(200, json.dumps(sim.log).encode())
        elif method == "GET" and self.path == "/_sim/letta":
            with sim.lock:
                self._send(200, json.dumps({"agents": sim.agents, "patches": sim.patches}).encode())
        elif self.path == "/_sim/config" and method == "GET":
            self._send(200, json.dumps(asdict(sim.config)).encode())
        elif self.path == "/_sim/config" and method == "POST":
            with sim.lock:
                for k, v in (body or {}).items():
                    if not hasattr(sim.config, k):
                        self._send(400, error_body(400, f"unknown simulator setting {k!r}"))
                        return
                    setattr(sim.config, k, v)
                sim.random = random.Random(sim.config.seed)
            self._send(200, json.dumps(asdict(sim.config)).encode())
        elif self.path == "/_sim/reset" and method == "POST":
            with sim.lock:
                sim.log.clear()
                sim.config.fail_next = []
            self._send(200, b"{}")
        else:
            self._send(404, error_body(404, f"no route {self.path}"))
