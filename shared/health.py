"""Provider health: a real minimal call to each configured provider, in parallel, with a short timeout.

healthy   answered within HEALTH_DEGRADED_MS
degraded  answered slowly, or failed fewer than HEALTH_DOWN_AFTER times in a row
down      failed HEALTH_DOWN_AFTER times in a row

Workers read the result (`check_available`): a job for a provider that is down is deferred with
backoff instead of hammering it, and runs again by itself once a probe finds the provider back.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import httpx

from . import events
from .config import Settings, get_settings
from .db import get_pool
from .errors import DeferredError, describe
from .metrics import metrics
from .providers.http import bearer, raise_for_provider
from .redact import redact

CACHE_S = 5.0
PROBE_INPUT = ["ping"]  # what an embedding health probe sends


class ProviderDown(DeferredError):
    pass


@dataclass(frozen=True)
class Probe:
    provider: str  # the name the clients use: "chat", "embeddings", "letta"
    kind: str  # chat | embedding | letta
    model: str
    call: Callable[[httpx.Client], httpx.Response]
    base_url: str
    headers: dict


def probes(settings: Settings) -> list[Probe]:
    wanted = {p.strip() for p in settings.health_providers.split(",") if p.strip()}
    found = []
    if "chat" in wanted:
        model = settings.chat_model_default
        body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "stream": False}
        found.append(Probe("chat", "chat", model, lambda c, b=body, h=bearer(settings.chat_key): c.post("/chat/completions", json=b, headers=h),
                           settings.chat_api_base, {}))
    if "embedding" in wanted:
        model = settings.embedding_model_default
        key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
        body = {"model": model, "input": PROBE_INPUT, "encoding_format": "float"}
        found.append(Probe("embeddings", "embedding", model, lambda c, b=body, h=bearer(key): c.post("/embeddings", json=b, headers=h),
                           settings.embedding_api_base, {}))
    if settings.letta_api_base_url:
        key = settings.letta_api_key.get_secret_value() if settings.letta_api_key else None
        found.append(Probe("letta", "letta", "", lambda c, h=bearer(key): c.get("/v1/health/", headers=h),
                           settings.letta_api_base_url, {}))
    return found


@dataclass
class ProbeResult:
    probe: Probe
    ok: bool
    latency_ms: float
    error_class: str | None = None
    error: str | None = None


def run_probe(probe: Probe, timeout_s: float) -> ProbeResult:
    started = time.monotonic()
    try:
        with httpx.Client(base_url=probe.base_url.rstrip("/"), timeout=timeout_s) as client:
            response = probe.call(client)
            raise_for_provider(probe.provider, response)
            if probe.kind != "letta":
                response.json()  # a garbled answer is a failure too
        return ProbeResult(probe, True, (time.monotonic() - started) * 1000)
    except Exception as e:
        return ProbeResult(probe, False, (time.monotonic() - started) * 1000, type(e).__name__, redact(describe(e, 500)))


def refresh(settings: Settings | None = None, *, trace: dict | None = None) -> list[dict]:
    """Probe every configured provider in parallel and record the results; returns the new states."""
    settings = settings or get_settings()
    todo = probes(settings)
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        results = list(pool.map(lambda p: run_probe(p, settings.health_probe_timeout_s), todo))
    states = []
    m = metrics()
    with get_pool().connection() as conn, conn.transaction():
        for r in results:
            p = r.probe
            row = conn.execute("select consecutive_failures from provider_health where provider = %s and model = %s",
                               (p.provider, p.model)).fetchone()
            failures = 0 if r.ok else (row[0] if row else 0) + 1
            if r.ok:
                status = "healthy" if r.latency_ms <= settings.health_degraded_ms else "degraded"
            else:
                status = "down" if failures >= settings.health_down_after else "degraded"
            conn.execute(
                "insert into provider_health (provider, model, kind, status, latency_ms, consecutive_failures,"
                " last_error_class, last_error, last_success_at, checked_at)"
                " values (%(p)s, %(m)s, %(k)s, %(s)s, %(l)s, %(f)s, %(ec)s, %(e)s, case when %(ok)s then now() end, now())"
                " on conflict (provider, model) do update set kind = excluded.kind, status = excluded.status,"
                " latency_ms = excluded.latency_ms, consecutive_failures = excluded.consecutive_failures,"
                " last_error_class = coalesce(excluded.last_error_class, provider_health.last_error_class),"
                " last_error = coalesce(excluded.last_error, provider_health.last_error),"
                " last_success_at = coalesce(excluded.last_success_at, provider_health.last_success_at),"
                " checked_at = now()",
                {"p": p.provider, "m": p.model, "k": p.kind, "s": status, "l": r.latency_ms, "f": failures,
                 "ec": r.error_class, "e": r.error, "ok": r.ok},
            )
            conn.execute(
                "insert into provider_health_checks (provider, model, kind, status, ok, latency_ms, error_class, error)"
                " values (%s, %s, %s, %s, %s, %s, %s, %s)",
                (p.provider, p.model, p.kind, status, r.ok, r.latency_ms, r.error_class, r.error),
            )
            m.provider_up.labels(p.provider, p.kind).set(0 if status == "down" else 1)
            m.provider_probe_seconds.labels(p.provider).observe(r.latency_ms / 1000)
            states.append({"provider": p.provider, "model": p.model, "kind": p.kind, "status": status,
                           "latency_ms": round(r.latency_ms, 1), "consecutive_failures": failures,
                           "error_class": r.error_class, "error": r.error})
        pruned = conn.execute(
            "delete from provider_health_checks where checked_at < now() - %s * interval '1 hour'",
            (settings.health_retention_h,),
        ).rowcount
    events.emit("health.refreshed", **(trace or {}), providers=states, pruned_checks=pruned)
    _cache.clear()
    return states


def current_health() -> list[dict]:
    from psycopg.rows import dict_row

    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "select provider, model, kind, status, round(latency_ms::numeric, 1) as latency_ms, consecutive_failures,"
            " last_error_class, last_success_at, checked_at from provider_health order by provider, model"
        ).fetchall()


_cache: dict[str, tuple[float, bool]] = {}
_cache_lock = threading.Lock()


def check_available(provider: str) -> None:
    """Raise ProviderDown (deferred: delayed with backoff, retries kept) if the last probe found it down."""
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(provider)
    if cached is None or now - cached[0] > CACHE_S:
        with get_pool().connection() as conn:
            row = conn.execute("select bool_or(status = 'down') from provider_health where provider = %s",
                               (provider,)).fetchone()
        cached = (now, bool(row and row[0]))
        with _cache_lock:
            _cache[provider] = cached
    if cached[1]:
        raise ProviderDown(f"{provider} is down according to the last health probe; the job waits for it to recover")
