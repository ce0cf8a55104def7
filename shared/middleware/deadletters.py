"""Writes every rejected message to `dead_letters` with the reason, on either broker."""

from __future__ import annotations

import structlog
from dramatiq.errors import ActorNotFound, BrokerConnectionError
from dramatiq.middleware import Middleware, MiddlewareError

from fleet.shared import events
from fleet.shared.deadletters import DeadLetter, record_dead_letter
from fleet.shared.durable import while_unreachable
from fleet.shared.errors import describe
from fleet.shared.middleware.events import job_fields
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)


def reason_for(message, exception: BaseException | None) -> str:
    if exception is None:
        return "rejected by middleware"
    if isinstance(exception, ActorNotFound):
        return f"unknown actor {message.actor_name!r}"
    text = describe(exception)
    if message.options.get("retries_exhausted"):
        attempts = message.options.get("retries", 0) + 1
        return f"retries exhausted after {attempts} attempts: {type(exception).__name__}: {text}"
    return f"permanent error: {type(exception).__name__}: {text}"


class DeadLetterNotRecorded(MiddlewareError, BrokerConnectionError):
    """Raised from before_nack when the dead letter cannot be written: a MiddlewareError so no broker swallows
    it, a BrokerConnectionError so dramatiq's worker keeps the message and tries the nack (and with it this
    write) again every few seconds. The message never leaves its queue without its dead_letters row."""


class DeadLetters(Middleware):
    @property
    def actor_options(self):
        return {"dead_letters"}  # False (`@job(..., dead_letters=False)`): the job.dead event only, no row

    # Before the nack: the row and its job.dead event exist before the broker lets go of the message.
    def before_nack(self, broker, message):
        exception = getattr(message, "_exception", None)
        reason = reason_for(message, exception)
        actor = broker.actors.get(message.actor_name)
        if actor is not None and actor.options.get("dead_letters") is False:
            events.emit("job.dead", **job_fields(message), reason=redact(reason), dead_letter=False)
            log.warning("job.dead", reason=reason, dead_letter=False)
            return
        letter = DeadLetter(
            queue=message.queue_name,
            actor=message.actor_name,
            message_id=message.message_id,
            message=message.asdict(),
            reason=reason,
            error_class=type(exception).__name__ if exception else None,
            error=describe(exception) if exception else None,
            attempts=message.options.get("retries", 0) + 1,
            trace_id=message.options.get("trace_id"),
        )
        try:
            while_unreachable(lambda: record_dead_letter(letter), what="dead letter")
        except Exception as e:
            log.exception(
                "dead_letter.record_failed",
                job_id=message.message_id,
                reason=reason,
                note="the message stays unacknowledged; the write is tried again",
            )
            raise DeadLetterNotRecorded(f"dead letter not recorded: {type(e).__name__}: {redact(describe(e))}") from e
        log.warning("job.dead", reason=reason)
