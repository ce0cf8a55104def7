"""Request bodies: the job models the workers validate with, unknown fields refused."""

from __future__ import annotations

from pydantic import ConfigDict, Field, ValidationError

from fleet.shared.jobs import ChatJob, EmbedJob

from fleet.gateway.errors import InvalidBody


class ChatBody(ChatJob):
    model_config = ConfigDict(extra="forbid", title="ChatRequest")
    user_id: None = Field(None, description="not accepted in the body: the user is the token's sub")


class EmbedBody(EmbedJob):
    model_config = ConfigDict(extra="forbid", title="EmbedRequest")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


def parse(model, raw: bytes):
    if not raw.strip():
        raise InvalidBody([{"type": "json_invalid", "loc": ("body",), "msg": "empty body",
                            "ctx": {"error": "the body is empty"}}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise InvalidBody(e.errors(include_url=False)) from None
