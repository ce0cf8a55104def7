"""`fleet`: the command line for operators and producers. One module per command group; each registers
its commands (`register`), and the SQL they need is in fleet.ops.queries."""

from __future__ import annotations

import argparse
import os
import sys

from fleet.ops.cli import agents, demo, dlq, jobs, lifecycle, observe, run, services

# The order of the commands in `fleet --help`.
GROUPS = (services, run, jobs, lifecycle, agents, observe, dlq, demo)
# The commands that need no DATABASE_URL: they start their own services, or use none.
OWN_SERVICES = {"services", "demo", "simulator"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description="Queue-driven worker fleet for AI-agent backends.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows an option unparsed (`enqueue echo --trace-id T '{}'`).
    if extra and getattr(args, "payload", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.payload, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command not in ("worker",):
        from fleet.shared.logs import configure_logging

        configure_logging(os.environ.get("FLEET_LOG_LEVEL", "WARNING"))
    from fleet.shared.db import NotConfigured, missing_connections
    from fleet.shared.services import ServiceError

    if args.command not in OWN_SERVICES:
        # At once, before any work: never a silent fallback to a database or Redis of the process's own.
        problems = missing_connections()
        if problems:
            for problem in problems:
                print(f"fleet {args.command}: {problem}", file=sys.stderr)
            return 2
    try:
        return args.func(args) or 0
    except (NotConfigured, ServiceError) as e:  # what to set or install, said without a traceback
        print(f"fleet {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fleet events ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
