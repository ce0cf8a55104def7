"""Prometheus metrics for every job: dramatiq's own series plus the fleet's outcome counters."""

from __future__ import annotations

import os
import time

from dramatiq.middleware import Middleware

from fleet.shared.errors import classify
from fleet.shared.metrics import metrics


class JobSeries:
    """One (queue, actor)'s labelled children, looked up once: prometheus_client's `labels()` takes a lock
    and builds the label tuple on every call, six times per job otherwise."""

    def __init__(self, queue: str, actor: str) -> None:
        m = metrics()
        self.inprogress = m.inprogress.labels(queue, actor)
        self.messages = m.messages.labels(queue, actor)
        self.duration_ms = m.duration.labels(queue, actor)
        self.duration_s = m.job_seconds.labels(queue, actor)
        self.succeeded = m.jobs.labels(queue, actor, "succeeded")


class Metrics(Middleware):
    enqueue_hooks_done_in_bulk = True  # PgmqBroker.enqueue_payloads counts its jobs once per call

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._series: dict[tuple[str, str], JobSeries] = {}

    def series(self, message) -> JobSeries:
        key = (message.queue_name, message.actor_name)
        found = self._series.get(key)
        if found is None:  # a race here builds the same children twice: harmless
            found = self._series[key] = JobSeries(*key)
        return found

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
        self.series(message).inprogress.inc()
        self._started[message.message_id] = time.monotonic()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        series = self.series(message)
        started = self._started.pop(message.message_id, None)
        series.inprogress.dec()
        series.messages.inc()
        if started is not None:
            elapsed = time.monotonic() - started
            series.duration_ms.observe(elapsed * 1000)
            series.duration_s.observe(elapsed)
        if exception is None:
            series.succeeded.inc()
            return
        m = metrics()
        labels = (message.queue_name, message.actor_name)
        m.errors.labels(*labels).inc()
        if not message.failed:
            kind = classify(exception)
            m.jobs.labels(*labels, "deferred" if kind == "deferred" else "retried").inc()
            if kind != "deferred":
                m.retries.labels(*labels).inc()

    def after_skip_message(self, broker, message):
        self._started.pop(message.message_id, None)
        self.series(message).inprogress.dec()

    def after_nack(self, broker, message):
        m = metrics()
        m.rejects.labels(message.queue_name, message.actor_name).inc()
        m.jobs.labels(message.queue_name, message.actor_name, "dead").inc()
