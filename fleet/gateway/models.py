"""Request bodies: the job models the workers validate with, unknown fields refused."""

from __future__ import annotations

from pydantic import ConfigDict, Field, ValidationError

from fleet.shared.jobs import ChatJob, EmbedJob

from fleet.gateway.errors import InvalidBody

SESSION_SCOPE_CHARS = 39  # "u:{uuid}:" before a verified user's session id (see tenancy.scoped_session_id)


class ChatBody(ChatJob):
    model_config = ConfigDict(extra="forbid", title="ChatRequest")
    session_id: str = Field(min_length=1, max_length=200 - SESSION_SCOPE_CHARS,
                            description="the caller's own session id (each user has a namespace of their own)")
    user_id: None = Field(None, description="not accepted in the body: the user is the token's sub")


class EmbedBody(EmbedJob):
    model_config = ConfigDict(extra="forbid", title="EmbedRequest")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


def _nul_at(value, where: tuple = ()) -> tuple | None:
    """Where a NUL character is, in any string or key of a parsed body (PostgreSQL text cannot hold one)."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in str(key):
                return (*where, key)
            if (found := _nul_at(item, (*where, key))) is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _nul_at(item, (*where, i))) is not None:
                return found
    return None


def parse(model, raw: bytes):
    if not raw.strip():
        raise InvalidBody([{"type": "json_invalid", "loc": ("body",), "msg": "empty body",
                            "ctx": {"error": "the body is empty"}}])
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        raise InvalidBody(e.errors(include_url=False)) from None
    if (where := _nul_at(body.model_dump())) is not None:
        raise InvalidBody([{"type": "string_nul", "loc": ("body", *where),
                            "msg": "a NUL character (\\u0000) is not accepted in a string"}])
    return body
