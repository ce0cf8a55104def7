"""Long-running processes: `fleet worker`, `scheduler`, `metrics`, `gateway`, `simulator`."""

from __future__ import annotations

import os
import sys

from fleet.shared.config import get_settings


def cmd_worker(args) -> int:
    from fleet.ops.processes import worker_command, worker_env
    from fleet.shared.config import reset_settings
    from fleet.shared.registry import job_modules, load, queues as known_queues

    extra = [m for text in args.jobs or [] for m in job_modules(text)]
    if extra:  # the worker processes read FLEET_JOBS: --jobs adds to it
        os.environ["FLEET_JOBS"] = ",".join(dict.fromkeys([*job_modules(os.environ.get("FLEET_JOBS")), *extra]))
        reset_settings()
    try:
        load()  # here first, so a module that cannot be imported or declares a bad job is named at once
    except Exception as e:  # noqa: BLE001  any import or declaration error is printed, and the exit code is 2
        print(f"fleet worker: {e}", file=sys.stderr)
        return 2
    for q in args.queues or []:
        if q not in known_queues():
            print(f"fleet worker: unknown queue {q!r}; known: {', '.join(known_queues())}", file=sys.stderr)
            return 2
    from fleet.shared.middleware.startup import missing_settings

    problems = missing_settings(get_settings(), set(args.queues) if args.queues else None)
    if problems:
        for p in problems:
            print(f"fleet worker: {p}", file=sys.stderr)
        return 2
    env = worker_env(args.queues, args.metrics_port)
    cmd = worker_command(args.queues, args.processes, args.threads, args.metrics_port)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def cmd_scheduler(args) -> int:
    import signal

    from fleet.shared.logs import configure_logging
    from fleet.shared.scheduler import Scheduler

    configure_logging(get_settings().log_level)
    scheduler = Scheduler(tick_s=args.tick)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    signal.signal(signal.SIGINT, lambda *_: scheduler.stop())
    scheduler.run()
    return 0


def cmd_metrics(args) -> int:
    from fleet.shared.metrics import serve

    return serve(args.host, args.port)


def cmd_gateway(args) -> int:
    try:
        # Only whether the gateway extra is installed: the server imports them itself.
        import fastapi  # noqa: F401
        import jwt  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(
            f"fleet gateway: needs the gateway extra ({e.name} is not installed): pip install 'fleet[gateway]'",
            file=sys.stderr,
        )
        return 2
    from fleet.gateway.server import serve

    return serve(args.host, args.port)


def register(sub) -> None:
    s = sub.add_parser("worker", help="run dramatiq worker processes for some or all queues")
    s.add_argument("--queues", nargs="*", help="queues to consume (default: all)")
    s.add_argument(
        "--jobs",
        action="append",
        metavar="MODULE[,MODULE]",
        help="modules declaring your own job types (`@job`), served beside the fleet's own; adds to FLEET_JOBS",
    )
    s.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    s.add_argument("--threads", type=int, default=8, help="threads per process (default 8)")
    s.add_argument("--metrics-port", type=int, default=None, help="exporter port (FLEET_METRICS_PORT); 0 disables it")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("scheduler", help="enqueue periodic jobs (one leader at a time)")
    s.add_argument("--tick", type=float, default=1.0, help="seconds between looks at what is due (default 1)")
    s.set_defaults(func=cmd_scheduler)

    s = sub.add_parser("metrics", help="serve /metrics, /healthz, /readyz")
    s.add_argument("--host", help="FLEET_METRICS_HOST (127.0.0.1)")
    s.add_argument("--port", type=int, help="FLEET_METRICS_PORT (9191)")
    s.set_defaults(func=cmd_metrics)

    s = sub.add_parser("gateway", help="the HTTP gateway: chat and embed jobs over HTTP, their frames as SSE")
    s.add_argument("--host", help="GATEWAY_HOST (127.0.0.1)")
    s.add_argument("--port", type=int, help="GATEWAY_PORT (8080); 0 picks a free port")
    s.set_defaults(func=cmd_gateway)

    s = sub.add_parser("simulator", help="run the provider simulator (OpenAI-compatible) on loopback")
    s.add_argument("--port", type=int, default=8900, help="loopback port to listen on (default 8900)")
    s.add_argument("--config", default="{}", help="JSON object of simulator settings")
    s.set_defaults(
        func=lambda a: __import__("fleet.simulator", fromlist=["main"]).main(
            ["--port", str(a.port), "--config", a.config]
        )
    )
