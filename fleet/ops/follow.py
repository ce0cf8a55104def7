"""Following work the fleet does in the background, with a progress bar whose total is known first."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from fleet.ops import queries
from fleet.ops.terminal import progress_bar
from fleet.shared.db import one

T = TypeVar("T")


def wait_until(ready: Callable[[], T], timeout_s: float, interval_s: float = 0.2) -> T | None:
    """ready()'s first true answer, or None after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := ready():
            return value
        time.sleep(interval_s)
    return None


def follow_upgrade_run(run_id: str, label: str, timeout_s: float = 300) -> dict | None:
    """Wait for the run's fan-out (which fixes how many agents it holds), then show its agents finishing.
    Returns the agents by status once the run is finished, None if it is not finished within timeout_s."""
    from fleet.workers.agents.upgrades import counts

    deadline = time.monotonic() + timeout_s
    planned = wait_until(lambda: (p := queries.upgrade_progress(run_id)) and p[0] != "pending" and p, timeout_s)
    if not planned:
        return None
    with progress_bar(label, max(planned[1], 1)) as bar:
        while time.monotonic() < deadline:
            _, _, done, finished = one(queries.upgrade_progress(run_id))
            bar.update(done)
            if finished:
                return counts(run_id)
            time.sleep(0.2)
    return None
