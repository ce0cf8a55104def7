"""Riding out a restart of the database or of Redis: work that must not be dropped (a retry's enqueue,
a dead letter, a job's events) is tried again while the connection is refused, for a bounded time."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import dramatiq.errors
import psycopg
import redis.exceptions
import structlog

from .redact import redact

log = structlog.get_logger(__name__)

T = TypeVar("T")
UNREACHABLE = (psycopg.OperationalError, dramatiq.errors.BrokerConnectionError, redis.exceptions.ConnectionError,
               redis.exceptions.TimeoutError)
BUDGET_S = 60.0  # longer than a database restart or failover takes
# Set on a message whose retry could not be enqueued: the consumer leaves it unacknowledged, so the
# broker delivers it again once its visibility timeout ends, instead of losing it.
HOLD_ACK = "fleet_hold_ack"


def while_unreachable(operation: Callable[[], T], *, what: str, budget_s: float = BUDGET_S) -> T:
    deadline = time.monotonic() + budget_s
    delay = 0.1
    while True:
        try:
            return operation()
        except UNREACHABLE as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("unreachable.retrying", what=what, error=redact(str(e)), retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
