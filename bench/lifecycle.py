"""Memory lifecycle on 1,000,000 memories: memories (rows) examined per second and actions applied per second.

python -m bench.lifecycle [--rows N]
"""

from __future__ import annotations

import argparse
import time
import uuid

from fleet.shared.db import get_pool
from fleet.workers.lifecycle.actions import run_lifecycle


def main() -> None:
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    a = p.parse_args()
    project = f"bench-{uuid.uuid4().hex[:8]}"
    with get_pool().connection() as conn:
        t = time.perf_counter()
        # a mix: 10% past their expiry, last access spread over 90 days, 1% pinned, confidence spread
        conn.execute(
            "insert into memories (project_id, type, expires_at, last_accessed_at, confidence, pinned)"
            " select %s, (array['semantic', 'episodic', 'procedural'])[1 + g %% 3],"
            " case when g %% 10 = 0 then now() - interval '1 day' end,"
            " now() - (g %% 90) * interval '1 day' - interval '1 hour', 0.2 + (g %% 80) / 100.0, g %% 100 = 0"
            " from generate_series(1, %s) g",
            (project, a.rows),
        )
        conn.execute("analyze memories")
        seeded = time.perf_counter() - t
    try:
        t = time.perf_counter()
        dry = run_lifecycle(
            project=project, dry_run=True, actions=["expire", "archive", "decay"], enqueue=lambda _: None
        )
        dry_s = time.perf_counter() - t
        t = time.perf_counter()
        result = run_lifecycle(project=project, actions=["expire", "archive", "decay"], enqueue=lambda _: None)
        elapsed = time.perf_counter() - t
    finally:
        with get_pool().connection() as conn:
            conn.execute(
                "delete from memory_lifecycle_actions a using memories m"
                " where a.memory_id = m.id and m.project_id = %s",
                (project,),
            )
            conn.execute("delete from memories where project_id = %s", (project,))
    applied = sum(result.counts.values())
    assert dry.counts == result.counts, (dry.counts, result.counts)
    print(f"lifecycle_rows: {a.rows}")
    print(f"lifecycle_seed_s: {seeded:.1f}")
    print(f"lifecycle_rows_examined_per_s: {a.rows / elapsed:.0f}")  # each row once, for all three actions
    print(f"lifecycle_applied_per_s: {applied / elapsed:.0f}")
    print(f"lifecycle_applied: {applied}")
    print(f"lifecycle_dry_run_s: {dry_s:.1f}")
    print(f"lifecycle_run_s: {elapsed:.1f}")


if __name__ == "__main__":
    main()
