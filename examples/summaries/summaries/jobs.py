"""`summarize` on queue `summaries`: a stored document summarised through the chat provider.

Every guarantee the fleet gives its own jobs holds here: the payload is checked by SummarizeJob before it is
sent; a transient failure (the provider's 429 or 5xx, a timeout) is retried with backoff; a permanent one (no
such document) is dead-lettered with its reason and replays with `fleet dlq retry` once fixed; a worker
killed mid-job leaves the message to another; the summary is an upsert, so a repeat writes it once; the rate
limit holds across every worker process; one job at a time per document (the lease).
"""

from __future__ import annotations

import os

from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ConfigDict, Field

from fleet import PermanentError, RateLimit, job
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool
from fleet.shared.providers.chat import ChatClient, Finished

# Summaries started per window, across all workers (SUMMARIES_PER_WINDOW, SUMMARIES_WINDOW_S).
PER_WINDOW = int(os.environ.get("SUMMARIES_PER_WINDOW", "60"))
WINDOW_S = int(os.environ.get("SUMMARIES_WINDOW_S", "60"))


class SummarizeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    document_id: str = Field(min_length=1, max_length=200)
    max_words: int = Field(40, ge=5, le=500)


@job(
    SummarizeJob,
    queue="summaries",
    max_retries=4,
    min_backoff=500,
    max_backoff=30_000,
    time_limit=120_000,
    rate_limit=RateLimit(PER_WINDOW, window_s=WINDOW_S),
    lease="document_id",
)
def summarize(payload: SummarizeJob) -> None:
    """Summarises a stored document through the chat provider and stores the summary."""
    with get_pool().connection() as conn:
        row = conn.execute(
            "select body from summary_documents where document_id = %s", (payload.document_id,)
        ).fetchone()
    if row is None:  # no retry can fix it: a dead letter, retried once the document is stored
        raise PermanentError(f"document {payload.document_id!r} is not stored")
    settings = get_settings()
    prompt = f"Summarise in at most {payload.max_words} words:\n\n{row[0]}"
    summary = ""
    for event in ChatClient(settings).stream([{"role": "user", "content": prompt}]):
        if isinstance(event, Finished):
            summary = event.text
    message = CurrentMessage.get_current_message()
    with get_pool().connection() as conn:
        conn.execute(
            "insert into document_summaries (document_id, summary, model, job_id) values (%s, %s, %s, %s)"
            " on conflict (document_id) do update set summary = excluded.summary, model = excluded.model,"
            " job_id = excluded.job_id, summarized_at = now()",
            (payload.document_id, summary, settings.chat_model_default, message.message_id if message else "direct"),
        )
