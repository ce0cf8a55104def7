"""Request signing (GATEWAY_HMAC_KEY): X-Signature is the hex HMAC-SHA256 of
"{X-Timestamp}.{METHOD}.{path}.{body}"; the timestamp (Unix seconds) must be within the window,
and a POST's signature is accepted once (remembered in Postgres, so across every gateway process)."""

from __future__ import annotations

import hashlib
import hmac
import time

from fastapi import Request

from fleet.gateway.errors import ApiError
from fleet.gateway.settings import GatewaySettings
from fleet.gateway.store import Store


def signed_text(timestamp: str, method: str, path: str, body: bytes) -> bytes:
    return f"{timestamp}.{method.upper()}.{path}.".encode() + body


def sign(key: str, timestamp: str, method: str, path: str, body: bytes) -> str:
    return hmac.new(key.encode(), signed_text(timestamp, method, path, body), hashlib.sha256).hexdigest()


def _refused(message: str) -> ApiError:
    return ApiError(401, "bad_signature", message)


async def check_signature(request: Request, body: bytes, settings: GatewaySettings, store: Store) -> None:
    if settings.hmac_key is None:
        return
    signature = request.headers.get("x-signature", "").strip().lower()
    timestamp = request.headers.get("x-timestamp", "").strip()
    if not signature or not timestamp:
        raise _refused("X-Signature and X-Timestamp headers are required")
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        raise _refused("X-Timestamp is not a Unix time in seconds") from None
    if age > settings.hmac_window_s:
        raise _refused(f"X-Timestamp is outside the {settings.hmac_window_s} s window")
    expected = sign(settings.hmac_key.get_secret_value(), timestamp, request.method, request.url.path, body)
    if not hmac.compare_digest(expected, signature):
        raise _refused("X-Signature does not match the request")
    # A request that changes something is accepted once; a read (GET) may be repeated within the window
    # (polling a job twice in one second signs the same text and must not be refused).
    if request.method not in ("GET", "HEAD") and not await store.remember_signature(signature, 2 * settings.hmac_window_s):
        raise _refused("this signature was already used (a replayed request)")
