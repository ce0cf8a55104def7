"""Token accounting for chat: the model's context window, the history's budget within it, and the
usage of an answer when the server sends none (its tokenizer where it has one, else an estimate;
either way with the chat template's overhead, and marked estimated)."""

from __future__ import annotations

from fleet.shared.config import Settings
from fleet.shared.errors import PermanentError
from fleet.shared.providers.chat import Tokenizer
from fleet.shared.providers.embeddings import estimate_tokens


class ContextWindowExceeded(PermanentError):
    """The prompt cannot fit the model's context window: retrying the same prompt cannot help."""


def context_window(settings: Settings, model: str) -> int | None:
    return settings.chat_context_windows.get(model)


def overhead(settings: Settings, messages: list[dict]) -> int:
    """The chat template's tokens around the messages' text."""
    return len(messages) * settings.chat_template_tokens_per_message + settings.chat_template_tokens


def message_tokens(settings: Settings, content: str) -> int:
    return estimate_tokens(content) + settings.chat_template_tokens_per_message


def prompt_estimate(settings: Settings, messages: list[dict]) -> int:
    return sum(estimate_tokens(m["content"]) for m in messages) + overhead(settings, messages)


def history_budget(settings: Settings, model: str, max_tokens: int | None) -> int:
    """Tokens the stored history may take: CHAT_CONTEXT_TOKENS, within the model's window less the answer."""
    window = context_window(settings, model)
    if window is None:
        return settings.chat_context_tokens
    room = window - (max_tokens or settings.chat_answer_reserve_tokens) - settings.chat_template_tokens
    return min(settings.chat_context_tokens, room)


def check_fits(settings: Settings, model: str, max_tokens: int | None, messages: list[dict]) -> None:
    """Refuse a prompt that cannot fit (a too long message, or a given conversation) before sending it."""
    window = context_window(settings, model)
    if window is None:
        return
    prompt = prompt_estimate(settings, messages)
    answer = max_tokens or settings.chat_answer_reserve_tokens
    if prompt + answer > window:
        raise ContextWindowExceeded(
            f"the prompt (about {prompt} tokens) and room for the answer ({answer}) exceed the context window"
            f" of {model} ({window} tokens, CHAT_CONTEXT_WINDOWS): shorten the message or start a new session"
        )


def empty_answer_error(settings: Settings, model: str, messages: list[dict], cause: BaseException) -> BaseException:
    """What an answer without a single token means: over the context window (the server's tokenizer
    says so where it has one), a permanent error with the reason; otherwise a cut stream, retried."""
    window = context_window(settings, model)
    if window is None:
        return cause
    counted = Tokenizer(settings).count("\n".join(m["content"] for m in messages), model)
    prompt = (counted + overhead(settings, messages)) if counted is not None else prompt_estimate(settings, messages)
    if prompt < window:
        return cause
    return ContextWindowExceeded(
        f"the server answered nothing: the prompt ({prompt} tokens"
        f"{'' if counted is not None else ', estimated'}) does not fit the context window"
        f" of {model} ({window} tokens)"
    )


def usage_of(settings: Settings, model: str, reported: dict | None, messages: list[dict], text: str) -> dict:
    """The server's usage when it sent one; otherwise counted with its tokenizer, or estimated, plus the
    template's overhead, and marked estimated either way."""
    if reported and reported.get("prompt_tokens") is not None:
        return {
            "prompt_tokens": reported.get("prompt_tokens"),
            "completion_tokens": reported.get("completion_tokens"),
            "estimated": False,
        }
    tokenizer = Tokenizer(settings)
    counted = tokenizer.count("\n".join(m["content"] for m in messages), model)
    content = counted if counted is not None else sum(estimate_tokens(m["content"]) for m in messages)
    answer = tokenizer.count(text, model) if text else 0
    return {
        "prompt_tokens": content + overhead(settings, messages),
        "completion_tokens": answer if answer is not None else estimate_tokens(text),
        "estimated": True,
    }
