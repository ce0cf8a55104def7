"""How the commands print: JSON for scripts; tables for people (rich at a terminal, plain text otherwise)."""

from __future__ import annotations

import json
import sys

from fleet.ops.terminal import print_table

__all__ = ["print_json", "print_table", "report_cut"]


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def report_cut(command: str, shown: int, matching: int | None, what: str) -> None:
    """That a limit cut the result (`matching` None: by how much is not known), on standard error so that
    JSON on standard output stays whole."""
    if matching is None:
        print(f"{command}: --limit cut the result: the first {shown} {what}, and there are more", file=sys.stderr)
    elif matching > shown:
        print(f"{command}: --limit cut the result: {shown} of {matching} matching {what}", file=sys.stderr)
