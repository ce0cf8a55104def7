"""The OpenAI-compatible chat endpoint (`POST /v1/chat/completions`), streaming or not, the model list
(`GET /v1/models`), llama.cpp's `/props` and the tokenizer endpoint llama.cpp's Python server has
(`POST /extras/tokenize/count`).

The simulator's tokens are words. Its usage counts the chat template's tokens as real servers do:
`template_tokens_per_message` per message and `template_tokens` once (the reply's opening, and the
system prompt a template adds by itself). Over
`context_window` it answers as llama-cpp-python does: an empty stream, or a 400 naming the window.
"""

from __future__ import annotations

import hashlib
import json
import time

from fleet.simulator.http import BaseHandler, error_body
from fleet.simulator.state import SimConfig


def words(text: str) -> int:
    return len(text.split())


def prompt_tokens(messages: list[dict], config: SimConfig) -> int:
    return (
        sum(words(str(m.get("content", ""))) for m in messages)
        + config.template_tokens_per_message * len(messages)
        + config.template_tokens
    )


def over_context_body(prompt: int, window: int, max_tokens: int | None) -> bytes:
    """llama-cpp-python's 400 for a prompt of at least its window's length (recorded: completion_over_context)."""
    message = (
        f"This model's maximum context length is {window} tokens. However, you requested {prompt + (max_tokens or 0)}"
        f" tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce the length of the"
        " messages or completion."
    )
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    ).encode()


