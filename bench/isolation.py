"""A soak's own FLEET_HOME and environment, restored afterwards (bench/soak.py, soak_reconnect.py, soak_pressure.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def isolated_home(broker: str, name: str) -> Iterator[Path]:
    """A FLEET_HOME of its own and no inherited database, Redis, metrics directory or signing key; the
    environment and settings as they were afterwards."""
    home = Path(tempfile.mkdtemp(prefix=f"fleet-{name}-{broker}-"))
    saved_env = dict(os.environ)
    os.environ.update({"FLEET_HOME": str(home), "FLEET_BROKER": broker})
    for var in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "FLEET_SIGNING_KEY"):
        os.environ.pop(var, None)
    from fleet.shared.config import reset_settings

    reset_settings()
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        reset_settings()
        shutil.rmtree(home, ignore_errors=True)
