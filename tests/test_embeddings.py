"""Embedding batches: real worker processes, real pgvector, the provider simulator over real HTTP."""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager

import httpx
import psycopg
import pytest

from fleet.workers.embed.embedding import content_hash

from .conftest import started_fleet
from .embedding_support import API_KEY, MODEL, docs, embed_env, sim_log, stored
from .helpers import dead_letters, wait_for

pytestmark = pytest.mark.usefixtures("fresh_sim")  # every test starts with a clean simulator


@pytest.fixture(scope="module")
def efleet(services, sim, tmp_path_factory):
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute("create table if not exists test_docs (id bigserial primary key, body text not null, lang text)")
    with started_fleet(services, "pgmq", tmp_path_factory.mktemp("embed"), **embed_env(sim)) as f:
        yield f


def test_upsert_and_idempotency(efleet, sim):
    prefix = f"idem-{uuid.uuid4().hex[:8]}"
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs(prefix, 10)}, trace_id=trace)
    evs = efleet.wait_done(trace, 1)
    rows = stored(efleet.dsn, prefix)
    assert len(rows) == 10
    row = rows[f"{prefix}-3"]
    assert row[2] == content_hash(f"{prefix} document number 3") and row[3] == MODEL
    expected = sim.sim.vector(MODEL, f"{prefix} document number 3")
    got = json.loads(row[4])
    assert len(got) == 1024 and max(abs(a - b) for a, b in zip(got, expected)) < 1e-6
    done = [e for e in evs if e["type"] == "embed.done"][0]["payload"]
    assert done["embedded"] == 10 and done["skipped"] == 0 and done["tokens"] > 0
    assert [e["payload"]["batches_done"] for e in evs if e["type"] == "embed.status"] == [1]
    first_requests = sim_log(sim)
    assert sum(r["n_inputs"] for r in first_requests) == 10
    assert all(r["encoding_format"] == "float" for r in first_requests)

    again = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs(prefix, 10)}, trace_id=again)
    evs = efleet.wait_done(again, 1)
    assert len(stored(efleet.dsn, prefix)) == 10
    assert sim_log(sim) == first_requests  # unchanged content: no provider call at all
    done = [e for e in evs if e["type"] == "embed.done"][0]["payload"]
    assert done["embedded"] == 0 and done["skipped"] == 10

    changed = docs(prefix, 10)
    changed[4]["content"] = "a new text for document four"
    third = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": changed}, trace_id=third)
    efleet.wait_done(third, 1)
    assert [r["inputs"] for r in sim_log(sim)[len(first_requests) :]] == [["a new text for document four"]]
    assert stored(efleet.dsn, prefix)[f"{prefix}-4"][1] == "a new text for document four"


def test_batch_is_split_when_the_provider_says_too_large(efleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"max_inputs": 3})
    prefix = f"split-{uuid.uuid4().hex[:8]}"
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs(prefix, 10), "table": "code_vectors"}, trace_id=trace)
    efleet.wait_done(trace, 1)
    assert len(stored(efleet.dsn, prefix, "code_vectors")) == 10
    log = sim_log(sim)
    assert log[0]["status"] == 413 and log[0]["n_inputs"] == 10
    assert sum(r["n_inputs"] for r in log if r["status"] == 200) == 10
    assert all(r["n_inputs"] <= 3 for r in log if r["status"] == 200)


def test_retry_after_is_honoured(efleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [429], "retry_after_s": 1.2})
    prefix = f"ra-{uuid.uuid4().hex[:8]}"
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs(prefix, 2)}, trace_id=trace)
    efleet.wait_done(trace, 1)
    first, second = sim_log(sim)[:2]
    assert first["status"] == 429 and second["status"] == 200
    assert second["t"] - first["t"] >= 1.15
    assert len(stored(efleet.dsn, prefix)) == 2


