"""Secret redaction for everything the fleet writes: logs, events, dead letters, metrics."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from fleet.shared.config import get_settings

MASK = "[redacted]"
_PATTERNS = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)(api[_-]?key|token|secret|password|passwd)(\"?\s*[:=]\s*\"?)[^\s\"',;&]+"),
    re.compile(r"(?i)(postgres(?:ql)?|redis|rediss)://([^:/@\s]*):([^@\s]+)@"),
]


_secrets_of: tuple[object, list[str]] | None = None  # (the settings object, its secrets): redact() runs per event


def _known_secrets() -> list[str]:
    global _secrets_of
    try:
        settings = get_settings()
    except Exception:  # noqa: BLE001  redact runs in error handlers and must not raise; settings invalid: patterns still apply
        return []
    cached = _secrets_of
    if cached is None or cached[0] is not settings:  # new settings (reset_settings) are read again
        cached = _secrets_of = (settings, settings.secrets())
    return cached[1]


def redact(text: str) -> str:
    if not text:
        return text
    for secret in _known_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _PATTERNS[1].sub(MASK, text)
    text = _PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _PATTERNS[3].sub(lambda m: f"{m.group(1)}://{m.group(2)}:{MASK}@", text)
    return text


# A key names a secret when, lower-cased and without separators, it is one of these or ends with a suffix
# (db_password, client_secret, access_token, x-api-key). Not "tokens" (token counts) nor "idempotency_key".
_SECRET_KEYS = {"key", "auth", "pwd", "pass", "credential", "credentials", "cookie", "setcookie", "dsn"}
_SECRET_SUFFIXES = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "secrets",
    "token",
    "apikey",
    "accesskey",
    "secretkey",
    "privatekey",
    "signingkey",
    "authorization",
    "credentials",
)


def is_secret_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    return _is_secret_name(key)


@lru_cache(maxsize=4096)  # the keys of events and logs are a small set: decide each once
def _is_secret_name(key: str) -> bool:
    name = re.sub(r"[^a-z0-9]", "", key.lower())
    return name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES)


def redact_value(value: Any) -> Any:
    """Redact strings anywhere inside JSON-like data, and mask whatever sits under a secret-looking key."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(k) and v not in (None, "") else redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value  # numbers, booleans, None: nothing to redact
