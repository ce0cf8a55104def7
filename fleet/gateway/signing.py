"""Request signing (GATEWAY_HMAC_KEY): X-Signature is the hex HMAC-SHA256 of the lines

    {X-Timestamp}\\n{METHOD}\\n{path?query as sent}\\n{Authorization}\\n{Idempotency-Key}\\n{body}

(an absent header is an empty line), so the query string, the token and the idempotency key are
covered as well as the body. The timestamp (Unix seconds, digits only) must be within the window, and
a POST's signature is accepted once (remembered in Postgres, so across every gateway process)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from fastapi import Request

from fleet.gateway.errors import ApiError
from fleet.gateway.settings import GatewaySettings
from fleet.gateway.store import Store

TIMESTAMP = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")  # no sign, exponent, nan or inf
SIGNATURE = re.compile(r"[0-9a-f]{64}")


def signed_text(
    timestamp: str, method: str, target: str, body: bytes, authorization: str = "", idempotency_key: str = ""
) -> bytes:
    head = "\n".join((timestamp, method.upper(), target, authorization, idempotency_key, ""))
    return head.encode("latin-1", "replace") + body


def sign(
    key: str,
    timestamp: str,
    method: str,
    target: str,
    body: bytes,
    *,
    authorization: str = "",
    idempotency_key: str = "",
) -> str:
    """The signature of a request; `target` is the path with its query string (`/v1/jobs/x?a=1`)."""
    text = signed_text(timestamp, method, target, body, authorization, idempotency_key)
    return hmac.new(key.encode(), text, hashlib.sha256).hexdigest()


def request_target(request: Request) -> str:
    """The path and query exactly as the client sent them."""
    path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def _refused(message: str) -> ApiError:
    return ApiError(401, "bad_signature", message)


async def check_signature(request: Request, body: bytes, settings: GatewaySettings, store: Store) -> None:
    if settings.hmac_key is None:
        return
    signature = request.headers.get("x-signature", "").strip().lower()
    timestamp = request.headers.get("x-timestamp", "").strip()
    if not signature or not timestamp:
        raise _refused("X-Signature and X-Timestamp headers are required")
    if not TIMESTAMP.fullmatch(timestamp):
        raise _refused("X-Timestamp is not a Unix time in seconds")
    if abs(time.time() - float(timestamp)) > settings.hmac_window_s:
        raise _refused(f"X-Timestamp is outside the {settings.hmac_window_s} s window")
    if not SIGNATURE.fullmatch(signature):
        raise _refused("X-Signature is not a hex HMAC-SHA256 (64 hex digits)")
    expected = sign(
        settings.hmac_key.get_secret_value(),
        timestamp,
        request.method,
        request_target(request),
        body,
        authorization=request.headers.get("authorization", ""),
        idempotency_key=request.headers.get("idempotency-key", ""),
    )
    if not hmac.compare_digest(expected, signature):
        raise _refused("X-Signature does not match the request")
    # A request that changes something is accepted once; a read (GET) may be repeated within the window
    # (polling a job twice in one second signs the same text and must not be refused).
    if request.method not in ("GET", "HEAD") and not await store.remember_signature(
        signature, 2 * settings.hmac_window_s
    ):
        raise _refused("this signature was already used (a replayed request)")
