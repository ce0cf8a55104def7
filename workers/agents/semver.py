"""SemVer 2.0.0 parsing and precedence (https://semver.org, section 11): build metadata is ignored,
a pre-release sorts before its release, numeric identifiers compare numerically and before
alphanumeric ones, and a longer pre-release wins when all earlier identifiers are equal.
The same rules are in SQL (fleet_semver_cmp) for the database's own checks."""

from __future__ import annotations

import re
from functools import total_ordering

PATTERN = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


class InvalidVersion(ValueError):
    pass


@total_ordering
class Version:
    def __init__(self, text: str) -> None:
        m = PATTERN.match(text)
        if not m:
            raise InvalidVersion(f"{text!r} is not a SemVer 2.0 version (MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD])")
        self.text = text
        self.core = (int(m[1]), int(m[2]), int(m[3]))
        self.pre = tuple(m[4].split(".")) if m[4] else ()
        self.build = m[5]

    def _key(self):
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.pre)
        # no pre-release sorts after any pre-release of the same core
        return self.core, (1,) if not self.pre else (0, pre)

    def __eq__(self, other) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Version({self.text!r})"
