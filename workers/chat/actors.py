"""`chat_completion` on queue `chat`: a streamed answer, frames to listeners, messages persisted."""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import CurrentMessage

from fleet import job
from fleet.shared.config import get_settings
from fleet.shared.errors import InvalidPayload
from fleet.shared.frames import FramePublisher
from fleet.shared.jobs import ChatJob
from fleet.shared.middleware.events import job_fields
from fleet.shared.middleware.retries import is_last_attempt
from fleet.shared.providers.chat import ChatClient
from fleet.shared.ratelimit import per_minute
from fleet.workers.chat.completion import ChatRequest, publish_failure, run_chat

READY_SENT = "chat_ready_sent"  # a message option
LAST_SEQ = "chat_last_seq"  # a message option: the seq of the last frame an earlier attempt published


@job(ChatJob, queue="chat", min_backoff=1_000, max_backoff=60_000)
def chat_completion(job: ChatJob) -> None:
    """Streams a chat answer to listeners and stores the messages."""
    settings = get_settings()
    message = CurrentMessage.get_current_message()
    assert message is not None  # CurrentMessage sets it for every job
    job_id = message.message_id
    publisher = FramePublisher(job_id, settings, after_seq=int(message.options.get(LAST_SEQ, 0)))
    try:
        if settings.require_idempotency and job.idempotency_key is None:
            raise InvalidPayload("idempotency_key is required (REQUIRE_IDEMPOTENCY=true)")
        _answer(job, message, publisher, settings)
    except Exception as e:
        publish_failure(publisher, e, last_attempt=is_last_attempt(dramatiq.get_broker(), message))
        raise
    finally:
        if "ready" in publisher.sent:  # carried by the retried or deferred message: one `ready` per job
            message.options[READY_SENT] = True
        message.options[LAST_SEQ] = publisher.seq  # SSE ids stay unique and increasing across attempts
        publisher.close()


def _answer(job: ChatJob, message, publisher: FramePublisher, settings) -> None:
    job_id = message.message_id
    if job.model is not None and job.model not in settings.allowed_chat_models():
        raise InvalidPayload(
            f"model {job.model!r} is not configured (CHAT_MODEL_DEFAULT, CHAT_MODELS, CHAT_CONTEXT_WINDOWS)"
        )
    content = job.messages[-1].content if job.messages else job.content
    assert content is not None  # a ChatJob has content or messages
    request = ChatRequest(
        session_id=job.session_id,
        job_id=job_id,
        key=job.idempotency_key or f"job:{job_id}",
        content=content,
        messages=[m.model_dump() for m in job.messages] if job.messages else None,
        model=job.model or settings.chat_model_default,
        temperature=job.temperature,
        max_tokens=job.max_tokens,
        user_id=str(job.user_id) if job.user_id else None,
        trace=job_fields(message),
        ready_sent=bool(message.options.get(READY_SENT)),
    )
    limiter = per_minute("chat", settings.chat_rate_limit_per_min)
    run_chat(request, ChatClient(settings), publisher, settings, rate_limit=limiter.acquire if limiter else None)
