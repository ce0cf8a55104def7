"""The broker is a setting, not a code path: FLEET_BROKER=pgmq (default) or redis. The broker is built here,
and what it can do is its `capabilities` (fleet.shared.capabilities), which the rest of the fleet asks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import dramatiq

from fleet.shared.brokers.pgmq import PgmqBroker
from fleet.shared.brokers.redis import FleetRedisBroker
from fleet.shared.capabilities import capabilities, capabilities_of
from fleet.shared.config import Settings, get_settings
from fleet.shared.db import redis_url
from fleet.shared.middleware import fleet_middleware

if TYPE_CHECKING:
    import psycopg


def build_broker(settings: Settings | None = None) -> dramatiq.Broker:
    settings = settings or get_settings()
    middleware = fleet_middleware(settings)
    broker: dramatiq.Broker
    if capabilities(settings).queues_in_redis:
        broker = FleetRedisBroker(
            url=redis_url(settings),
            middleware=middleware,
            heartbeat_timeout=settings.visibility_timeout_s * 1000,  # a dead worker's messages come back after this
            maintenance_chance=settings.redis_maintenance_chance,
        )
    else:
        broker = PgmqBroker(settings=settings, middleware=middleware)
    return broker


def enqueue_many(
    broker: dramatiq.Broker,
    messages: list[dramatiq.Message[Any]],
    *,
    delay: int | None = None,
    conn: psycopg.Connection[Any] | None = None,
) -> None:
    """One round trip per batch where the broker can (pgmq, inside `conn`'s transaction when given), one per
    message otherwise (Redis)."""
    if capabilities_of(broker).sends_in_transaction:
        cast(PgmqBroker, broker).enqueue_many(messages, delay=delay, conn=conn)
    else:
        for message in messages:
            broker.enqueue(message, delay=delay)


__all__ = ["build_broker", "enqueue_many", "FleetRedisBroker", "PgmqBroker"]
