"""One delivery per attempt: two live copies of a job never run the same retry.

A retry (or deferral) is enqueued before the attempt that scheduled it is acknowledged: a worker killed,
or a database that loses an unflushed ack, in between leaves the attempt to be delivered and run again,
and its second run schedules a second copy of the next attempt. So each retried or deferred generation of
a job (its `retries` and `deferrals` counts) is claimed by the first delivery that starts it; a copy
delivered under another identity (another pgmq message, another Redis message id) is skipped, which ends
the second chain. A redelivery of the same message (its worker died) keeps its identity and runs again.
"""

from __future__ import annotations

import structlog
from dramatiq.middleware import Middleware, SkipMessage

from fleet.shared import claims
from fleet.shared.db import get_pool

log = structlog.get_logger(__name__)

CLAIM_TTL_S = 7 * 86400


def delivery_of(message) -> str | None:
    """The broker's identity of this copy: the pgmq message id, or the Redis message id."""
    pgmq_id = getattr(message, "pgmq_id", None)
    return f"pgmq:{pgmq_id}" if pgmq_id is not None else message.options.get("redis_message_id")


def generation_of(message) -> str:
    return f"{message.options.get('retries', 0)}.{message.options.get('deferrals', 0)}"


class AttemptClaims(Middleware):
    def before_process_message(self, broker, message):
        delivery = delivery_of(message)
        if generation_of(message) == "0.0" or delivery is None:
            return  # a first attempt has one producer; its redeliveries are the same message
        key = f"{message.message_id}:{generation_of(message)}"
        with get_pool().connection() as conn:
            claimed = claims.claim_held(conn, claims.ATTEMPT, key, delivery, CLAIM_TTL_S, field="delivery")
        if not claimed:
            log.warning("job.duplicate_skipped", generation=generation_of(message), delivery=delivery)
            raise SkipMessage(f"another copy of attempt {generation_of(message)} of this job already started")
