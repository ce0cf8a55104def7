"""The embeddings family against a real infinity server (all-MiniLM-L6-v2, 384 dimensions), with the same
worker processes and code as production: vectors equal to the server's own, an oversized input set aside
alone, source rows chunked within what the model reads."""

from __future__ import annotations

import json
import uuid

import httpx
import psycopg
import pytest

from tests.conftest import started_fleet
from tests.helpers import dead_letters

from .openai_servers import EMBEDDING_DIM, embedding_server  # noqa: F401  (a fixture, used by name)

TABLE = "code_vectors"  # moved to the server's dimension as the README's "Embedding dimension" says
SOURCES = {"notes": {"table": "conformance_notes", "content_column": "body", "target": TABLE}}


@pytest.fixture(scope="module")
def efleet(services, embedding_server, tmp_path_factory):
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute("drop index if exists code_vectors_embedding_idx")
        conn.execute("truncate code_vectors")
        conn.execute(f"alter table code_vectors alter column embedding type vector({EMBEDDING_DIM})")
        conn.execute("create index code_vectors_embedding_idx on code_vectors using hnsw (embedding vector_cosine_ops)")
        conn.execute("create table if not exists conformance_notes (id bigserial primary key, body text not null)")
    env = {
        "EMBEDDING_API_BASE": embedding_server.base,
        "EMBED_SOURCES": json.dumps(SOURCES),
        "HEALTH_PROVIDERS": "embedding",
    } | embedding_server.env
    with started_fleet(services, "pgmq", tmp_path_factory.mktemp("embed"), **env) as fleet:
        yield fleet


def server_vectors(server, texts: list[str]) -> list[list[float]]:
    body = httpx.post(
        f"{server.base}/embeddings",
        json={"model": server.model, "input": texts, "encoding_format": "float"},
        timeout=60,
    ).json()
    return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]


def stored_rows(dsn: str, where: str, params) -> dict[tuple[str, int], tuple[str, list[float]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"select source_id, chunk_index, content, embedding::text from {TABLE} where {where}", params
        ).fetchall()
    return {(r[0], r[1]): (r[2], json.loads(r[3])) for r in rows}


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_documents_are_stored_with_the_servers_own_vectors(efleet, embedding_server):
    prefix = f"conf-{uuid.uuid4().hex[:8]}"
    texts = [f"{prefix}: how the fleet retries a job, part {i}" for i in range(20)]
    trace = efleet.trace()
    efleet.client.embed_documents(
        [{"source_id": f"{prefix}-{i}", "content": t} for i, t in enumerate(texts)],
        table=TABLE,
        docs_per_job=8,
        trace_id=trace,
    )
    efleet.wait_done(trace, 3, timeout=120)
    rows = stored_rows(efleet.dsn, "source_id like %s", (f"{prefix}-%",))
    assert len(rows) == 20 and dead_letters(efleet.dsn, trace) == []
    direct = server_vectors(embedding_server, texts)
    for i, vector in enumerate(direct):
        content, stored = rows[(f"{prefix}-{i}", 0)]
        assert content == texts[i] and len(stored) == EMBEDDING_DIM and close(stored, vector)


def test_an_input_over_the_servers_limit_is_set_aside_alone(efleet):
    """infinity refuses an input over 122,880 characters with a 422 and a `detail` list."""
    prefix = f"big-{uuid.uuid4().hex[:8]}"
    documents = [{"source_id": f"{prefix}-{i}", "content": f"{prefix} note {i}"} for i in range(10)]
    documents[3]["content"] = "lorem ipsum " * 11_000  # 132,000 characters
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": documents, "table": TABLE}, trace_id=trace)
    efleet.wait_done(trace, 2, timeout=120)
    rows = stored_rows(efleet.dsn, "source_id like %s", (f"{prefix}-%",))
    assert sorted(k[0] for k in rows) == sorted(f"{prefix}-{i}" for i in range(10) if i != 3)
    (dl,) = dead_letters(efleet.dsn, trace)
    assert dl["reason"].startswith(f"permanent error: InputTooLarge: {prefix}-3#0: ")
    assert "embeddings answered 422" in dl["reason"] and "String should have at most 122880 characters" in dl["reason"]


def test_a_long_row_is_chunked_within_what_the_model_reads(efleet, embedding_server):
    """all-MiniLM-L6-v2 reads 256 word pieces and the server drops the rest without a word: two rows that
    differ only at their end must still get different vectors for their end."""
    sentence = "The fleet embeds documents into pgvector through an OpenAI compatible provider. "
    bodies = [sentence * 24 + "The end is alpha.", sentence * 24 + "The end is omega, quite another ending."]
    assert server_vectors(embedding_server, bodies)[0] == server_vectors(embedding_server, bodies)[1]  # cut
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        ids = [
            conn.execute("insert into conformance_notes (body) values (%s) returning id", (b,)).fetchone()[0]
            for b in bodies
        ]
    trace = efleet.trace()
    efleet.client.embed_rows("notes", ids, trace_id=trace)
    efleet.wait_done(trace, 1, timeout=120)
    rows = [stored_rows(efleet.dsn, "source_id = %s", (f"notes:{i}",)) for i in ids]
    assert len(rows[0]) == len(rows[1]) > 1
    last = max(k[1] for k in rows[0])
    (a_text, a), (b_text, b) = rows[0][(f"notes:{ids[0]}", last)], rows[1][(f"notes:{ids[1]}", last)]
    assert a_text.endswith("alpha.") and b_text.endswith("ending.") and not close(a, b)
    assert " ".join(rows[0][(f"notes:{ids[0]}", n)][0] for n in range(last + 1)) == bodies[0]
    assert close(a, server_vectors(embedding_server, [a_text])[0])
