"""Per-caller limits.

- Requests a minute: GATEWAY_CHAT_RATE_LIMIT_PER_MIN and GATEWAY_EMBED_RATE_LIMIT_PER_MIN on the POST routes,
  GATEWAY_AGENT_RATE_LIMIT_PER_MIN on POST /v1/agents, GATEWAY_OPERATOR_RATE_LIMIT_PER_MIN on the
  operators' POST routes, GATEWAY_READ_RATE_LIMIT_PER_MIN on the GET routes; dramatiq's window rate
  limiter over the fleet's shared backend (Redis or Postgres), so they hold across processes.
- Open streams: GATEWAY_MAX_STREAMS_PER_USER SSE streams per verified user in one process.
- Probes and documents (/healthz, /readyz, /metrics, the page, the OpenAPI document):
  GATEWAY_PROBE_RATE_LIMIT_PER_MIN per client address and route, in each process: they must answer
  while the database (where the shared limits are counted) is down.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from dramatiq.rate_limits import WindowRateLimiter

from fleet.gateway.errors import ApiError
from fleet.gateway.settings import GatewaySettings
from fleet.shared.config import Settings
from fleet.shared.ratelimit import backend

WINDOW_S = 60


def _limit(settings: Settings, gw: GatewaySettings, kind: str) -> int:
    return {
        "chat": gw.chat_rate_limit_per_min,
        "embed": gw.embed_rate_limit_per_min,
        "agents": gw.agent_rate_limit_per_min,
        "operator": gw.operator_rate_limit_per_min,
    }.get(kind, gw.read_rate_limit_per_min)


def _try(limiter: WindowRateLimiter) -> bool:
    with limiter.acquire(raise_on_failure=False) as acquired:  # a window's slot is never given back
        return acquired


async def check_rate(settings: Settings, gw: GatewaySettings, kind: str, client: str) -> None:
    """429 with Retry-After when `client` has used its requests of this minute. Retry-After is the
    window: by then every request counted against the client has left it. `kind` is chat, embed, agents,
    operator or read."""
    limit = _limit(settings, gw, kind)
    if limit <= 0:
        return
    limiter = WindowRateLimiter(backend(), f"fleet:gateway:{kind}:{client}", limit=limit, window=WINDOW_S)
    if not await asyncio.to_thread(_try, limiter):
        raise ApiError(
            429, "rate_limited", f"more than {limit} {kind} requests a minute", {"Retry-After": str(WINDOW_S)}
        )


class StreamSlot:
    """One open stream of a user: held by the stream's generator, so a stream that never started
    (its client left before the first byte) frees its slot with it."""

    __slots__ = ("__weakref__",)


class StreamCap:
    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._open: dict[str, weakref.WeakSet] = {}

    def check(self, user_id: str | None) -> None:
        """A 429 when this user has no stream to spare (before a request writes anything)."""
        if user_id is not None and 0 < self.per_user <= len(self._open.get(user_id, ())):
            raise ApiError(
                429,
                "too_many_streams",
                f"{self.per_user} streams of yours are open already (GATEWAY_MAX_STREAMS_PER_USER); close one first",
                {"Retry-After": "1"},
            )

    def take(self, user_id: str | None) -> StreamSlot | None:
        """A slot for one more stream of this user, or a 429 (no cap without a verified user)."""
        self.check(user_id)
        if user_id is None or self.per_user <= 0:
            return None
        slot = StreamSlot()
        self._open.setdefault(user_id, weakref.WeakSet()).add(slot)
        return slot

    def give_back(self, user_id: str | None, slot: StreamSlot | None) -> None:
        if slot is not None and user_id is not None and (slots := self._open.get(user_id)) is not None:
            slots.discard(slot)
            if not slots:
                del self._open[user_id]

    async def held(
        self, user_id: str | None, slot: StreamSlot | None, stream: AsyncGenerator[bytes, None]
    ) -> AsyncIterator[bytes]:
        """The stream, its slot given back when it ends."""
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    yield chunk
        finally:
            self.give_back(user_id, slot)


PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/", "/openapi.json", "/docs"})


class ProbeRateLimit:
    """A fixed one-minute window per (client address, route) in this process (pure ASGI). Counts are
    dropped at each window's end, so the table holds at most one minute of clients (dramatiq's in-memory
    rate-limit backend keeps every key it has seen)."""

    def __init__(self, app, per_min: int) -> None:
        self.app, self.per_min = app, per_min
        self.window_started = time.monotonic()
        self.counts: dict[tuple[str, str], int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.per_min <= 0 or scope["path"] not in PROBE_ROUTES:
            return await self.app(scope, receive, send)
        now = time.monotonic()
        if now - self.window_started >= WINDOW_S:
            self.window_started, self.counts = now, {}
        key = ((scope.get("client") or ("unknown",))[0], scope["path"])
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= self.per_min:
            return await self.app(scope, receive, send)
        retry_after = max(1, int(WINDOW_S - (now - self.window_started)))
        body = json.dumps(
            {
                "error": "rate_limited",
                "message": f"more than {self.per_min} requests a minute to"
                f" {scope['path']} (GATEWAY_PROBE_RATE_LIMIT_PER_MIN)",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", str(retry_after).encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
