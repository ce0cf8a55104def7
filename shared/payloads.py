"""What any job payload must be, beyond its actor's model: nested at most MAX_DEPTH deep, free of NUL
characters, which Postgres text and jsonb cannot store, and of NaN and infinite numbers, which JSON has not.
Checked where input enters (the SDK at enqueue, the pgmq consumer for raw messages, every actor), so it is
refused with a reason there.
`storable` makes text that must be kept anyway (events, dead letters) safe for Postgres."""

from __future__ import annotations

import math
import re
from typing import Any

MAX_DEPTH = 64
_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def problem(payload: Any) -> str | None:
    """Why `payload` cannot be a job, or None. Iterative, so any depth is safe to inspect."""
    return None if _plainly_fine(payload) else _described(payload)


def _plainly_fine(payload: Any) -> bool:
    """The check without the paths, for the common case (every enqueue runs it): True when the payload is
    made of exact JSON types and has none of the problems; False sends it to _described, which names the
    problem or finds none (a subclass or another type is left to it)."""
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        kind = type(value)
        if kind is dict:
            items = value.items()
        elif kind is list or kind is tuple:
            items = enumerate(value)
        elif kind is str:
            if "\x00" in value:
                return False
            continue
        elif kind is float:
            if not math.isfinite(value):
                return False
            continue
        elif kind is int or kind is bool or value is None:
            continue
        else:
            return False
        if depth > MAX_DEPTH:
            return False
        for key, item in items:
            if type(key) is str and "\x00" in key:
                return False
            if type(item) is str:
                if "\x00" in item:
                    return False
            elif not (type(item) is int or item is None):
                stack.append((item, depth + 1))
    return True


def _described(payload: Any) -> str | None:
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
