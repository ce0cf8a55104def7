"""The endpoints: POST /v1/chat and /v1/embed (SSE), job and trace lookups, a stream resume."""

from __future__ import annotations

import re
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from fleet.gateway.auth import Caller
from fleet.gateway.enqueue import JobSpec, KeyClaim, follow_and_enqueue
from fleet.gateway.errors import ApiError
from fleet.gateway.limits import check_rate
from fleet.gateway.models import ChatBody, EmbedBody, parse
from fleet.gateway.signing import check_signature
from fleet.gateway.sse import job_stream
from fleet.gateway.state import Gateway
from fleet.gateway.store import job_state
from fleet.gateway.tenancy import chat_checks, embed_payload, scoped_session_id
from fleet.shared import claims

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SEQ = re.compile(r"[0-9]{1,18}")  # a frame's seq as Last-Event-ID (ASCII digits; int() would take others)
JOB_ID = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, as the ids jobs get


def body_doc(model: type[BaseModel]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.model_config['title']}"}}
            },
        },
        "responses": {"200": {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}},
    }


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def admitted(request: Request, kind: str = "read") -> tuple[Caller, bytes]:
    """Token, signature and rate limit (chat, embed, or read for the GET routes), in that order;
    returns the caller and the raw body (bounded by GATEWAY_MAX_BODY_BYTES before this reads it)."""
    g = gateway(request)
    caller = await g.auth.caller(request)
    raw = await request.body()
    await check_signature(request, raw, g.gw, g.store)
    await check_rate(g.settings, g.gw, kind, caller.client)
    last_event_id(request)  # a bad header is refused before anything is written
    return caller, raw


def last_event_id(request: Request) -> int | None:
    value = request.headers.get("last-event-id")
    if value is None or not value.strip():
        return None
    if not SEQ.fullmatch(value.strip()):
        raise ApiError(
            400, "bad_last_event_id", "Last-Event-ID must be the seq of a frame (an integer of up to 18 digits)"
        )
    return int(value.strip())


def idempotency_key(request: Request, body_key: str | None, required: bool) -> str | None:
    header = request.headers.get("idempotency-key")
    if header is not None and body_key is not None and header != body_key:
        raise ApiError(
            422, "conflicting_idempotency_keys", "the Idempotency-Key header and the body's idempotency_key differ"
        )
    key = header or body_key
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError(422, "bad_idempotency_key", "an idempotency key has 1 to 200 characters")
    if key is None and required:
        raise ApiError(
            400,
            "idempotency_key_required",
            "an Idempotency-Key header (or body idempotency_key) is required (REQUIRE_IDEMPOTENCY=true)",
        )
    return key


async def start_job(
    request: Request,
    caller: Caller,
    kind: str,
    name: str,
    payload: dict,
    key: str | None,
    session_id: str | None = None,
) -> StreamingResponse:
    """Follow the job, then enqueue it (a key seen before enqueues nothing: its job is streamed)."""
    g = gateway(request)
    last_seq = last_event_id(request)
    slot = g.streams.take(caller.user_id)  # before anything is enqueued: a refused stream starts no job
    try:
        return await _start_job(request, g, caller, kind, name, payload, key, session_id, last_seq, slot)
    except BaseException:
        g.streams.give_back(caller.user_id, slot)
        raise


async def _start_job(
    request: Request,
    g: Gateway,
    caller: Caller,
    kind: str,
    name: str,
    payload: dict,
    key: str | None,
    session_id: str | None,
    last_seq: int | None,
    slot,
) -> StreamingResponse:
    claim = KeyClaim(g.store, claims.gateway_scope(kind), f"{caller.user_id or '-'}:{key}") if key is not None else None
    if claim is not None:
        job_id, trace_id, state = await g.store.claim_key(claim.scope, claim.key)
        if state == "pending":
            raise ApiError(
                409,
                "idempotency_key_in_flight",
                "a request with this idempotency key is being enqueued; repeat it in a moment",
                {"Retry-After": "1"},
            )
        repeat = state == "done"
    else:
        job_id, trace_id, repeat = str(uuid.uuid4()), str(uuid.uuid4()), False
    hub = g.hub(kind)
    if repeat:
        queue, backlog = await hub.follow(job_id)
    else:
        queue, backlog = await follow_and_enqueue(
            g, hub, claim, JobSpec(kind, name, payload, job_id, trace_id, caller.user_id, session_id)
        )
    stream = job_stream(
        hub,
        job_id,
        (queue, backlog),
        last_seq=last_seq,
        ended=g.chat_ended if kind == "chat" else None,
        check_first=hub.kind == "pgmq",
        keepalive_s=g.gw.keepalive_s,
        timeout_s=g.gw.stream_timeout_s,
    )
    headers = SSE_HEADERS | {"X-Job-Id": job_id, "X-Trace-Id": trace_id, "X-Idempotent-Replay": str(repeat).lower()}
    return StreamingResponse(
        g.streams.held(caller.user_id, slot, stream), media_type="text/event-stream", headers=headers
    )


