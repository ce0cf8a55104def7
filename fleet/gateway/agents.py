"""The Agent Management Service: a user's own agent (POST /v1/agents, GET /v1/me), and for operators the
templates (publish, list, read, diff) and cohort upgrades (start with progress as SSE, read, halt).

The work is the agents family's (fleet.workers.agents): these routes check who asks, enqueue its jobs and
read its tables. Operator routes need the operator claim or key (Authenticator.require_operator). The
family is imported when a route first runs, so importing the app declares no actor."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncGenerator

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fleet.gateway.auth import Caller
from fleet.gateway.errors import ApiError
from fleet.gateway.metrics import gateway_metrics
from fleet.gateway.models import TEMPLATE_NAME, AgentBody, TemplateBody, UpgradeBody, parse
from fleet.gateway.routes import SSE_HEADERS, admitted, body_doc, gateway, idempotency_key, last_event_id, start_job
from fleet.gateway.sse import KEEPALIVE, encode
from fleet.gateway.state import Gateway
from fleet.shared import claims
from fleet.shared.errors import PermanentError

router = APIRouter()
NAME = re.compile(TEMPLATE_NAME)
PROGRESS_POLL_S = 0.5
RUN_AGENTS_MAX = 1000


def _user_of(caller: Caller, named: uuid.UUID | str | None) -> str:
    """Whose agent: the verified token's user; without verified tokens, the user the trusted caller names."""
    if caller.user_id is not None:
        if named is not None and str(named) != caller.user_id:
            raise ApiError(403, "not_your_agent", "a user reaches only their own agent: leave user_id out")
        return caller.user_id
    if named is None:
        raise ApiError(422, "user_id_required", "without verified tokens the request names the user (user_id)")
    try:
        return str(uuid.UUID(str(named)))
    except ValueError:
        raise ApiError(422, "bad_user_id", "a user id is a UUID") from None


async def _published(name: str, version: str | None) -> str:
    """The version to use (the highest published when none is named), or a 404."""
    from fleet.workers.agents import templates

    rows = await asyncio.to_thread(templates.list_templates, name)
    if not rows:
        raise ApiError(404, "template_not_found", f"no template {name!r} is published")
    if version is None:
        return rows[-1]["version"]
    if version not in {r["version"] for r in rows}:
        raise ApiError(404, "template_not_found", f"template {name}@{version} is not published")
    return version


@router.post(
    "/v1/agents",
    openapi_extra=body_doc(AgentBody),
    tags=["agents"],
    summary="Create the caller's agent from a template; progress streams as SSE, ending with the agent id",
)
async def create_agent(request: Request):
    g = gateway(request)
    caller, raw = await admitted(request, "agents")
    body = parse(AgentBody, raw)
    user = _user_of(caller, body.user_id)
    key = idempotency_key(request, body.idempotency_key, g.settings.require_idempotency)
    version = await _published(body.template, body.version)
    g.streams.check(caller.user_id)
    # One job per user and key, or per user and template without a key: a repeat streams the same job.
    natural = f"{user}:{f'key:{key}' if key is not None else f'template:{body.template}'}"
    payload = {"user_id": user, "template": body.template, "version": version}
    response = await start_job(request, caller, "agents", "create_agent", payload, natural)
    response.headers["X-User-Id"] = user
    return response


@router.get(
    "/v1/me", tags=["agents"], summary="The caller's profile: their agent, its template version and last upgrade"
)
async def me(request: Request, user_id: str | None = None):
    g = gateway(request)
    caller, _ = await admitted(request)
    user = _user_of(caller, user_id)
    from fleet.workers.agents.profiles import profile_of

    profile = await asyncio.to_thread(profile_of, user, g.settings)
    if profile is None:
        return {
            "user_id": user,
            "letta_agent_id": None,
            "template": None,
            "version": None,
            "last_upgrade": None,
            "agent": None,
            "agent_error": None,
        }
    return profile


async def _operator(request: Request, kind: str = "read") -> tuple[Gateway, Caller, bytes]:
    g = gateway(request)
    caller, raw = await admitted(request, kind)
    g.auth.require_operator(request, caller)
    return g, caller, raw


def _template_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ApiError(404, "template_not_found", "no such template (a name is 1 to 100 of a-z 0-9 _ . -)")
    return name


