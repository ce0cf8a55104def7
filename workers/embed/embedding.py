"""The embedding job: which documents, which are unchanged, provider batches, and the pgvector upsert.

Tables and columns come only from code (TARGET_TABLES) and from EMBED_SOURCES in config; a job
names a registered source or target, never an identifier of its own.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.shared import events
from fleet.shared.config import Settings, get_settings
from fleet.shared.db import get_pool
from fleet.shared.errors import PermanentError, describe
from fleet.shared.jobs import TARGET_TABLES
from fleet.shared.metrics import metrics
from fleet.shared.providers.embeddings import EmbeddingsClient, estimate_tokens, plan_batches
from fleet.shared.vectors import vector_dim, with_vectors

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class UnregisteredSource(PermanentError):
    pass


class Source(BaseModel):
    """A content table registered in EMBED_SOURCES: {"docs": {"table": "public.docs", "id_column": "id",
    "content_column": "body", "target": "vector_documents", "readers": "authenticated"}}"""

    model_config = ConfigDict(extra="forbid")
    table: str
    id_column: str = "id"
    content_column: str
    target: str = "vector_documents"
    metadata_columns: list[str] = Field(default_factory=list)
    # Which tenants read the source's vectors (row-level security, through vector_shared_sources):
    # "authenticated" every signed-in user, "project:<id>" that project's members, "operator" no tenant;
    # unset, the source's row in vector_shared_sources is left as the operator wrote it.
    readers: str | None = Field(None, pattern=r"^(operator|authenticated|project:[^:\s]{1,200})$")

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        if not all(IDENTIFIER.match(part) for part in v.split(".")) or v.count(".") > 1:
            raise ValueError(f"{v!r} is not a table name (schema.table)")
        return v

    @field_validator("id_column", "content_column")
    @classmethod
    def _column(cls, v: str) -> str:
        if not IDENTIFIER.match(v):
            raise ValueError(f"{v!r} is not a column name")
        return v

    @field_validator("metadata_columns")
    @classmethod
    def _columns(cls, v: list[str]) -> list[str]:
        for c in v:
            cls._column(c)
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v not in TARGET_TABLES:
            raise ValueError(f"target must be one of {', '.join(TARGET_TABLES)}")
        return v

    def table_identifier(self) -> sql.Identifier:
        return sql.Identifier(*self.table.split("."))


def registered_sources(settings: Settings | None = None) -> dict[str, Source]:
    settings = settings or get_settings()
    sources = {}
    for name, spec in settings.embed_sources.items():
        try:
            sources[name] = Source.model_validate(spec)
        except ValidationError as e:
            raise ValueError(f"EMBED_SOURCES[{name!r}] is invalid: {describe(e)}") from None
    return sources


def source(name: str, settings: Settings | None = None) -> Source:
    sources = registered_sources(settings)
    if name not in sources:
        raise UnregisteredSource(
            f"unregistered source {name!r}; registered in EMBED_SOURCES: {', '.join(sorted(sources)) or '(none)'}"
        )
    return sources[name]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Doc:
    source_id: str
    chunk_index: int
    content: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return content_hash(self.content)


# What a model reads of one input, in its own tokens; EMBED_MODEL_INPUT_TOKENS adds to and overrides these.
KNOWN_INPUT_TOKENS = {
    "BAAI/bge-m3": 8192,
    "sentence-transformers/all-MiniLM-L6-v2": 256,  # word pieces, [CLS] and [SEP] included
    "text-embedding-3-small": 8191,
    "text-embedding-3-large": 8191,
}
SPECIAL_TOKENS = 2  # what an encoder adds around the text ([CLS] ... [SEP], <s> ... </s>)


def chunk_tokens(settings: Settings, model: str) -> int:
    """Chunk size: EMBED_CHUNK_TOKENS, never more than the model reads (the server would cut the rest)."""
    limit = (KNOWN_INPUT_TOKENS | settings.embed_model_input_tokens).get(model)
    return settings.embed_chunk_tokens if limit is None else min(settings.embed_chunk_tokens, limit - SPECIAL_TOKENS)


def chunk_text(text: str, max_tokens: int) -> list[str]:
    """Split on whitespace into pieces of at most about max_tokens estimated tokens."""
    limit = max_tokens * 4
    if len(text.encode()) <= limit:
        return [text]
    chunks, current = [], ""
    for word in re.split(r"(\s+)", text):
        if current and len((current + word).encode()) > limit:
            chunks.append(current.strip())
            current = ""
        while len(word.encode()) > limit:  # a "word" longer than a chunk is cut
            chunks.append(word[: limit // 4])
            word = word[limit // 4 :]
        current += word
    if current.strip():
        chunks.append(current.strip())
    return [c for c in chunks if c]


# -- Postgres ---------------------------------------------------------------
def unchanged(conn: psycopg.Connection, table: str, docs: list[Doc], model: str) -> set[tuple[str, int]]:
    """Keys whose stored row has the same content hash and model: nothing to pay for."""
    if not docs:
        return set()
    rows = conn.execute(
        sql.SQL(
            "select t.source_id, t.chunk_index from {} t"
            " join unnest(%s::text[], %s::int[], %s::text[]) as d(source_id, chunk_index, content_hash)"
            " using (source_id, chunk_index) where t.content_hash = d.content_hash and t.model = %s"
        ).format(sql.Identifier(table)),
        ([d.source_id for d in docs], [d.chunk_index for d in docs], [d.hash for d in docs], model),
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


UPSERT_COLUMNS = sql.SQL("source_id, chunk_index, content, metadata, model, content_hash, embedding")


def upsert_vectors(
    conn: psycopg.Connection, table: str, docs: list[Doc], vectors: list[list[float]], model: str, dim: int
) -> int:
    """Binary COPY into a temporary table, then one INSERT ... ON CONFLICT DO UPDATE, in one transaction.

    bench/embed.py compares it with psycopg 3's pipelined executemany of single-row upserts: on this
    machine the two are within noise of each other, and with the HNSW index both are bound by its
    maintenance (about 1 ms per 1024-dim row).
    """
    with_vectors(conn)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "create temp table if not exists embed_stage (source_id text, chunk_index int, content text,"
                " metadata jsonb, model text, content_hash text, embedding vector({})) on commit delete rows"
            ).format(sql.Literal(dim))
        )
        with cur.copy(sql.SQL("copy embed_stage ({}) from stdin (format binary)").format(UPSERT_COLUMNS)) as copy:
            copy.set_types(["text", "int4", "text", "jsonb", "text", "text", "vector"])
            for doc, vec in zip(docs, vectors, strict=True):
                copy.write_row(
                    (doc.source_id, doc.chunk_index, doc.content, Jsonb(doc.metadata), model, doc.hash, Vector(vec))
                )
        cur.execute(
            sql.SQL(
                "insert into {table} ({columns}) select {columns} from embed_stage"
                " on conflict (source_id, chunk_index) do update set content = excluded.content,"
                " metadata = excluded.metadata, model = excluded.model, content_hash = excluded.content_hash,"
                " embedding = excluded.embedding, updated_at = now()"
            ).format(table=sql.Identifier(table), columns=UPSERT_COLUMNS)
        )
        return cur.rowcount


def load_source_docs(
    conn: psycopg.Connection, name: str, ids: list[str], settings: Settings, model: str
) -> tuple[list[Doc], list[str], Source]:
    """Rows of a registered source, chunked for `model`; returns (docs, missing ids, source)."""
    src = source(name, settings)
    columns = [sql.SQL("{}::text").format(sql.Identifier(src.id_column)), sql.Identifier(src.content_column)]
    columns += [sql.Identifier(c) for c in src.metadata_columns]
    rows = conn.execute(
        sql.SQL("select {} from {} where {}::text = any(%s)").format(
            sql.SQL(", ").join(columns), src.table_identifier(), sql.Identifier(src.id_column)
        ),
        (ids,),
    ).fetchall()
    declare_readers(conn, name, src)
    found = {r[0] for r in rows}
    docs = []
    for row in rows:
        row_id, content = row[0], row[1] or ""
        meta = {"source": name, "id": row_id} | {c: row[2 + i] for i, c in enumerate(src.metadata_columns)}
        for i, piece in enumerate(chunk_text(content, chunk_tokens(settings, model)) if content.strip() else []):
            docs.append(Doc(f"{name}:{row_id}", i, piece, meta | {"chunk": i}))
    return docs, [i for i in ids if i not in found], src


def declare_readers(conn: psycopg.Connection, name: str, src: Source) -> None:
    """Make vector_shared_sources say what the source's `readers` declares (nothing when it declares none)."""
    if src.readers is None:
        return
    if src.readers == "operator":
        conn.execute("delete from vector_shared_sources where source = %s", (name,))
        return
    project = src.readers.removeprefix("project:") if src.readers.startswith("project:") else None
    conn.execute(
        "insert into vector_shared_sources (source, project_id) values (%s, %s) on conflict (source)"
        " do update set project_id = excluded.project_id where vector_shared_sources.project_id"
        " is distinct from excluded.project_id",
        (name, project),
    )


