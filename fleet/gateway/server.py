"""`fleet gateway`: the app under uvicorn, one process (run more behind a load balancer to scale)."""

from __future__ import annotations

import sys

import uvicorn

from fleet.gateway.settings import UnprotectedGateway, gateway_settings, require_protection


def serve(host: str | None = None, port: int | None = None) -> int:
    gw = gateway_settings()
    try:  # before uvicorn: a clear message and exit code 2, not a traceback from the app factory
        require_protection(gw)
    except UnprotectedGateway as e:
        print(f"fleet gateway: {e}", file=sys.stderr)
        return 2
    uvicorn.run("fleet.gateway.app:create_app", factory=True, host=host or gw.host, port=gw.port if port is None else port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5, backlog=4096)
    return 0
