"""Secret redaction for everything the fleet writes: logs, events, dead letters, metrics."""

from __future__ import annotations

import re
from typing import Any

from .config import get_settings

MASK = "[redacted]"
_PATTERNS = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)(api[_-]?key|token|secret|password|passwd)(\"?\s*[:=]\s*\"?)[^\s\"',;&]+"),
    re.compile(r"(?i)(postgres(?:ql)?|redis|rediss)://([^:/@\s]*):([^@\s]+)@"),
]


def _known_secrets() -> list[str]:
    try:
        return get_settings().secrets()
    except Exception:  # settings invalid: patterns still apply
        return []


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


def redact_value(value: Any) -> Any:
    """Redact strings anywhere inside JSON-like data."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value
