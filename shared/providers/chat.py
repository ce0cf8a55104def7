"""OpenAI-compatible streaming chat client.

`stream()` yields events as the provider sends them: text deltas, then the finish reason and the
usage (asked for with `stream_options.include_usage`; some servers, llama.cpp's Python server among
them, never send it). An answer is complete only when a `finish_reason` arrived and then `[DONE]`:
- a connection that ends before `[DONE]`, or a chunk that is not JSON, is a `StreamBroken`;
- `[DONE]` without any `finish_reason` is a cut answer too (llama.cpp ends a running stream that way
  when another request takes its slot), so it is a `StreamBroken` as well, never a complete answer.
Each carries the text received so far, so the caller can store a partial answer.

Opening the stream (up to the response headers) is retried CHAT_PROVIDER_MAX_RETRIES times within the
job; every provider fault is reported to the health state (shared/health.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import structlog

from fleet.shared.config import Settings, get_settings
from fleet.shared.errors import TransientError
from fleet.shared.health import check_available, note_failure, note_success
from fleet.shared.metrics import metrics
from fleet.shared.providers.http import bearer, call_with_retries, http_client, raise_for_provider

PROVIDER = "chat"
log = structlog.get_logger(__name__)


class StreamBroken(TransientError):
    """The stream stopped before its end (cut connection, malformed chunk, no finish_reason)."""

    def __init__(self, message: str, *, text: str = "") -> None:
        super().__init__(message)
        self.text = text


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str | None
    usage: dict | None = None  # None when the provider sent no usage chunk


class ChatClient:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()

    @property
    def client(self) -> httpx.Client:
        return http_client(self.settings.chat_api_base, timeout_s=self.settings.chat_timeout_s)

    def stream(
        self,
        messages: list[dict],
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[Delta | Finished]:
        body: dict = {
            "model": model or self.settings.chat_model_default,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        check_available(PROVIDER, self.settings)
        response = self._open(body)
        try:
            yield from self._events(response)
        finally:
            response.close()

    def _open(self, body: dict) -> httpx.Response:
        """The response, once its status says the stream begins; failures before that are retried here."""
        m = metrics()
        headers = bearer(self.settings.chat_key)

        def attempt() -> httpx.Response:
            try:
                response = self.client.send(
                    self.client.build_request("POST", "/chat/completions", json=body, headers=headers), stream=True
                )
            except httpx.TimeoutException:
                m.provider_requests.labels(PROVIDER, "timeout").inc()
                note_failure(PROVIDER, TransientError("timed out"), self.settings)
                raise
            except httpx.TransportError as e:
                m.provider_requests.labels(PROVIDER, "error").inc()
                note_failure(PROVIDER, e, self.settings)
                raise
            m.provider_requests.labels(PROVIDER, str(response.status_code)).inc()
            if response.status_code >= 400:
                response.read()
                response.close()
                try:
                    raise_for_provider(PROVIDER, response)
                except Exception as e:
                    note_failure(PROVIDER, e, self.settings)
                    raise
            return response

        # Health bookkeeping (note_*) never raises, so it cannot re-send a request or leak an open stream.
        response = call_with_retries(attempt, provider=PROVIDER, max_retries=self.settings.chat_provider_max_retries)
        note_success(PROVIDER, self.settings)
        return response

    @staticmethod
    def _events(response: httpx.Response) -> Iterator[Delta | Finished]:
        parts: list[str] = []
        finish_reason = None
        usage = None
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # comments, event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    if finish_reason is None:
                        raise StreamBroken(
                            "the stream ended without a finish_reason: the server cut the answer", text="".join(parts)
                        )
                    if usage:
                        metrics().provider_tokens.labels(PROVIDER, "input").inc(usage.get("prompt_tokens") or 0)
                        metrics().provider_tokens.labels(PROVIDER, "output").inc(usage.get("completion_tokens") or 0)
                    yield Finished("".join(parts), finish_reason, usage)
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise StreamBroken("the provider sent a malformed chunk", text="".join(parts)) from None
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
        except (httpx.TransportError, httpx.StreamError) as e:
            raise StreamBroken(f"the stream broke: {type(e).__name__}", text="".join(parts)) from None
        raise StreamBroken("the stream ended before [DONE]", text="".join(parts))


class Tokenizer:
    """The chat server's own tokenizer, where it has one (llama.cpp's Python server:
    `POST /extras/tokenize/count`, beside the /v1 API); `count` is None elsewhere.

    On llama-cpp-python a tokenize call takes the model's lock like a completion does, so it cuts a
    stream running at that moment: call it only once this job's own stream has ended.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.root = self.settings.chat_api_base.rstrip("/").removesuffix("/v1")

    def count(self, text: str, model: str) -> int | None:
        if not text:
            return 0
        try:
            response = http_client(self.root, timeout_s=self.settings.health_probe_timeout_s).post(
                "/extras/tokenize/count", json={"input": text, "model": model}, headers=bearer(self.settings.chat_key)
            )
        except httpx.HTTPError as e:
            log.info("chat.tokenizer_unreachable", error=type(e).__name__)
            return None  # an estimate will do (marked so); the answer is already stored
        try:
            return int(response.json()["count"]) if response.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            return None
