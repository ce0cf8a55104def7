"""The chat job: idempotency, history within a budget, streaming with frames, progressive persistence."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog
from psycopg.rows import dict_row

from fleet.shared import events
from fleet.shared.config import Settings
from fleet.shared.db import get_pool, one
from fleet.shared.errors import PermanentError, classify, describe
from fleet.shared.frames import FramePublisher
from fleet.shared.metrics import metrics
from fleet.shared.providers.chat import ChatClient, Delta, Finished, StreamBroken
from fleet.shared.providers.embeddings import estimate_tokens
from fleet.shared.redact import redact
from fleet.workers.chat.facts import ask_window
from fleet.workers.chat.tokens import (
    ContextWindowExceeded,
    check_fits,
    history_budget,
    message_tokens,
    over_window,
    prompt_estimate,
    usage_of,
)

log = structlog.get_logger(__name__)

PERSIST_EVERY_S = 0.25
REFITS = 3  # how often a prompt refused as over the model's window is fitted again before the job gives up


class SessionOwnedByAnother(PermanentError):
    pass


@dataclass
class ChatRequest:
    session_id: str
    job_id: str
    key: str
    content: str
    messages: list[dict] | None  # when given, sent as the conversation instead of the stored history
    model: str
    temperature: float | None
    max_tokens: int | None
    user_id: str | None
    trace: dict
    ready_sent: bool = False  # an earlier attempt of this job already told the listener it started


def ensure_session(conn, session_id: str, user_id: str | None) -> None:
    conn.execute(
        "insert into chat_sessions (id, user_id) values (%s, %s) on conflict (id) do nothing", (session_id, user_id)
    )
    owner = conn.execute("select user_id from chat_sessions where id = %s", (session_id,)).fetchone()[0]
    if user_id is not None and owner is not None and str(owner) != str(user_id):
        raise SessionOwnedByAnother(f"session {session_id!r} belongs to another user")


def history(conn, session_id: str, before_id: int, budget_tokens: int, settings: Settings, model: str) -> list[dict]:
    """The newest messages of the session that fit the budget (template overhead included), oldest first."""
    rows = conn.execute(
        "select role, content from messages where session_id = %s and id < %s and status in ('complete', 'partial')"
        " order by id desc limit 200",
        (session_id, before_id),
    ).fetchall()
    kept, used = [], 0
    for role, content in rows:
        used += message_tokens(settings, model, content)
        if used > budget_tokens:
            break
        kept.append({"role": role, "content": content})
    return list(reversed(kept))


class Keepalive(threading.Thread):
    """`keepalive` frames every few seconds until the first delta, so a listener knows the job lives."""

    def __init__(self, publisher: FramePublisher, every_s: float) -> None:
        super().__init__(name="chat-keepalive", daemon=True)
        self.publisher, self.every_s = publisher, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.publisher.publish("keepalive")

    def stop(self) -> None:
        self.stopped.set()


def replay_stored(req: ChatRequest, row: dict, publisher: FramePublisher) -> None:
    """A repeated idempotency key: the stored answer, no provider call."""
    if not req.ready_sent:
        publisher.publish("ready", replayed=True)
    if row["content"]:
        publisher.publish("chat.delta", text=row["content"])
    usage = {
        "prompt_tokens": row["tokens_in"],
        "completion_tokens": row["tokens_out"],
        "estimated": row["tokens_estimated"],
    }
    if row["status"] == "complete":
        publisher.publish(
            "chat.done",
            text=row["content"],
            usage=usage,
            finish_reason=row["finish_reason"],
            status="complete",
            replayed=True,
        )
    else:
        publisher.publish(
            "error",
            error_class="Interrupted",
            message=row["error"] or "the stored answer is partial",
            status=row["status"],
            text=row["content"],
            usage=usage,
            replayed=True,
        )
    events.emit("chat.done", **req.trace, status=row["status"], replayed=True, session_id=req.session_id)


def publish_failure(publisher: FramePublisher, error: BaseException, *, last_attempt: bool) -> None:
    """An `error` frame for a job that will not answer: a permanent error, or the last attempt failed."""
    if classify(error) == "permanent" or (last_attempt and classify(error) == "transient"):
        publisher.publish("error", error_class=type(error).__name__, message=redact(describe(error)), status="error")


def prepare(
    req: ChatRequest, publisher: FramePublisher, settings: Settings, *, scale: float = 1.0
) -> tuple[str | None, list[dict]]:
    """In one short transaction (none is held while the provider answers): the replayed status of a stored
    answer, or None and the conversation to send, the stored history fitted into the model's window (`scale`:
    server tokens per estimated token, once a refusal told)."""
    with get_pool().connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        ensure_session(conn, req.session_id, req.user_id)
        prior = cur.execute(
            "select id, status, content, tokens_in, tokens_out, tokens_estimated, finish_reason, error from messages"
            " where session_id = %s and role = 'assistant' and idempotency_key = %s",
            (req.session_id, req.key),
        ).fetchone()
        if (
            prior is not None and prior["status"] == "streaming"
        ):  # an earlier attempt died mid-stream: no silent restart
            cur.execute(
                "update messages set status = 'partial', tokens_estimated = true, tokens_out = %s,"
                " error = 'the worker stopped while streaming', completed_at = now() where id = %s",
                (estimate_tokens(prior["content"]) if prior["content"] else 0, prior["id"]),
            )
            prior = cur.execute("select * from messages where id = %s", (prior["id"],)).fetchone()
        if prior is None:
            user_row = one(
                cur.execute(
                    "insert into messages (session_id, role, content, idempotency_key, job_id, trace_id, model)"
                    " values (%s, 'user', %s, %s, %s, %s, %s)"
                    " on conflict (session_id, role, idempotency_key) where idempotency_key is not null"
                    " do update set job_id = excluded.job_id returning id",
                    (req.session_id, req.content, req.key, req.job_id, req.trace.get("trace_id"), req.model),
                ).fetchone()
            )
            # The history's budget leaves room in the model's context window for the new message and the answer.
            budget = history_budget(settings, req.model, req.max_tokens, scale=scale) - message_tokens(
                settings, req.model, req.content
            )
            context = req.messages or (
                history(conn, req.session_id, user_row["id"], budget, settings, req.model)
                + [{"role": "user", "content": req.content}]
            )
            check_fits(settings, req.model, req.max_tokens, context, scale=scale)
    # Frames go out after the commit: publishing takes a connection of its own, and holding this one (and
    # its transaction) meanwhile let busy threads exhaust the pool waiting for their second connection.
    if prior is not None:
        replay_stored(req, prior, publisher)
        return prior["status"], []
    return None, context


def run_chat(
    req: ChatRequest, client: ChatClient, publisher: FramePublisher, settings: Settings, *, rate_limit=None
) -> str:
    """Returns the final status. Raises before the first delta (so the job is retried or dead-lettered);
    after it, never: a broken stream ends `partial` with an `error` frame. A prompt the server refuses as over
    the model's window (or answers with nothing, llama.cpp's way) is fitted into the window it names and sent
    again at once."""
    ask_window(settings, req.model)  # before this job's stream (on llama-cpp-python any request cuts one)
    replayed, context = prepare(req, publisher, settings)
    if replayed is not None:
        return replayed
    if not req.ready_sent:  # one `ready` per job, however often it is deferred or retried
        publisher.publish("ready", model=req.model, session_id=req.session_id)
    scale = 1.0
    for _ in range(REFITS):
        try:
            return _stream_answer(req, client, context, publisher, settings, rate_limit)
        except Exception as e:
            limit = over_window(settings, req.model, context, e)
            if limit is None:
                raise  # before the first delta: retried (transient) or dead-lettered (permanent)
            size = f" ({limit.prompt_tokens} tokens)" if limit.prompt_tokens else ""
            refused = ContextWindowExceeded(
                f"the server refused the prompt{size}: it does not fit the context window of {req.model}"
                f" ({limit.window} tokens)"
            )
            if req.messages is not None or len(context) == 1:
                raise refused from e  # nothing to leave out
            if limit.prompt_tokens:  # how far the estimate fell short of the server's count
                scale = max(scale, limit.prompt_tokens / prompt_estimate(settings, req.model, context))
            _, refitted = prepare(req, publisher, settings, scale=scale)
            if len(refitted) >= len(context):
                raise refused from e
            log.info("chat.refitted", model=req.model, window=limit.window, messages=len(refitted), was=len(context))
            context = refitted
    raise ContextWindowExceeded(f"the prompt still did not fit the context window of {req.model} after {REFITS} tries")


def _stream_answer(req: ChatRequest, client: ChatClient, context, publisher, settings, rate_limit) -> str:
    """One request to the provider. Raises only before the first delta."""
    keepalive = Keepalive(publisher, settings.chat_keepalive_s)
    keepalive.start()
    started = time.monotonic()
    answer_id = None
    parts: list[str] = []
    first_delta_at = None
    last_persist = 0.0
    try:
        stream = client.stream(context, model=req.model, temperature=req.temperature, max_tokens=req.max_tokens)
        if rate_limit is not None:
            with rate_limit():
                first = next(stream, None)
        else:
            first = next(stream, None)
        for event in _chain(first, stream):
            if isinstance(event, Delta):
                if answer_id is None:
                    keepalive.stop()
                    first_delta_at = time.monotonic()
                    metrics().chat_ttft.labels(req.model).observe(first_delta_at - started)
                    answer_id = _start_answer(req)
                parts.append(event.text)
                publisher.publish("chat.delta", text=event.text)
                if time.monotonic() - last_persist > PERSIST_EVERY_S:
                    _persist(answer_id, "".join(parts))
                    last_persist = time.monotonic()
            elif isinstance(event, Finished):
                if answer_id is None:
                    answer_id = _start_answer(req)
                return _finish(req, answer_id, event, context, publisher, started, first_delta_at, settings)
        raise StreamBroken("the stream ended without an answer")
    except Exception as e:
        keepalive.stop()
        if answer_id is None:
            raise
        return _end_partial(req, answer_id, "".join(parts), e, context, publisher, started, first_delta_at, settings)
    finally:
        keepalive.stop()


def _chain(first, stream):
    if first is not None:
        yield first
    yield from stream


def _start_answer(req: ChatRequest) -> int:
    with get_pool().connection() as conn:
        return one(
            conn.execute(
                "insert into messages (session_id, role, content, status, model, idempotency_key, job_id, trace_id)"
                " values (%s, 'assistant', '', 'streaming', %s, %s, %s, %s) returning id",
                (req.session_id, req.model, req.key, req.job_id, req.trace.get("trace_id")),
            ).fetchone()
        )[0]


def _persist(answer_id: int, text: str) -> None:
    with get_pool().connection() as conn:
        conn.execute("update messages set content = %s where id = %s", (text, answer_id))


def _finish(req, answer_id, event: Finished, context, publisher, started, first_delta_at, settings) -> str:
    usage_out = usage_of(settings, req.model, event.usage, context, event.text)
    tokens_in, tokens_out, estimated = (
        usage_out["prompt_tokens"],
        usage_out["completion_tokens"],
        usage_out["estimated"],
    )
    with get_pool().connection() as conn:
        conn.execute(
            "update messages set content = %s, status = 'complete', tokens_in = %s, tokens_out = %s,"
            " tokens_estimated = %s, finish_reason = %s, completed_at = now() where id = %s",
            (event.text, tokens_in, tokens_out, estimated, event.finish_reason, answer_id),
        )
    publisher.publish(
        "chat.done", text=event.text, usage=usage_out, finish_reason=event.finish_reason, status="complete"
    )
    _done_event(req, "complete", usage_out, started, first_delta_at, event.finish_reason)
    return "complete"


def _end_partial(req, answer_id, text, error, context, publisher, started, first_delta_at, settings) -> str:
    usage = usage_of(settings, req.model, None, context, text)
    tokens_in, tokens_out = usage["prompt_tokens"], usage["completion_tokens"]
    message = redact(describe(error))
    with get_pool().connection() as conn:
        conn.execute(
            "update messages set content = %s, status = 'partial', tokens_in = %s, tokens_out = %s,"
            " tokens_estimated = true, error = %s, completed_at = now() where id = %s",
            (text, tokens_in, tokens_out, message, answer_id),
        )
    publisher.publish(
        "error", error_class=type(error).__name__, message=message, status="partial", text=text, usage=usage, final=True
    )
    _done_event(req, "partial", usage, started, first_delta_at, None, error=message)
    return "partial"


def _done_event(req, status, usage, started, first_delta_at, finish_reason, error=None) -> None:
    now = time.monotonic()
    metrics().chat_completions.labels(req.model, status).inc()
    if usage.get("completion_tokens") and first_delta_at:
        metrics().chat_tokens_per_s.labels(req.model).observe(
            usage["completion_tokens"] / max(now - first_delta_at, 1e-3)
        )
    events.emit(
        "chat.done",
        **req.trace,
        status=status,
        session_id=req.session_id,
        usage=usage,
        finish_reason=finish_reason,
        latency_ms=round((now - started) * 1000, 1),
        ttft_ms=round((first_delta_at - started) * 1000, 1) if first_delta_at else None,
        error=error,
    )
