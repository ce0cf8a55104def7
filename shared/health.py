"""Provider health: a real minimal call to each configured provider, in parallel, with a short timeout.

healthy   answered within HEALTH_DEGRADED_MS
degraded  answered slowly, or failed fewer than HEALTH_DOWN_AFTER times in a row
down      failed HEALTH_DOWN_AFTER times in a row

Workers read the result (`check_available`): a job for a provider that is down is deferred with
backoff instead of hammering it, and runs again by itself once a probe finds the provider back.
Only the row of the model configured now counts: rows of models no longer configured are history.

The jobs' own calls count too (`note_failure`, `note_success`): a provider fault seen by a job is a
failed check, so an outage is noticed after HEALTH_DOWN_AFTER failed calls, within the first attempts
of the first jobs, not only after HEALTH_DOWN_AFTER scheduled probes (minutes). But only if none of its
calls succeeded for HEALTH_DOWN_QUIET_S: a provider that fails half its calls is degraded, not down, and
deferring every job would stop the half it still does. A provider that is down is probed again by the
first worker that finds its state older than HEALTH_RECHECK_S.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from fleet.shared import events
from fleet.shared.config import Settings, get_settings
from fleet.shared.db import get_pool
from fleet.shared.errors import DeferredError, ProviderError, TransientError, describe
from fleet.shared.metrics import metrics
from fleet.shared.providers.http import bearer, raise_for_provider
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)
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


def _post(path: str, body: dict[str, Any], headers: dict[str, str]) -> Callable[[httpx.Client], httpx.Response]:
    return lambda client: client.post(path, json=body, headers=headers)


def _get(path: str, headers: dict[str, str]) -> Callable[[httpx.Client], httpx.Response]:
    return lambda client: client.get(path, headers=headers)


def probes(settings: Settings) -> list[Probe]:
    wanted = {p.strip() for p in settings.health_providers.split(",") if p.strip()}
    found = []
    if "chat" in wanted:
        model = settings.chat_model_default
        body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "stream": False}
        headers = bearer(settings.chat_key)
        found.append(
            Probe(
                "chat",
                "chat",
                model,
                _post("/chat/completions", body, headers),
                settings.chat_api_base,
                {},
            )
        )
    if "embedding" in wanted:
        model = settings.embedding_model_default
        key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
        body = {"model": model, "input": PROBE_INPUT, "encoding_format": "float"}
        headers = bearer(key)
        found.append(
            Probe(
                "embeddings",
                "embedding",
                model,
                _post("/embeddings", body, headers),
                settings.embedding_api_base,
                {},
            )
        )
    if settings.letta_api_base_url:
        key = settings.letta_api_key.get_secret_value() if settings.letta_api_key else None
        headers = bearer(key)
        found.append(
            Probe(
                "letta",
                "letta",
                "",
                _get("/v1/health/", headers),
                settings.letta_api_base_url,
                {},
            )
        )
    return found


@dataclass
class ProbeResult:
    probe: Probe
    ok: bool
    latency_ms: float | None  # None: a job's failed call, whose latency says nothing about the provider's
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
    except Exception as e:  # noqa: BLE001  any failure is the probe's result, recorded with its class and message
        return ProbeResult(
            probe, False, (time.monotonic() - started) * 1000, type(e).__name__, redact(describe(e, 500))
        )


def _record(conn, settings: Settings, r: ProbeResult, origin: str = "probe") -> dict:
    """One check into provider_health (the state) and provider_health_checks (the history)."""
    p = r.probe
    row = conn.execute(
        "select consecutive_failures, coalesce(last_success_at < now() - %s * interval '1 second',"
        " true) from provider_health where provider = %s and model = %s for update",
        (settings.health_down_quiet_s, p.provider, p.model),
    ).fetchone()
    failures = 0 if r.ok else (row[0] if row else 0) + 1
    quiet = row is None or row[1] or origin == "probe"  # a job's failures say "down" only if nothing got through
    if r.ok:
        assert r.latency_ms is not None  # a call that got through was timed
        status = "healthy" if r.latency_ms <= settings.health_degraded_ms else "degraded"
    else:
        status = "down" if failures >= settings.health_down_after and quiet else "degraded"
    conn.execute(
        "insert into provider_health (provider, model, kind, status, latency_ms, consecutive_failures,"
        " last_error_class, last_error, last_success_at, checked_at)"
        " values (%(p)s, %(m)s, %(k)s, %(s)s, %(l)s, %(f)s, %(ec)s, %(e)s, case when %(ok)s then now() end, now())"
        " on conflict (provider, model) do update set kind = excluded.kind, status = excluded.status,"
        " latency_ms = coalesce(excluded.latency_ms, provider_health.latency_ms),"
        " consecutive_failures = excluded.consecutive_failures,"
        " last_error_class = coalesce(excluded.last_error_class, provider_health.last_error_class),"
        " last_error = coalesce(excluded.last_error, provider_health.last_error),"
        " last_success_at = coalesce(excluded.last_success_at, provider_health.last_success_at),"
        " checked_at = now()",
        {
            "p": p.provider,
            "m": p.model,
            "k": p.kind,
            "s": status,
            "l": r.latency_ms,
            "f": failures,
            "ec": r.error_class,
            "e": r.error,
            "ok": r.ok,
        },
    )
    conn.execute(
        "insert into provider_health_checks (provider, model, kind, status, ok, latency_ms, error_class, error, origin)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (p.provider, p.model, p.kind, status, r.ok, r.latency_ms, r.error_class, r.error, origin),
    )
    m = metrics()
    m.provider_up.labels(p.provider, p.kind).set(0 if status == "down" else 1)
    if origin == "probe" and r.latency_ms is not None:  # a probe is always timed
        m.provider_probe_seconds.labels(p.provider).observe(r.latency_ms / 1000)
    return {
        "provider": p.provider,
        "model": p.model,
        "kind": p.kind,
        "status": status,
        "latency_ms": round(r.latency_ms, 1) if r.latency_ms is not None else None,
        "consecutive_failures": failures,
        "error_class": r.error_class,
        "error": r.error,
    }


def refresh(settings: Settings | None = None, *, trace: dict | None = None, only: str | None = None) -> list[dict]:
    """Probe every configured provider (or only the one named) in parallel and record the results."""
    settings = settings or get_settings()
    todo = [p for p in probes(settings) if only is None or p.provider == only]
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        results = list(pool.map(lambda p: run_probe(p, settings.health_probe_timeout_s), todo))
    with get_pool().connection() as conn, conn.transaction():
        states = [_record(conn, settings, r) for r in results]
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


def probe_for(provider: str, settings: Settings) -> Probe | None:
    """The probe of a provider as configured now (its model is the one jobs use by default)."""
    return next((p for p in probes(settings) if p.provider == provider), None)


@dataclass
class _Known:
    at: float
    down: bool


_cache: dict[str, _Known] = {}
_success_written: dict[str, float] = {}  # when this process last wrote a success, per provider
_cache_lock = threading.Lock()
SUCCESS_WRITE_S = 0.25  # well under HEALTH_DOWN_QUIET_S, so the last success on record is never much older


def _state(provider: str, settings: Settings) -> _Known:
    """The configured model's row only: a row left behind by a model no longer configured says nothing."""
    now = time.monotonic()
    with _cache_lock:
        known = _cache.get(provider)
    if known is not None and now - known.at <= CACHE_S:
        return known
    probe = probe_for(provider, settings)
    down = False
    if probe is not None:
        with get_pool().connection() as conn:
            row = conn.execute(
                "select status, checked_at <= now() - %s * interval '1 second'"
                " from provider_health where provider = %s and model = %s",
                (settings.health_recheck_s, provider, probe.model),
            ).fetchone()
        if row is not None and row[0] == "down" and row[1]:
            down = _recheck(probe, settings)  # down, and not looked at for a while: look now
        elif row is not None:
            down = row[0] == "down"
    known = _Known(now, down)
    with _cache_lock:
        _cache[provider] = known
    return known