def test_401_is_dead_lettered_at_once_without_the_key(efleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"api_key": "a-different-key"})
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs("unauth", 1)}, trace_id=trace)
    efleet.wait_done(trace, 1)
    (dl,) = dead_letters(efleet.dsn, trace)
    assert "embeddings answered 401: Incorrect API key provided." in dl["reason"]
    assert dl["reason"].startswith("permanent error: ProviderError")
    assert len(sim_log(sim)) == 1  # permanent: not retried
    assert API_KEY not in dl["reason"] and API_KEY not in efleet.workers.logs()


def test_dimension_mismatch_is_a_clear_permanent_error(efleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"embedding_dim": 768})
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs("dim", 2)}, trace_id=trace)
    efleet.wait_done(trace, 1)
    (dl,) = dead_letters(efleet.dsn, trace)
    assert "the provider returned 768-dimensional vectors but the target column is vector(1024)" in dl["reason"]
    assert len(sim_log(sim)) == 1


def test_unregistered_source_and_bad_payloads_are_rejected(efleet):
    from fleet.shared.errors import InvalidPayload

    trace = efleet.trace()
    bad_tables = [
        {"source": "docs", "ids": [1], "table": "pg_authid"},
        {"documents": [{"source_id": "x", "content": "y"}], "table": "users; drop table x"},
    ]
    for payload in bad_tables:  # the SDK has the model: refused at the edge
        with pytest.raises(InvalidPayload, match="table: Input should be 'vector_documents' or 'code_vectors'"):
            efleet.client.enqueue("embed_documents", payload, trace_id=trace)
    # a source is registered in the workers' settings, so only they can refuse one; a producer without the
    # model (SQL, another language) can send the bad tables, and the workers refuse those too
    efleet.client.enqueue("embed_documents", {"source": "no_such_source", "ids": [1]}, trace_id=trace)
    for payload in bad_tables:
        efleet.client.broker.enqueue(efleet.client.message("embed_documents", payload, trace))
    efleet.wait_done(trace, 3)
    reasons = sorted(d["reason"] for d in dead_letters(efleet.dsn, trace))
    assert any("unregistered source 'no_such_source'; registered in EMBED_SOURCES: docs" in r for r in reasons)
    assert sum("table: Input should be 'vector_documents' or 'code_vectors'" in r for r in reasons) == 2