@router.post("/v1/chat", openapi_extra=body_doc(ChatBody), summary="Ask a question; the answer streams as SSE")
async def chat(request: Request):
    g = gateway(request)
    caller, raw = await admitted(request, "chat")
    body = parse(ChatBody, raw)
    chat_checks(body, g.settings, g.gw)
    key = idempotency_key(request, body.idempotency_key, g.settings.require_idempotency)
    g.streams.check(caller.user_id)  # before the session is written
    session_id = scoped_session_id(body.session_id, caller)
    owner = await g.store.claim_session(session_id, caller.user_id)
    if caller.user_id is not None and owner != caller.user_id:  # an id in the user's space created outside the gateway
        raise ApiError(403, "session_refused", f"session {body.session_id!r} cannot be used")
    payload = (
        body.model_dump(exclude_none=True, exclude={"user_id"})
        | {"session_id": session_id}
        | ({"idempotency_key": key} if key else {})
        | ({"user_id": caller.user_id} if caller.user_id else {})
    )
    return await start_job(request, caller, "chat", "chat_completion", payload, key, session_id)


@router.post(
    "/v1/embed",
    openapi_extra=body_doc(EmbedBody),
    summary="Embed inline documents or registered source rows; progress streams as SSE",
)
async def embed(request: Request):
    g = gateway(request)
    caller, raw = await admitted(request, "embed")
    body = parse(EmbedBody, raw)
    key = idempotency_key(request, body.idempotency_key, g.settings.require_idempotency)
    payload = embed_payload(caller, body, g.settings, g.gw)
    return await start_job(request, caller, "embed", "embed_documents", payload, key)


async def owned_job(request: Request, job_id: str) -> tuple[Gateway, Caller, dict | None]:
    g = gateway(request)
    caller, _ = await admitted(request)
    if not JOB_ID.fullmatch(job_id):
        raise ApiError(404, "job_not_found", "no such job (a job id is 1 to 200 printable ASCII characters)")
    row = await g.store.job(job_id)
    if caller.user_id is not None and (row is None or not caller.may_see(row["user_id"])):
        raise ApiError(404, "job_not_found", f"no job {job_id!r} of yours")
    return g, caller, row


@router.get("/v1/jobs/{job_id}", summary="A job's state, attempts and dead-letter reason")
async def job(request: Request, job_id: str):
    g, _, row = await owned_job(request, job_id)
    events = await g.store.events(job_id=job_id)
    if row is None and not events:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    state, attempts = job_state(events)
    dead = await g.store.dead_letter(job_id) if state == "dead" else None
    return {
        "job_id": job_id,
        "trace_id": str(row["trace_id"]) if row else (events[0]["trace_id"] and str(events[0]["trace_id"])),
        "kind": row["kind"] if row else None,
        "state": state,
        "attempts": attempts,
        "dead_letter": dead and {"reason": dead["reason"], "error_class": dead["error_class"]},
        "events": len(events),
    }


@router.get(
    "/v1/jobs/{job_id}/stream",
    summary="Resume a job's SSE stream (Last-Event-ID honoured)",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_stream_again(request: Request, job_id: str):
    g, caller, row = await owned_job(request, job_id)
    caller_id = caller.user_id
    kind = row["kind"] if row else "chat"
    hub = g.hub(kind)
    last_seq = last_event_id(request)
    slot = g.streams.take(caller_id)
    try:
        sub = await hub.follow(job_id)
    except BaseException:
        g.streams.give_back(caller_id, slot)
        raise
    stream = job_stream(
        hub,
        job_id,
        sub,
        last_seq=last_seq,
        ended=g.chat_ended if kind == "chat" else None,
        check_first=hub.kind == "pgmq",
        keepalive_s=g.gw.keepalive_s,
        timeout_s=g.gw.stream_timeout_s,
    )
    return StreamingResponse(
        g.streams.held(caller_id, slot, stream),
        media_type="text/event-stream",
        headers=SSE_HEADERS | {"X-Job-Id": job_id},
    )


@router.get("/v1/traces/{trace_id}", summary="The bus_events of a trace")
@router.get("/api/metrics/trace/{trace_id}", include_in_schema=False)
async def trace(request: Request, trace_id: str):
    g = gateway(request)
    caller, _ = await admitted(request)
    try:
        trace_id = str(uuid.UUID(trace_id))
    except ValueError:
        raise ApiError(422, "bad_trace_id", "a trace id is a UUID") from None
    if caller.user_id is not None and not await g.store.trace_owned_by(trace_id, caller.user_id):
        raise ApiError(404, "trace_not_found", f"no trace {trace_id} of yours")
    events = await g.store.events(trace_id=trace_id)
    return {
        "trace_id": trace_id,
        "events": [
            {k: (str(v) if k in ("created_at", "trace_id") else v) for k, v in e.items() if k != "id"} for e in events
        ],
    }
