"""Enqueueing a job the gateway streams: listen first, record its owner, send it, and keep the request's
idempotency key consistent with what happened (confirmed once sent, released when sending failed)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from fleet.gateway.errors import ApiError
from fleet.gateway.state import Gateway
from fleet.gateway.store import PENDING_TTL_S, Store
from fleet.shared.errors import InvalidPayload, PayloadTooLarge

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class KeyClaim:
    store: Store
    scope: str
    key: str


@dataclass(frozen=True)
class JobSpec:
    kind: str
    name: str
    payload: dict
    job_id: str
    trace_id: str
    user_id: str | None
    session_id: str | None


async def follow_and_enqueue(g: Gateway, hub, claim: KeyClaim | None, job: JobSpec):
    """Listen for the job, record its owner and enqueue it; on any failure undo all three (the key is free
    again), then confirm the key. A process that dies in between leaves a pending key that expires soon."""
    queue = None
    try:
        queue, backlog = await hub.follow(job.job_id)
        await g.store.record_job(job.job_id, job.trace_id, job.kind, job.user_id, job.session_id)
        await asyncio.to_thread(g.client.enqueue, job.name, job.payload, job_id=job.job_id, trace_id=job.trace_id)
    except Exception as e:
        if queue is not None:
            hub.leave(job.job_id, queue)
        await g.store.forget_job(job.job_id)
        if claim is not None:
            await claim.store.release_key(claim.scope, claim.key)
        if isinstance(e, PayloadTooLarge):
            raise ApiError(413, "payload_too_large", str(e)) from None
        if isinstance(e, InvalidPayload):
            raise ApiError(422, "invalid_request", str(e)) from None
        raise
    if claim is not None:
        try:
            await claim.store.confirm_key(claim.scope, claim.key)
        except Exception as e:  # noqa: BLE001  logged; the job is enqueued: stream it; its key stays pending and expires soon
            log.error(
                "gateway.key_confirm_failed",
                job_id=job.job_id,
                error=type(e).__name__,
                note=f"a repeat after {PENDING_TTL_S} s would enqueue the job again",
            )
    return queue, backlog
