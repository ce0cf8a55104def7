"""Producer SDK: enqueue one or many jobs, with an optional idempotency key and trace id.

    from fleet import FleetClient
    fleet = FleetClient()
    fleet.enqueue(summarize, SummarizeJob(document_id="doc-1"))  # a declared job (`@job`) and its model
    fleet.enqueue("echo", {"message": "hi"}, idempotency_key="order-42")  # by name
    fleet.enqueue_many("echo", [{"message": str(i)} for i in range(10_000)])

Every payload is checked by its job type's model before it is sent, wherever the model is at hand (the
job is declared in this process, or its module is importable: FLEET_JOBS): a bad payload is an
InvalidPayload here, not a dead letter later. A job known only from the job_types table is checked by
the worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import dramatiq
import psycopg
import pydantic
import structlog
from dramatiq.broker import Broker

from fleet.shared import claims
from fleet.shared.brokers import PgmqBroker, build_broker, enqueue_many
from fleet.shared.capabilities import capabilities_of
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool
from fleet.shared.durable import while_unreachable
from fleet.shared.errors import PayloadTooLarge, describe
from fleet.shared.redact import redact
from fleet.shared.registry import Job, JobType, job_type

if TYPE_CHECKING:
    from fleet.shared.config import Settings
    from fleet.shared.frames import FrameListener

M = TypeVar("M", bound=pydantic.BaseModel)

IDEMPOTENCY_TTL_S = 7 * 86400
PENDING_TTL_S = 60  # Redis: how long a key claimed for a send that has not been confirmed stays claimed

log = structlog.get_logger(__name__)

__all__ = ["FleetClient", "Enqueued", "PayloadTooLarge"]


@dataclass(frozen=True, slots=True)  # slots: a bulk enqueue builds one per job
class Enqueued:
    job_id: str
    trace_id: str
    queue: str
    duplicate: bool = False  # True when the idempotency key was seen before and nothing new was enqueued


class FleetClient:
    idempotency_ttl_s: float = IDEMPOTENCY_TTL_S
    pending_ttl_s: float = PENDING_TTL_S

    def __init__(self, broker: Broker | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.broker = broker or build_broker(self.settings)

    def message(self, name: str, payload: Any, trace_id: str | None = None) -> dramatiq.Message[Any]:
        """A dramatiq message for a registered job type (the unit the per-message path enqueues)."""
        jt = job_type(name)
        self.broker.declare_queue(jt.queue)
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=jt.queue,
            actor_name=jt.name,
            args=(payload,),
            kwargs={},
            options={"trace_id": trace_id or str(uuid.uuid4())},
        )
        size = len(message.encode())
        if size > self.settings.max_payload_bytes:
            limit = self.settings.max_payload_bytes
            raise PayloadTooLarge(f"payload of {size} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({limit})")
        return message

    @overload
    def enqueue(
        self,
        job: Job[M],
        payload: M | dict[str, Any],
        *,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
        delay_ms: int | None = None,
        job_id: str | None = None,
    ) -> Enqueued: ...

    @overload
    def enqueue(
        self,
        job: str,
        payload: Any,
        *,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
        delay_ms: int | None = None,
        job_id: str | None = None,
    ) -> Enqueued: ...

    def enqueue(
        self,
        job: Job[Any] | str,
        payload: Any,
        *,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
        delay_ms: int | None = None,
        job_id: str | None = None,
    ) -> Enqueued:
        """Enqueue one job: a declared job (its model's instance, or a dict the model accepts) or a job type by
        name. `job_id` fixes its id in advance (a listener can subscribe before it runs)."""
        if job_id is not None:
            if idempotency_key is not None:
                raise ValueError("give either job_id or idempotency_key")
            jt, (checked,) = self._checked(job, [payload])
            trace = str(uuid.UUID(str(trace_id))) if trace_id else str(uuid.uuid4())
            ((sent, trace),) = self._send(jt.name, [checked], trace, delay_ms, [(job_id, trace)])
            return Enqueued(sent, trace, jt.queue)
        keys = [idempotency_key] if idempotency_key is not None else None
        return self.enqueue_many(job, [payload], idempotency_keys=keys, trace_id=trace_id, delay_ms=delay_ms)[0]

    @overload
    def enqueue_many(
        self,
        job: Job[M],
        payloads: Iterable[M | dict[str, Any]],
        *,
        idempotency_keys: list[str] | None = None,
        trace_id: str | None = None,
        delay_ms: int | None = None,
    ) -> list[Enqueued]: ...

    @overload
    def enqueue_many(
        self,
        job: str,
        payloads: Iterable[Any],
        *,
        idempotency_keys: list[str] | None = None,
        trace_id: str | None = None,
        delay_ms: int | None = None,
    ) -> list[Enqueued]: ...

    def enqueue_many(
        self,
        job: Job[Any] | str,
        payloads: Iterable[Any],
        *,
        idempotency_keys: list[str] | None = None,
        trace_id: str | None = None,
        delay_ms: int | None = None,
    ) -> list[Enqueued]:
        """Enqueue a batch, atomically on pgmq. With keys, a key seen before enqueues nothing new.
        A given trace_id is shared by the batch; otherwise each job gets its own."""
        jt, payloads = self._checked(job, list(payloads))
        name = jt.name
        if trace_id is not None:
            trace_id = str(uuid.UUID(str(trace_id)))  # a trace id is a UUID: refuse anything else early
        if idempotency_keys is not None and len(idempotency_keys) != len(payloads):
            raise ValueError("idempotency_keys must have one key per payload")
        if idempotency_keys is None:
            sent = self._send(name, payloads, trace_id, delay_ms, None)
            return [Enqueued(job_id, trace, jt.queue) for job_id, trace in sent]
        if capabilities_of(self.broker).sends_in_transaction:
            return self._enqueue_claimed_atomically(name, payloads, idempotency_keys, trace_id, delay_ms)
        return self._enqueue_claimed_then_confirmed(name, payloads, idempotency_keys, trace_id, delay_ms)

    def _enqueue_claimed_atomically(
        self, name: str, payloads: list[Any], keys: list[str], trace_id: str | None, delay_ms: int | None
    ) -> list[Enqueued]:
        """pgmq: the keys are claimed and the jobs sent in one transaction, so neither exists without the other."""
        queue = job_type(name).queue
        with get_pool().connection() as conn, conn.transaction():
            fresh, results, claims = self._claim_keys(conn, queue, keys, trace_id, self.idempotency_ttl_s)
            sent = self._send(
                name, [payloads[i] for i in fresh], trace_id, delay_ms, [claims[i] for i in fresh], conn=conn
            )
        return self._merge_results(queue, fresh, results, sent, len(payloads))

    def _enqueue_claimed_then_confirmed(
        self, name: str, payloads: list[Any], keys: list[str], trace_id: str | None, delay_ms: int | None
    ) -> list[Enqueued]:
        """Redis: Postgres and Redis share no transaction. The keys are claimed as pending for a short time
        (pending_ttl_s), the jobs sent, then the claims confirmed for the full TTL. A producer that dies or
        fails in between leaves a pending claim that expires soon, after which the key can be used again."""
        queue = job_type(name).queue
        with get_pool().connection() as conn, conn.transaction():
            fresh, results, claims = self._claim_keys(conn, queue, keys, trace_id, self.pending_ttl_s, pending=True)
        mine = [keys[i] for i in fresh]
        try:
            sent = self._send(name, [payloads[i] for i in fresh], trace_id, delay_ms, [claims[i] for i in fresh])
        except Exception:
            self._release_pending(mine)
            raise
        while_unreachable(lambda: self._confirm_keys(mine), what="idempotency key confirmation")
        return self._merge_results(queue, fresh, results, sent, len(payloads))

    @staticmethod
    def _checked(job: Job[Any] | str, payloads: list[Any]) -> tuple[JobType, list[Any]]:
        """The job type, and the payloads as JSON-ready data checked by its model (InvalidPayload if one fails)."""
        jt = job.type if isinstance(job, Job) else job_type(job)
        return jt, [jt.validate(p) for p in payloads]

    @staticmethod
    def _merge_results(
        queue: str, fresh: list[int], results: dict[int, Enqueued], sent: list[tuple[str, str]], count: int
    ) -> list[Enqueued]:
        for i, (job_id, trace) in zip(fresh, sent, strict=True):
            results[i] = Enqueued(job_id, trace, queue)
        return [results[i] for i in range(count)]

    # -- job families ------------------------------------------------------
    def embed_documents(
        self,
        documents: Iterable[dict[str, Any]],
        *,
        table: str | None = None,
        model: str | None = None,
        docs_per_job: int = 256,
        trace_id: str | None = None,
    ) -> list[Enqueued]:
        """Embed documents ({source_id, chunk_index, content, metadata}) into `table`
        (vector_documents or code_vectors), in jobs of `docs_per_job` documents."""
        docs = list(documents)
        extra = {k: v for k, v in (("table", table), ("model", model)) if v is not None}
        payloads = [{"documents": docs[i : i + docs_per_job]} | extra for i in range(0, len(docs), docs_per_job)]
        return self.enqueue_many("embed_documents", payloads, trace_id=trace_id)

    def embed_rows(
        self, source: str, ids: Iterable[str | int], *, ids_per_job: int = 256, trace_id: str | None = None
    ) -> list[Enqueued]:
        """Embed rows of a source registered in EMBED_SOURCES."""
        ids = list(ids)
        payloads = [{"source": source, "ids": ids[i : i + ids_per_job]} for i in range(0, len(ids), ids_per_job)]
        return self.enqueue_many("embed_documents", payloads, trace_id=trace_id)

    def stream_chat(
        self,
        session_id: str,
        content: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        user_id: str | None = None,
        timeout_s: float = 300,
    ) -> ChatStream:
        """Enqueue a chat job and follow it: iterate for the text deltas as they arrive; afterwards the
        stream holds the final `text`, `usage`, `finish_reason` and `status`."""
        from fleet.shared.frames import FrameListener

        payload: dict[str, Any] = {"session_id": session_id}
        for k, v in (
            ("content", content),
            ("messages", messages),
            ("model", model),
            ("temperature", temperature),
            ("max_tokens", max_tokens),
            ("idempotency_key", idempotency_key),
            ("user_id", user_id),
        ):
            if v is not None:
                payload[k] = v
        job_id = str(uuid.uuid4())
        listener = FrameListener(job_id, self.settings)  # subscribed before the job can start
        try:
            enqueued = self.enqueue("chat_completion", payload, job_id=job_id)
        except Exception:
            listener.close()
            raise
        return ChatStream(enqueued.job_id, enqueued.trace_id, listener, timeout_s)

    def chat(self, session_id: str, content: str | None = None, **kwargs: Any) -> ChatStream:
        """The final answer of a chat job (a finished ChatStream: .text, .usage, .status)."""
        stream = self.stream_chat(session_id, content, **kwargs)
        for _ in stream:
            pass
        return stream

    def _send(
        self,
        name: str,
        payloads: list[Any],
        trace_id: str | None,
        delay_ms: int | None,
        preassigned: list[tuple[str, str]] | None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[tuple[str, str]]:
        if not payloads:
            return []
        jt = job_type(name)
        self.broker.declare_queue(jt.queue)
        broker = self.broker
        bulk = capabilities_of(broker).sends_in_transaction and cast(PgmqBroker, broker).can_enqueue_in_bulk()
        if bulk and preassigned is None:
            return cast(PgmqBroker, broker).enqueue_payloads(
                jt.queue, jt.name, payloads, trace_id=trace_id, delay_ms=delay_ms
            )
        messages = [self.message(name, p, trace_id) for p in payloads]
        if preassigned is not None:  # the ids recorded with the idempotency keys
            messages = [
                m.copy(message_id=job_id, options={"trace_id": trace})
                for m, (job_id, trace) in zip(messages, preassigned, strict=True)
            ]
        enqueue_many(broker, messages, delay=delay_ms, conn=conn)
        return [(m.message_id, m.options["trace_id"]) for m in messages]

    @staticmethod
    def _claim_keys(
        conn: psycopg.Connection[Any],
        queue: str,
        keys: list[str],
        trace_id: str | None,
        ttl_s: float,
        *,
        pending: bool = False,
    ) -> tuple[list[int], dict[int, Enqueued], dict[int, tuple[str, str]]]:
        """Record each new key (or one whose record expired) with the job id it will have, on `conn`;
        returns (fresh indexes, duplicates, claims)."""
        planned = [(str(uuid.uuid4()), trace_id or str(uuid.uuid4())) for _ in keys]
        records = [{"job_id": j, "trace_id": t} | ({"pending": True} if pending else {}) for j, t in planned]
        claimed, seen = claims.claim_keys(conn, claims.IDEMPOTENCY, keys, records, ttl_s)
        fresh: list[int] = []
        results: dict[int, Enqueued] = {}
        mine: dict[int, tuple[str, str]] = {}
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in claimed and k not in first:
                first[k] = i
                fresh.append(i)
                mine[i] = (seen[k]["job_id"], seen[k]["trace_id"])
            else:  # seen before, or repeated inside this batch
                results[i] = Enqueued(seen[k]["job_id"], seen[k]["trace_id"], queue, duplicate=True)
        return fresh, results, mine

    def _confirm_keys(self, keys: list[str]) -> None:
        with get_pool().connection() as conn:
            claims.confirm_keys(conn, claims.IDEMPOTENCY, keys, self.idempotency_ttl_s)

    def _release_pending(self, keys: list[str]) -> None:
        """The send failed: free the keys now. Should that fail too, the pending claims expire by themselves."""
        try:
            with get_pool().connection() as conn:
                claims.release_pending(conn, claims.IDEMPOTENCY, keys)
        except Exception as e:  # noqa: BLE001  logged; the keys expire by themselves
            log.warning(
                "idempotency.release_failed",
                keys=len(keys),
                error=redact(describe(e)),
                note=f"the pending keys expire within {self.pending_ttl_s:.0f} s",
            )


class ChatStream:
    """Iterate for text deltas; then `text`, `usage`, `finish_reason`, `status` (complete, partial,
    error) and `error` describe the answer. `frames` keeps every frame seen."""

    def __init__(self, job_id: str, trace_id: str, listener: FrameListener, timeout_s: float) -> None:
        self.job_id, self.trace_id = job_id, trace_id
        self._listener, self._timeout_s = listener, timeout_s
        self.frames: list[dict[str, Any]] = []
        self.text = ""
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.status: str | None = None
        self.error: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[str]:
        received: list[str] = []
        for frame in self._listener.frames(self._timeout_s):
            self.frames.append(frame)
            kind = frame["type"]
            if kind == "chat.delta":
                received.append(frame["text"])
                yield frame["text"]
            elif kind in ("chat.done", "error"):
                final = frame.get("text")
                joined = "".join(received)
                if final and final != joined and final.startswith(joined):
                    yield final[len(joined) :]  # deltas sent before this listener could hear them
                self.text = final if final is not None else joined
                self.usage = frame.get("usage")
                self.finish_reason = frame.get("finish_reason")
                self.status = frame.get("status") or ("complete" if kind == "chat.done" else "error")
                if kind == "error":
                    self.error = {"error_class": frame.get("error_class"), "message": frame.get("message")}
                return
