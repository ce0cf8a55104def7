"""Migrations: plain SQL files in sql/, applied in order, once, each in its own transaction.

A file's checksum is recorded; an applied file that was changed afterwards is refused,
because the database no longer matches what the file says.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import psycopg
import structlog

log = structlog.get_logger(__name__)

# fleet/migrations: in the repository a link to sql/, in an installed wheel a copy of its files. The path is
# not resolved: in the repository fleet/shared is itself a link to shared/, and the migrations sit beside it.
SQL_DIR = Path(__file__).parent.parent / "migrations"
LOCK_KEY = 0x666C656574_01  # advisory lock: one migrator at a time


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        if not version.isdigit():
            raise MigrationError(f"{path.name}: a migration is named <timestamp>_<name>.sql")
        found.append(Migration(version, name, path))
    return found


def ensure_pgmq(conn: psycopg.Connection) -> str:
    """pgmq as an extension where the server has it (Supabase, Tembo), else the SQL bundled in the pgmq package."""
    if conn.execute("select 1 from pg_namespace where nspname = 'pgmq'").fetchone():
        return "present"
    if conn.execute("select 1 from pg_available_extensions where name = 'pgmq'").fetchone():
        conn.execute("create extension if not exists pgmq")
        return "extension"
    from pgmq.install import get_embedded_install_sql

    with conn.transaction():
        conn.execute(get_embedded_install_sql())
    return "sql"


def migrate(conn: psycopg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations; returns the versions applied."""
    conn.execute("select pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        how = ensure_pgmq(conn)
        if how != "present":
            log.info("pgmq.installed", how=how)
        conn.execute(
            "create table if not exists fleet_migrations ("
            " version text primary key, name text not null, checksum text not null,"
            " applied_at timestamptz not null default now())"
        )
        applied = {v: c for v, c in conn.execute("select version, checksum from fleet_migrations")}
        done = []
        for m in discover(sql_dir):
            if m.version in applied:
                if applied[m.version] != m.checksum:
                    raise MigrationError(
                        f"{m.path.name} was changed after it was applied (checksum {applied[m.version][:12]} "
                        f"recorded, {m.checksum[:12]} now). Applied migrations are immutable: revert the file "
                        f"and put the change in a new migration."
                    )
                continue
            with conn.transaction():
                conn.execute(m.sql)
                conn.execute(
                    "insert into fleet_migrations (version, name, checksum) values (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )
            log.info("migration.applied", version=m.version, name=m.name)
            done.append(m.version)
        from fleet.shared.registry import queues

        for queue_name in queues():  # the registered job types' queues, with their wake-up trigger
            conn.execute("select fleet_ensure_queue(%s)", (queue_name,))
        return done
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (LOCK_KEY,))
