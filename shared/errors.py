"""Error classes decide retries, in one place.

transient  -> retried with jittered exponential backoff (Retry-After honoured)
permanent  -> dead-lettered at once, no retries
deferred   -> put back with a delay without using up a retry (rate limit, provider down)
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import psycopg
import pydantic
from dramatiq.rate_limits import RateLimitExceeded

ErrorKind = Literal["transient", "permanent", "deferred"]

TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
PERMANENT_STATUS = {400, 401, 402, 403, 404, 405, 410, 413, 415, 422}


class FleetError(Exception):
    """Base of the fleet's own errors; `kind` says what the retry layer does with it."""

    kind: ErrorKind = "transient"

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(FleetError):
    kind: ErrorKind = "permanent"


class TransientError(FleetError):
    kind: ErrorKind = "transient"


class DeferredError(FleetError):
    """Not a failure of the job: come back later and keep the retries."""

    kind: ErrorKind = "deferred"


class InvalidPayload(PermanentError, ValueError):
    pass


class PayloadTooLarge(InvalidPayload, ValueError):
    """A job bigger than FLEET_MAX_PAYLOAD_BYTES: refused at enqueue, dead-lettered if it arrives anyway."""


class ProviderError(FleetError):
    """An HTTP provider answered with an error status."""

    def __init__(self, provider: str, status: int, message: str, *, retry_after_s: float | None = None):
        super().__init__(f"{provider} answered {status}: {message}", retry_after_s=retry_after_s)
        self.provider = provider
        self.status = status
        self.kind = classify_status(status, message)


def classify_status(status: int, body: str = "") -> ErrorKind:
    if status == 429 and "insufficient_quota" in body:
        return "permanent"  # quota exhausted: retrying cannot help
    if status in TRANSIENT_STATUS or status >= 500:
        return "transient"
    return "permanent"


def classify(exc: BaseException) -> ErrorKind:
    if isinstance(exc, FleetError):
        return exc.kind
    if isinstance(exc, RateLimitExceeded):
        return "deferred"
    if isinstance(exc, (pydantic.ValidationError, json.JSONDecodeError, UnicodeError, TypeError, ValueError)):
        return "permanent"
    if isinstance(exc, httpx.HTTPStatusError):
        return classify_status(exc.response.status_code, exc.response.text)
    if isinstance(exc, (httpx.TimeoutException, httpx.TransportError, TimeoutError, ConnectionError)):
        return "transient"
    if isinstance(exc, psycopg.OperationalError):
        return "transient"
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return "permanent"
    return "transient"


def retry_after_of(exc: BaseException) -> float | None:
    value = getattr(exc, "retry_after_s", None)
    if value is not None:
        return float(value)
    if isinstance(exc, httpx.HTTPStatusError):
        return parse_retry_after(exc.response.headers.get("retry-after"))
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from model providers and read as absent)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def describe(exc: BaseException, limit: int = 2000) -> str:
    """A one-line, bounded error message for events and dead letters (secrets are redacted by the caller)."""
    text = str(exc).replace("\n", " ").strip() or exc.__class__.__name__
    if isinstance(exc, pydantic.ValidationError):
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<payload>'}: {e['msg']}" for e in exc.errors()[:10])
    return text[:limit]
