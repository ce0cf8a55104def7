"""Fan-out of a cohort upgrade to 100,000 agents: run row, cohort selection, 100,000 agent_upgrades rows
and 100,000 upgrade_agent jobs enqueued.

    python -m bench.upgrade [--agents N]
"""

from __future__ import annotations

import argparse
import time
import uuid

from fleet.shared.client import FleetClient
from fleet.shared.db import get_pool
from fleet.workers.agents.agentfile import parse_agent_file
from fleet.workers.agents.templates import publish
from fleet.workers.agents.upgrades import fan_out

TEMPLATE = {
    "agents": [
        {
            "name": "bench",
            "system": "s",
            "llm_config": {"model": "m", "model_endpoint_type": "openai", "context_window": 8000},
            "embedding_config": {"embedding_endpoint_type": "openai", "embedding_model": "e", "embedding_dim": 1024},
        }
    ]
}


def main() -> None:
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=100_000)
    a = p.parse_args()
    parse_agent_file(TEMPLATE)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", TEMPLATE)
    publish(name, "1.1.0", TEMPLATE)
    client = FleetClient()
    client.broker.declare_queue("upgrade_agents")
    with get_pool().connection() as conn:
        conn.execute(
            "insert into user_profiles (user_id, letta_agent_id, template_name, template_version)"
            " select gen_random_uuid(), %s || g, %s, '1.0.0' from generate_series(1, %s) g",
            (f"{name}-agent-", name, a.agents),
        )
        run = str(
            conn.execute(
                "insert into upgrade_runs (template_name, to_version, dry_run) values (%s, '1.1.0', true) returning id",
                (name,),
            ).fetchone()[0]
        )
    try:
        t = time.perf_counter()
        n = fan_out(run, client)
        elapsed = time.perf_counter() - t
    finally:
        with get_pool().connection() as conn:
            conn.execute("delete from pgmq.q_upgrade_agents where message->'args'->0->>'run_id' = %s", (run,))
            conn.execute("delete from agent_upgrades where run_id = %s", (run,))
            conn.execute("delete from upgrade_runs where id = %s", (run,))
            conn.execute("delete from user_profiles where template_name = %s", (name,))
        client.broker.close()
    print(f"upgrade_fanout_agents: {n}")
    print(f"upgrade_fanout_s: {elapsed:.2f}")
    print(f"upgrade_fanout_agents_per_s: {n / elapsed:.0f}")


if __name__ == "__main__":
    main()
