"""The rule every long-lived connection follows when its server goes away: try again at once, then with
jittered exponential backoff (dramatiq's compute_backoff, from 50 ms up to 0.5 s, so a restarted database
is read again within half a second of accepting connections). A lost connection is an
expected fault: one warning per episode, naming the SQLSTATE (never the SQL text), and a count in
`fleet_db_reconnects_total` by process role and connection."""

from __future__ import annotations

import time

import psycopg
import structlog
from dramatiq.common import compute_backoff

log = structlog.get_logger(__name__)

FIRST_BACKOFF_MS = 50
MAX_BACKOFF_MS = 500
# What a lost or refused PostgreSQL connection raises (psycopg_pool's PoolTimeout is an OperationalError too).
DB_CONNECTION_LOST = (psycopg.OperationalError, psycopg.InterfaceError)


def sqlstate(error: BaseException | None) -> str | None:
    """The SQLSTATE of a psycopg error, or of the error it wraps (dramatiq's ConnectionClosed)."""
    seen = 0
    while error is not None and seen < 5:
        state = getattr(error, "sqlstate", None)
        if state:
            return state
        error = error.__cause__ or (error.args[0] if error.args and isinstance(error.args[0], BaseException) else None)
        seen += 1
    return None


class Reconnects:
    """One connection's reconnect episodes. `lost(error)` starts or continues an episode and returns how
    long to wait before the next try (0 for the first); `restored()` ends it."""

    def __init__(self, connection: str, *, role: str = "worker") -> None:
        self.connection, self.role = connection, role
        self.failures = 0
        self.since: float | None = None

    def lost(self, error: BaseException) -> float:
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "db.connection_lost",
                connection=self.connection,
                role=self.role,
                sqlstate=sqlstate(error),
                error_class=type(error).__name__,
            )
        self.failures += 1
        if self.failures == 1:
            return 0.0
        _, backoff_ms = compute_backoff(self.failures - 2, factor=FIRST_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS)
        return backoff_ms / 1000

    def restored(self) -> None:
        if self.since is None:
            return
        from fleet.shared.metrics import metrics

        metrics().db_reconnects.labels(self.role, self.connection).inc()
        log.info(
            "db.reconnected",
            connection=self.connection,
            role=self.role,
            tries=self.failures,
            down_s=round(time.monotonic() - self.since, 3),
        )
        self.failures, self.since = 0, None