@contextmanager
def embedding_triggers(dsn: str):
    """The auto-embedding triggers on test_docs for one test only: left in place, they would enqueue a
    default-model job for every row later tests insert, racing those tests' own jobs on the same rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "create trigger test_docs_embed_insert after insert on test_docs referencing new table as new_rows"
            " for each statement execute function fleet_enqueue_embedding('docs', 'id', '3')"
        )
        conn.execute(
            "create trigger test_docs_embed_update after update on test_docs referencing new table as new_rows"
            " for each statement execute function fleet_enqueue_embedding('docs', 'id')"
        )
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("drop trigger test_docs_embed_insert on test_docs")
            conn.execute("drop trigger test_docs_embed_update on test_docs")


def test_trigger_enqueues_and_rows_get_embeddings(efleet, sim):
    with embedding_triggers(efleet.dsn):
        check_trigger_embeddings(efleet, sim)


def check_trigger_embeddings(efleet, sim):
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "insert into test_docs (body, lang) select 'row text ' || g, 'en' from generate_series(1, 7) g returning id"
            )
        ]
    keys = {f"docs:{i}" for i in ids}

    def embedded():
        with psycopg.connect(efleet.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "select source_id, content, metadata from vector_documents where source_id = any(%s)", (list(keys),)
            ).fetchall()
        return rows if len(rows) == 7 else None

    rows = wait_for(embedded, 30, what="the inserted rows' embeddings")
    meta = {r[0]: r[2] for r in rows}
    assert meta[f"docs:{ids[0]}"] == {"source": "docs", "id": str(ids[0]), "lang": "en", "chunk": 0}
    jobs = [r for r in sim_log(sim) if r["status"] == 200]
    assert sum(r["n_inputs"] for r in jobs) == 7

    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        conn.execute("update test_docs set body = 'changed text' where id = %s", (ids[0],))
    wait_for(
        lambda: stored(efleet.dsn, f"docs:{ids[0]}")[f"docs:{ids[0]}"][1] == "changed text",
        30,
        what="the updated row's new embedding",
    )


def test_match_functions_return_the_nearest_rows(efleet, sim):
    prefix = f"match-{uuid.uuid4().hex[:8]}"
    trace = efleet.trace()
    efleet.client.enqueue_many(
        "embed_documents",
        [
            {"documents": docs(prefix, 6)},
            {"documents": docs(prefix, 6), "table": "code_vectors"},
        ],
        trace_id=trace,
    )
    efleet.wait_done(trace, 2)
    query = sim.sim.vector(MODEL, f"{prefix} document number 2")
    literal = "[" + ",".join(map(str, query)) + "]"
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        code = conn.execute(
            "select source_id, similarity from match_code_vectors(%s::vector, 3, %s::jsonb)",
            (literal, json.dumps({"n": 2, "batch": prefix})),
        ).fetchall()
        knowledge = conn.execute(
            "select source_id, similarity from match_agent_knowledge_vectors(%s::vector, 3)", (literal,)
        ).fetchall()
    assert code[0][0] == f"{prefix}-2" and code[0][1] > 0.999 and len(code) == 1  # the filter keeps one row
    assert knowledge[0][0] == f"{prefix}-2" and knowledge[0][1] > 0.999
    assert knowledge[1][1] < 0.5  # random unit vectors in 1024 dimensions are nearly orthogonal


def test_cli_enqueues_a_documents_file_and_searches(efleet, sim, tmp_path):
    import os

    from .helpers import fleet_cli

    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs(prefix, 300)) + "\n")
    env = dict(os.environ) | embed_env(sim)
    trace = str(uuid.uuid4())
    out = fleet_cli("enqueue", "embed", "--file", str(path), "--trace-id", trace, env=env).stdout
    assert "enqueued 2 job(s) on embed" in out  # 300 documents, 256 per job
    efleet.wait_done(trace, 2)
    assert len(stored(efleet.dsn, prefix)) == 300
    found = json.loads(fleet_cli("search", f"{prefix} document number 17", "-k", "3", "--json", env=env).stdout)
    assert found[0]["source_id"] == f"{prefix}-17" and found[0]["similarity"] > 0.999
    assert len(found) == 3


def test_sdk_embed_documents_and_rows(efleet, sim):
    prefix = f"sdk-{uuid.uuid4().hex[:8]}"
    trace = str(uuid.uuid4())
    jobs = efleet.client.embed_documents(docs(prefix, 5), table="code_vectors", docs_per_job=2, trace_id=trace)
    assert len(jobs) == 3
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "insert into test_docs (body) select %s || g from generate_series(1, 4) g returning id", (prefix,)
            )
        ]
    efleet.client.embed_rows("docs", ids, ids_per_job=3, trace_id=trace)
    efleet.wait_done(trace, 5)
    assert len(stored(efleet.dsn, prefix, "code_vectors")) == 5
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        n = conn.execute(
            "select count(*) from vector_documents where source_id = any(%s)", ([f"docs:{i}" for i in ids],)
        ).fetchone()[0]
    assert n == 4


# -- what real servers do (tests/fixtures/openai/infinity; conformance/test_embeddings.py runs it against infinity) --


def enqueue_one_oversized(efleet, sim, name: str, n: int, oversized: int) -> tuple[str, str, list[dict]]:
    """n documents, the one at index `oversized` over infinity's input limit (1,000 characters here)."""
    httpx.post(f"{sim.url}/_sim/config", json={"error_style": "infinity", "max_input_chars": 1000})
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    documents = docs(prefix, n)
    documents[oversized]["content"] = "x" * 1001
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": documents}, trace_id=trace)
    return prefix, trace, documents


