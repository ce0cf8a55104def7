"""Fixtures for `make conformance`: the same embedded PostgreSQL, Redis and real worker processes as
`make test` (imported from tests/conftest.py), with real servers in place of the simulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import services  # noqa: F401  (a fixture, used by name)

CACHE = Path(os.environ.get("FLEET_CONFORMANCE_CACHE", Path.home() / ".cache" / "fleet-conformance"))


@pytest.fixture(scope="session")
def cache() -> Path:
    """Where install.sh put the servers' virtualenvs."""
    return CACHE
