"""What a declared job holds while it runs (fleet.shared.registry's `lease` and `rate_limit` options).

- Rate limit: dramatiq's WindowRateLimiter on the fleet's shared backend (fleet.shared.ratelimit), so the
  limit holds across processes and machines. Over the limit, RateLimitExceeded defers the job.
- Lease: a claim (fleet.shared.claims, scope `lease:<job type>`, key: the payload field's value) naming the job
  id that holds it, renewed every third of its TTL while the job runs and deleted when it ends. A job whose
  lease another job holds is deferred; a copy of the same job (a redelivery keeps its id) takes it back at
  once; a dead worker's lease expires after its TTL. `claim`/`release` are the same protocol for any
  holder (create_agent claims a user's agent creation with them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import structlog
from dramatiq.middleware import CurrentMessage

from fleet.shared import claims
from fleet.shared.db import get_pool
from fleet.shared.errors import DeferredError, describe
from fleet.shared.redact import redact

if TYPE_CHECKING:
    from fleet.shared.registry import JobType, Lease, RateLimit

log = structlog.get_logger(__name__)


class LeaseHeld(DeferredError):
    """Another job holds the lease: this one comes back later, keeping its retries."""


@contextmanager
def guarded(jt: JobType, payload: Any) -> Iterator[None]:
    lease, limit = jt.options.lease, jt.options.rate_limit
    with held(jt.name, lease, payload) if lease else nullcontext():
        with limited(jt.name, limit) if limit else nullcontext():
            yield


def limited(name: str, limit: RateLimit):
    from dramatiq.rate_limits import WindowRateLimiter

    from fleet.shared.ratelimit import backend

    limiter = WindowRateLimiter(backend(), f"fleet:job:{limit.key or name}", limit=limit.limit, window=limit.window_s)
    return limiter.acquire()  # raise_on_failure: RateLimitExceeded, which the retries treat as deferred


@contextmanager
def held(name: str, lease: Lease, payload: Any) -> Iterator[None]:
    scope, key = claims.lease_scope(name), str(getattr(payload, lease.field))
    message = CurrentMessage.get_current_message()
    holder = message.message_id if message is not None else f"direct-{threading.get_ident()}"
    if not claim(scope, key, holder, lease.ttl_s):
        raise LeaseHeld(
            f"another {name} job holds the lease on {lease.field}={key}", retry_after_s=min(5.0, lease.ttl_s / 2)
        )
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(scope, key, holder, lease.ttl_s, stop), daemon=True, name=f"lease-{name}"
    )
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        release(scope, key, holder)


def claim(scope: str, key: str, holder: str, ttl_s: float) -> bool:
    """Claim (scope, key) for `holder` for ttl_s: True when it is free, expired, or already the holder's."""
    with get_pool().connection() as conn:
        return claims.claim_held(conn, scope, key, holder, ttl_s)


def _renew(scope: str, key: str, holder: str, ttl_s: float, stop: threading.Event) -> None:
    while not stop.wait(ttl_s / 3):
        try:
            with get_pool().connection() as conn:
                claims.renew(conn, scope, key, holder, ttl_s)
        except Exception as e:  # noqa: BLE001  logged; tried again at the next beat; the lease lasts its TTL meanwhile
            log.warning("lease.renew_failed", scope=scope, error=redact(describe(e)))


def release(scope: str, key: str, holder: str) -> None:
    """Give the claim up if it is still the holder's; a failure leaves it to expire."""
    try:
        with get_pool().connection() as conn:
            claims.release_held(conn, scope, key, holder)
    except Exception as e:  # noqa: BLE001  logged; the lease then expires by itself
        log.warning("lease.release_failed", scope=scope, error=redact(describe(e)))
