"""pgvector on a psycopg connection: the binary dumper and a table's vector dimension (used by the embed
and lifecycle families alike)."""

from __future__ import annotations

import threading

import psycopg
from pgvector.psycopg.vector import register_vector_info
from psycopg.types import TypeInfo

from fleet.shared.db import one
from fleet.shared.errors import PermanentError

_vector_info: TypeInfo | None = None
_vector_lock = threading.Lock()


def with_vectors(conn: psycopg.Connection) -> psycopg.Connection:
    """pgvector's binary dumper on this connection (the type's oid is looked up once per process)."""
    global _vector_info
    if _vector_info is None:
        with _vector_lock:
            if _vector_info is None:
                _vector_info = TypeInfo.fetch(conn, "vector")
    register_vector_info(conn, _vector_info)
    return conn


def vector_dim(conn: psycopg.Connection, table: str) -> int:
    dim = one(conn.execute("select get_vector_dim(%s)", (table,)).fetchone())[0]
    if not dim or dim < 1:
        raise PermanentError(f"{table}.embedding has no fixed dimension")
    return dim
