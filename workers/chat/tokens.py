"""Token accounting for chat: the history's budget within the model's context window, whether an answer
that never began was a prompt over that window, and the usage of an answer when the server sends none (its
tokenizer where it has one, else an estimate; either way with the chat template's overhead, and marked
estimated). The window and the template's tokens are the model's facts (facts.py)."""

from __future__ import annotations

import httpx
import structlog

from fleet.shared.config import Settings
from fleet.shared.errors import FleetError, PermanentError, describe
from fleet.shared.providers.chat import ChatClient, PromptMeasure, StreamBroken, Tokenizer, context_limit
from fleet.shared.providers.embeddings import estimate_tokens
from fleet.shared.redact import redact
from fleet.workers.chat.facts import (
    calibrate_template,
    content_tokens,
    context_window,
    learn_window,
    template_tokens,
)

log = structlog.get_logger(__name__)


class ContextWindowExceeded(PermanentError):
    """The prompt cannot fit the model's context window: retrying the same prompt cannot help."""


def overhead(settings: Settings, model: str, messages: list[dict]) -> int:
    """The chat template's tokens around the messages' text."""
    per_message, once = template_tokens(settings, model)
    return len(messages) * per_message + once


def message_tokens(settings: Settings, model: str, content: str) -> int:
    return estimate_tokens(content) + template_tokens(settings, model)[0]


def prompt_estimate(settings: Settings, model: str, messages: list[dict]) -> int:
    return sum(estimate_tokens(m["content"]) for m in messages) + overhead(settings, model, messages)


def history_budget(settings: Settings, model: str, max_tokens: int | None, *, scale: float = 1.0) -> int:
    """Tokens the stored history may take: CHAT_CONTEXT_TOKENS, within the model's window less the answer.
    `scale`: how many of the server's tokens one estimated token turned out to be (> 1 after a refusal)."""
    window = context_window(settings, model)
    if window is None:
        return settings.chat_context_tokens
    room = window - (max_tokens or settings.chat_answer_reserve_tokens) - template_tokens(settings, model)[1]
    return min(settings.chat_context_tokens, int(room / scale))


def check_fits(
    settings: Settings, model: str, max_tokens: int | None, messages: list[dict], *, scale: float = 1.0
) -> None:
    """Refuse a prompt that cannot fit (a too long message, or a given conversation) before sending it."""
    window = context_window(settings, model)
    if window is None:
        return
    prompt = round(prompt_estimate(settings, model, messages) * scale)
    answer = max_tokens or settings.chat_answer_reserve_tokens
    if prompt + answer > window:
        source = "CHAT_CONTEXT_WINDOWS" if model in settings.chat_context_windows else "as the server says"
        raise ContextWindowExceeded(
            f"the prompt (about {prompt} tokens) and room for the answer ({answer}) exceed the context window"
            f" of {model} ({window} tokens, {source}): shorten the message or start a new session"
        )


def over_window(settings: Settings, model: str, messages: list[dict], cause: BaseException) -> PromptMeasure | None:
    """Whether an answer that never began (an empty stream, or a refusal) was the prompt over the model's
    window: the refusal's own words, else the server's own verdict on the same prompt (`ChatClient.measure`,
    which is refused in the same words). The window so named is learned. None: it was not (a cut stream, or
    a refusal of another kind)."""
    limit = context_limit(cause)
    if limit is None and isinstance(cause, StreamBroken) and not cause.text:
        try:
            limit = ChatClient(settings).measure(messages, model)
        except (FleetError, httpx.HTTPError) as e:
            log.info("chat.measure_failed", model=model, error=redact(describe(e)))
            return None  # the server cannot say now: the empty stream is retried as a cut one
    if limit is None or limit.window is None:
        return None  # the server took the prompt: the stream was cut for another reason
    learn_window(settings, model, limit.window)
    return PromptMeasure(limit.prompt_tokens, context_window(settings, model) or limit.window)


def usage_of(settings: Settings, model: str, reported: dict | None, messages: list[dict], text: str) -> dict:
    """The server's usage when it sent one; otherwise counted with its tokenizer, or estimated, plus the
    template's overhead (measured once against the server), and marked estimated either way."""
    if reported and reported.get("prompt_tokens") is not None:
        return {
            "prompt_tokens": reported.get("prompt_tokens"),
            "completion_tokens": reported.get("completion_tokens"),
            "estimated": False,
        }
    calibrate_template(settings, model)  # once per model: this job's stream has ended
    content = content_tokens(settings, model, messages)
    answer = Tokenizer(settings).count(text, model) if text else 0
    return {
        "prompt_tokens": content + overhead(settings, model, messages),
        "completion_tokens": answer if answer is not None else estimate_tokens(text),
        "estimated": True,
    }
