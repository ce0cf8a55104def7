"""The ASGI app: lifespan (store, hubs, SDK client), error handlers, health, metrics, the chat page."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleet.gateway.agents import router as agents_router
from fleet.gateway.auth import Authenticator
from fleet.gateway.bodylimit import BodyLimitMiddleware
from fleet.gateway.errors import (
    ApiError,
    InvalidBody,
    api_error_handler,
    error_response,
    invalid_body_handler,
    unexpected_handler,
    validation_handler,
)
from fleet.gateway.hub_events import AgentHub, EmbedHub
from fleet.gateway.limits import ProbeRateLimit
from fleet.gateway.metrics import MetricsMiddleware, gateway_metrics
from fleet.gateway.models import AgentBody, ChatBody, EmbedBody, TemplateBody, UpgradeBody
from fleet.gateway.page import chat_page
from fleet.gateway.routes import router
from fleet.gateway.settings import gateway_settings, require_protection
from fleet.gateway.state import Gateway
from fleet.gateway.store import Store
from fleet.shared.capabilities import capabilities
from fleet.shared.client import FleetClient
from fleet.shared.config import get_settings
from fleet.shared.db import connections
from fleet.shared.logs import configure_logging

BLOCKING_THREADS = 32  # enqueues and stored-answer reads run in threads (the SDK is synchronous)


def chat_hub(settings, gw):
    if capabilities(settings).frames == "stream":
        from fleet.gateway.hub_redis import RedisHub

        return RedisHub(gw.keep_frames_s, gw.stream_timeout_s)
    from fleet.gateway.hub_pg import PgHub

    return PgHub(gw.keep_frames_s, gw.stream_timeout_s)


@asynccontextmanager
async def lifespan(app: FastAPI):
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(BLOCKING_THREADS, "gateway-io"))
    settings, gw = get_settings(), gateway_settings()
    configure_logging(settings.log_level)  # the fleet's processors: JSON lines, secrets redacted
    store = Store()
    await store.open()
    hubs = [
        chat_hub(settings, gw),
        EmbedHub(store, gw.keep_frames_s, gw.stream_timeout_s),
        AgentHub(store, gw.keep_frames_s, gw.stream_timeout_s),
    ]
    started = []
    try:
        for hub in hubs:
            await hub.start()
            started.append(hub)
        # a producer, as any: the SDK finds each job type by name (fleet.shared.registry); no actor is declared
        client = FleetClient(settings=settings)
        app.state.gateway = Gateway(settings, gw, store, hubs[0], hubs[1], client, Authenticator(gw), hubs[2])
        yield
    finally:
        for hub in reversed(started):
            await hub.stop()
        await store.close()


def openapi_with_bodies(app: FastAPI):
    """FastAPI's document, plus the request bodies the routes parse themselves (so that auth and
    signature checks come before the body's validation)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title="Fleet gateway",
            version="1",
            routes=app.routes,
            description="Chat, embed and agent jobs over HTTP, their frames as Server-Sent Events;"
            " agent templates and cohort upgrades for operators.",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatBody, EmbedBody, AgentBody, TemplateBody, UpgradeBody):
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.model_config["title"]] = doc
        app.openapi_schema = schema
    return app.openapi_schema


def create_app() -> FastAPI:
    gw = gateway_settings()
    require_protection(gw)
    app = FastAPI(
        title="Fleet gateway",
        lifespan=lifespan,
        openapi_url="/openapi.json" if gw.docs else None,
        docs_url="/docs" if gw.docs else None,
        redoc_url=None,
    )
    app.include_router(router)
    app.include_router(agents_router)
    app.add_exception_handler(ApiError, api_error_handler)  # type: ignore[arg-type]  # Starlette types a handler as taking any Exception; each is registered for its own class
    app.add_exception_handler(InvalidBody, invalid_body_handler)  # type: ignore[arg-type]  # as above
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]  # as above
    app.add_exception_handler(Exception, unexpected_handler)
    app.add_middleware(BodyLimitMiddleware, max_bytes=gw.max_body_bytes)
    app.add_middleware(ProbeRateLimit, per_min=gw.probe_rate_limit_per_min)
    app.add_middleware(MetricsMiddleware)
    app.openapi = lambda: openapi_with_bodies(app)  # type: ignore[method-assign]  # FastAPI's way to customise the schema

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request):
        g: Gateway = request.app.state.gateway
        try:
            await asyncio.wait_for(g.store.ping(), 2.0)
        except Exception as e:  # noqa: BLE001  not ready: say why (no secrets: the error names no DSN)
            return error_response(503, "not_ready", f"database unreachable: {type(e).__name__}")
        hubs = (g.chat_hub, g.embed_hub, g.agent_hub)
        dead = [task for hub in hubs for task in hub.stopped_tasks()]
        if dead:
            return error_response(503, "not_ready", f"stopped: {', '.join(dead)}")
        if not gw.dev:  # how busy the gateway is, and on what: for the operator (/metrics), not for anyone
            return {"status": "ready"}
        return {
            "status": "ready",
            "open_streams": sum(hub.open_streams() for hub in hubs),
            **connections(),
        }  # which database and broker, credentials masked

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(gateway_metrics().registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        if not gw.dev:
            return JSONResponse(
                {"error": "not_found", "message": "the chat page is served with GATEWAY_DEV=true"}, status_code=404
            )
        return HTMLResponse(chat_page())

    return app