class ChatRoutes(BaseHandler):
    def route(self, method: str, body: dict | None) -> bool:
        if method == "POST" and self.path == "/v1/chat/completions":
            self.chat(body)
            return True
        if method == "POST" and self.path == "/extras/tokenize/count" and self.sim.config.tokenizer:
            self.tokenize_count(body)
            return True
        if method == "GET" and self.path == "/v1/models":
            self.models()
            return True
        if method == "GET" and self.path == "/props" and self.sim.config.report_window == "llama.cpp":
            self.sim.record({"path": self.path, "t": time.time(), "status": 200})
            self._send(
                200, json.dumps({"default_generation_settings": {"n_ctx": self.sim.config.context_window}}).encode()
            )
            return True
        return super().route(method, body)

    def models(self):
        """llama-cpp-python's shape; vLLM adds `max_model_len`, OpenRouter `context_length`."""
        c = self.sim.config
        key = {"vllm": "max_model_len", "openrouter": "context_length"}.get(c.report_window or "")
        self._take_model()  # llama-cpp-python: listing the models takes the model like a completion
        self.sim.record({"path": self.path, "t": time.time(), "status": 200})
        data = [
            {"id": m, "object": "model", "owned_by": "me", "permissions": []}
            | ({key: c.context_window} if key and c.context_window else {})
            for m in c.models
        ]
        self._send(200, json.dumps({"object": "list", "data": data}).encode())

    # -- chat ------------------------------------------------------------
    def chat(self, body: dict | None):
        c = self.sim.config
        entry = {"path": self.path, "t": time.time(), "status": 200}
        if body is None or not isinstance(body.get("messages"), list) or not body["messages"]:
            entry["status"] = 400
            self.sim.record(entry)
            self._send(400, error_body(400, "messages must be a non-empty list"))
            return
        entry.update(
            model=body.get("model"),
            stream=bool(body.get("stream")),
            n_messages=len(body["messages"]),
            stream_options=body.get("stream_options"),
            max_tokens=body.get("max_tokens"),
        )
        if not self._auth_ok():
            entry["status"] = 401
            self.sim.record(entry)
            self._send(401, error_body(401, "Incorrect API key provided.", code="invalid_api_key"))
            return
        fault = self.sim.next_fault()
        if fault in (429, 500, 502, 503) or isinstance(fault, int):
            entry["status"] = fault
            self.sim.record(entry)
            headers = {"Retry-After": f"{c.retry_after_s:g}"} if fault == 429 else {}
            self._send(fault, error_body(fault, "simulated provider failure", "server_error"), headers)
            return
        if fault == "timeout":
            entry["status"] = 504
            self.sim.record(entry)
            time.sleep(c.timeout_s)
            self._send(504, error_body(504, "upstream timed out", "server_error"))
            return
        if fault is None:
            roll = self.sim.random.random()
            fault = (
                "cut"
                if roll < c.stream_cut_rate
                else ("malformed" if roll < c.stream_cut_rate + c.malformed_chunk_rate else None)
            )
        entry["fault"] = fault
        self.sim.record(entry)
        turn = self._take_model()
        usage = {"prompt_tokens": prompt_tokens(body["messages"], c)}
        if c.context_window is not None and usage["prompt_tokens"] >= c.context_window:
            if body.get("stream"):
                self._stream(body, [], usage, "over_context", turn)
            else:
                entry["status"] = 400
                self._send(400, over_context_body(usage["prompt_tokens"], c.context_window, body.get("max_tokens")))
            return
        words = self._answer_words(body)
        usage["completion_tokens"] = len(words)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            time.sleep((c.ttft_ms + (len(words) / c.tokens_per_s * 1000 if c.tokens_per_s else 0)) / 1000)
            answer = {
                "id": "chatcmpl-sim",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop" if len(words) < (body.get("max_tokens") or 1e9) else "length",
                        "message": {"role": "assistant", "content": " ".join(words)},
                    }
                ],
                "usage": usage,
            }
            self._send(200, json.dumps(answer).encode())
            return
        self._stream(body, words, usage, fault, turn)

    def tokenize_count(self, body: dict | None):
        self._take_model()  # llama-cpp-python: a tokenize call takes the model like a completion
        self.sim.record({"path": self.path, "t": time.time(), "status": 200})
        self._send(200, json.dumps({"count": words(str((body or {}).get("input", "")))}).encode())

    def _take_model(self) -> int:
        with self.sim.lock:
            self.sim.chat_requests += 1
            return self.sim.chat_requests

    def _interrupted(self, turn: int) -> bool:
        """llama-cpp-python (interrupt_requests): a later request ends this stream with [DONE], no finish_reason."""
        return self.sim.config.interrupt_streams and self.sim.chat_requests != turn

    def _answer_words(self, body: dict) -> list[str]:
        last = str(body["messages"][-1].get("content", ""))
        seed = int.from_bytes(hashlib.sha256(last.encode()).digest()[:4], "big")
        vocabulary = (
            "the fleet answers every question with care and a steady stream of tokens "
            "from the simulated provider on loopback"
        ).split()
        n = body.get("max_tokens") or self.sim.config.answer_tokens
        return [vocabulary[(seed + i) % len(vocabulary)] for i in range(int(n))]

    def _stream(self, body: dict, words: list[str], usage: dict, fault, turn: int):
        c = self.sim.config
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {
            "id": "chatcmpl-sim",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
        }

        def chunk(delta: dict, finish=None, **extra) -> bytes:
            data = base | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]} | extra
            return f"data: {json.dumps(data)}\n\n".encode()

        try:
            time.sleep(c.ttft_ms / 1000)
            if fault == "over_context":  # llama.cpp: the prompt does not fit; 200, then the stream closes empty
                return
            self.wfile.write(chunk({"role": "assistant"}))
            self.wfile.flush()
            for i, word in enumerate(words):
                if self._interrupted(turn):
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    return
                if fault == "cut" and i >= c.cut_after_tokens:
                    return  # the connection closes without finish_reason, usage or [DONE]
                if fault == "malformed" and i == c.cut_after_tokens:
                    self.wfile.write(b'data: {"choices": [{"delta": {"content": \n\n')
                    self.wfile.flush()
                    return
                if c.tokens_per_s and i:
                    time.sleep(1 / c.tokens_per_s)
                self.wfile.write(chunk({"content": word if i == 0 else " " + word}))
                self.wfile.flush()
            finish = "length" if body.get("max_tokens") and len(words) >= body["max_tokens"] else "stop"
            self.wfile.write(chunk({}, finish))
            if c.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                self.wfile.write(f"data: {json.dumps(base | {'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
