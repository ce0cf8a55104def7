"""Trace context: every job carries a `trace_id` (created at enqueue if absent) bound into the logs."""

from __future__ import annotations

import uuid

import structlog
from dramatiq.middleware import Middleware


class TraceContext(Middleware):
    enqueue_hooks_done_in_bulk = True  # PgmqBroker.enqueue_payloads gives each envelope its trace id itself

    def before_enqueue(self, broker, message, delay):
        if "trace_id" not in message.options:
            message.options["trace_id"] = str(uuid.uuid4())

    def before_process_message(self, broker, message):
        # Raw messages from SQL arrive without one; keep the new id across retries.
        if "trace_id" not in message.options:
            message.options["trace_id"] = str(uuid.uuid4())
        trace_id = message.options["trace_id"]
        structlog.contextvars.bind_contextvars(
            trace_id=trace_id,
            job_id=message.message_id,
            queue=message.queue_name,
            actor=message.actor_name,
        )

    def after_process_message(self, broker, message, *, result=None, exception=None):
        structlog.contextvars.clear_contextvars()

    after_skip_message = after_process_message
