"""Connection limits under uvicorn's h11 protocol, enforced in the gateway process itself (with or
without a proxy in front):

- at most GATEWAY_MAX_CONNECTIONS open connections: one over the limit gets a 503 and is closed
  before it is read;
- a connection with no request in progress is closed after GATEWAY_IDLE_TIMEOUT_S (a fresh one too,
  not only after a response as uvicorn's --timeout-keep-alive does);
- a request's headers must arrive within GATEWAY_HEADER_TIMEOUT_S of its first byte, and its body
  within GATEWAY_BODY_TIMEOUT_S of its headers; a slower client is cut off.

uvicorn has no header or body deadline, and its --limit-concurrency answers 503 only once a request
has arrived (idle sockets are kept): hence this protocol class, a small subclass that only adds timers
around uvicorn's own parsing.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from fleet.gateway.settings import GatewaySettings

IDLE, HEADERS, BODY, APP = "idle", "headers", "body", "app"


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": "too_many_connections", "message": message}).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"retry-after: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class LimitedH11Protocol(H11Protocol):
    max_connections = 1000
    idle_timeout_s = 5.0
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = IDLE
        self._timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.write(_refusal(f"more than {self.max_connections} open connections (GATEWAY_MAX_CONNECTIONS)"))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._phase == IDLE:
            self._enter(HEADERS)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """The phase from uvicorn's state: no request in progress, its body still coming, or the app's."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._enter(HEADERS if self._phase == HEADERS else IDLE)
        else:
            self._enter(BODY if cycle.more_body else APP)

    def _enter(self, phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            self._arm()

    def _arm(self) -> None:
        self._cancel()
        limit = {IDLE: self.idle_timeout_s, HEADERS: self.header_timeout_s, BODY: self.body_timeout_s}.get(self._phase)
        if limit is not None:
            self._timer = self.loop.call_later(limit, self._expired, self._phase)

    def _cancel(self) -> None:
        if (timer := getattr(self, "_timer", None)) is not None:
            timer.cancel()
            self._timer = None

    def _expired(self, phase: str) -> None:
        self._timer = None
        if phase == self._phase and not self.transport.is_closing():
            self.transport.close()


def limited_protocol(gw: GatewaySettings) -> type[LimitedH11Protocol]:
    """The protocol class with this process's limits."""
    return type(
        "GatewayH11Protocol",
        (LimitedH11Protocol,),
        {
            "max_connections": gw.max_connections,
            "idle_timeout_s": gw.idle_timeout_s,
            "header_timeout_s": gw.header_timeout_s,
            "body_timeout_s": gw.body_timeout_s,
        },
    )
