"""Embedded services and migrations: `fleet services`, `fleet migrate`."""

from __future__ import annotations

import sys

from fleet.shared.capabilities import capabilities
from fleet.shared.config import get_settings


def cmd_services(args) -> int:
    from fleet.shared.redact import redact
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

    settings = get_settings()
    pg, rd = EmbeddedPostgres(settings.home), EmbeddedRedis(settings.home)
    want_redis = capabilities(settings).queues_in_redis or args.redis
    if args.action == "up":
        if settings.database_url is None:
            print("postgres:", redact(pg.up()))
        else:
            print("postgres: DATABASE_URL is set; nothing to start")
        if want_redis:
            if settings.redis_url is None:
                print("redis:", redact(rd.up()))
            else:
                print("redis: REDIS_URL is set; nothing to start")
        if settings.database_url is None or (want_redis and settings.redis_url is None):
            print(
                "other fleet processes use these servers with FLEET_EMBEDDED=1 (or DATABASE_URL / REDIS_URL set"
                " to them); without either they refuse to start"
            )
    elif args.action == "down":
        print("postgres:", "stopped" if pg.down() else "not running")
        print("redis:", "stopped" if rd.down() else "not running")
    else:
        print("postgres:", f"running ({redact(pg.dsn())})" if pg.running() else "not running")
        print("redis:", f"running ({redact(rd.url())})" if rd.running() else "not running")
    return 0


def cmd_migrate(args) -> int:
    from fleet.shared.db import connect
    from fleet.shared.migrate import MigrationError, migrate

    try:
        with connect() as conn:
            applied = migrate(conn)
    except MigrationError as e:
        print(f"fleet migrate: {e}", file=sys.stderr)
        return 2
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else " (up to date)"))
    return 0


def register(sub) -> None:
    s = sub.add_parser("services", help="embedded PostgreSQL (and Redis) for development, under FLEET_HOME")
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("up", help="start them (a running one is reused), under FLEET_HOME")
    p.add_argument("--redis", action="store_true", help="start Redis too, whatever FLEET_BROKER says")
    p.set_defaults(func=cmd_services)
    actions.add_parser("down", help="stop them").set_defaults(func=cmd_services, redis=False)
    actions.add_parser("status", help="whether they run, and where").set_defaults(func=cmd_services, redis=False)

    s = sub.add_parser("migrate", help="apply pending SQL migrations from sql/")
    s.set_defaults(func=cmd_migrate)
