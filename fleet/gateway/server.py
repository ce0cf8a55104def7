"""`fleet gateway`: the app under uvicorn, one process (run more behind a load balancer to scale).

uvicorn runs its h11 protocol with the gateway's connection limits added (fleet.gateway.connections)."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from fleet.gateway.connections import limited_protocol
from fleet.gateway.settings import UnprotectedGateway, gateway_settings, require_protection


def serve(host: str | None = None, port: int | None = None) -> int:
    try:  # before uvicorn: a clear message and exit code 2, not a traceback from the app factory
        gw = gateway_settings()
        require_protection(gw)
    except ValidationError as e:  # named by setting, without the value (it may be a secret)
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_input=False))
        print(f"fleet gateway: invalid settings: {problems}", file=sys.stderr)
        return 2
    except UnprotectedGateway as e:
        print(f"fleet gateway: {e}", file=sys.stderr)
        return 2
    uvicorn.run(
        "fleet.gateway.app:create_app",
        factory=True,
        host=host or gw.host,
        port=gw.port if port is None else port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        backlog=4096,
        http=limited_protocol(gw),
        timeout_keep_alive=max(1, int(gw.idle_timeout_s)),
    )
    return 0