def _recheck(probe: Probe, settings: Settings) -> bool:
    """Probe a provider that is down now, once across all workers (whoever claims the row), so jobs
    resume within HEALTH_RECHECK_S of its return instead of waiting for the next scheduled refresh.
    No database connection is held during the probe: it may take HEALTH_PROBE_TIMEOUT_S, and the
    pool is sized for the worker's threads."""
    with get_pool().connection() as conn:
        claimed = conn.execute(
            "update provider_health set checked_at = now() where provider = %s and model = %s and status = 'down'"
            " and checked_at <= now() - %s * interval '1 second' returning 1",
            (probe.provider, probe.model, settings.health_recheck_s),
        ).fetchone()
    if claimed is None:
        return True
    result = run_probe(probe, settings.health_probe_timeout_s)
    with get_pool().connection() as conn, conn.transaction():
        state = _record(conn, settings, result)
    return state["status"] == "down"


def check_available(provider: str, settings: Settings | None = None) -> None:
    """Raise ProviderDown (deferred: delayed with backoff, retries kept) if the provider is down."""
    if _state(provider, settings or get_settings()).down:
        raise ProviderDown(f"{provider} is down according to the last health probe; the job waits for it to recover")


def is_provider_fault(error: BaseException) -> bool:
    """A fault of the provider as a whole (unreachable, timing out, 5xx, a garbled answer), which a
    probe would see too; not a refusal of this request (4xx) nor a rate limit (429)."""
    if isinstance(error, ProviderError):
        return error.status >= 500
    return isinstance(error, (httpx.TransportError, httpx.TimeoutException, TransientError))


