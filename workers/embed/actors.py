"""`embed_documents` on queue `embed`: documents into pgvector through an OpenAI-compatible provider."""

from __future__ import annotations

from dramatiq.middleware import CurrentMessage

from fleet import job
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool
from fleet.shared.deadletters import record_refused_input
from fleet.shared.errors import PermanentError
from fleet.shared.jobs import EmbedJob
from fleet.shared.middleware.events import job_fields
from fleet.shared.providers.embeddings import EmbeddingsClient
from fleet.shared.ratelimit import per_minute
from fleet.workers.embed.embedding import Doc, delete_stale_chunks, load_source_docs, run_embedding


def _client(settings) -> EmbeddingsClient:
    limiter = per_minute("embeddings", settings.embed_rate_limit_per_min)
    return EmbeddingsClient(settings, rate_limit=limiter.acquire if limiter else None)


@job(EmbedJob, queue="embed", min_backoff=2_000, max_backoff=300_000)
def embed_documents(job: EmbedJob) -> None:
    """Embeds documents (inline or rows of a registered source) into pgvector."""
    settings = get_settings()
    message = CurrentMessage.get_current_message()
    trace = job_fields(message) if message else {}
    model = job.model or settings.embedding_model_default
    missing: list[str] = []
    if job.documents is not None:
        docs = [Doc(d.source_id, d.chunk_index, d.content, d.metadata) for d in job.documents]
        table = job.table or "vector_documents"
    else:
        ids = [str(i) for i in job.ids or []]
        assert job.source is not None  # an EmbedJob has documents or a source
        with get_pool().connection() as conn:
            docs, missing, src = load_source_docs(conn, job.source, ids, settings, model)
        table = src.target
    stats = run_embedding(docs, table, model, _client(settings), trace=trace, settings=settings, missing=len(missing))
    if job.source is not None:
        found = [f"{job.source}:{i}" for i in (str(x) for x in job.ids or []) if i not in missing]
        with get_pool().connection() as conn:
            delete_stale_chunks(conn, table, docs, found)
    if stats.rejected and message is None:  # called outside a worker: nowhere to put them but an error
        raise PermanentError(
            f"{stats.failed} of {len(docs)} document(s) could not be embedded "
            f"(the rest are stored): {'; '.join(stats.failures[:5])}"
        )
    for doc, reason in stats.rejected:
        dead_letter_input(message, job, doc, reason, model, table)


def dead_letter_input(message, job: EmbedJob, doc: Doc, reason: str, model: str, table: str) -> None:
    """One input the provider refuses even alone goes to the dead letters by itself, as a job of its own (to
    retry once fixed); the rest of its job is stored and the job succeeds."""
    if job.source is not None:
        payload = {"source": job.source, "ids": [doc.metadata["id"]], "model": model}
    else:
        payload = {
            "documents": [
                {
                    "source_id": doc.source_id,
                    "chunk_index": doc.chunk_index,
                    "content": doc.content,
                    "metadata": doc.metadata,
                }
            ],
            "table": table,
            "model": model,
        }
    record_refused_input(message, payload, f"{doc.source_id}#{doc.chunk_index}", reason)