@router.post(
    "/v1/templates",
    status_code=201,
    openapi_extra=body_doc(TemplateBody),
    tags=["operators"],
    summary="Publish an Agent File as a template version (immutable, SemVer above every published one)",
)
async def publish_template(request: Request):
    from fleet.workers.agents import templates
    from fleet.workers.agents.agentfile import InvalidAgentFile
    from fleet.workers.agents.semver import InvalidVersion

    _, _, raw = await _operator(request, "operator")
    body = parse(TemplateBody, raw)
    try:
        row = await asyncio.to_thread(templates.publish, body.name, body.version, body.content)
    except InvalidVersion as e:
        raise ApiError(422, "bad_version", str(e)) from None
    except InvalidAgentFile as e:
        raise ApiError(422, "invalid_agent_file", str(e)) from None
    except templates.TemplateError as e:  # published already, or not above the highest published version
        raise ApiError(409, "template_refused", str(e)) from None
    return JSONResponse(_jsonable(row), status_code=201)


@router.get("/v1/templates", tags=["operators"], summary="The published templates and versions, in SemVer order")
async def list_templates(request: Request, name: str | None = None):
    from fleet.workers.agents import templates

    await _operator(request)
    if name is not None:
        _template_name(name)
    return {"templates": await asyncio.to_thread(templates.list_templates, name)}


@router.get(
    "/v1/templates/{name}/diff",
    tags=["operators"],
    summary="What an upgrade from one version to another changes (memory blocks are never applied)",
)
async def diff_templates(request: Request, name: str, from_version: str, to_version: str):
    from fleet.workers.agents import templates

    await _operator(request)
    try:
        return await asyncio.to_thread(templates.diff_versions, _template_name(name), from_version, to_version)
    except templates.TemplateNotFound as e:
        raise ApiError(404, "template_not_found", str(e)) from None


@router.get("/v1/templates/{name}/{version}", tags=["operators"], summary="A template version's Agent File")
async def read_template(request: Request, name: str, version: str):
    from fleet.workers.agents import templates

    await _operator(request)
    try:
        content = await asyncio.to_thread(templates.get, _template_name(name), version)
    except templates.TemplateNotFound as e:
        raise ApiError(404, "template_not_found", str(e)) from None
    return {"name": name, "version": version, "content": content}


@router.post(
    "/v1/upgrades",
    openapi_extra=body_doc(UpgradeBody),
    tags=["operators"],
    summary="Run a cohort upgrade (dry run by default); counts per status stream as SSE until it ends",
)
async def start_upgrade(request: Request):
    from fleet.workers.agents.upgrades import HaltPolicy, start_run

    g, caller, raw = await _operator(request, "operator")
    body = parse(UpgradeBody, raw)
    key = idempotency_key(request, body.idempotency_key, g.settings.require_idempotency)
    await _published(body.template, body.version)
    last_seq = last_event_id(request)
    scope, claim = claims.gateway_scope("upgrades"), f"{caller.client}:{key}"
    run_id = str(uuid.uuid4())
    if key is not None:  # the key names the run: a repeat streams the run it started
        run_id, _, state = await g.store.claim_key(scope, claim)
        if state == "pending":
            raise ApiError(
                409,
                "idempotency_key_in_flight",
                "a request with this idempotency key is starting its run; repeat it in a moment",
                {"Retry-After": "1"},
            )
    cohort = {
        k: v
        for k, v in {
            "from_version": body.cohort.from_version,
            "user_ids": [str(u) for u in body.cohort.user_ids] if body.cohort.user_ids else None,
            "percent": body.canary_percent,
        }.items()
        if v is not None
    }
    try:
        run_id = await asyncio.to_thread(
            start_run,
            body.template,
            body.version,
            cohort,
            body.dry_run,
            g.client,
            run_id=run_id,
            halt=HaltPolicy(body.halt_failure_rate, body.halt_min_sample),
        )
    except BaseException as e:
        if key is not None:  # no run was started under the key: it is free again
            await g.store.release_key(scope, claim)
        if isinstance(e, (PermanentError, psycopg.errors.ForeignKeyViolation)):  # unpublished since the check
            raise ApiError(404, "template_not_found", str(e).splitlines()[0]) from None
        raise
    if key is not None:
        await g.store.confirm_key(scope, claim)
    return _progress_response(g, caller, run_id, last_seq)


