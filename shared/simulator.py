"""The provider simulator: an OpenAI-compatible HTTP server on loopback with settable latency and faults.

The demo, the tests and the benchmarks talk to it over real HTTP, so the client code under test is
the production code. Faithful where clients depend on it: DeepInfra's 400 for a null
`encoding_format`, OpenAI's error body shape, `Retry-After` on 429, base64 embeddings on request.

Control endpoints (not part of any provider's API):
  POST /_sim/config   merge a JSON object into the settings (see SimConfig)
  POST /_sim/reset    clear the request log and the one-shot faults
  GET  /_sim/log      every request so far: path, time, status, inputs, options
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class SimConfig:
    embedding_dim: int = 1024
    latency_ms: float = 0.0  # per request
    latency_per_input_ms: float = 0.0  # per embedding input
    error_rate_5xx: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    timeout_rate: float = 0.0
    timeout_s: float = 30.0  # how long a "timed out" request hangs before answering 504
    malformed_rate: float = 0.0
    max_inputs: int | None = None  # more inputs in one request: 413, as providers do for oversized batches
    api_key: str | None = None  # when set, any other bearer token gets 401
    fail_next: list = field(default_factory=list)  # one-shot faults for the next requests: 429, 500, "cut", "malformed"
    seed: int = 0
    # chat
    ttft_ms: float = 0.0  # time to first token
    tokens_per_s: float = 0.0  # 0: as fast as possible
    answer_tokens: int = 12  # when the request sets no max_tokens
    cut_after_tokens: int = 3  # a "cut" stream stops after this many content chunks
    stream_cut_rate: float = 0.0
    malformed_chunk_rate: float = 0.0
    # letta
    alter_block_on_patch: bool = False  # a misbehaving server that rewrites memory during an upgrade
    letta_latency_ms: float = 0.0


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.random = random.Random(self.config.seed)
        self.agents: dict[str, dict] = {}  # the Letta subset's state, in memory
        self.patches: dict[str, int] = {}  # PATCH count per agent (one per agent per upgrade run)

    # -- faults ------------------------------------------------------------
    def next_fault(self) -> int | str | None:
        with self.lock:
            c = self.config
            if c.fail_next:
                return c.fail_next.pop(0)
            roll = self.random.random()
        for rate, fault in ((c.error_rate_5xx, 500), (c.rate_429, 429), (c.timeout_rate, "timeout"),
                            (c.malformed_rate, "malformed")):
            if roll < rate:
                return fault
            roll -= rate
        return None

    def record(self, entry: dict) -> None:
        with self.lock:
            self.log.append(entry)

    # -- embeddings --------------------------------------------------------
    def _bytes(self, model: str, text: str) -> bytes:
        return hashlib.shake_256(f"{model}\x00{text}".encode()).digest(self.config.embedding_dim)

    def vector(self, model: str, text: str) -> list[float]:
        """Deterministic: the same model and text give the same vector (SHAKE-256 of both, each
        component one of 256 values in (-1, 1), exact in float32). Not normalised: cosine needs no norm."""
        return [_COMPONENTS[b] for b in self._bytes(model, text)]

    def vector_json(self, model: str, text: str) -> str:
        """The same vector as JSON text, built from a table (json.dumps of 1,024 floats costs 0.6 ms)."""
        return "[" + ",".join(_COMPONENT_TEXT[b] for b in self._bytes(model, text)) + "]"


LLM_REQUIRED = ("model", "model_endpoint_type", "context_window")
EMBEDDING_REQUIRED = ("embedding_endpoint_type", "embedding_model", "embedding_dim")
_TOOL_NAMES: dict[str, str] = {}


def _tool_id(name: str) -> str:
    tool_id = "tool-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    _TOOL_NAMES[tool_id] = name
    return tool_id


def _config_problems(config, required: tuple[str, ...], field: str) -> list[dict]:
    if not isinstance(config, dict):
        return [{"loc": ["body", field], "msg": "Field required", "type": "missing"}]
    return [{"loc": ["body", field, k], "msg": "Field required", "type": "missing"} for k in required if k not in config]


_COMPONENTS = [(2 * b - 255) / 256 for b in range(256)]
_COMPONENT_TEXT = [repr(c) for c in _COMPONENTS]


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def make_handler(sim: Simulator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                return None

        def do_GET(self):
            if self.path == "/_sim/log":
                with sim.lock:
                    self._send(200, json.dumps(sim.log).encode())
            elif self.path == "/_sim/letta":
                with sim.lock:
                    self._send(200, json.dumps({"agents": sim.agents, "patches": sim.patches}).encode())
            elif self.path == "/_sim/config":
                self._send(200, json.dumps(asdict(sim.config)).encode())
            elif self.path in ("/health", "/v1/health", "/v1/health/"):
                self._send(200, b'{"status": "ok"}')
            elif self.path.startswith(("/v1/agents", "/v1/tools")):
                self.letta("GET", None)
            else:
                self._send(404, _error(404, f"no route {self.path}"))

        def do_POST(self):
            body = self._body()
            if self.path == "/_sim/config":
                with sim.lock:
                    for k, v in (body or {}).items():
                        if not hasattr(sim.config, k):
                            self._send(400, _error(400, f"unknown simulator setting {k!r}"))
                            return
                        setattr(sim.config, k, v)
                    sim.random = random.Random(sim.config.seed)
                self._send(200, json.dumps(asdict(sim.config)).encode())
                return
            if self.path == "/_sim/reset":
                with sim.lock:
                    sim.log.clear()
                    sim.config.fail_next = []
                self._send(200, b"{}")
                return
            if self.path == "/v1/embeddings":
                self.embeddings(body)
                return
            if self.path == "/v1/chat/completions":
                self.chat(body)
                return
            if self.path.rstrip("/") == "/v1/agents":
                self.letta("POST", body)
                return
            self._send(404, _error(404, f"no route {self.path}"))

        def do_PATCH(self):
            body = self._body()
            if self.path.startswith("/v1/agents/"):
                self.letta("PATCH", body)
                return
            self._send(404, _error(404, f"no route {self.path}"))

        # -- Letta (the 0.16 server's agents subset) ---------------------------
        def letta(self, method: str, body: dict | None):
            entry = {"path": self.path, "method": method, "t": time.time(), "status": 200}
            time.sleep(sim.config.letta_latency_ms / 1000)
            status, payload = self._letta_answer(method, body)
            entry["status"] = status
            sim.record(entry)
            self._send(status, json.dumps(payload).encode())

        def _letta_answer(self, method: str, body: dict | None):
            if not self._auth_ok():
                return 401, {"detail": "Unauthorized"}
            fault = sim.next_fault()
            if isinstance(fault, int):
                return fault, {"detail": "simulated server failure"}
            path, _, query = self.path.partition("?")
            parts = [p for p in path.split("/") if p]  # v1, agents, [id], [core-memory, blocks]
            if method == "GET" and parts[:2] == ["v1", "tools"]:
                from urllib.parse import parse_qs

                name = (parse_qs(query).get("name") or [""])[0]
                return 200, [{"id": _tool_id(name), "name": name}] if name else []
            if method == "GET" and len(parts) == 2:  # list, filtered by name
                from urllib.parse import parse_qs

                name = (parse_qs(query).get("name") or [None])[0]
                with sim.lock:
                    return 200, [a for a in sim.agents.values() if name is None or a["name"] == name]
            if method == "POST":
                if body is None:
                    return 422, {"detail": [{"msg": "invalid JSON body"}]}
                problems = _config_problems(body.get("llm_config"), LLM_REQUIRED, "llm_config") + _config_problems(
                    body.get("embedding_config"), EMBEDDING_REQUIRED, "embedding_config")
                if problems:
                    return 422, {"detail": problems}
                agent_id = f"agent-{hashlib.sha1(str(time.time_ns()).encode() + str(len(sim.agents)).encode()).hexdigest()[:12]}"
                blocks = [{"id": f"block-{agent_id[6:]}-{i}", "label": b.get("label"), "value": b.get("value", ""),
                           "limit": b.get("limit", 5000)} for i, b in enumerate(body.get("memory_blocks") or [])]
                agent = {"id": agent_id, "name": body.get("name"), "system": body.get("system", ""),
                         "llm_config": body["llm_config"], "embedding_config": body["embedding_config"],
                         "tools": [{"id": _tool_id(t), "name": t} for t in body.get("tools") or []],
                         "tool_rules": body.get("tool_rules") or [], "tags": body.get("tags") or [],
                         "metadata": body.get("metadata") or {}, "memory": {"blocks": blocks}}
                with sim.lock:
                    sim.agents[agent_id] = agent
                return 200, agent
            agent_id = parts[2] if len(parts) > 2 else ""
            with sim.lock:
                agent = sim.agents.get(agent_id)
            if agent is None:
                return 404, {"detail": f"Agent id={agent_id} not found"}
            if method == "GET":
                if parts[3:] == ["core-memory", "blocks"]:
                    return 200, agent["memory"]["blocks"]
                return 200, agent
            if body is None:
                return 422, {"detail": [{"msg": "invalid JSON body"}]}
            # a PATCH replaces llm_config and embedding_config whole: a partial object is refused
            problems = []
            if "llm_config" in body:
                problems += _config_problems(body["llm_config"], LLM_REQUIRED, "llm_config")
            if "embedding_config" in body:
                problems += _config_problems(body["embedding_config"], EMBEDDING_REQUIRED, "embedding_config")
            if problems:
                return 422, {"detail": problems}
            with sim.lock:
                for key in ("name", "system", "llm_config", "embedding_config", "tool_rules", "tags", "metadata"):
                    if key in body:
                        agent[key] = body[key]
                if "tool_ids" in body:
                    agent["tools"] = [{"id": t, "name": _TOOL_NAMES.get(t, t)} for t in body["tool_ids"]]
                sim.patches[agent_id] = sim.patches.get(agent_id, 0) + 1
                if sim.config.alter_block_on_patch and agent["memory"]["blocks"]:
                    agent["memory"]["blocks"][0]["value"] += " (rewritten by the server)"
            return 200, agent

        def _auth_ok(self) -> bool:
            key = sim.config.api_key
            return key is None or self.headers.get("Authorization") == f"Bearer {key}"

        def embeddings(self, body: dict | None):
            t0 = time.time()
            entry = {"path": self.path, "t": t0, "status": 200}
            if body is None:
                entry["status"] = 400
                sim.record(entry)
                self._send(400, _error(400, "could not parse the JSON body"))
                return
            inputs = body.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            entry.update(model=body.get("model"), n_inputs=len(inputs or []),
                         encoding_format=body.get("encoding_format", "<absent>"), inputs=inputs)
            status, payload, headers = self._embed_answer(body, inputs)
            entry["status"] = status
            sim.record(entry)
            if status == "timeout":
                time.sleep(sim.config.timeout_s)
                status, payload = 504, _error(504, "upstream timed out", "server_error")
            self._send(status, payload, headers)

        # -- chat ------------------------------------------------------------
        def chat(self, body: dict | None):
            c = sim.config
            entry = {"path": self.path, "t": time.time(), "status": 200}
            if body is None or not isinstance(body.get("messages"), list) or not body["messages"]:
                entry["status"] = 400
                sim.record(entry)
                self._send(400, _error(400, "messages must be a non-empty list"))
                return
            entry.update(model=body.get("model"), stream=bool(body.get("stream")), n_messages=len(body["messages"]),
                         stream_options=body.get("stream_options"), max_tokens=body.get("max_tokens"))
            if not self._auth_ok():
                entry["status"] = 401
                sim.record(entry)
                self._send(401, _error(401, "Incorrect API key provided.", code="invalid_api_key"))
                return
            fault = sim.next_fault()
            if fault in (429, 500, 502, 503) or isinstance(fault, int):
                entry["status"] = fault
                sim.record(entry)
                headers = {"Retry-After": f"{c.retry_after_s:g}"} if fault == 429 else {}
                self._send(fault, _error(fault, "simulated provider failure", "server_error"), headers)
                return
            if fault == "timeout":
                entry["status"] = 504
                sim.record(entry)
                time.sleep(c.timeout_s)
                self._send(504, _error(504, "upstream timed out", "server_error"))
                return
            if fault is None:
                roll = sim.random.random()
                fault = "cut" if roll < c.stream_cut_rate else (
                    "malformed" if roll < c.stream_cut_rate + c.malformed_chunk_rate else None)
            entry["fault"] = fault
            sim.record(entry)
            words = self._answer_words(body)
            usage = {"prompt_tokens": sum(max(1, len(str(m.get("content", "")).split())) for m in body["messages"]),
                     "completion_tokens": len(words)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if not body.get("stream"):
                time.sleep((c.ttft_ms + (len(words) / c.tokens_per_s * 1000 if c.tokens_per_s else 0)) / 1000)
                answer = {"id": "chatcmpl-sim", "object": "chat.completion", "created": int(time.time()),
                          "model": body.get("model"), "choices": [{"index": 0, "finish_reason": "stop" if len(words) < (body.get("max_tokens") or 1e9) else "length",
                          "message": {"role": "assistant", "content": " ".join(words)}}], "usage": usage}
                self._send(200, json.dumps(answer).encode())
                return
            self._stream(body, words, usage, fault)

        def _answer_words(self, body: dict) -> list[str]:
            last = str(body["messages"][-1].get("content", ""))
            seed = int.from_bytes(hashlib.sha256(last.encode()).digest()[:4], "big")
            vocabulary = ("the fleet answers every question with care and a steady stream of tokens "
                          "from the simulated provider on loopback").split()
            n = body.get("max_tokens") or sim.config.answer_tokens
            return [vocabulary[(seed + i) % len(vocabulary)] for i in range(int(n))]

        def _stream(self, body: dict, words: list[str], usage: dict, fault):
            c = sim.config
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            base = {"id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": body.get("model")}

            def chunk(delta: dict, finish=None, **extra) -> bytes:
                data = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | extra
                return f"data: {json.dumps(data)}\n\n".encode()

            try:
                time.sleep(c.ttft_ms / 1000)
                self.wfile.write(chunk({"role": "assistant", "content": ""}))
                self.wfile.flush()
                for i, word in enumerate(words):
                    if fault == "cut" and i >= c.cut_after_tokens:
                        return  # the connection closes without finish_reason, usage or [DONE]
                    if fault == "malformed" and i == c.cut_after_tokens:
                        self.wfile.write(b"data: {\"choices\": [{\"delta\": {\"content\": \n\n")
                        self.wfile.flush()
                        return
                    if c.tokens_per_s and i:
                        time.sleep(1 / c.tokens_per_s)
                    self.wfile.write(chunk({"content": word if i == 0 else " " + word}))
                    self.wfile.flush()
                finish = "length" if body.get("max_tokens") and len(words) >= body["max_tokens"] else "stop"
                self.wfile.write(chunk({}, finish))
                if (body.get("stream_options") or {}).get("include_usage"):
                    self.wfile.write(f"data: {json.dumps(base | {'choices': [], 'usage': usage})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _embed_answer(self, body: dict, inputs):
            c = sim.config
            if not self._auth_ok():
                return 401, _error(401, "Incorrect API key provided.", code="invalid_api_key"), {}
            if "encoding_format" in body and body["encoding_format"] is None:
                # DeepInfra's answer to the OpenAI SDK's default of sending null
                return 400, _error(400, "encoding_format: Input should be 'float' or 'base64'"), {}
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
                return 400, _error(400, "input must be a string or a non-empty list of strings"), {}
            if c.max_inputs is not None and len(inputs) > c.max_inputs:
                return 413, _error(413, f"request too large: {len(inputs)} inputs, at most {c.max_inputs}"), {}
            time.sleep((c.latency_ms + c.latency_per_input_ms * len(inputs)) / 1000)
            fault = sim.next_fault()
            if fault == 429:
                return 429, _error(429, "Rate limit reached", "rate_limit_error"), {"Retry-After": f"{c.retry_after_s:g}"}
            if isinstance(fault, int):
                return fault, _error(fault, "simulated provider failure", "server_error"), {}
            if fault == "timeout":
                return "timeout", b"", {}
            if fault == "malformed":
                return 200, b'{"object": "list", "data": [{"embedding": [0.1, ', {}
            model = body.get("model") or "default"
            as_base64 = body.get("encoding_format") == "base64"
            items = []
            tokens = 0
            for i, text in enumerate(inputs):
                tokens += max(1, len(text.encode()) // 4)
                if as_base64:
                    vec = sim.vector(model, text)
                    emb = json.dumps(base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode())
                else:
                    emb = sim.vector_json(model, text)
                items.append(f'{{"object":"embedding","index":{i},"embedding":{emb}}}')
            usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens})
            answer = f'{{"object":"list","data":[{",".join(items)}],"model":{json.dumps(model)},"usage":{usage}}}'
            return 200, answer.encode(), {}

    return Handler


class SimulatorServer:
    """Runs the simulator in a thread of this process (tests) or as `fleet simulator` (demo, bench)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None) -> None:
        self.sim = Simulator(config)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(self.sim))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "SimulatorServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="simulator", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet simulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--config", default="{}", help="JSON object of SimConfig settings")
    a = p.parse_args(argv)
    server = SimulatorServer(a.host, a.port, SimConfig(**json.loads(a.config)))
    print(f"simulator listening on {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
