"""What a pgmq row becomes: a dramatiq envelope read back, or a raw JSON job wrapped for its queue's actor;
and, for a row that is neither, the ids its dead letter carries."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from psycopg.types.string import TextLoader

from fleet.shared.payloads import MAX_DEPTH, problem

ENVELOPE_FIELDS = {"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}


class JsonbAsText(TextLoader):
    """Read jsonb as text: the consumer checks size and decodes itself."""


class PgmqMessage(MessageProxy):
    """A delivered message and its pgmq identity. `from_sql` is set by the consumer alone, when it wrapped a
    raw JSON job (not an envelope): nothing in a message's content can set it."""

    def __init__(self, message: dramatiq.Message, pgmq_id: int, read_ct: int, *, from_sql: bool = False) -> None:
        super().__init__(message)
        self.pgmq_id = pgmq_id
        self.read_ct = read_ct
        self.from_sql = from_sql


class Undeliverable(Exception):
    """The row can never become a job: it is dead-lettered and archived."""


def decode(
    queue_name: str, msg_id: int, enqueued_at, body: str, max_bytes: int, actor_for: Callable[[str, Any], str]
) -> tuple[dramatiq.Message, bool]:
    """The message, and whether it was a raw JSON job wrapped here (True) rather than an envelope."""
    if len(body) > max_bytes:
        raise Undeliverable(f"message of {len(body)} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({max_bytes})")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise Undeliverable(f"message is not valid JSON: {e}") from None
    except RecursionError:
        raise Undeliverable(f"message nested too deeply to decode (the limit is {MAX_DEPTH} levels)") from None
    if isinstance(data, dict) and ENVELOPE_FIELDS <= data.keys():
        return _envelope(queue_name, data), False
    return _wrapped(queue_name, msg_id, enqueued_at, data, actor_for), True


def _envelope(queue_name: str, data: dict) -> dramatiq.Message:
    try:
        fields = {k: data[k] for k in ENVELOPE_FIELDS}
        if (
            not isinstance(fields["args"], list)
            or not isinstance(fields["kwargs"], dict)
            or not isinstance(fields["options"], dict)
        ):
            raise TypeError("args must be a list, kwargs and options objects")
        fields["args"] = tuple(fields["args"])
        if (why := problem(fields["args"])) is not None:
            raise ValueError(why)
        if fields["queue_name"] != queue_name:
            raise ValueError(f"envelope names queue {fields['queue_name']!r} but was read from {queue_name!r}")
        return dramatiq.Message(**fields)
    except (TypeError, ValueError) as e:
        raise Undeliverable(f"malformed message envelope: {e}") from None


def _wrapped(
    queue_name: str, msg_id: int, enqueued_at, data: Any, actor_for: Callable[[str, Any], str]
) -> dramatiq.Message:
    """A raw JSON job from SQL or another producer: wrapped for the queue's actor."""
    if not isinstance(data, dict):
        raise Undeliverable(f"a raw message must be a JSON object, got {type(data).__name__}")
    try:
        actor_name = actor_for(queue_name, data)
    except LookupError as e:
        raise Undeliverable(str(e)) from None
    payload = data["payload"] if "actor" in data and isinstance(data.get("payload"), dict) else data
    if (why := problem(payload)) is not None:
        raise Undeliverable(f"raw message refused: {why}")
    return dramatiq.Message(
        queue_name=queue_name,
        actor_name=actor_name,
        args=(payload,),
        kwargs={},
        options={"raw": True},
        message_id=f"pgmq:{queue_name}:{msg_id}",
        message_timestamp=int(float(enqueued_at) * 1000),
    )


def identity(body: str) -> tuple[str | None, str | None, str | None]:
    """The job id, actor and trace id of an undeliverable envelope, when it has them, so its dead letter
    and job.dead event carry the ids its producer knows."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    options = data["options"] if isinstance(data.get("options"), dict) else {}
    message_id, actor_name, trace_id = (
        v if isinstance(v, str) else None
        for v in (data.get("message_id"), data.get("actor_name"), options.get("trace_id"))
    )
    return message_id, actor_name, trace_id
