"""Prometheus metrics, multiprocess-safe: worker processes write to PROMETHEUS_MULTIPROC_DIR,
one exporter per host serves them all, plus queue depth read from the broker at scrape time.

The exporter also answers /healthz (alive) and /readyz (the database and broker answer).
"""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

log = structlog.get_logger(__name__)

DURATION_BUCKETS_MS = (
    5,
    10,
    25,
    50,
    75,
    100,
    250,
    500,
    750,
    1000,
    2500,
    5000,
    7500,
    10000,
    30000,
    60000,
    600000,
    900000,
)


class _Metrics:
    """Created on first use, after PROMETHEUS_MULTIPROC_DIR is set by the process that starts workers."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self._dramatiq_series(prom)
        self._job_and_provider_series(prom)
        self._family_series(prom)
        self._process_series(prom)

    def _dramatiq_series(self, prom) -> None:
        """dramatiq's own names, so its dashboards work on the fleet's workers."""
        # Not dramatiq's Prometheus middleware: it points PROMETHEUS_MULTIPROC_DIR at a directory of its own and
        # forks its own exposition server on one fixed port (dramatiq_prom_port), so it cannot share this
        # exporter, its queue figures, or a port per worker group.
        labels = ["queue_name", "actor_name"]
        self.messages = prom.Counter("dramatiq_messages_total", "The total number of messages processed.", labels)
        self.errors = prom.Counter("dramatiq_message_errors_total", "The total number of errored messages.", labels)
        self.retries = prom.Counter("dramatiq_message_retries_total", "The total number of retried messages.", labels)
        self.rejects = prom.Counter(
            "dramatiq_message_rejects_total", "The total number of dead-lettered messages.", labels
        )
        self.inprogress = prom.Gauge(
            "dramatiq_messages_inprogress", "The number of messages in progress.", labels, multiprocess_mode="livesum"
        )
        self.duration = prom.Histogram(
            "dramatiq_message_duration_milliseconds",
            "The time spent processing messages.",
            labels,
            buckets=DURATION_BUCKETS_MS,
        )

    def _job_and_provider_series(self, prom) -> None:
        self.jobs = prom.Counter(
            "fleet_jobs_total",
            "Jobs finished, by outcome (succeeded, retried, deferred, dead).",
            ["queue", "actor", "outcome"],
        )
        self.job_seconds = prom.Histogram(
            "fleet_job_duration_seconds",
            "Job run time in seconds.",
            ["queue", "actor"],
            buckets=tuple(b / 1000 for b in DURATION_BUCKETS_MS),
        )
        self.enqueued = prom.Counter("fleet_jobs_enqueued_total", "Jobs enqueued by this process.", ["queue"])
        self.provider_requests = prom.Counter(
            "fleet_provider_requests_total", "HTTP requests to providers, by status.", ["provider", "status"]
        )
        self.provider_latency = prom.Histogram(
            "fleet_provider_request_seconds",
            "Provider request latency.",
            ["provider"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.provider_tokens = prom.Counter(
            "fleet_provider_tokens_total", "Tokens reported by providers.", ["provider", "kind"]
        )

    def _family_series(self, prom) -> None:
        self.embed_documents = prom.Counter(
            "fleet_embed_documents_total", "Documents by outcome (embedded, skipped, failed).", ["table", "outcome"]
        )
        self.embed_batches = prom.Counter(
            "fleet_embed_batches_total", "Provider batches embedded and stored.", ["table"]
        )
        self.chat_ttft = prom.Histogram(
            "fleet_chat_time_to_first_token_seconds",
            "From the provider request to the first delta.",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.chat_tokens_per_s = prom.Histogram(
            "fleet_chat_tokens_per_second",
            "Output tokens per second after the first delta.",
            ["model"],
            buckets=(5, 10, 20, 40, 80, 160, 320, 640),
        )
        self.chat_completions = prom.Counter(
            "fleet_chat_completions_total", "Chat answers by final status.", ["model", "status"]
        )
        self.provider_up = prom.Gauge(
            "fleet_provider_up",
            "1 unless the last health probe found the provider down.",
            ["provider", "kind"],
            multiprocess_mode="mostrecent",
        )
        self.provider_probe_seconds = prom.Histogram(
            "fleet_provider_probe_seconds",
            "Health probe latency.",
            ["provider"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self.lifecycle_actions = prom.Counter(
            "fleet_lifecycle_actions_total", "Memories changed by lifecycle action.", ["action"]
        )

    def _process_series(self, prom) -> None:
        self.worker_processes = prom.Gauge(
            "fleet_worker_processes", "Worker processes running.", ["queues"], multiprocess_mode="livesum"
        )
        self.queue_consumers = prom.Gauge(
            "fleet_queue_consumers", "Worker processes consuming each queue.", ["queue"], multiprocess_mode="livesum"
        )
        self.db_reconnects = prom.Counter(
            "fleet_db_reconnects_total",
            "Long-lived connections (to PostgreSQL, or"
            " Redis for the gateway's frames) made again after they were lost, by process"
            " role and connection.",
            ["role", "connection"],
        )
        self.consumer_errors = prom.Counter(
            "fleet_consumer_errors_total",
            "Broker round trips refused by the database"
            " for a reason other than a lost connection (the consumer backs off).",
            ["queue", "error_class"],
        )
        self.health_write_errors = prom.Counter(
            "fleet_health_write_errors_total",
            "Health bookkeeping of a job's provider call the database refused (the call's outcome stands).",
            ["provider", "error_class"],
        )
        self.upgrades = prom.Counter(
            "fleet_upgrades_total", "Agents finished by upgrade runs, by status and mode.", ["status", "mode"]
        )


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


class QueueCollector:
    """Queue depth, in-flight, oldest message age and dead letters, read when Prometheus scrapes."""

    def __init__(self, answer_within_s: float = 2.0) -> None:
        self.answer_within_s = answer_within_s

    def _reachable(self) -> None:
        """Fail fast when the database cannot be reached: waiting for the pool's 30 s timeout would outlast the
        scrape, and Prometheus would see the exporter down instead of fleet_broker_up 0."""
        from fleet.shared.db import get_pool

        with get_pool().connection(timeout=self.answer_within_s) as conn:
            conn.execute("select 1")

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from fleet.shared.status import queue_stats

        depth = GaugeMetricFamily(
            "fleet_queue_depth", "Messages in the queue (visible, delayed and in flight).", labels=["queue"]
        )
        visible = GaugeMetricFamily("fleet_queue_visible", "Messages ready to be read now.", labels=["queue"])
        inflight = GaugeMetricFamily(
            "fleet_queue_in_flight", "Messages read and not yet acknowledged (or delayed).", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "fleet_queue_oldest_age_seconds", "Age of the oldest message in the queue.", labels=["queue"]
        )
        dead = GaugeMetricFamily("fleet_dead_letters", "Dead letters not yet retried.", labels=["queue"])
        up = GaugeMetricFamily("fleet_broker_up", "1 when the broker and database answered this scrape.")
        try:
            self._reachable()
            stats = queue_stats()
            fleet_wide = list(_fleet_wide_gauges())
        except Exception as e:  # noqa: BLE001  logged, and reported as fleet_up 0
            log.warning("metrics.queue_stats_failed", error=str(e))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for s in stats:
            depth.add_metric([s["queue"]], s["depth"])
            visible.add_metric([s["queue"]], s["visible"])
            inflight.add_metric([s["queue"]], s["in_flight"])
            oldest.add_metric([s["queue"]], s["oldest_age_s"])
            dead.add_metric([s["queue"]], s["dead_letters"])
        yield from (depth, visible, inflight, oldest, dead, up, *fleet_wide)


UPGRADE_STATES = ("pending", "running", "succeeded", "failed", "skipped", "cancelled")


def _fleet_wide_gauges():
    """Series read from the database: the scheduler's leadership and the progress of unfinished upgrade runs.
    Every state is always reported (0 when none) so dashboards and alerts never see a gap."""
    from prometheus_client.core import GaugeMetricFamily

    from fleet.shared.db import get_pool, one
    from fleet.shared.leadership import current_leader

    leader = GaugeMetricFamily("fleet_scheduler_leader", "1 while a scheduler holds the leader lock.")
    leader.add_metric([], 1 if current_leader() else 0)
    yield leader
    with get_pool().connection() as conn:
        counts: dict[str, int] = dict(
            conn.execute(
                "select u.status, count(*) from agent_upgrades u join upgrade_runs r on r.id = u.run_id"
                " where r.status in ('pending', 'running') group by u.status"
            ).fetchall()
        )
        unfinished = conn.execute("select count(*) from upgrade_runs where status in ('pending', 'running')")
        runs = one(unfinished.fetchone())[0]
    agents = GaugeMetricFamily(
        "fleet_upgrade_run_agents", "Agents of unfinished upgrade runs, by status.", labels=["status"]
    )
    for state in UPGRADE_STATES:
        agents.add_metric([state], counts.get(state, 0))
    yield agents
    active = GaugeMetricFamily("fleet_upgrade_runs_active", "Upgrade runs pending or running.")
    active.add_metric([], runs)
    yield active


def render(scrape_timeout_s: float | None = None) -> tuple[bytes, str]:
    import prometheus_client as prom
    from prometheus_client import multiprocess

    registry = prom.CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    # Half the scraper's timeout (Prometheus sends it with each scrape), at most 2 s, for the database to answer.
    registry.register(QueueCollector(min(2.0, scrape_timeout_s / 2) if scrape_timeout_s else 2.0))
    return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


def _ready() -> tuple[bool, str]:
    """The first line says ready or why not; the next ones which database and broker (credentials masked)."""
    from fleet.shared.db import connections
    from fleet.shared.status import check_ready

    where = "".join(f"\n{name}: {value}" for name, value in connections().items() if value)
    try:
        check_ready()
        return True, "ready" + where
    except Exception as e:  # noqa: BLE001  any failure means not ready: the answer says why
        from fleet.shared.redact import redact

        return False, redact(f"not ready: {type(e).__name__}: {e}") + where


def _scrape_timeout(header: str | None) -> float | None:
    try:
        return float(header) if header else None
    except ValueError:
        return None


class _Handler(BaseHTTPRequestHandler):
    # Not prometheus_client.start_http_server: besides the exposition it answers /healthz and /readyz, and it
    # bounds the queue figures' database query by each scrape's own timeout (the header Prometheus sends).
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/metrics":
            body, ctype = render(_scrape_timeout(self.headers.get("X-Prometheus-Scrape-Timeout-Seconds")))
            self._send(200, body, ctype)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path == "/readyz":
            ok, text = _ready()
            self._send(200 if ok else 503, (text + "\n").encode(), "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def serve(host: str | None = None, port: int | None = None) -> int:
    """Run the exporter until the process is stopped (a dramatiq fork function, or `fleet metrics`)."""
    from fleet.shared.config import get_settings
    from fleet.shared.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    host = host or settings.metrics_host
    port = port if port is not None else settings.metrics_port
    server = ThreadingHTTPServer((host, port), _Handler)
    log.info("metrics.serving", host=host, port=port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
