"""Postgres connections: where the database is, and connections that work through a transaction pooler."""

from __future__ import annotations

import select
import threading
from typing import TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg.conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from fleet.shared.capabilities import capabilities
from fleet.shared.config import Settings, get_settings
from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

_lock = threading.RLock()


class NotConfigured(RuntimeError):
    """A process was started without the setting that says where its database (or Redis) is."""


_EMBEDDED_HINT = (
    "; for development, FLEET_EMBEDDED=1 starts an embedded one under FLEET_HOME instead"
    " (`fleet demo` and `fleet services up` start their own)"
)


def missing_connections(settings: Settings | None = None) -> list[str]:
    """What this process lacks to find its database and broker: DATABASE_URL, and REDIS_URL on the Redis
    broker (none with FLEET_EMBEDDED=1)."""
    settings = settings or get_settings()
    if settings.embedded:
        return []
    missing = []
    if settings.database_url is None:
        missing.append(
            "DATABASE_URL is not set: set it to the PostgreSQL this process uses"
            " (postgresql://USER:PASSWORD@HOST:5432/DATABASE)" + _EMBEDDED_HINT
        )
    if capabilities(settings).queues_in_redis and settings.redis_url is None:
        missing.append(
            "REDIS_URL is not set, and FLEET_BROKER=redis needs it: set it to the Redis this process"
            " uses (redis://:PASSWORD@HOST:6379/0)" + _EMBEDDED_HINT
        )
    return missing


def database_dsn(settings: Settings | None = None) -> str:
    """DATABASE_URL; with FLEET_EMBEDDED=1 and no DATABASE_URL, the embedded PostgreSQL under FLEET_HOME
    (started if needed). Without either, NotConfigured: a process never falls back to a database of its own."""
    settings = settings or get_settings()
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    if not settings.embedded:
        raise NotConfigured(missing_connections(settings)[0])
    with _lock:
        return EmbeddedPostgres(settings.home).up()


def redis_url(settings: Settings | None = None) -> str:
    """REDIS_URL; with FLEET_EMBEDDED=1 and no REDIS_URL, the embedded Redis under FLEET_HOME (started if
    needed). Without either, NotConfigured."""
    settings = settings or get_settings()
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value()
    if not settings.embedded:
        raise NotConfigured(
            "REDIS_URL is not set: set it to the Redis this process uses"
            " (redis://:PASSWORD@HOST:6379/0)" + _EMBEDDED_HINT
        )
    with _lock:
        return EmbeddedRedis(settings.home).up()


def masked_dsn(dsn: str) -> str:
    """A PostgreSQL connection string (URL or key=value) as user@host:port/database, the password shown as ***."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = info.get("user") or ""
    secret = ":***" if info.get("password") else ""
    at = f"{user}{secret}@" if user or secret else ""
    return f"postgresql://{at}{info.get('host') or 'localhost'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def masked_redis_url(url: str) -> str:
    """A Redis URL as scheme://host:port/db, the password shown as ***."""
    parts = urlsplit(url)
    user = parts.username or ""
    at = f"{user}:***@" if parts.password else (f"{user}@" if user else "")
    return f"{parts.scheme}://{at}{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path}"


def connections(settings: Settings | None = None) -> dict[str, str | None]:
    """Which database and broker this process uses, with credentials masked: for `/readyz` and `fleet status`.
    None where it is not set (the process then refuses to start)."""
    settings = settings or get_settings()
    embedded = f"embedded under {settings.home}" if settings.embedded else None
    redis = None
    if settings.redis_url is not None:
        redis = masked_redis_url(settings.redis_url.get_secret_value())
    elif capabilities(settings).queues_in_redis:
        redis = embedded
    database = masked_dsn(settings.database_url.get_secret_value()) if settings.database_url is not None else embedded
    return {"database": database, "broker": settings.broker, "redis": redis}


def connect_kwargs(settings: Settings | None = None) -> dict:
    settings = settings or get_settings()
    kwargs: dict = {"autocommit": True, "application_name": "fleet"}
    if settings.uses_pooler:
        # Transaction poolers hand each transaction to any server connection.
        kwargs["prepare_threshold"] = None
    return kwargs


def connect(settings: Settings | None = None, **overrides) -> psycopg.Connection:
    settings = settings or get_settings()
    kwargs = connect_kwargs(settings) | overrides
    return psycopg.connect(database_dsn(settings), **kwargs)


def make_pool(
    settings: Settings | None = None, *, min_size: int = 1, max_size: int = 8, name: str = "fleet"
) -> ConnectionPool:
    settings = settings or get_settings()
    kwargs = connect_kwargs(settings)
    return ConnectionPool(
        database_dsn(settings),
        min_size=min_size,
        max_size=max_size,
        kwargs=kwargs,
        name=name,
        open=True,
        check=check_if_server_spoke,
    )


def check_if_server_spoke(conn: psycopg.Connection) -> None:
    """The pool's check before it hands out a connection, without a round trip for a healthy one: an idle
    connection the server has written to (the FATAL of a shutdown or crash, the socket's end) is readable,
    and only then is psycopg_pool's own check (an empty query) run, which discards it if it is broken.
    Checking every connection costs a round trip per checkout: for a producer's single enqueue, a third of
    its round trips."""
    if conn.closed:
        ConnectionPool.check_connection(conn)
        return
    poller = select.poll()  # not select.select: a process holding many sockets has descriptors past 1024
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


Row = TypeVar("Row")


def one(row: Row | None) -> Row:
    """The row of a statement that always returns one (an aggregate, a function call, `insert ... returning`
    of a row that is inserted or updated). None is a bug, said as such."""
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


_pool: ConnectionPool | None = None
_pool_size = 10  # a producer's; a worker process sizes it from its threads (size_pool_for_threads)


def pool_size_for_threads(threads: int) -> int:
    """Connections a worker process can need at once: each job thread holds at most one at a time (no
    connection is held across a provider call or while taking another), and as many helper threads can
    each hold one beside it (an upgrade's heartbeat, a chat's keepalive frames); plus the events writer,
    the metrics exporter's queue read and spare room."""
    return 2 * threads + 4


def size_pool_for_threads(threads: int) -> None:
    global _pool_size
    with _lock:
        _pool_size = max(_pool_size, pool_size_for_threads(threads))
        if _pool is not None and _pool.max_size < _pool_size:
            _pool.resize(min_size=_pool.min_size, max_size=_pool_size)


def get_pool() -> ConnectionPool:
    """The process's shared pool (created on first use, so forked workers each get their own)."""
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = make_pool(max_size=_pool_size)
    return _pool


def close_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


__all__ = [
    "connect",
    "one",
    "make_pool",
    "get_pool",
    "close_pool",
    "database_dsn",
    "redis_url",
    "connections",
    "missing_connections",
    "NotConfigured",
    "dict_row",
]
