"""Per-user request limits (CHAT_RATE_LIMIT_PER_MIN, EMBED_RATE_LIMIT_PER_MIN) on dramatiq's window
rate limiter over the fleet's shared backend (Redis or Postgres), so they hold across processes."""

from __future__ import annotations

import asyncio

from dramatiq.rate_limits import WindowRateLimiter

from fleet.shared.config import Settings
from fleet.shared.ratelimit import backend

from fleet.gateway.errors import ApiError

WINDOW_S = 60


def _limit(settings: Settings, kind: str) -> int:
    return settings.chat_rate_limit_per_min if kind == "chat" else settings.embed_rate_limit_per_min


def _try(limiter: WindowRateLimiter) -> bool:
    with limiter.acquire(raise_on_failure=False) as acquired:  # a window's slot is never given back
        return acquired


async def check_rate(settings: Settings, kind: str, client: str) -> None:
    """429 with Retry-After when `client` has used its requests of this minute. Retry-After is the
    window: by then every request counted against the client has left it."""
    limit = _limit(settings, kind)
    if limit <= 0:
        return
    limiter = WindowRateLimiter(backend(), f"fleet:gateway:{kind}:{client}", limit=limit, window=WINDOW_S)
    if not await asyncio.to_thread(_try, limiter):
        raise ApiError(429, "rate_limited", f"more than {limit} {kind} requests a minute",
                       {"Retry-After": str(WINDOW_S)})
