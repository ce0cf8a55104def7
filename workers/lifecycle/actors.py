"""`memory_lifecycle` on queue `lifecycle` (scheduled, and on demand), and `embed_memories`, the
embedding-family job that gives memories their vectors."""

from __future__ import annotations

from dramatiq.middleware import CurrentMessage
from pgvector import Vector
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet import job
from fleet.shared import events
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool
from fleet.shared.deadletters import record_refused_input
from fleet.shared.errors import PermanentError
from fleet.shared.middleware.events import job_fields
from fleet.shared.providers.embeddings import EmbeddingsClient, plan_batches
from fleet.shared.ratelimit import per_minute
from fleet.shared.vectors import vector_dim, with_vectors
from fleet.workers.lifecycle.actions import ACTIONS, run_lifecycle


class LifecycleJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project_id: str | None = Field(None, min_length=1, max_length=200)
    dry_run: bool = False
    actions: list[str] | None = None
    batch_size: int | None = Field(None, ge=1, le=100_000)

    @field_validator("actions")
    @classmethod
    def _known(cls, v):
        unknown = sorted(set(v or []) - set(ACTIONS))
        if unknown:
            raise ValueError(f"unknown actions {unknown}; known: {', '.join(ACTIONS)}")
        return v


@job(LifecycleJob, queue="lifecycle", max_retries=3)
def memory_lifecycle(job: LifecycleJob) -> None:
    """Expires, archives, decays, evicts, merges and re-embeds memories."""
    message = CurrentMessage.get_current_message()
    run_lifecycle(
        project=job.project_id,
        dry_run=job.dry_run,
        actions=job.actions,
        batch_size=job.batch_size,
        trace=job_fields(message) if message else None,
    )


class EmbedMemoriesJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=1, max_length=1000)


@job(EmbedMemoriesJob, queue="embed_memories")
def embed_memories(job: EmbedMemoriesJob) -> None:
    """Embeds memories' payloads into memories.embedding."""
    settings = get_settings()
    model = settings.embedding_model_default
    with get_pool().connection() as conn:
        rows = conn.execute(
            "select m.id, p.content from memories m join memory_payloads p on p.memory_id = m.id"
            " where m.id = any(%s::uuid[]) and m.status = 'activated' and p.content is not null"
            " and (m.embedding is null or m.embedding_model is distinct from %s)",
            (job.ids, model),
        ).fetchall()
        dim = vector_dim(conn, "memories")
    if not rows:
        return
    limiter = per_minute("embeddings", settings.embed_rate_limit_per_min)
    client = EmbeddingsClient(settings, rate_limit=limiter.acquire if limiter else None)
    refused: list[tuple[str, str]] = []  # (memory id, the provider's reason) for inputs refused even alone
    for batch in plan_batches([r[1] for r in rows], settings.embed_max_batch, settings.embed_max_tokens_per_request):
        batch_rows = [rows[i] for i in batch]
        # halved down to an input the provider refuses even alone, as embed jobs are: the rest is stored
        result = client.embed_partial([c for _, c in batch_rows], model=model, expected_dim=dim)
        refused += [(str(batch_rows[i][0]), reason) for i, reason in sorted(result.rejected.items())]
        group = [r for i, r in enumerate(batch_rows) if i not in result.rejected]
        vectors = result.vectors
        if not group:
            continue
        with get_pool().connection() as conn:
            # Before the cursor: a cursor takes a copy of its connection's adapters when it is made.
            with_vectors(conn)
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "update memories set embedding = %s, embedding_model = %s, updated_at = now() where id = %s",
                    [(Vector(v), model, mid) for (mid, _), v in zip(group, vectors, strict=True)],
                )
    if refused:
        dead_letter_memories(CurrentMessage.get_current_message(), refused, model)


def dead_letter_memories(message, refused: list[tuple[str, str]], model: str) -> None:
    """Each memory whose input the provider refuses even alone goes to the dead letters by itself, as an
    embed_memories job of its own (to retry once fixed); the rest of its job is stored and the job succeeds."""
    if message is None:  # called outside a worker: nowhere to put them but an error
        raise PermanentError(f"{len(refused)} memory(ies) could not be embedded (the rest are stored): {refused[0][1]}")
    for memory_id, reason in refused:
        record_refused_input(message, {"ids": [memory_id]}, f"memory:{memory_id}", reason)
        events.emit("memory.embed_refused", **job_fields(message), memory_id=memory_id, model=model, reason=reason)
