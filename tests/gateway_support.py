"""Helpers for the gateway tests: a fleet (workers on one broker) behind a real gateway process, and an
SSE reader over real HTTP."""

from __future__ import annotations

import json
import signal
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from .conftest import started_fleet
from .embedding_support import API_KEY
from .gateway_process import GatewayProcess

CHAT_ENV = {
    "CHAT_API_KEY": API_KEY,
    "CHAT_KEEPALIVE_S": "0.2",
    "CHAT_MODEL_DEFAULT": "sim-chat",
    "EMBEDDING_API_KEY": API_KEY,
}


@dataclass
class Sse:
    status: int
    headers: dict
    frames: list[dict] = field(default_factory=list)  # each frame's data, plus "_id" and "_event" as sent
    comments: int = 0
    body: dict | None = None  # the JSON error body of a non-200 answer

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]

    def text(self) -> str:
        return "".join(f["text"] for f in self.frames if f["type"] == "chat.delta")


def read_sse(response: httpx.Response, *, stop_after=None) -> Sse:
    """Reads the stream to its end (or until stop_after(frames) is true, then drops the connection)."""
    out = Sse(response.status_code, dict(response.headers))
    if response.status_code != 200:
        response.read()
        out.body = response.json()
        return out
    block: dict = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            out.comments += 1
        elif line.startswith("id: "):
            block["_id"] = line[4:]
        elif line.startswith("event: "):
            block["_event"] = line[7:]
        elif line.startswith("data: "):
            block["data"] = json.loads(line[6:])
        elif line == "" and "data" in block:
            out.frames.append(block.pop("data") | block)
            block = {}
            if stop_after is not None and stop_after(out.frames):
                break
    return out


def post_sse(url: str, path: str, body, *, headers: dict | None = None, stop_after=None, timeout: float = 60) -> Sse:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    hdrs = {"Content-Type": "application/json"} | (headers or {})
    with httpx.stream("POST", f"{url}{path}", content=content, headers=hdrs, timeout=timeout) as response:
        return read_sse(response, stop_after=stop_after)


def get_sse(url: str, path: str, *, headers: dict | None = None, timeout: float = 60) -> Sse:
    with httpx.stream("GET", f"{url}{path}", headers=headers or {}, timeout=timeout) as response:
        return read_sse(response)


def new_key() -> str:
    return f"k-{uuid.uuid4()}"


def chat_calls(sim) -> list[dict]:
    return [r for r in httpx.get(f"{sim.url}/_sim/log").json() if r["path"] == "/v1/chat/completions"]


@dataclass
class GatewayFleet:
    fleet: object
    gateway: GatewayProcess

    @property
    def url(self) -> str:
        return self.gateway.url


@contextmanager
def fleet_with_gateway(services, sim, kind: str, log_dir, gateway_env: dict | None = None, **worker_env):
    env = CHAT_ENV | {"CHAT_API_BASE": f"{sim.url}/v1", "EMBEDDING_API_BASE": f"{sim.url}/v1"} | worker_env
    with started_fleet(services, kind, log_dir, **env) as fleet:
        # development mode unless the test asks for production (gateway_env GATEWAY_DEV=false); the per-caller
        # request limits are counted in the shared backend, where every test's 127.0.0.1 is one caller, so
        # they are off unless a test sets them (the tests of the limits do)
        gw_env = (
            fleet.env
            | {
                "GATEWAY_KEEPALIVE_S": "0.5",
                "GATEWAY_DEV": "true",
                "GATEWAY_DOCS": "true",
                "GATEWAY_CHAT_RATE_LIMIT_PER_MIN": "0",
                "GATEWAY_EMBED_RATE_LIMIT_PER_MIN": "0",
            }
            | (gateway_env or {})
        )
        gateway = GatewayProcess(gw_env, log_dir).start()
        try:
            yield GatewayFleet(fleet, gateway)
        finally:
            code = gateway.stop()
            # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean stop
            assert code in (0, -signal.SIGTERM), f"the gateway exited with {code}:\n{gateway.logs()[-3000:]}"
