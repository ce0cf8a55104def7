"""What the fleet knows of each chat model: its context window and its chat template's tokens.

Settings name them (CHAT_CONTEXT_WINDOWS; CHAT_TEMPLATE_TOKENS_PER_MESSAGE and CHAT_TEMPLATE_TOKENS) and
override whatever the server says. Otherwise they are learned from the server, once per process and model:
- the window where the server reports it (`/v1/models`, `/props`), asked before the model's first answer; a
  server that reports it nowhere (llama-cpp-python) names it when it refuses a prompt over it, and the
  window so learned holds from then on;
- the template's tokens from the server's own usage of two tiny prompts (one message, then three), asked the
  first time an answer comes without usage (the only time the fleet counts a prompt itself) and after this
  job's stream has ended, since on llama-cpp-python any request cuts a running stream.
Until learned, the defaults below stand in, as the settings' own defaults used to.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import structlog

from fleet.shared.config import Settings
from fleet.shared.errors import FleetError, describe
from fleet.shared.providers.chat import ChatClient, Tokenizer, reported_window
from fleet.shared.providers.embeddings import estimate_tokens
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)

DEFAULT_TOKENS_PER_MESSAGE = 4  # role markers, as most templates have
DEFAULT_TEMPLATE_TOKENS = 3  # the reply's opening
ASK_AGAIN_S = 60.0  # a server that could not be asked is asked again after this long, not at every job
PROBE_TEXT = "."  # one token for every tokenizer, and for the 4-bytes-a-token estimate


@dataclass
class _Known:
    window: int | None = None
    window_source: str | None = None  # "server" (reported), "refusal" (learned from a refusal over it)
    window_asked_at: float | None = None  # monotonic; None: never asked
    window_answered: bool = False
    template: tuple[int, int] | None = None  # per message, once
    template_asked_at: float | None = None
    template_answered: bool = False


_known: dict[tuple[str, str], _Known] = {}
_lock = threading.Lock()


def _entry(settings: Settings, model: str) -> _Known:
    with _lock:
        return _known.setdefault((settings.chat_api_base, model), _Known())


def _due(asked_at: float | None, answered: bool) -> bool:
    return asked_at is None or (not answered and time.monotonic() - asked_at > ASK_AGAIN_S)


def context_window(settings: Settings, model: str) -> int | None:
    """CHAT_CONTEXT_WINDOWS' value for the model, else the window the server reported or named."""
    if model in settings.chat_context_windows:
        return settings.chat_context_windows[model]
    return _entry(settings, model).window


def ask_window(settings: Settings, model: str) -> None:
    """Ask the server for the model's window once (again after ASK_AGAIN_S if it could not be asked)."""
    if model in settings.chat_context_windows:
        return
    known = _entry(settings, model)
    with _lock:
        if not _due(known.window_asked_at, known.window_answered) or known.window_source == "refusal":
            return
        known.window_asked_at = time.monotonic()  # one thread asks; the others go on with what is known
    window, answered = reported_window(settings, model)
    with _lock:
        known.window_answered = answered
        if window is not None and known.window_source != "refusal":
            known.window, known.window_source = window, "server"
    log.info("chat.context_window", model=model, window=window, source="server" if window else None)


def learn_window(settings: Settings, model: str, window: int) -> None:
    """The window a server named when it refused a prompt: it holds from now on (the settings still win)."""
    known = _entry(settings, model)
    with _lock:
        changed = known.window != window
        known.window, known.window_source = window, "refusal"
    if changed:
        log.info("chat.context_window", model=model, window=window, source="refusal")


def template_tokens(settings: Settings, model: str) -> tuple[int, int]:
    """The chat template's tokens (per message, once): the settings where set, else as calibrated, else the
    defaults. No I/O."""
    calibrated = _entry(settings, model).template
    per_message, once = calibrated or (DEFAULT_TOKENS_PER_MESSAGE, DEFAULT_TEMPLATE_TOKENS)
    if settings.chat_template_tokens_per_message is not None:
        per_message = settings.chat_template_tokens_per_message
    if settings.chat_template_tokens is not None:
        once = settings.chat_template_tokens
    return per_message, once


def content_tokens(settings: Settings, model: str, messages: list[dict]) -> tuple[int, bool]:
    """The messages' text in tokens, and whether the server's tokenizer counted it (else an estimate)."""
    counted = Tokenizer(settings).count("\n".join(m["content"] for m in messages), model)
    if counted is not None:
        return counted, True
    return sum(estimate_tokens(m["content"]) for m in messages), False


def calibrate_template(settings: Settings, model: str) -> None:
    """Measure the template's tokens once, against the server's usage of one message and of three: what the
    server counts beyond the messages' text. Only when a setting leaves a part of it unset."""
    if settings.chat_template_tokens_per_message is not None and settings.chat_template_tokens is not None:
        return
    known = _entry(settings, model)
    with _lock:
        if not _due(known.template_asked_at, known.template_answered):
            return
        known.template_asked_at = time.monotonic()
    one = [{"role": "user", "content": PROBE_TEXT}]
    three = [*one, {"role": "assistant", "content": PROBE_TEXT}, *one]
    client = ChatClient(settings)
    try:
        counts = [client.measure(messages, model) for messages in (one, three)]
    except (FleetError, httpx.HTTPError) as e:
        log.info("chat.template_calibration_failed", model=model, error=redact(describe(e)))
        return  # asked again after ASK_AGAIN_S; the defaults stand in meanwhile
    with _lock:
        known.template_answered = True
    s1, s3 = (c.prompt_tokens if c is not None and c.window is None else None for c in counts)
    if s1 is None or s3 is None:
        log.info("chat.template_not_measured", model=model)  # the server reports no usage: the defaults stay
        return
    text = content_tokens(settings, model, one)[0]
    per_message = max(0, round((s3 - s1 - 2 * text) / 2))
    once = max(0, s1 - text - per_message)
    with _lock:
        known.template = (per_message, once)
    log.info("chat.template_tokens", model=model, per_message=per_message, once=once)