def delete_stale_chunks(conn: psycopg.Connection, table: str, docs: list[Doc], source_ids: list[str]) -> int:
    """A source row that now has fewer chunks (or none) loses the extra ones."""
    counts: dict[str, int] = {sid: 0 for sid in source_ids}
    for d in docs:
        counts[d.source_id] = max(counts.get(d.source_id, 0), d.chunk_index + 1)
    return conn.execute(
        sql.SQL(
            "delete from {} t using unnest(%s::text[], %s::int[]) as k(source_id, n)"
            " where t.source_id = k.source_id and t.chunk_index >= k.n"
        ).format(sql.Identifier(table)),
        (list(counts), list(counts.values())),
    ).rowcount


@dataclass
class EmbedStats:
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    missing: int = 0
    tokens: int = 0
    batches: int = 0
    failures: list[str] = field(default_factory=list)
    rejected: list[tuple[Doc, str]] = field(default_factory=list)  # inputs the provider refuses even alone


def run_embedding(
    docs: list[Doc],
    table: str,
    model: str,
    client: EmbeddingsClient,
    *,
    trace: dict,
    settings: Settings,
    missing: int = 0,
) -> EmbedStats:
    """Embed what changed, one provider batch at a time, each upserted as soon as it returns so a
    retried job never pays again for finished batches."""
    stats = EmbedStats(missing=missing)
    started = time.monotonic()
    with get_pool().connection() as conn:
        dim = vector_dim(conn, table)
        same = unchanged(conn, table, docs, model)
    todo = [d for d in docs if (d.source_id, d.chunk_index) not in same]
    stats.skipped = len(docs) - len(todo)
    batches = plan_batches([d.content for d in todo], settings.embed_max_batch, settings.embed_max_tokens_per_request)
    stats.batches = len(batches)

    m = metrics()

    def store(n: int, done: list[Doc], vectors: list[list[float]]) -> None:
        if done:
            with get_pool().connection() as conn:
                upsert_vectors(conn, table, done, vectors, model, dim)
            stats.embedded += len(done)
            m.embed_batches.labels(table).inc()
            m.embed_documents.labels(table, "embedded").inc(len(done))
        events.emit(
            "embed.status", **trace, batches_done=n, batches_total=len(batches), embedded=stats.embedded, table=table
        )

    # Batch n is written while batch n+1 is at the provider; the job ends only when every write has.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-upsert") as writer:
        pending: Future | None = None
        for n, batch in enumerate(batches, 1):
            done, vectors = _embed_group([todo[i] for i in batch], model, dim, client, stats)
            if pending is not None:
                pending.result()
            pending = writer.submit(store, n, done, vectors)
        if pending is not None:
            pending.result()
    m.embed_documents.labels(table, "skipped").inc(stats.skipped)
    m.embed_documents.labels(table, "failed").inc(stats.failed)
    events.emit(
        "embed.done",
        **trace,
        table=table,
        model=model,
        embedded=stats.embedded,
        skipped=stats.skipped,
        failed=stats.failed,
        missing=stats.missing,
        tokens=stats.tokens,
        batches=stats.batches,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
        failures=stats.failures[:20],
    )
    return stats


