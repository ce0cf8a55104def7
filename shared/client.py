"""Producer SDK: enqueue one or many jobs, with an optional idempotency key and trace id.

    from shared.client import FleetClient
    fleet = FleetClient()
    fleet.enqueue("echo", {"message": "hi"}, idempotency_key="order-42")
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import dramatiq
from dramatiq.broker import Broker
from psycopg.types.json import Jsonb

from .brokers import build_broker, enqueue_many
from .config import get_settings
from .db import get_pool
from .registry import job_type

IDEMPOTENCY_SCOPE = "enqueue"
IDEMPOTENCY_TTL_S = 7 * 86400


class PayloadTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Enqueued:
    job_id: str
    trace_id: str
    queue: str
    duplicate: bool = False  # True when the idempotency key was seen before and nothing new was enqueued


class FleetClient:
    def __init__(self, broker: Broker | None = None) -> None:
        self.broker = broker or build_broker()
        self.settings = get_settings()

    def _message(self, name: str, payload: Any, trace_id: str | None) -> dramatiq.Message:
        jt = job_type(name)
        body = json.dumps(payload)
        if len(body) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(f"payload of {len(body)} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({self.settings.max_payload_bytes})")
        if trace_id is not None:
            trace_id = str(uuid.UUID(str(trace_id)))  # a trace id is a UUID: refuse anything else early
        self.broker.declare_queue(jt.queue)
        options = {"trace_id": trace_id or str(uuid.uuid4())}
        return dramatiq.Message(queue_name=jt.queue, actor_name=jt.name, args=(payload,), kwargs={}, options=options)

    def enqueue(self, name: str, payload: Any, *, idempotency_key: str | None = None, trace_id: str | None = None,
                delay_ms: int | None = None) -> Enqueued:
        keys = [idempotency_key] if idempotency_key is not None else None
        return self.enqueue_many(name, [payload], idempotency_keys=keys, trace_id=trace_id, delay_ms=delay_ms)[0]

    def enqueue_many(self, name: str, payloads: Iterable[Any], *, idempotency_keys: list[str] | None = None,
                     trace_id: str | None = None, delay_ms: int | None = None) -> list[Enqueued]:
        """Enqueue a batch (one `send_batch` per 1,000 on pgmq). With keys, repeated keys enqueue nothing new."""
        messages = [self._message(name, p, trace_id) for p in payloads]
        if idempotency_keys is not None and len(idempotency_keys) != len(messages):
            raise ValueError("idempotency_keys must have one key per payload")
        fresh = messages
        results: dict[int, Enqueued] = {}
        if idempotency_keys is not None:
            fresh, results = self._claim_keys(messages, idempotency_keys)
        try:
            if fresh:
                enqueue_many(self.broker, fresh, delay=delay_ms)
        except Exception:
            if idempotency_keys is not None:
                self._release_keys([k for m, k in zip(messages, idempotency_keys) if m in fresh])
            raise
        return [results.get(i) or Enqueued(m.message_id, m.options["trace_id"], m.queue_name) for i, m in enumerate(messages)]

    def _claim_keys(self, messages: list[dramatiq.Message], keys: list[str]):
        records = [Jsonb({"job_id": m.message_id, "trace_id": m.options["trace_id"]}) for m in messages]
        with get_pool().connection() as conn:
            claimed = {
                row[0]
                for row in conn.execute(
                    "insert into request_dedup (scope, key, result, expires_at)"
                    " select %s, k, r, now() + %s * interval '1 second' from unnest(%s::text[], %s::jsonb[]) as t(k, r)"
                    " on conflict (scope, key) do nothing returning key",
                    (IDEMPOTENCY_SCOPE, IDEMPOTENCY_TTL_S, keys, records),
                )
            }
            seen = dict(conn.execute(
                "select key, result from request_dedup where scope = %s and key = any(%s)",
                (IDEMPOTENCY_SCOPE, [k for k in keys if k not in claimed]),
            ).fetchall())
        fresh, results, first = [], {}, {}
        for i, (m, k) in enumerate(zip(messages, keys)):
            if k in claimed and k not in first:
                fresh.append(m)
                first[k] = m
            elif k in first:  # a key repeated inside one batch counts once
                results[i] = Enqueued(first[k].message_id, first[k].options["trace_id"], m.queue_name, duplicate=True)
            else:
                prior = seen[k]
                results[i] = Enqueued(prior["job_id"], prior["trace_id"], m.queue_name, duplicate=True)
        return fresh, results

    def _release_keys(self, keys: list[str]) -> None:
        with get_pool().connection() as conn:
            conn.execute("delete from request_dedup where scope = %s and key = any(%s)", (IDEMPOTENCY_SCOPE, keys))
