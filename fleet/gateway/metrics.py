"""The gateway's Prometheus metrics, in a registry of its own (served at /metrics)."""

from __future__ import annotations

import time
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fleet_gateway_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fleet_gateway_request_duration_seconds",
            "Time to the response's headers (a stream's first byte), by route",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.open_streams = Gauge(
            "fleet_gateway_open_streams", "SSE streams open now, by kind", ["kind"], registry=self.registry
        )
        self.ended_checks = Counter(
            "fleet_gateway_ended_checks_total",
            "Quiet chat streams' checks for an answer stored unheard",
            registry=self.registry,
        )
        self.ended_queries = Counter(
            "fleet_gateway_ended_check_queries_total",
            "Database round trips those checks took (one per batch)",
            registry=self.registry,
        )


@lru_cache(maxsize=1)
def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics()


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """A request's method as a label: a made-up method is "other", so clients cannot add series."""
    return method if method in METHODS else "other"


class MetricsMiddleware:
    """Counts requests and times them to their response headers (pure ASGI: streams pass untouched).
    Every label is bounded: the method (METHODS, else "other"), the route's template (never the path
    a client sent), the status."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        m = gateway_metrics()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                route, method = getattr(scope.get("route"), "path", "unmatched"), method_label(scope["method"])
                m.requests.labels(method, route, str(message["status"])).inc()
                m.latency.labels(method, route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, timed_send)
