"""The OpenAI-compatible embeddings endpoint (`POST /v1/embeddings`)."""

from __future__ import annotations

import base64
import json
import struct
import time

from fleet.simulator.http import BaseHandler, error_body


class EmbeddingRoutes(BaseHandler):
    def route(self, method: str, body: dict | None) -> bool:
        if method == "POST" and self.path == "/v1/embeddings":
            self.embeddings(body)
            return True
        return super().route(method, body)

    def embeddings(self, body: dict | None):
        t0 = time.time()
        entry = {"path": self.path, "t": t0, "status": 200}
        if body is None:
            entry["status"] = 400
            self.sim.record(entry)
            self._send(400, error_body(400, "could not parse the JSON body"))
            return
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        entry.update(
            model=body.get("model"),
            n_inputs=len(inputs or []),
            encoding_format=body.get("encoding_format", "<absent>"),
            inputs=inputs,
            request_id=self.headers.get("X-Request-Id"),
        )
        status, payload, headers = self._embed_answer(body, inputs)
        entry["status"], entry["answered"] = status, time.time()  # a 429 goes out after the latency
        self.sim.record(entry)
        if status == "timeout":
            time.sleep(self.sim.config.timeout_s)
            status, payload = 504, error_body(504, "upstream timed out", "server_error")
        self._send(status, payload, headers)

    def _embed_answer(self, body: dict, inputs):
        c = self.sim.config
        if not self._auth_ok():
            return 401, error_body(401, "Incorrect API key provided.", code="invalid_api_key"), {}
        if "encoding_format" in body and body["encoding_format"] is None:
            if c.error_style == "infinity":
                return (
                    422,
                    infinity_detail(
                        "enum",
                        ["encoding_format"],
                        "Input should be 'float' or 'base64'",
                        {"expected": "'float' or 'base64'"},
                        union=False,
                        echo=None,
                    ),
                    {},
                )
            # DeepInfra's answer to the OpenAI SDK's default of sending null
            return 400, error_body(400, "encoding_format: Input should be 'float' or 'base64'"), {}
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return 400, error_body(400, "input must be a string or a non-empty list of strings"), {}
        refused = self._refusal(inputs)
        if refused is not None:
            return refused
        time.sleep((c.latency_ms + c.latency_per_input_ms * len(inputs)) / 1000)
        fault = self.sim.next_fault()
        if fault == 429:
            return (
                429,
                error_body(429, "Rate limit reached", "rate_limit_error"),
                {"Retry-After": f"{c.retry_after_s:g}"},
            )
        if isinstance(fault, int):
            return fault, error_body(fault, "simulated provider failure", "server_error"), {}
        if fault == "timeout":
            return "timeout", b"", {}
        if fault == "malformed":
            return 200, b'{"object": "list", "data": [{"embedding": [0.1, ', {}
        model = body.get("model") or "default"
        as_base64 = body.get("encoding_format") == "base64"
        items = []
        tokens = 0
        for i, text in enumerate(inputs):
            tokens += (
                len(text) if c.error_style == "infinity" else max(1, len(text.encode()) // 4)
            )  # infinity: characters
            if c.max_input_tokens is not None:  # the model reads this much; the rest is cut without a word
                text = " ".join(text.split(" ")[: c.max_input_tokens])
            if as_base64:
                vec = self.sim.vector(model, text)
                emb = json.dumps(base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode())
            else:
                emb = self.sim.vector_json(model, text)
            items.append(f'{{"object":"embedding","index":{i},"embedding":{emb}}}')
        usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens})
        answer = f'{{"object":"list","data":[{",".join(items)}],"model":{json.dumps(model)},"usage":{usage}}}'
        return 200, answer.encode(), {}

    def _refusal(self, inputs: list[str]):
        """An oversized batch or input, answered as the configured server does (tests/fixtures/openai/)."""
        c = self.sim.config
        if c.max_inputs is not None and len(inputs) > c.max_inputs:
            if c.error_style == "infinity":
                return (
                    422,
                    infinity_detail(
                        "too_long",
                        ["input", "list[constrained-str]"],
                        f"List should have at most {c.max_inputs} items after validation, not {len(inputs)}",
                        {"field_type": "List", "max_length": c.max_inputs, "actual_length": len(inputs)},
                    ),
                    {},
                )
            return 413, error_body(413, f"request too large: {len(inputs)} inputs, at most {c.max_inputs}"), {}
        for i, text in enumerate(inputs):
            if c.max_input_chars is not None and len(text) > c.max_input_chars:
                if c.error_style == "infinity":
                    return (
                        422,
                        infinity_detail(
                            "string_too_long",
                            ["input", "list[constrained-str]", i],
                            f"String should have at most {c.max_input_chars} characters",
                            {"max_length": c.max_input_chars},
                        ),
                        {},
                    )
                return (
                    400,
                    error_body(
                        400,
                        f"This model's maximum context length is {c.max_input_chars // 4} tokens,"
                        f" however you requested {len(text) // 4} tokens in input {i}.",
                    ),
                    {},
                )
        return None


def infinity_detail(type_: str, loc: list, msg: str, ctx: dict, *, union: bool = True, echo="...") -> bytes:
    """infinity's (FastAPI's) 422: a `detail` list, the offending value echoed back; for `input`, the
    other branch of its union (a single string) is refused too."""
    detail = [{"type": type_, "loc": ["body", "text", *loc], "msg": msg, "input": echo, "ctx": ctx}]
    if union:
        detail.append(
            {
                "type": "string_type",
                "loc": ["body", "text", "input", "constrained-str"],
                "msg": "Input should be a valid string",
                "input": "...",
            }
        )
    return json.dumps({"detail": detail}).encode()