def _run_id(run: str) -> str:
    try:
        return str(uuid.UUID(run))
    except ValueError:
        raise ApiError(404, "run_not_found", "no such run (a run id is a UUID)") from None


@router.get(
    "/v1/upgrades/{run}",
    tags=["operators"],
    summary="A run's state and counts, and its agents (diff, status, error) up to `limit`",
)
async def read_upgrade(request: Request, run: str, limit: int = 100):
    from fleet.workers.agents.upgrades import run_state

    await _operator(request)
    if not 0 <= limit <= RUN_AGENTS_MAX:
        raise ApiError(422, "bad_limit", f"limit is 0 to {RUN_AGENTS_MAX}")
    state = await asyncio.to_thread(run_state, _run_id(run), limit)
    if state is None:
        raise ApiError(404, "run_not_found", f"no upgrade run {run}")
    return state


@router.get(
    "/v1/upgrades/{run}/stream",
    tags=["operators"],
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Resume a run's progress stream",
)
async def upgrade_stream(request: Request, run: str):
    from fleet.workers.agents.upgrades import run_state

    g, caller, _ = await _operator(request)
    run_id = _run_id(run)
    if await asyncio.to_thread(run_state, run_id) is None:
        raise ApiError(404, "run_not_found", f"no upgrade run {run}")
    return _progress_response(g, caller, run_id, last_event_id(request))


@router.post(
    "/v1/upgrades/{run}/halt",
    tags=["operators"],
    summary="Halt a run: its pending agents are cancelled, those in progress finish",
)
async def halt_upgrade(request: Request, run: str):
    from fleet.workers.agents.upgrades import halt, run_state

    await _operator(request, "operator")
    run_id = _run_id(run)
    if await asyncio.to_thread(run_state, run_id) is None:
        raise ApiError(404, "run_not_found", f"no upgrade run {run}")
    cancelled = await asyncio.to_thread(halt, run_id)
    state = await asyncio.to_thread(run_state, run_id)
    return {"run_id": run_id, "cancelled": cancelled, **(state or {})}


def _progress_response(g: Gateway, caller: Caller, run_id: str, last_seq: int | None) -> StreamingResponse:
    slot = g.streams.take(caller.user_id)
    stream = run_progress(run_id, last_seq, g.gw.keepalive_s, g.gw.stream_timeout_s)
    return StreamingResponse(
        g.streams.held(caller.user_id, slot, stream),
        media_type="text/event-stream",
        headers=SSE_HEADERS | {"X-Run-Id": run_id},
    )


async def run_progress(
    run_id: str, last_seq: int | None, keepalive_s: float, timeout_s: float
) -> AsyncGenerator[bytes, None]:
    """`ready`, then `upgrade.progress` (status, total, counts per agent status) each time they change, then
    `upgrade.done` once the run has finished. Frames are numbered on from Last-Event-ID on a resume."""
    from fleet.workers.agents.upgrades import run_state

    gauge = gateway_metrics().open_streams.labels("upgrades")
    gauge.inc()
    seq = last_seq or 0

    def frame(kind: str, **data) -> bytes:
        nonlocal seq
        seq += 1
        return encode({"seq": seq, "type": kind, "run_id": run_id} | data)

    try:
        yield frame("ready")
        deadline, quiet_since, last = time.monotonic() + timeout_s, time.monotonic(), None
        while True:
            state = await asyncio.to_thread(run_state, run_id)
            if state is None:
                yield frame("error", error_class="RunNotFound", message=f"upgrade run {run_id} does not exist")
                return
            progress = {"status": state["status"], "total": state["total"], "counts": state["counts"]}
            if state["finished"]:
                yield frame("upgrade.done", **progress)
                return
            now = time.monotonic()
            if progress != last:
                yield frame("upgrade.progress", **progress)
                last, quiet_since = progress, now
            elif now - quiet_since >= keepalive_s:
                yield KEEPALIVE
                quiet_since = now
            if now > deadline:
                yield frame(
                    "error",
                    error_class="StreamTimeout",
                    message=f"the run did not end within {timeout_s:.0f}s; it goes on: GET /v1/upgrades/{run_id}",
                )
                return
            await asyncio.sleep(PROGRESS_POLL_S)
    finally:
        gauge.dec()


def _jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
