"""Riding out a restart of the database or of Redis: work that must not be dropped (a retry's enqueue,
a dead letter, a job's events) is tried again while the connection is refused, for a bounded time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import dramatiq.errors
import psycopg
import redis.exceptions
import structlog
import tenacity

from fleet.shared.config import get_settings
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)

T = TypeVar("T")
UNREACHABLE = (
    psycopg.OperationalError,
    dramatiq.errors.BrokerConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
# Set on a message whose retry could not be enqueued (holding its delay): its ack waits until the retry is
# enqueued, or on pgmq the consumer leaves it unacknowledged for redelivery (middleware/retries.py).
HOLD_ACK = "fleet_hold_ack"


def while_unreachable(operation: Callable[[], T], *, what: str, budget_s: float | None = None) -> T:
    """Run `operation`, trying again while the database or Redis is unreachable, for up to
    FLEET_UNREACHABLE_BUDGET_S (longer than a restart or failover takes); then its error is raised."""
    if budget_s is None:
        budget_s = get_settings().unreachable_budget_s
    deadline = time.monotonic() + budget_s

    def next_try_too_late(state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + (state.upcoming_sleep or 0) > deadline

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        log.warning("unreachable.retrying", what=what, error=redact(str(error)), retry_in_s=state.upcoming_sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(UNREACHABLE),
        wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),  # 0.1 s, doubling, at most 2 s apart
        stop=next_try_too_late,
        before_sleep=log_retry,
        reraise=True,  # the operation's own error once the budget is spent
    )
    return retrying(operation)
