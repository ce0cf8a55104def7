"""The dead-letter store: jobs that will not succeed, with the reason, kept for inspection and retry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from fleet.shared.db import get_pool, one
from fleet.shared.events import as_uuid, emit
from fleet.shared.payloads import storable, storable_text
from fleet.shared.redact import MASK, redact, redact_value


@dataclass
class DeadLetter:
    queue: str
    actor: str | None
    message_id: str | None
    message: dict | None
    reason: str
    error_class: str | None = None
    error: str | None = None
    attempts: int = 0
    trace_id: Any = None
    raw: str | None = None


def _stored_message(message: dict | None) -> tuple[Jsonb | None, str | None]:
    """The message as jsonb (redacted, NULs replaced), or, when it is too deep to walk, as raw text."""
    if message is None:
        return None, None
    try:
        return Jsonb(redact_value(message), dumps=lambda v: storable(json.dumps(v))), None
    except RecursionError:
        return None, storable_text(redact(json.dumps(message, default=str)[:10_000]))


def record_refused_input(message, payload: dict, part: str, reason: str) -> int:
    """One input of a job that the provider refuses even alone (the rest of the job is stored): a dead letter
    of its own, as a job of the same actor with `payload` (that input only), to retry once fixed. `part` names
    the input in the letter's id and reason."""
    letter = message.asdict() | {"args": [payload], "message_id": f"{message.message_id}/{part}"}
    return record_dead_letter(
        DeadLetter(
            queue=message.queue_name,
            actor=message.actor_name,
            message_id=letter["message_id"],
            message=letter,
            reason=f"permanent error: InputTooLarge: {part}: {reason}",
            error_class="InputTooLarge",
            error=reason,
            attempts=message.options.get("retries", 0) + 1,
            trace_id=message.options.get("trace_id"),
        )
    )


def record_dead_letter(dl: DeadLetter) -> int:
    reason, error = storable_text(redact(dl.reason)), storable_text(redact(dl.error or ""))
    message, raw = _stored_message(dl.message)
    if dl.raw:
        raw = storable_text(redact(dl.raw))
    with get_pool().connection() as conn:
        row = one(
            conn.execute(
                "insert into dead_letters"
                " (queue, actor, message_id, message, raw, reason, error_class, error, attempts, trace_id)"
                " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) returning id",
                (
                    dl.queue,
                    dl.actor,
                    dl.message_id,
                    message,
                    raw,
                    reason,
                    dl.error_class,
                    error or None,
                    dl.attempts,
                    as_uuid(dl.trace_id),
                ),
            ).fetchone()
        )
    emit(
        "job.dead",
        trace_id=dl.trace_id,
        job_id=dl.message_id,
        queue=dl.queue,
        actor=dl.actor,
        reason=reason,
        error_class=dl.error_class,
        attempts=dl.attempts,
        dead_letter_id=row[0],
    )
    return row[0]


@dataclass(frozen=True)
class Selection:
    """Which dead letters an action applies to: those matching every filter given. `list`, `retry` and
    `purge` take the same selection, so what `fleet dlq list` shows is what the others touch."""

    ids: tuple[int, ...] = ()
    queue: str | None = None
    error_class: str | None = None
    older_than_s: float | None = None
    newer_than_s: float | None = None
    include_retried: bool = False

    def where(self) -> tuple[str, list]:
        where: list[str] = ["true"]
        params: list[object] = []
        if self.ids:
            where.append("id = any(%s)")
            params.append(list(self.ids))
        if self.queue:
            where.append("queue = %s")
            params.append(self.queue)
        if self.error_class:
            where.append("error_class = %s")
            params.append(self.error_class)
        if self.older_than_s is not None:
            where.append("created_at < now() - %s * interval '1 second'")
            params.append(self.older_than_s)
        if self.newer_than_s is not None:
            where.append("created_at >= now() - %s * interval '1 second'")
            params.append(self.newer_than_s)
        if not self.include_retried:
            where.append("retried_at is null")
        return " and ".join(where), params


SUMMARY_COLUMNS = "id, queue, actor, message_id, reason, error_class, attempts, trace_id, created_at, retried_at"


def list_dead_letters(selection: Selection = Selection(), *, limit: int | None = 100) -> list[dict]:
    """The selected dead letters, newest first, at most `limit` of them (None: all)."""
    where, params = selection.where()
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"select {SUMMARY_COLUMNS} from dead_letters where {where} order by id desc limit %s", [*params, limit]
        ).fetchall()


def count_dead_letters(selection: Selection = Selection()) -> int:
    where, params = selection.where()
    with get_pool().connection() as conn:
        return one(conn.execute(f"select count(*) from dead_letters where {where}", params).fetchone())[0]


def selected_ids(selection: Selection, *, limit: int | None = None) -> list[int]:
    """The ids of the selected dead letters, oldest first, at most `limit` of them (None: all)."""
    where, params = selection.where()
    with get_pool().connection() as conn:
        rows = conn.execute(f"select id from dead_letters where {where} order by id limit %s", [*params, limit])
        return [r[0] for r in rows.fetchall()]


def get_dead_letter(dl_id: int) -> dict | None:
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("select * from dead_letters where id = %s", (dl_id,)).fetchone()


def claim_for_retry(ids: list[int]) -> list[dict]:
    """Marks those of `ids` not yet retried as retried and returns them whole: two operators retrying the
    same dead letters at once re-enqueue each of them once. A claimed letter that is not re-enqueued after
    all is handed back with `release`."""
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "update dead_letters set retried_at = now() where id = any(%s) and retried_at is null returning *", (ids,)
        ).fetchall()


def release(ids: list[int]) -> None:
    if ids:
        with get_pool().connection() as conn:
            conn.execute("update dead_letters set retried_at = null where id = any(%s)", (ids,))


def purge_dead_letters(selection: Selection) -> int:
    """Deletes the selected dead letters for good; returns how many."""
    where, params = selection.where()
    with get_pool().connection() as conn:
        return conn.execute(f"delete from dead_letters where {where}", params).rowcount


def payload_of(row: dict) -> tuple[str, str | None, Any]:
    """(queue, actor, payload) to enqueue again: the original message's argument, or the raw JSON."""
    message = row.get("message")
    if message and message.get("args"):
        return row["queue"], message.get("actor_name"), message["args"][0]
    if row.get("raw"):
        return row["queue"], row.get("actor"), json.loads(row["raw"])
    raise ValueError(f"dead letter {row['id']} has no payload to retry")


def masked_fields(payload: Any, path: str = "$") -> list[str]:
    """Where the stored payload holds a value that redaction masked when it was dead-lettered: enqueued
    again, the job would receive the mask instead of the value, so such a dead letter is not retried."""
    if isinstance(payload, dict):
        return [f for k, v in payload.items() for f in masked_fields(v, f"{path}.{k}")]
    if isinstance(payload, list):
        return [f for i, v in enumerate(payload) for f in masked_fields(v, f"{path}[{i}]")]
    return [path] if isinstance(payload, str) and MASK in payload else []
