"""What any job payload must be, beyond its actor's model: nested at most MAX_DEPTH deep, free of NUL
characters, which Postgres text and jsonb cannot store, and of NaN and infinite numbers, which JSON has not. Checked where input enters (the SDK at
enqueue, the pgmq consumer for raw messages, every actor), so it is refused with a reason there.
`storable` makes text that must be kept anyway (events, dead letters) safe for Postgres."""

from __future__ import annotations

import math
import re
from typing import Any

MAX_DEPTH = 64
_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def problem(payload: Any) -> str | None:
    """Why `payload` cannot be a job, or None. Iterative, so any depth is safe to inspect."""
    stack = [(payload, 1, "$")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return f"a NUL character at {path} (Postgres cannot store it)"
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                return f"{value} at {path} (JSON has no NaN or infinite numbers)"
            continue
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        else:
            continue
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        for key, item in items:
            if isinstance(key, str) and "\x00" in key:
                return f"a NUL character in a key at {path}"
            stack.append((item, depth + 1, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"))
    return None


def storable(json_text: str) -> str:
    """JSON text that jsonb accepts: an escaped NUL becomes U+FFFD (the replacement character)."""
    if "\\u0000" not in json_text:  # the common case, without the regex
        return json_text
    return _ESCAPED_NUL.sub(r"\1\\ufffd", json_text)


def storable_text(text: str) -> str:
    return text.replace("\x00", "\ufffd")
