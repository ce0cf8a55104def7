"""What every provider client shares: one pooled httpx client per process and base URL, error
classification (shared/errors.py) and a short, bounded retry of a single call that honours Retry-After.

Retry in one layer per concern: this retries one HTTP call a few times within a job; dramatiq's
retries (with long backoff) handle the job as a whole. No SDK retries underneath.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import structlog
import tenacity
from dramatiq.middleware import CurrentMessage

from fleet.shared.errors import ProviderError, TransientError, classify, parse_retry_after

log = structlog.get_logger(__name__)
T = TypeVar("T")

_clients: dict[tuple, httpx.Client] = {}
_lock = threading.Lock()


def http_client(base_url: str, *, timeout_s: float = 30.0, max_connections: int = 32) -> httpx.Client:
    """One pooled client per process, base URL and timeout (connections are reused across jobs)."""
    key = (base_url, timeout_s, max_connections)
    with _lock:
        client = _clients.get(key)
        if client is None or client.is_closed:
            client = httpx.Client(
                base_url=base_url.rstrip("/"),
                timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
                limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            )
            _clients[key] = client
        return client


def job_request_id() -> str | None:
    """`<job id>/<attempt>/<delivery>` of the job making this call, sent as X-Request-Id: a provider's request
    log then tells one job's retries apart from another copy's or another job's calls."""
    from fleet.shared.middleware.attempts import delivery_of

    message = CurrentMessage.get_current_message()
    if message is None:
        return None
    return f"{message.message_id}/{message.options.get('retries', 0) + 1}/{delivery_of(message) or '-'}"


def timed_post(client: httpx.Client, provider: str, path: str, body: dict, headers: dict) -> httpx.Response:
    """POST and record latency and status (`timeout`/`error` when no answer came) in the provider metrics."""
    from fleet.shared.metrics import metrics

    m = metrics()
    if (request_id := job_request_id()) is not None:
        headers = headers | {"X-Request-Id": request_id}
    started = time.monotonic()
    try:
        response = client.post(path, json=body, headers=headers)
    except httpx.TimeoutException:
        m.provider_requests.labels(provider, "timeout").inc()
        raise
    except httpx.TransportError:
        m.provider_requests.labels(provider, "error").inc()
        raise
    m.provider_latency.labels(provider).observe(time.monotonic() - started)
    m.provider_requests.labels(provider, str(response.status_code)).inc()
    return response


def raise_for_provider(provider: str, response: httpx.Response) -> None:
    """An error status becomes a ProviderError carrying its class and Retry-After; never the request's headers."""
    if response.status_code < 400:
        return
    message: str | None
    try:
        body = response.json()
        detail = body.get("error") or body.get("detail") or {}  # OpenAI-style, or FastAPI-style (Letta)
        if isinstance(detail, list):  # FastAPI's validation errors (infinity): where and what, not the input
            message = "; ".join(_validation_error(d) for d in detail[:5])
        else:
            message = detail.get("message") if isinstance(detail, dict) else json.dumps(detail)[:300]
    except (ValueError, AttributeError):
        message = response.text[:300]
    raise ProviderError(
        provider,
        response.status_code,
        (message or response.reason_phrase)[:500],
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
    )


def _validation_error(item) -> str:
    """`body.input.3: String should have at most 122880 characters (string_too_long)`; the echoed input is left out."""
    if not isinstance(item, dict):
        return str(item)[:200]
    where = ".".join(str(p) for p in item.get("loc") or [])
    return f"{where}: {item.get('msg')} ({item.get('type')})"[:300]


def _as_fleet_error(provider: str, fn: Callable[[], T]) -> Callable[[], T]:
    def call() -> T:
        try:
            return fn()
        except httpx.TimeoutException as e:
            raise TransientError(f"{provider} timed out: {type(e).__name__}") from None
        except httpx.TransportError as e:
            raise TransientError(f"{provider} connection failed: {type(e).__name__}: {e}") from None

    return call


def call_with_retries(
    fn: Callable[[], T],
    *,
    provider: str,
    max_retries: int,
    base_delay_s: float = 0.5,
    max_delay_s: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`, retrying transient failures up to `max_retries` times (full jitter, at least Retry-After).

    A Retry-After longer than max_delay_s is not waited for here: the error goes up so the job is
    retried later by dramatiq without holding a worker thread.
    """
    jitter = tenacity.wait_random_exponential(multiplier=base_delay_s, max=max_delay_s)

    def error(state: tenacity.RetryCallState) -> BaseException | None:
        return state.outcome.exception() if state.outcome is not None else None  # set once an attempt is made

    def wait(state: tenacity.RetryCallState) -> float:
        retry_after = getattr(error(state), "retry_after_s", None)
        return max(jitter(state), retry_after or 0.0)

    def retry_after_too_long(state: tenacity.RetryCallState) -> bool:
        retry_after = getattr(error(state), "retry_after_s", None)
        return retry_after is not None and retry_after > max_delay_s

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log.info(
            "provider.retrying",
            provider=provider,
            attempt=state.attempt_number,
            delay_s=round(state.next_action.sleep, 3) if state.next_action is not None else None,
            error=str(error(state))[:200],
        )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda e: classify(e) == "transient"),
        # tenacity combines any callable with `|`; its stubs ask for a stop_base
        stop=tenacity.stop_after_attempt(max_retries + 1) | retry_after_too_long,  # type: ignore[operator]
        wait=wait,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(_as_fleet_error(provider, fn))


def bearer(key: str | None) -> dict[str, Any]:
    return {"Authorization": f"Bearer {key}"} if key else {}
