"""Random UUIDv4 strings in bulk: one urandom call for many ids (uuid.uuid4() costs a syscall each)."""

from __future__ import annotations

import functools
import os

# Each id's version nibble (4) and variant bits (10xx), for the whole buffer at once in one integer.
_KEEP, _SET = bytes.fromhex("ffffffffffff0fff3fffffffffffffff"), bytes.fromhex("00000000000040008000000000000000")


@functools.lru_cache(maxsize=8)
def _masks(n: int) -> tuple[int, int]:
    return int.from_bytes(_KEEP * n, "big"), int.from_bytes(_SET * n, "big")


def uuid4_strings(n: int) -> list[str]:
    keep, set_ = _masks(n)
    r = ((int.from_bytes(os.urandom(16 * n), "big") & keep) | set_).to_bytes(16 * n, "big").hex()
    return [
        f"{r[i : i + 8]}-{r[i + 8 : i + 12]}-{r[i + 12 : i + 16]}-{r[i + 16 : i + 20]}-{r[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]
