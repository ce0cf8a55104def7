"""Prometheus metrics for every job: dramatiq's own series plus the fleet's outcome counters."""

from __future__ import annotations

import os
import time

from dramatiq.middleware import Middleware

from fleet.shared.errors import classify
from fleet.shared.metrics import metrics


class Metrics(Middleware):
    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def after_process_boot(self, broker):
        queues = os.environ.get("FLEET_WORKER_QUEUES", "all")
        metrics().worker_processes.labels(queues).inc()

    def after_worker_boot(self, broker, worker):
        # The queues this process consumes, so an alert can tell a queue nobody reads.
        queues = worker.consumer_whitelist or broker.get_declared_queues()
        for queue in {q.removesuffix(".DQ").removesuffix(".XQ") for q in queues}:
            metrics().queue_consumers.labels(queue).inc()

    def after_worker_shutdown(self, broker, worker):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def after_enqueue(self, broker, message, delay):
        metrics().enqueued.labels(message.queue_name).inc()

    def before_process_message(self, broker, message):
        m = metrics()
        m.inprogress.labels(message.queue_name, message.actor_name).inc()
        self._started[message.message_id] = time.monotonic()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        m = metrics()
        labels = (message.queue_name, message.actor_name)
        started = self._started.pop(message.message_id, None)
        m.inprogress.labels(*labels).dec()
        m.messages.labels(*labels).inc()
        if started is not None:
            elapsed = time.monotonic() - started
            m.duration.labels(*labels).observe(elapsed * 1000)
            m.job_seconds.labels(*labels).observe(elapsed)
        if exception is None:
            m.jobs.labels(*labels, "succeeded").inc()
            return
        m.errors.labels(*labels).inc()
        if not message.failed:
            kind = classify(exception)
            m.jobs.labels(*labels, "deferred" if kind == "deferred" else "retried").inc()
            if kind != "deferred":
                m.retries.labels(*labels).inc()

    def after_skip_message(self, broker, message):
        self._started.pop(message.message_id, None)
        metrics().inprogress.labels(message.queue_name, message.actor_name).dec()

    def after_nack(self, broker, message):
        m = metrics()
        m.rejects.labels(message.queue_name, message.actor_name).inc()
        m.jobs.labels(message.queue_name, message.actor_name, "dead").inc()
