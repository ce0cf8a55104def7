"""OpenAI-compatible streaming chat client.

`stream()` yields events as the provider sends them: text deltas, then the finish reason and the
usage (asked for with `stream_options.include_usage`). The stream is complete only when `[DONE]`
arrives; a connection that ends before it, or a chunk that is not JSON, is a `StreamBroken` that
carries what was received, so the caller can store a partial answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import httpx

from ..config import Settings, get_settings
from ..errors import TransientError
from ..health import check_available
from ..metrics import metrics
from .http import bearer, http_client, raise_for_provider

PROVIDER = "chat"


class StreamBroken(TransientError):
    """The stream stopped before [DONE] (cut connection, malformed chunk)."""

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

    def stream(self, messages: list[dict], *, model: str | None = None, temperature: float | None = None,
               max_tokens: int | None = None) -> Iterator[Delta | Finished]:
        body: dict = {"model": model or self.settings.chat_model_default, "messages": messages, "stream": True,
                      "stream_options": {"include_usage": True}}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        check_available(PROVIDER)
        m = metrics()
        try:
            with self.client.stream("POST", "/chat/completions", json=body,
                                    headers=bearer(self.settings.chat_key)) as response:
                m.provider_requests.labels(PROVIDER, str(response.status_code)).inc()
                if response.status_code >= 400:
                    response.read()
                    raise_for_provider(PROVIDER, response)
                yield from self._events(response)
        except httpx.TimeoutException:
            m.provider_requests.labels(PROVIDER, "timeout").inc()
            raise TransientError(f"{PROVIDER} timed out") from None
        except httpx.TransportError as e:
            raise TransientError(f"{PROVIDER} connection failed: {type(e).__name__}") from None

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
