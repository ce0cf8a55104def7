"""Retries decided by error class (shared/errors.py), replacing dramatiq's Retries.

transient: exponential backoff with jitter (dramatiq's compute_backoff), at least the provider's Retry-After,
           up to max_retries; an actor's own backoff range applies, capped by the configured max_backoff.
permanent: failed at once, so the broker dead-letters it.
deferred:  enqueued again after a delay without using up a retry (rate limits, a provider that is down).
"""

from __future__ import annotations

import structlog
from dramatiq.common import compute_backoff
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import Middleware, MiddlewareError

from fleet.shared import events
from fleet.shared.capabilities import capabilities_of
from fleet.shared.durable import HOLD_ACK, UNREACHABLE, while_unreachable
from fleet.shared.errors import classify, describe, retry_after_of
from fleet.shared.middleware.events import job_fields
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)

MAX_DEFERRALS = 10_000  # a job deferred this often has a limit that never clears


def backoff_ms(attempt: int, min_ms: int, max_ms: int) -> int:
    """dramatiq's own backoff (as its Retries computes it): min_ms doubled per attempt, capped at max_ms,
    then jittered between half of it and all of it."""
    return compute_backoff(attempt, factor=min_ms, max_backoff=max_ms)[1]


class ClassifiedRetries(Middleware):
    def __init__(self, *, max_retries: int = 5, min_backoff: int = 1000, max_backoff: int = 300_000) -> None:
        self.max_retries = max_retries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff

    @property
    def actor_options(self):
        return {"max_retries", "min_backoff", "max_backoff", "throws"}

    def _option(self, broker, message, name: str, default):
        actor = broker.actors.get(message.actor_name)
        return message.options.get(name, actor.options.get(name, default) if actor else default)

    def before_ack(self, broker, message):
        hold_until_enqueued(broker, message)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is None:
            return
        kind = classify(exception)
        error = redact(describe(exception))
        fields = job_fields(message)
        retry_after = retry_after_of(exception)
        if kind == "permanent":
            message.fail()
            return
        if kind == "deferred":
            deferrals = message.options.get("deferrals", 0)
            if deferrals < MAX_DEFERRALS:
                message.options["deferrals"] = deferrals + 1
                delay = int(retry_after * 1000) if retry_after else backoff_ms(min(deferrals, 6), 500, 30_000)
                events.emit("job.deferred", **fields, delay_ms=delay, error_class=type(exception).__name__, error=error)
                enqueue_again(broker, message, delay)
                return
        retries = message.options.get("retries", 0)
        max_retries = self._option(broker, message, "max_retries", self.max_retries)
        if retries >= max_retries:
            message.options["retries_exhausted"] = True
            message.fail()
            return
        min_backoff = self._option(broker, message, "min_backoff", self.min_backoff)
        # An actor's max_backoff is its family's policy; FLEET_MAX_BACKOFF_MS is the operator's ceiling on all of them.
        max_backoff = min(self._option(broker, message, "max_backoff", self.max_backoff), self.max_backoff)
        delay = backoff_ms(retries, min_backoff, max_backoff)
        if retry_after is not None:
            delay = max(delay, int(retry_after * 1000))
        message.options["retries"] = retries + 1
        events.emit(
            "job.retrying",
            **fields,
            attempt=retries + 1,
            delay_ms=delay,
            error_class=type(exception).__name__,
            error=error,
        )
        log.info("job.retrying", attempt=retries + 1, delay_ms=delay, error_class=type(exception).__name__)
        enqueue_again(broker, message, delay)


class RetryNotEnqueued(MiddlewareError, BrokerConnectionError):
    """Raised from before_ack: a MiddlewareError so dramatiq does not swallow it, a BrokerConnectionError so
    the worker keeps the message unacknowledged and tries the ack (and with it this enqueue) again shortly."""


def enqueue_again(broker, message, delay: int) -> None:
    """Enqueue the retry (or deferral), riding out a restart of the broker. Should it stay unreachable,
    the original message is held back from its ack (see `hold_until_enqueued`), so it is not lost."""
    try:
        while_unreachable(lambda: broker.enqueue(message, delay=delay), what="retry enqueue")
    except UNREACHABLE as e:
        message.options[HOLD_ACK] = {"delay": delay}
        log.error("job.retry_not_enqueued", error=redact(str(e)), note="held unacknowledged until it is enqueued")


def hold_until_enqueued(broker, message) -> None:
    """Before the ack of a message whose retry could not be enqueued: try that enqueue once more. Should it
    fail again, a broker that redelivers held messages (pgmq: the consumer skips the ack and the message
    returns after its visibility timeout) gets it back; on any other broker (Redis) the ack waits, and
    dramatiq's worker tries it again every few seconds until the broker answers. Either way the original
    is acknowledged only once its retry is enqueued, and a worker that dies meanwhile leaves it to redelivery."""
    held = message.options.pop(HOLD_ACK, None)
    if held is None:
        return
    try:
        broker.enqueue(message, delay=held["delay"])
    except UNREACHABLE as e:
        message.options[HOLD_ACK] = held
        if capabilities_of(broker).redelivers_held_messages:
            return
        raise RetryNotEnqueued(f"the retry is still not enqueued: {redact(str(e))}") from None
    log.info("job.retry_enqueued_late", delay_ms=held["delay"])


def is_last_attempt(broker, message) -> bool:
    """True when a transient failure of this attempt would dead-letter the job instead of retrying it."""
    retries = next((m for m in broker.middleware if isinstance(m, ClassifiedRetries)), None)
    if retries is None:
        return True
    limit = retries._option(broker, message, "max_retries", retries.max_retries)
    return message.options.get("retries", 0) >= limit
