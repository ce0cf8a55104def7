"""Random UUIDv4 strings in bulk: one urandom call for many ids (uuid.uuid4() costs a syscall each)."""

from __future__ import annotations

import os

_VARIANT = "89ab89ab89ab89ab"


def uuid4_strings(n: int) -> list[str]:
    r = os.urandom(16 * n).hex()
    return [
        f"{r[i:i + 8]}-{r[i + 8:i + 12]}-4{r[i + 13:i + 16]}-{_VARIANT[int(r[i + 16], 16)]}{r[i + 17:i + 20]}-{r[i + 20:i + 32]}"
        for i in range(0, 32 * n, 32)
    ]
