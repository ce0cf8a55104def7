"""Producer SDK: enqueue one or many jobs, with an optional idempotency key and trace id.

    from shared.client import FleetClient
    fleet = FleetClient()
    fleet.enqueue("echo", {"message": "hi"}, idempotency_key="order-42")
    fleet.enqueue_many("echo", [{"message": str(i)} for i in range(10_000)])
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import dramatiq
from dramatiq.broker import Broker
from psycopg.types.json import Jsonb

from .brokers import PgmqBroker, build_broker, enqueue_many
from .config import get_settings
from .db import get_pool
from .errors import PayloadTooLarge
from .registry import job_type

IDEMPOTENCY_SCOPE = "enqueue"
IDEMPOTENCY_TTL_S = 7 * 86400

__all__ = ["FleetClient", "Enqueued", "PayloadTooLarge"]


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

    def message(self, name: str, payload: Any, trace_id: str | None = None) -> dramatiq.Message:
        """A dramatiq message for a registered job type (the unit the per-message path enqueues)."""
        jt = job_type(name)
        self.broker.declare_queue(jt.queue)
        message = dramatiq.Message(queue_name=jt.queue, actor_name=jt.name, args=(payload,), kwargs={},
                                   options={"trace_id": trace_id or str(uuid.uuid4())})
        size = len(message.encode())
        if size > self.settings.max_payload_bytes:
            raise PayloadTooLarge(f"payload of {size} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({self.settings.max_payload_bytes})")
        return message

    def enqueue(self, name: str, payload: Any, *, idempotency_key: str | None = None, trace_id: str | None = None,
                delay_ms: int | None = None) -> Enqueued:
        keys = [idempotency_key] if idempotency_key is not None else None
        return self.enqueue_many(name, [payload], idempotency_keys=keys, trace_id=trace_id, delay_ms=delay_ms)[0]

    def enqueue_many(self, name: str, payloads: Iterable[Any], *, idempotency_keys: list[str] | None = None,
                     trace_id: str | None = None, delay_ms: int | None = None) -> list[Enqueued]:
        """Enqueue a batch, atomically on pgmq. With keys, a key seen before enqueues nothing new.
        A given trace_id is shared by the batch; otherwise each job gets its own."""
        payloads = list(payloads)
        jt = job_type(name)
        if trace_id is not None:
            trace_id = str(uuid.UUID(str(trace_id)))  # a trace id is a UUID: refuse anything else early
        if idempotency_keys is not None and len(idempotency_keys) != len(payloads):
            raise ValueError("idempotency_keys must have one key per payload")
        results: dict[int, Enqueued] = {}
        fresh = list(range(len(payloads)))
        claims: dict[int, tuple[str, str]] = {}
        if idempotency_keys is not None:
            fresh, results, claims = self._claim_keys(jt.queue, idempotency_keys, trace_id)
        try:
            sent = self._send(name, [payloads[i] for i in fresh], trace_id, delay_ms,
                              [claims[i] for i in fresh] if claims else None)
        except Exception:
            if idempotency_keys is not None:
                self._release_keys([idempotency_keys[i] for i in fresh])
            raise
        for i, (job_id, trace) in zip(fresh, sent):
            results[i] = Enqueued(job_id, trace, jt.queue)
        return [results[i] for i in range(len(payloads))]

    # -- job families ------------------------------------------------------
    def embed_documents(self, documents: Iterable[dict], *, table: str | None = None, model: str | None = None,
                        docs_per_job: int = 256, trace_id: str | None = None) -> list[Enqueued]:
        """Embed documents ({source_id, chunk_index, content, metadata}) into `table`
        (vector_documents or code_vectors), in jobs of `docs_per_job` documents."""
        docs = list(documents)
        extra = {k: v for k, v in (("table", table), ("model", model)) if v is not None}
        payloads = [{"documents": docs[i : i + docs_per_job]} | extra for i in range(0, len(docs), docs_per_job)]
        return self.enqueue_many("embed_documents", payloads, trace_id=trace_id)

    def embed_rows(self, source: str, ids: Iterable[str | int], *, ids_per_job: int = 256,
                   trace_id: str | None = None) -> list[Enqueued]:
        """Embed rows of a source registered in EMBED_SOURCES."""
        ids = list(ids)
        payloads = [{"source": source, "ids": ids[i : i + ids_per_job]} for i in range(0, len(ids), ids_per_job)]
        return self.enqueue_many("embed_documents", payloads, trace_id=trace_id)

    def _send(self, name: str, payloads: list, trace_id: str | None, delay_ms: int | None,
              preassigned: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
        if not payloads:
            return []
        jt = job_type(name)
        self.broker.declare_queue(jt.queue)
        broker = self.broker
        if isinstance(broker, PgmqBroker) and broker.can_enqueue_in_bulk() and preassigned is None:
            return broker.enqueue_payloads(jt.queue, jt.name, payloads, trace_id=trace_id, delay_ms=delay_ms)
        messages = [self.message(name, p, trace_id) for p in payloads]
        if preassigned is not None:  # the ids recorded with the idempotency keys
            messages = [m.copy(message_id=job_id, options={"trace_id": trace})
                        for m, (job_id, trace) in zip(messages, preassigned)]
        enqueue_many(broker, messages, delay=delay_ms)
        return [(m.message_id, m.options["trace_id"]) for m in messages]

    def _claim_keys(self, queue: str, keys: list[str], trace_id: str | None):
        """Record each new key with the job id it will have; returns (fresh indexes, duplicates, claims)."""
        planned = [(str(uuid.uuid4()), trace_id or str(uuid.uuid4())) for _ in keys]
        records = [Jsonb({"job_id": j, "trace_id": t}) for j, t in planned]
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
                (IDEMPOTENCY_SCOPE, list(set(keys))),
            ).fetchall())
        fresh, results, claims, first = [], {}, {}, {}
        for i, k in enumerate(keys):
            if k in claimed and k not in first:
                first[k] = i
                fresh.append(i)
                claims[i] = (seen[k]["job_id"], seen[k]["trace_id"])
            else:  # seen before, or repeated inside this batch
                results[i] = Enqueued(seen[k]["job_id"], seen[k]["trace_id"], queue, duplicate=True)
        return fresh, results, claims

    def _release_keys(self, keys: list[str]) -> None:
        with get_pool().connection() as conn:
            conn.execute("delete from request_dedup where scope = %s and key = any(%s)", (IDEMPOTENCY_SCOPE, keys))