def note_failure(provider: str, error: BaseException, settings: Settings | None = None) -> None:
    """A job's own failed call counts like a failed probe: HEALTH_DOWN_AFTER of them in a row (across all
    workers) mark the provider down, so the next attempts are deferred instead of using up their retries.
    Bookkeeping only: a database fault here is logged, never raised in place of the provider's error."""
    settings = settings or get_settings()
    probe = probe_for(provider, settings)
    if probe is None or not is_provider_fault(error):
        return
    result = ProbeResult(probe, False, None, type(error).__name__, redact(describe(error, 500)))
    try:
        with get_pool().connection() as conn, conn.transaction():
            state = _record(conn, settings, result, origin="job")
    except Exception as e:  # noqa: BLE001 - the provider's outcome must stand; logged and counted below
        _bookkeeping_failed(provider, "note_failure", e)
        return
    with _cache_lock:
        _cache[provider] = _Known(time.monotonic(), state["status"] == "down")


def note_success(provider: str, settings: Settings | None = None) -> None:
    """A job's successful call ends a run of failures (consecutive means consecutive) and is the proof that
    the provider still answers (see HEALTH_DOWN_QUIET_S). Written at most every SUCCESS_WRITE_S per process.
    Bookkeeping only: a database fault here is logged, never turned into a failure of the (paid) call."""
    settings = settings or get_settings()
    now = time.monotonic()
    with _cache_lock:
        if now - _success_written.get(provider, float("-inf")) < min(SUCCESS_WRITE_S, settings.health_down_quiet_s / 4):
            return
        _success_written[provider] = now
    try:
        _record_success(provider, settings)
    except Exception as e:  # noqa: BLE001 - the provider's answer must stand; logged and counted below
        _bookkeeping_failed(provider, "note_success", e)


def _record_success(provider: str, settings: Settings) -> None:
    probe = probe_for(provider, settings)
    if probe is None:
        return
    with get_pool().connection() as conn:
        # A provider marked down stays down until a probe finds it back: in-flight calls prove little.
        row = conn.execute(
            "insert into provider_health (provider, model, kind, status, last_success_at) values (%s, %s, %s,"
            " 'healthy', now()) on conflict (provider, model) do update set consecutive_failures = 0,"
            " last_success_at = now(),"
            " status = case when provider_health.status = 'down' then 'down' else 'healthy' end"
            " returning status = 'down'",
            (provider, probe.model, probe.kind),
        ).fetchone()
    if row is not None and not row[0]:
        with _cache_lock:
            _cache[provider] = _Known(time.monotonic(), False)


def _bookkeeping_failed(provider: str, step: str, error: BaseException) -> None:
    log.warning(
        "health.bookkeeping_failed",
        provider=provider,
        step=step,
        error_class=type(error).__name__,
        error=redact(describe(error, 300)),
    )
    metrics().health_write_errors.labels(provider, type(error).__name__).inc()
