"""What a caller may ask for.

Sessions: a verified user's session ids are their own namespace (`u:{sub}:` before the id they send),
so two users' "s1" are two sessions, and no answer tells a user that another user's session exists.

Models and roles: a client names only a configured model (GATEWAY_MODELS, else the family's own list:
CHAT_MODEL_DEFAULT, CHAT_MODELS and the models of CHAT_CONTEXT_WINDOWS, which the workers accept; for
embeddings EMBEDDING_MODEL_DEFAULT and the models of EMBED_MODEL_INPUT_TOKENS), and sends only the
message roles of GATEWAY_CLIENT_ROLES.

Vectors: which vectors an embed request may write. `upsert_vectors` overwrites rows by (source_id, chunk_index)
in tables every caller shares, so a verified user's inline documents are kept to the user's own key space
(`u:{sub}:` before each source_id), and registered sources (`{name}:{row id}` keys, filled from the
operator's tables) are embedded by users only when GATEWAY_USERS_EMBED_SOURCES allows it. Without JWT
(development mode) there are no users to keep apart: ids pass unchanged."""

from __future__ import annotations

from fleet.gateway.auth import Caller
from fleet.gateway.errors import ApiError
from fleet.gateway.models import ChatBody, EmbedBody
from fleet.gateway.settings import GatewaySettings
from fleet.shared.config import Settings

USER_SCOPE = "u:"  # the prefix of every user's key space; MAX_SOURCE_ID is checked after it is added
MAX_SOURCE_ID = 512


def user_prefix(user_id: str) -> str:
    return f"{USER_SCOPE}{user_id}:"


def scoped_source_id(source_id: str, user_id: str) -> str:
    """The caller's own key for source_id: already-scoped ids (as read back from the table) stay as they are."""
    prefix = user_prefix(user_id)
    if source_id.startswith(prefix):
        return source_id
    if source_id.startswith(USER_SCOPE):
        raise ApiError(
            403,
            "source_id_out_of_scope",
            f"source_id {source_id!r} is in another user's key space (a user's ids are {prefix}<id>)",
        )
    if len(prefix) + len(source_id) > MAX_SOURCE_ID:
        raise ApiError(
            422,
            "invalid_request",
            f"source_id has at most {MAX_SOURCE_ID - len(prefix)} characters (the {prefix} prefix counts)",
        )
    return prefix + source_id


def scoped_session_id(session_id: str, caller: Caller) -> str:
    """The stored id of the caller's session (unchanged without verified users)."""
    return session_id if caller.user_id is None else user_prefix(caller.user_id) + session_id


def chat_models(settings: Settings, gw: GatewaySettings) -> list[str]:
    return gw.models or settings.allowed_chat_models()


def embed_models(settings: Settings) -> list[str]:
    return [settings.embedding_model_default, *settings.embed_model_input_tokens]


def _model_allowed(model: str | None, allowed: list[str], setting: str) -> None:
    if model is not None and model not in allowed:
        raise ApiError(
            422,
            "model_not_allowed",
            f"model {model!r} is not configured ({setting}); the models you may name: {', '.join(allowed)}",
        )


def chat_checks(body: ChatBody, settings: Settings, gw: GatewaySettings) -> None:
    """422 for a model that is not configured, or a message role clients may not send."""
    _model_allowed(body.model, chat_models(settings, gw), "GATEWAY_MODELS")
    for i, message in enumerate(body.messages or ()):
        if message.role not in gw.client_roles:
            raise ApiError(
                422,
                "role_not_allowed",
                f"messages[{i}] has role {message.role!r}; clients may send"
                f" {', '.join(gw.client_roles)} (GATEWAY_CLIENT_ROLES)",
            )


def embed_payload(caller: Caller, body: EmbedBody, settings: Settings, gw: GatewaySettings) -> dict:
    """The job's payload for this caller, or an ApiError for what the caller may not write."""
    _model_allowed(body.model, embed_models(settings), "EMBEDDING_MODEL_DEFAULT, EMBED_MODEL_INPUT_TOKENS")
    payload = body.model_dump(exclude_none=True, exclude={"idempotency_key"})
    if caller.user_id is None:
        return payload
    if body.source is not None:
        if not gw.users_embed_sources:
            raise ApiError(
                403,
                "registered_source_refused",
                "embedding a registered source is for the operator"
                " (GATEWAY_USERS_EMBED_SOURCES=false); send inline documents instead",
            )
        return payload
    for doc in payload["documents"]:
        doc["source_id"] = scoped_source_id(doc["source_id"], caller.user_id)
    return payload
