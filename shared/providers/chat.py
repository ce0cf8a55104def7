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

What a server says of a model: `reported_window` reads the context window where servers report it, and
`ChatClient.measure` asks the server's own count of a prompt (a non-streamed call, one token of answer),
which over the window is a 400 naming the window (`context_limit` reads it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import structlog

from fleet.shared.config import Settings, get_settings
from fleet.shared.errors import ProviderError, TransientError
from fleet.shared.health import check_available, note_failure, note_success
from fleet.shared.metrics import metrics
from fleet.shared.providers.http import bearer, call_with_retries, http_client, raise_for_provider
from fleet.shared.redact import redact

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


@dataclass
class PromptMeasure:
    """The server's count of a prompt (its usage, or the count its refusal names) and, when it refused the
    prompt as too long, the context window it named."""

    prompt_tokens: int | None
    window: int | None = None


# How servers word a refusal over the context window: OpenAI, vLLM and llama-cpp-python ("This model's maximum
# context length is 2048 tokens. However, you requested 2132 tokens (2131 in the messages, 1 in the
# completion)"; newer vLLM "... your request has 2131 input tokens"), llama.cpp's server ("request (2131 tokens)
# exceeds the available context size (2048 tokens)", with n_ctx and n_prompt_tokens beside it).
_WINDOW = (re.compile(r"maximum context length is (\d+)"), re.compile(r"context size \((\d+) tokens\)"))
_PROMPT = (
    re.compile(r"\((\d+) in the messages"),
    re.compile(r"request has (\d+) input tokens"),
    re.compile(r"request \((\d+) tokens\)"),
)


def context_limit(error: BaseException | str) -> PromptMeasure | None:
    """The window (and the prompt's size) a refusal over the context window names; None for any other error."""
    if not isinstance(error, str) and not (isinstance(error, ProviderError) and error.status == 400):
        return None
    text = str(error)
    window = next((int(m.group(1)) for p in _WINDOW if (m := p.search(text))), None)
    if window is None:
        return None
    return PromptMeasure(next((int(m.group(1)) for p in _PROMPT if (m := p.search(text))), None), window)


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def window_in_models(body, model: str) -> int | None:
    """A model's window in a `/v1/models` answer: vLLM's `max_model_len`, OpenRouter's `context_length`."""
    entries = body.get("data") if isinstance(body, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model:
            return _positive_int(entry.get("max_model_len")) or _positive_int(entry.get("context_length"))
    return None


def window_in_props(body) -> int | None:
    """llama.cpp's `/props`: `default_generation_settings.n_ctx` (or a top-level `n_ctx` in older builds)."""
    if not isinstance(body, dict):
        return None
    settings = body.get("default_generation_settings")
    return (_positive_int(settings.get("n_ctx")) if isinstance(settings, dict) else None) or _positive_int(
        body.get("n_ctx")
    )


def reported_window(settings: Settings, model: str) -> tuple[int | None, bool]:
    """The model's context window as the server reports it, and whether the server answered at all (False: it
    could not be asked, so ask again later). llama-cpp-python reports it nowhere: (None, True)."""
    base = settings.chat_api_base.rstrip("/")
    client = http_client(base, timeout_s=settings.health_probe_timeout_s)
    headers = bearer(settings.chat_key)
    answered = False
    for url in (f"{base}/models", f"{base.removesuffix('/v1')}/props"):
        try:
            response = client.get(url, headers=headers)
        except httpx.HTTPError as e:
            log.info("chat.model_facts_unreachable", url=url, error=type(e).__name__)
            continue
        answered = answered or response.status_code < 500
        if response.status_code != 200:
            continue
        try:
            body = response.json()
        except ValueError:
            log.info("chat.model_facts_not_json", url=url)
            continue
        window = window_in_models(body, model) if url.endswith("/models") else window_in_props(body)
        if window is not None:
            return window, True
    return None, answered


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

    def measure(self, messages: list[dict], model: str) -> PromptMeasure | None:
        """The server's own count of this prompt: a non-streamed call with one token of answer, whose usage
        counts the prompt, or whose 400 over the window names the window. None when the server tells neither
        (logged); a failure to reach it is raised, as for any call."""
        body = {"model": model, "messages": messages, "max_tokens": 1, "stream": False}

        def attempt() -> httpx.Response:
            # Not timed_post: llama-cpp-python answers 400 with an empty body to an X-Request-Id not a UUID.
            try:
                response = self.client.post("/chat/completions", json=body, headers=bearer(self.settings.chat_key))
            except httpx.TransportError:
                metrics().provider_requests.labels(PROVIDER, "error").inc()
                raise
            metrics().provider_requests.labels(PROVIDER, str(response.status_code)).inc()
            return response

        # A server that just broke a stream may reset the pooled connection the next call takes: retried.
        response = call_with_retries(attempt, provider=PROVIDER, max_retries=self.settings.chat_provider_max_retries)
        if response.status_code == 400:
            try:
                raise_for_provider(PROVIDER, response)
            except ProviderError as e:
                if (limit := context_limit(e)) is not None:
                    return limit
                log.info("chat.measure_refused", model=model, error=redact(str(e))[:300])
                return None
        try:
            raise_for_provider(PROVIDER, response)
            prompt = _positive_int(response.json()["usage"]["prompt_tokens"])
        except (ValueError, KeyError, TypeError):
            prompt = None
        if prompt is None:
            log.info("chat.measure_without_usage", model=model)
            return None
        return PromptMeasure(prompt)

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