def test_one_oversized_input_is_dead_lettered_alone_and_the_rest_stored(efleet, sim):
    """infinity answers 422 with a `detail` list for an input over its limit: the batch is bisected down to
    that input, every other document is stored, and only that input goes to the dead letters, with the reason."""
    prefix, trace, _ = enqueue_one_oversized(efleet, sim, "big", 12, 7)
    evs = efleet.wait_done(trace, 2)
    assert sorted(stored(efleet.dsn, prefix)) == sorted(f"{prefix}-{i}" for i in range(12) if i != 7)
    (dl,) = dead_letters(efleet.dsn, trace)
    assert dl["reason"].startswith(f"permanent error: InputTooLarge: {prefix}-7#0:")
    assert "String should have at most 1000 characters (string_too_long)" in dl["reason"]
    assert "xxxxxxxxxx" not in dl["reason"]  # the refused text is not echoed into the reason
    assert [e["type"] for e in evs if e["type"] in ("job.succeeded", "job.dead")].count("job.succeeded") == 1
    from fleet.shared.deadletters import get_dead_letter, payload_of  # a retry of the letter embeds that input alone

    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        letter_id = conn.execute("select id from dead_letters where trace_id = %s", (trace,)).fetchone()[0]
    queue, actor, payload = payload_of(get_dead_letter(letter_id))
    assert (queue, actor) == ("embed", "embed_documents")
    assert [d["source_id"] for d in payload["documents"]] == [f"{prefix}-7"]
    assert len([r for r in sim_log(sim) if r["status"] == 422]) >= 4  # halved down to the one input


def test_one_oversized_input_costs_a_bisection_not_the_batch(efleet, sim):
    """The halves that the provider embeds are kept while the bisection looks for the refused input:
    about 2*log2(n)+1 calls for a batch of n, and every other document is embedded exactly once."""
    prefix, trace, documents = enqueue_one_oversized(efleet, sim, "bisect", 16, 11)
    efleet.wait_done(trace, 2)
    assert sorted(stored(efleet.dsn, prefix)) == sorted(f"{prefix}-{i}" for i in range(16) if i != 11)
    (dl,) = dead_letters(efleet.dsn, trace)
    assert "string_too_long" in dl["reason"]
    calls = sim_log(sim)
    assert len(calls) <= 2 * 4 + 1, [(r["status"], r["n_inputs"]) for r in calls]
    embedded = [text for r in calls if r["status"] == 200 for text in r["inputs"]]
    assert sorted(embedded) == sorted(d["content"] for i, d in enumerate(documents) if i != 11)


def test_an_oversized_batch_in_infinitys_shape_is_split(efleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"error_style": "infinity", "max_inputs": 4})
    prefix = f"split422-{uuid.uuid4().hex[:8]}"
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"documents": docs(prefix, 10)}, trace_id=trace)
    efleet.wait_done(trace, 1)
    assert len(stored(efleet.dsn, prefix)) == 10 and dead_letters(efleet.dsn, trace) == []
    assert sim_log(sim)[0]["status"] == 422


MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # reads 256 word pieces of an input


def test_a_sources_rows_are_chunked_within_what_the_model_reads(efleet, sim):
    """The server cuts what is past the model's input limit without a word: chunks stay within it."""
    httpx.post(f"{sim.url}/_sim/config", json={"max_input_tokens": 256})
    body = " ".join(f"w{i:04d}" for i in range(700))  # 3,500 bytes: about 875 tokens by the 4-bytes estimate
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        row_id = conn.execute("insert into test_docs (body) values (%s) returning id", (body,)).fetchone()[0]
    trace = efleet.trace()
    efleet.client.enqueue("embed_documents", {"source": "docs", "ids": [row_id], "model": MINILM}, trace_id=trace)
    efleet.wait_done(trace, 1)
    with psycopg.connect(efleet.dsn, autocommit=True) as conn:
        chunks = [
            r[0]
            for r in conn.execute(
                "select content from vector_documents where source_id = %s order by chunk_index", (f"docs:{row_id}",)
            )
        ]
    assert len(chunks) == 5  # 254 tokens (the limit less [CLS] and [SEP]) of 4 bytes: 169 six-byte words a chunk
    assert all(len(c.encode()) <= 254 * 4 and len(c.split()) <= 256 for c in chunks)
    assert " ".join(chunks) == body  # nothing lost between chunks