def _embed_group(group: list[Doc], model: str, dim: int, client: EmbeddingsClient, stats: EmbedStats):
    """The documents of one planned batch the provider embedded, with their vectors; each one it refuses
    even alone goes to stats.rejected with the provider's reason (dead-lettered alone, the rest stored)."""
    result = client.embed_partial([d.content for d in group], model=model, expected_dim=dim)
    done = [d for i, d in enumerate(group) if i not in result.rejected]
    stats.tokens += result.tokens or sum(estimate_tokens(d.content) for d in done)
    for i, reason in sorted(result.rejected.items()):
        doc = group[i]
        stats.failed += 1
        stats.failures.append(f"{doc.source_id}#{doc.chunk_index}: {reason}")
        stats.rejected.append((doc, reason))
    return done, result.vectors


MATCH_FUNCTIONS = {"vector_documents": "match_agent_knowledge_vectors", "code_vectors": "match_code_vectors"}


def search(
    text: str,
    *,
    table: str = "vector_documents",
    k: int = 5,
    filter: dict | None = None,
    settings: Settings | None = None,
) -> list[dict]:
    """Embed `text` with the default model and return the k nearest chunks of `table`."""
    settings = settings or get_settings()
    if table not in MATCH_FUNCTIONS:
        raise ValueError(f"table must be one of {', '.join(MATCH_FUNCTIONS)}")
    if not isinstance(filter or {}, dict):
        raise ValueError("the filter must be a JSON object")
    with get_pool().connection() as conn:
        dim = vector_dim(conn, table)
        vector = EmbeddingsClient(settings).embed([text], expected_dim=dim).vectors[0]
        with_vectors(conn)
        cur = conn.execute(
            sql.SQL("select source_id, chunk_index, content, metadata, similarity from {}(%s, %s, %s)").format(
                sql.Identifier(MATCH_FUNCTIONS[table])
            ),
            (Vector(vector), k, Jsonb(filter or {})),
        )
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
