"""A user's agent as the user sees it: their profile (which agent, from which template version) and the
last upgrade that reached it, with the agent's billing endpoints and memory blocks read from Letta."""

from __future__ import annotations

from psycopg.rows import dict_row

from fleet.shared.config import Settings
from fleet.shared.db import get_pool
from fleet.shared.errors import FleetError, describe
from fleet.shared.providers.letta import LettaClient
from fleet.shared.redact import redact


def profile_of(user_id: str, settings: Settings) -> dict | None:
    """The profile, or None when the user has no agent yet. `agent` is what Letta holds now (None, with
    `agent_error`, when Letta cannot be asked)."""
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "select user_id::text, letta_agent_id, template_name as template,"
            " template_version as version, updated_at from user_profiles where user_id = %s",
            (user_id,),
        ).fetchone()
        if row is None or row["letta_agent_id"] is None:
            return None
        row["last_upgrade"] = cur.execute(
            "select run_id::text, from_version, to_version, dry_run, status, error, finished_at from agent_upgrades"
            " where user_id = %s order by coalesce(finished_at, started_at) desc nulls last limit 1",
            (user_id,),
        ).fetchone()
    row["agent"], row["agent_error"] = _agent(row["letta_agent_id"], settings)
    return row


def _agent(agent_id: str, settings: Settings) -> tuple[dict | None, str | None]:
    if not settings.letta_api_base_url:
        return None, "LETTA_API_BASE_URL is not set where this is answered"
    letta = LettaClient(settings.model_copy(update={"letta_max_retries": 1}))  # a person waits on this answer
    try:
        agent = letta.get_agent(agent_id)
        blocks = letta.blocks(agent_id)
    except (
        FleetError,
        ValueError,
    ) as e:  # the provider's errors, classified: the profile is answered without the live agent
        return None, redact(f"{type(e).__name__}: {describe(e)}")
    return {
        "id": agent["id"],
        "name": agent.get("name"),
        "model_endpoint": (agent.get("llm_config") or {}).get("model_endpoint"),
        "embedding_endpoint": (agent.get("embedding_config") or {}).get("embedding_endpoint"),
        "blocks": sorted(
            ({"label": b.get("label"), "value": b.get("value"), "limit": b.get("limit")} for b in blocks),
            key=lambda b: str(b["label"]),
        ),
    }, None
