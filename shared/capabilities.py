"""What each broker brings, chosen once from FLEET_BROKER. The rest of the fleet asks for a capability
(`capabilities(settings)`, or `capabilities_of(broker)`), never which broker is configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fleet.shared.config import Settings, get_settings


@dataclass(frozen=True)
class Capabilities:
    name: Literal["pgmq", "redis", "other"]
    # The queues are in Redis: REDIS_URL (or the embedded Redis) is needed, readiness pings it, and the
    # queue figures are read there.
    queues_in_redis: bool
    # How chat frames travel: Postgres NOTIFY on a channel per job, or a Redis stream per job.
    frames: Literal["notify", "stream"]
    # Where the rate-limit counters that every process shares live.
    rate_limits: Literal["postgres", "redis"]
    # Many messages in one round trip inside the caller's transaction: the SDK claims idempotency keys in the
    # same transaction, and SQL fans a cohort out (ams_enqueue_upgrade).
    sends_in_transaction: bool
    # A job's bus_events are committed with its ack (pgmq's consumer) or before it (the Redis ack writer),
    # so the events middleware need not flush them before each ack.
    events_ride_with_acks: bool
    # A message held back from its ack (its retry not yet enqueued) comes back by itself after its vt.
    redelivers_held_messages: bool
    # Whether another worker process is alive can be asked (dramatiq's Redis heartbeats): `worker_alive`.
    worker_liveness: bool


PGMQ = Capabilities(
    name="pgmq",
    queues_in_redis=False,
    frames="notify",
    rate_limits="postgres",
    sends_in_transaction=True,
    events_ride_with_acks=True,
    redelivers_held_messages=True,
    worker_liveness=False,
)
REDIS = Capabilities(
    name="redis",
    queues_in_redis=True,
    frames="stream",
    rate_limits="redis",
    sends_in_transaction=False,
    events_ride_with_acks=True,
    redelivers_held_messages=False,
    worker_liveness=True,
)
# A broker the fleet did not build (dramatiq's StubBroker in a user's tests): nothing beyond dramatiq's own.
PLAIN = Capabilities(
    name="other",
    queues_in_redis=False,
    frames="notify",
    rate_limits="postgres",
    sends_in_transaction=False,
    events_ride_with_acks=False,
    redelivers_held_messages=False,
    worker_liveness=False,
)
_BY_NAME = {"pgmq": PGMQ, "redis": REDIS}


def capabilities(settings: Settings | None = None) -> Capabilities:
    """The configured broker's capabilities (FLEET_BROKER)."""
    return _BY_NAME[(settings or get_settings()).broker]


def capabilities_of(broker: object) -> Capabilities:
    """A broker's capabilities: the fleet's brokers carry theirs; any other has dramatiq's own only."""
    found = getattr(broker, "capabilities", None)
    return found if isinstance(found, Capabilities) else PLAIN
