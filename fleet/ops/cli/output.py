"""How the commands print: JSON for scripts; tables for people (rich at a terminal, plain text otherwise)."""

from __future__ import annotations

import json

from fleet.ops.terminal import print_table

__all__ = ["print_json", "print_table"]


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))
