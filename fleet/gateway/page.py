"""The development chat page at `/` (GATEWAY_DEV=true): plain HTML and JavaScript."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def chat_page() -> str:
    return (Path(__file__).parent / "static" / "chat.html").read_text()
