"""Records each job's life in `bus_events`: job.started and job.succeeded here; retries and deaths where they happen."""

from __future__ import annotations

import time

from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import Middleware, MiddlewareError

from fleet.shared import events
from fleet.shared.capabilities import capabilities_of
from fleet.shared.durable import while_unreachable
from fleet.shared.middleware.attempts import delivery_of
from fleet.shared.redact import redact


def job_fields(message) -> dict:
    return {
        "trace_id": message.options.get("trace_id"),
        "job_id": message.message_id,
        "queue": message.queue_name,
        "actor": message.actor_name,
    }


class EventsNotRecorded(MiddlewareError, BrokerConnectionError):
    """Raised from before_ack when the job's events cannot be written: a MiddlewareError so no broker swallows
    it, a BrokerConnectionError so dramatiq's worker keeps the message and tries the ack again shortly."""


def job_head(message) -> str:
    return events.job_head(message.options.get("trace_id"), message.message_id, message.queue_name, message.actor_name)


def _number(value) -> str:
    return str(value) if type(value) is int else events.encode_json(value)


class JobEvents(Middleware):
    def __init__(self) -> None:
        self._started: dict[str, tuple[float, str]] = {}  # message id -> (start, its rows' encoded head)

    def before_worker_shutdown(self, broker, worker):
        events.flush_quietly()

    def after_worker_shutdown(self, broker, worker):
        events.flush_quietly()

    def before_process_message(self, broker, message):
        head = job_head(message)
        self._started[message.message_id] = (time.monotonic(), head)
        options = message.options
        # The delivery (pgmq or Redis message id) and the deferrals tell two copies of one attempt apart.
        # Written as text: this row and job.succeeded are two of every job's rows, on every job's path.
        attempt, deferrals = options.get("retries", 0) + 1, options.get("deferrals", 0)
        events.emit_encoded(
            head,
            message.queue_name,
            '"job.started"',
            f'{{"attempt":{_number(attempt)},'
            f'"deferrals":{_number(deferrals)},"delivery":{events.encode_json(delivery_of(message))}}}',
        )

    def after_process_message(self, broker, message, *, result=None, exception=None):
        started = self._started.pop(message.message_id, None)
        if exception is None:
            if started is None:
                events.emit_encoded(job_head(message), message.queue_name, '"job.succeeded"', '{"duration_ms":null}')
                return
            duration_ms = round((time.monotonic() - started[0]) * 1000, 3)
            events.emit_encoded(started[1], message.queue_name, '"job.succeeded"', f'{{"duration_ms":{duration_ms!r}}}')

    # On Redis the ack is Redis's and the events are Postgres's: write a job's events before its ack, so
    # a worker killed in between leaves a job that runs again, never one done without a record. (The
    # pgmq consumer commits the events in the same transaction as the acks.)
    def before_ack(self, broker, message):
        if capabilities_of(broker).events_ride_with_acks:
            return
        try:
            while_unreachable(events.flush, what="bus_events")
        except Exception as e:  # any failure: the ack waits (dramatiq swallows other errors and acks)
            raise EventsNotRecorded(f"bus_events not written: {type(e).__name__}: {redact(str(e))}") from e

    before_nack = before_ack

    def after_skip_message(self, broker, message):
        self._started.pop(message.message_id, None)
        events.emit("job.skipped", **job_fields(message))
