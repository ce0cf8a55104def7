"""What the fleet knows of each chat model: its context window and its chat template's tokens.

Settings name them (CHAT_CONTEXT_WINDOWS; CHAT_TEMPLATE_TOKENS_PER_MESSAGE and CHAT_TEMPLATE_TOKENS) and
override whatever the server says. Otherwise they are learned from the server, once per model for the fleet
(kept in `chat_model_facts`, where another process finds them, for FACTS_TTL_S) and cached in each process:
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
import psycopg
import structlog

from fleet.shared.config import Settings
from fleet.shared.db import get_pool
from fleet.shared.errors import FleetError, describe
from fleet.shared.providers.chat import ChatClient, Tokenizer, reported_window
from fleet.shared.providers.embeddings import estimate_tokens
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)

DEFAULT_TOKENS_PER_MESSAGE = 4  # role markers, as most templates have
DEFAULT_TEMPLATE_TOKENS = 3  # the reply's opening
ASK_AGAIN_S = 60.0  # a server that could not be asked is asked again after this long, not at every job
PROBE_TEXT = "."  # one token for every tokenizer, and for the 4-bytes-a-token estimate
FACTS_TTL_S = 86_400  # a server may be restarted with another window: what was learned is asked again a day on


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


def _stored(settings: Settings, model: str, known: _Known) -> None:
    """What another process learned (and stored) of the model, into this process's cache."""
    try:
        with get_pool().connection() as conn:
            row = conn.execute(
                "select context_window, window_source, tokens_per_message, template_tokens from chat_model_facts"
                " where api_base = %s and model = %s and updated_at > now() - make_interval(secs => %s)",
                (settings.chat_api_base, model, FACTS_TTL_S),
            ).fetchone()
    except psycopg.Error as e:  # bookkeeping: the server is asked instead
        log.warning("chat.model_facts_unread", model=model, error=type(e).__name__)
        return
    if row is None:
        return
    window, source, per_message, once = row
    with _lock:
        if window is not None and known.window_source != "refusal":
            known.window, known.window_source = window, source
            known.window_answered = True
        if per_message is not None and once is not None and known.template is None:
            known.template, known.template_answered = (per_message, once), True


def _store(settings: Settings, model: str, columns: dict) -> None:
    """Keep what was learned for the other processes. Bookkeeping: a database fault is logged, not raised."""
    names = list(columns)
    try:
        with get_pool().connection() as conn:
            conn.execute(
                f"insert into chat_model_facts (api_base, model, {', '.join(names)})"
                f" values (%s, %s, {', '.join(['%s'] * len(names))})"
                f" on conflict (api_base, model) do update set {', '.join(f'{n} = excluded.{n}' for n in names)},"
                " updated_at = now()",
                (settings.chat_api_base, model, *columns.values()),
            )
    except psycopg.Error as e:
        log.warning("chat.model_facts_unsaved", model=model, error=type(e).__name__)


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
    _stored(settings, model, known)
    if known.window is not None:
        return
    window, answered = reported_window(settings, model)
    with _lock:
        known.window_answered = answered
        if window is not None and known.window_source != "refusal":
            known.window, known.window_source = window, "server"
    log.info("chat.context_window", model=model, window=window, source="server" if window else None)
    if window is not None:
        _store(settings, model, {"context_window": window, "window_source": "server"})


def learn_window(settings: Settings, model: str, window: int) -> None:
    """The window a server named when it refused a prompt: it holds from now on (the settings still win)."""
    known = _entry(settings, model)
    with _lock:
        changed = known.window != window
        known.window, known.window_source = window, "refusal"
    if changed:
        log.info("chat.context_window", model=model, window=window, source="refusal")
        _store(settings, model, {"context_window": window, "window_source": "refusal"})


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


def content_tokens(settings: Settings, model: str, messages: list[dict]) -> int:
    """The messages' text in tokens: the server's tokenizer where it has one, else an estimate."""
    counted = Tokenizer(settings).count("\n".join(m["content"] for m in messages), model)
    return counted if counted is not None else sum(estimate_tokens(m["content"]) for m in messages)


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
    _stored(settings, model, known)
    if known.template is not None:
        return
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
    text = content_tokens(settings, model, one)
    per_message = max(0, round((s3 - s1 - 2 * text) / 2))
    once = max(0, s1 - text - per_message)
    with _lock:
        known.template = (per_message, once)
    log.info("chat.template_tokens", model=model, per_message=per_message, once=once)
    _store(settings, model, {"tokens_per_message": per_message, "template_tokens": once})
