"""Shared by the embedding tests: the simulator's settings, payload builders and readers."""

from __future__ import annotations

import json

import httpx
import psycopg

API_KEY = "sk-test-embeddings-0123456789"
SOURCES = {
    "docs": {
        "table": "test_docs",
        "id_column": "id",
        "content_column": "body",
        "target": "vector_documents",
        "metadata_columns": ["lang"],
    }
}
MODEL = "BAAI/bge-m3"


def embed_env(sim, **extra) -> dict:
    env = {
        "EMBEDDING_API_BASE": f"{sim.url}/v1",
        "EMBEDDING_API_KEY": API_KEY,
        "EMBEDDING_MODEL_DEFAULT": MODEL,
        "EMBED_SOURCES": json.dumps(SOURCES),
        "EMBED_PROVIDER_MAX_RETRIES": "2",
    }
    return env | extra


def reset_sim(sim) -> None:
    """Every setting back to its default (with the test key), the log and the one-shot faults cleared."""
    from dataclasses import asdict

    from fleet.simulator import SimConfig

    httpx.post(f"{sim.url}/_sim/reset")
    httpx.post(f"{sim.url}/_sim/config", json=asdict(SimConfig(api_key=API_KEY)))


def sim_log(sim) -> list[dict]:
    return httpx.get(f"{sim.url}/_sim/log").json()


def docs(prefix: str, n: int) -> list[dict]:
    return [
        {
            "source_id": f"{prefix}-{i}",
            "chunk_index": 0,
            "content": f"{prefix} document number {i}",
            "metadata": {"n": i, "batch": prefix},
        }
        for i in range(n)
    ]


def stored(dsn: str, prefix: str, table: str = "vector_documents") -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"select source_id, content, content_hash, model, embedding::text from {table} where source_id like %s",
            (f"{prefix}%",),
        ).fetchall()
    return {r[0]: r for r in rows}
