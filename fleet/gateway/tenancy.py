"""Which vectors an embed request may write. `upsert_vectors` overwrites rows by (source_id, chunk_index)
in tables every caller shares, so a verified user's inline documents are kept to the user's own key space
(`u:{sub}:` before each source_id), and registered sources (`{name}:{row id}` keys, filled from the
operator's tables) are embedded by users only when GATEWAY_USERS_EMBED_SOURCES allows it. Without JWT
(development mode) there are no users to keep apart: ids pass unchanged."""

from __future__ import annotations

from fleet.gateway.auth import Caller
from fleet.gateway.errors import ApiError
from fleet.gateway.models import EmbedBody
from fleet.gateway.settings import GatewaySettings

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
        raise ApiError(403, "source_id_out_of_scope", f"source_id {source_id!r} is in another user's key space"
                       f" (a user's ids are {prefix}<id>)")
    if len(prefix) + len(source_id) > MAX_SOURCE_ID:
        raise ApiError(422, "invalid_request", f"source_id has at most {MAX_SOURCE_ID - len(prefix)} characters"
                       f" (the {prefix} prefix counts)")
    return prefix + source_id


def embed_payload(caller: Caller, body: EmbedBody, gw: GatewaySettings) -> dict:
    """The job's payload for this caller, or an ApiError for what the caller may not write."""
    payload = body.model_dump(exclude_none=True, exclude={"idempotency_key"})
    if caller.user_id is None:
        return payload
    if body.source is not None:
        if not gw.users_embed_sources:
            raise ApiError(403, "registered_source_refused", "embedding a registered source is for the operator"
                           " (GATEWAY_USERS_EMBED_SOURCES=false); send inline documents instead")
        return payload
    for doc in payload["documents"]:
        doc["source_id"] = scoped_source_id(doc["source_id"], caller.user_id)
    return payload
