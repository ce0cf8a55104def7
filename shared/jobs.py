"""The payloads of the jobs the fleet's clients enqueue (chat, embed): defined here, apart from the
actors, so that a client (the gateway) validates with the same models without importing the workers
(whose actors need a broker)."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

TARGET_TABLES = ("vector_documents", "code_vectors")  # where inline documents may be embedded


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class ChatJob(BaseModel):
    """`content` (the next user message; history comes from the session) or a full `messages` list."""

    model_config = ConfigDict(extra="forbid")
    session_id: str = Field(min_length=1, max_length=200)
    content: str | None = Field(default=None, min_length=1, max_length=200_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=500)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=32_000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    user_id: UUID | None = None

    @model_validator(mode="after")
    def _one_input(self) -> ChatJob:
        if (self.content is None) == (self.messages is None):
            raise ValueError("give either content or messages")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last of messages must be the user's")
        return self


class InlineDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_id: str = Field(min_length=1, max_length=512)
    chunk_index: int = Field(default=0, ge=0, le=1_000_000)
    content: str = Field(min_length=1, max_length=200_000)
    metadata: dict[Any, Any] = Field(default_factory=dict)


class EmbedJob(BaseModel):
    """Either inline `documents` (into `table`), or `source` + `ids` naming rows of a registered source."""

    model_config = ConfigDict(extra="forbid")
    documents: list[InlineDocument] | None = Field(default=None, min_length=1, max_length=10_000)
    table: Literal[TARGET_TABLES] | None = None  # type: ignore[valid-type]
    source: str | None = Field(default=None, min_length=1, max_length=100)
    ids: list[str | int] | None = Field(default=None, min_length=1, max_length=10_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_kind(self) -> EmbedJob:
        if (self.documents is None) == (self.source is None):
            raise ValueError("give either documents, or source and ids")
        if self.source is not None and self.ids is None:
            raise ValueError("a source job needs ids")
        if self.source is not None and self.table is not None:
            raise ValueError("a source's target table comes from EMBED_SOURCES, not from the job")
        return self
