"""Cohort upgrades: fan a run out to one job per agent, and upgrade one agent by a single PATCH that
never touches its memory, then verify the billing endpoints and every memory block."""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass

import structlog
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from fleet.shared import events
from fleet.shared.capabilities import capabilities_of
from fleet.shared.config import Settings
from fleet.shared.db import get_pool, one
from fleet.shared.errors import DeferredError, PermanentError, classify, describe
from fleet.shared.metrics import metrics
from fleet.shared.providers.letta import LettaClient
from fleet.shared.redact import redact
from fleet.workers.agents.agentfile import parse_agent_file
from fleet.workers.agents.agentview import changes, patch_body
from fleet.workers.agents.creation import billing_endpoint
from fleet.workers.agents.templates import get, is_published

FINAL = ("succeeded", "failed", "skipped", "cancelled")

log = structlog.get_logger(__name__)


def in_canary(user_id: str, percent: float) -> bool:
    """A stable slice of users: the same users stay in a 5% canary on every run."""
    return int(hashlib.sha256(str(user_id).encode()).hexdigest()[:8], 16) % 10_000 < percent * 100


def select_cohort(conn, run: dict) -> list[tuple[str, str, str | None]]:
    """(agent_id, user_id, current version) of the agents the run's cohort names."""
    cohort = run["cohort"] or {}
    rows = conn.execute(
        "select letta_agent_id, user_id::text, template_version from user_profiles"
        " where letta_agent_id is not null and template_name = %s"
        " and (%s::text is null or template_version = %s) and (%s::uuid[] is null or user_id = any(%s::uuid[]))",
        (
            run["template_name"],
            cohort.get("from_version"),
            cohort.get("from_version"),
            cohort.get("user_ids"),
            cohort.get("user_ids"),
        ),
    ).fetchall()
    percent = cohort.get("percent")
    return [r for r in rows if percent is None or in_canary(r[1], float(percent))]


@dataclass(frozen=True)
class HaltPolicy:
    """When a run halts itself: above `failure_rate` failed among at least `min_sample` finished agents.
    None: the settings' UPGRADE_HALT_FAILURE_RATE and UPGRADE_HALT_MIN_SAMPLE."""

    failure_rate: float | None = None
    min_sample: int | None = None


def start_run(
    template: str,
    version: str,
    cohort: dict,
    dry_run: bool,
    client,
    *,
    run_id: str | None = None,
    halt: HaltPolicy = HaltPolicy(),
) -> str:
    """A new run, its fan-out enqueued: through pgmq in SQL (ams_enqueue_upgrade), or by the SDK on Redis.
    A `run_id` that names a run already started returns it and enqueues nothing."""
    with get_pool().connection() as conn:
        if capabilities_of(client.broker).sends_in_transaction:  # fanned out in SQL
            return str(
                one(
                    conn.execute(
                        "select ams_enqueue_upgrade(%s, %s, %s, %s, %s::uuid, %s::real, %s::integer)",
                        (template, version, Jsonb(cohort), dry_run, run_id, halt.failure_rate, halt.min_sample),
                    ).fetchone()
                )[0]
            )
        if not is_published(conn, template, version):
            raise PermanentError(f"template {template}@{version} is not published")
        row = conn.execute(
            "insert into upgrade_runs (id, template_name, to_version, dry_run, cohort,"
            " halt_failure_rate, halt_min_sample) values (coalesce(%s, gen_random_uuid()), %s, %s, %s,"
            " %s, %s, %s) on conflict (id) do nothing returning id",
            (run_id, template, version, dry_run, Jsonb(cohort), halt.failure_rate, halt.min_sample),
        ).fetchone()
    if row is None:  # started before under this id
        return str(run_id)
    client.enqueue("upgrade_fanout", {"run_id": str(row[0])})
    return str(row[0])


def fan_out(run_id: str, client) -> int:
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        run = cur.execute("select * from upgrade_runs where id = %s", (run_id,)).fetchone()
        if run is None:
            raise PermanentError(f"upgrade run {run_id} does not exist")
        if run["status"] in ("completed", "halted"):
            return 0
        cohort = select_cohort(conn, run)
        with conn.transaction():
            conn.execute(
                "insert into agent_upgrades (run_id, agent_id, user_id, from_version, to_version, dry_run)"
                " select %s, a, u::uuid, f, %s, %s from unnest(%s::text[], %s::text[], %s::text[]) as t(a, u, f)"
                " on conflict (run_id, agent_id) do nothing",
                (
                    run_id,
                    run["to_version"],
                    run["dry_run"],
                    [c[0] for c in cohort],
                    [c[1] for c in cohort],
                    [c[2] for c in cohort],
                ),
            )
            conn.execute(
                "update upgrade_runs set status = 'running', counts = %s where id = %s",
                (Jsonb({"total": len(cohort)}), run_id),
            )
    # a retried fan-out enqueues again; upgrade_agent recognises finished and running rows
    client.enqueue_many("upgrade_agent", [{"run_id": str(run_id), "agent_id": c[0]} for c in cohort])
    if not cohort:
        finish_if_done(run_id)
    return len(cohort)


def blocks_fingerprint(blocks: list[dict]) -> list[tuple]:
    return sorted((b.get("label"), b.get("value"), b.get("limit")) for b in blocks)


class LeaseLost(Exception):
    """Another attempt took this agent's upgrade over (this one's heartbeat went quiet): do nothing more."""


class Heartbeat(threading.Thread):
    """Keeps this attempt's lease alive: renews heartbeat_at while the lease is still this attempt's. A beat
    that fails (the database restarting) is logged and tried again next time; one that finds the lease gone
    marks it lost, and the attempt stops before its PATCH."""

    def __init__(self, run_id: str, agent_id: str, lease: str, every_s: float) -> None:
        super().__init__(name="upgrade-heartbeat", daemon=True)
        self.key, self.lease, self.every_s, self.stopped = (run_id, agent_id), lease, every_s, threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                if not self.beat():
                    self.lost = True
                    return
            except Exception as e:  # noqa: BLE001  logged; the next beat tries again, the lease lasts its TTL meanwhile
                log.warning(
                    "upgrade.heartbeat_failed", run_id=self.key[0], agent_id=self.key[1], error=redact(describe(e))
                )

    def beat(self) -> bool:
        """Renew the lease; False when it is no longer this attempt's."""
        with get_pool().connection() as conn:
            return (
                conn.execute(
                    "update agent_upgrades set heartbeat_at = now() where run_id = %s and agent_id = %s"
                    " and status = 'running' and lease = %s",
                    (*self.key, self.lease),
                ).rowcount
                == 1
            )

    def fence(self) -> None:
        """Right before the PATCH: the lease must still be this attempt's (and is renewed, so no other copy can
        take it in the moment the PATCH takes)."""
        if self.lost or not self.beat():
            raise LeaseLost(f"the upgrade of agent {self.key[1]} was taken over by another attempt")

    def stop(self) -> None:
        self.stopped.set()


def upgrade_one(run_id: str, agent_id: str, settings: Settings, trace: dict, *, last_attempt: bool = True) -> str:
    lease = str(uuid.uuid4())
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        with conn.transaction():
            row = cur.execute(
                "select u.*, r.status as run_status, r.template_name,"
                " u.heartbeat_at >= now() - %s * interval '1 second' as lease_live from agent_upgrades u"
                " join upgrade_runs r on r.id = u.run_id where u.run_id = %s and u.agent_id = %s"
                " for update of u",
                (settings.upgrade_stale_after_s, run_id, agent_id),
            ).fetchone()
            if row is None:
                raise PermanentError(f"agent {agent_id} is not part of upgrade run {run_id}")
            if row["status"] in FINAL:
                return row["status"]
            if row["run_status"] == "halted":
                return _finish(cur, row, "cancelled", None, "the run was halted", trace)
            if row["status"] == "running" and row["lease"] is not None and row["lease_live"]:
                raise DeferredError(
                    f"another attempt holds the upgrade of agent {agent_id}",
                    retry_after_s=settings.upgrade_stale_after_s,
                )
            cur.execute(
                "update agent_upgrades set status = 'running', lease = %s, attempts = attempts + 1,"
                " heartbeat_at = now(), started_at = coalesce(started_at, now())"
                " where run_id = %s and agent_id = %s",
                (lease, run_id, agent_id),
            )
    heartbeat = Heartbeat(run_id, agent_id, lease, settings.upgrade_heartbeat_s)
    heartbeat.start()
    try:
        status, change, error = _apply(row, settings, heartbeat.fence)
    except LeaseLost as e:
        log.warning("upgrade.superseded", run_id=run_id, agent_id=agent_id, error=str(e))
        return "superseded"
    except Exception as e:
        if classify(e) != "permanent" and not last_attempt:
            _release(run_id, agent_id, lease)
            raise  # retried; the row stays `running` with its attempts counted
        status, change, error = "failed", None, redact(f"{type(e).__name__}: {describe(e)}")
    finally:
        heartbeat.stop()
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur, conn.transaction():
        result = _finish(cur, row, status, change, error, trace, lease=lease)
        if result == "superseded":  # another copy took the lease meanwhile: its outcome is the one recorded
            log.warning("upgrade.superseded", run_id=run_id, agent_id=agent_id, error="lease lost before the finish")
            return result
        if status == "succeeded" and not row["dry_run"]:
            cur.execute(
                "update user_profiles set template_version = %s, updated_at = now() where letta_agent_id = %s",
                (row["to_version"], agent_id),
            )
    if status == "failed":
        maybe_halt(run_id, settings)
    finish_if_done(run_id)
    return result


def _release(run_id: str, agent_id: str, lease: str) -> None:
    """A failed attempt that will be retried gives its lease up, so the retry need not wait for it to go stale."""
    try:
        with get_pool().connection() as conn:
            conn.execute(
                "update agent_upgrades set lease = null where run_id = %s and agent_id = %s and lease = %s",
                (run_id, agent_id, lease),
            )
    except Exception as e:  # noqa: BLE001  logged; the retry then waits until the lease is stale: slower, still exclusive
        log.warning("upgrade.lease_release_failed", run_id=run_id, agent_id=agent_id, error=redact(describe(e)))


def _apply(row: dict, settings: Settings, fence=lambda: None) -> tuple[str, dict | None, str | None]:
    if row["from_version"] == row["to_version"]:
        return "skipped", None, None
    letta = LettaClient(settings)
    template = parse_agent_file(get(row["template_name"], row["to_version"]))
    endpoint = billing_endpoint(settings, str(row["user_id"]))
    agent = letta.get_agent(row["agent_id"])
    change = changes(agent, template, endpoint)
    if row["dry_run"]:
        return "succeeded", change, None
    before = blocks_fingerprint(letta.blocks(row["agent_id"]))
    if change:  # empty when a redelivered job finds its PATCH already applied: never PATCH twice
        patch = patch_body(agent, template, endpoint, change, lambda name: _tool_id_of(agent, letta, name))
        fence()  # still this attempt's agent: no second copy PATCHes
        letta.update_agent(row["agent_id"], patch)
    after_agent = letta.get_agent(row["agent_id"])
    after = blocks_fingerprint(letta.blocks(row["agent_id"]))
    if (
        after_agent["llm_config"].get("model_endpoint") != endpoint
        or after_agent["embedding_config"].get("embedding_endpoint") != endpoint
    ):
        return "failed", change, "the billing endpoints are not the proxy after the upgrade"
    if after != before:
        return "failed", change, "memory blocks changed during the upgrade (label, value or limit differ)"
    remaining = changes(after_agent, template, endpoint)
    if remaining:
        return "failed", change, f"fields still differ after the PATCH: {', '.join(sorted(remaining))}"
    return "succeeded", change, None


def _tool_id_of(agent: dict, letta: LettaClient, name: str) -> str:
    for tool in agent.get("tools") or []:
        if tool["name"] == name:
            return tool["id"]
    return letta.find_tool_id(name)


def _finish(
    cur, row: dict, status: str, change: dict | None, error: str | None, trace: dict, *, lease: str | None = None
) -> str:
    """Records the final status; with a lease, only while it is still this attempt's ("superseded" if not)."""
    finished = cur.execute(
        "update agent_upgrades set status = %s, diff = %s, error = %s, finished_at = now()"
        " where run_id = %s and agent_id = %s and status not in ('succeeded', 'failed', 'skipped', 'cancelled')"
        " and (%s::text is null or lease = %s)",
        (status, Jsonb(change) if change is not None else None, error, row["run_id"], row["agent_id"], lease, lease),
    )
    if lease is not None and finished.rowcount == 0:
        return "superseded"
    events.emit(
        "upgrade.agent",
        **trace,
        run_id=str(row["run_id"]),
        agent_id=row["agent_id"],
        status=status,
        error=error,
        changed=sorted(change or {}),
    )
    metrics().upgrades.labels(status, "dry_run" if row["dry_run"] else "apply").inc()
    return status


def maybe_halt(run_id: str, settings: Settings) -> bool:
    """Halt a run whose failure rate passed the threshold after the minimum sample."""
    with get_pool().connection() as conn, conn.transaction():
        done, failed, rate, sample = one(
            conn.execute(
                "select count(*) filter (where u.status in ('succeeded', 'failed')),"
                " count(*) filter (where u.status = 'failed'), r.halt_failure_rate, r.halt_min_sample"
                " from upgrade_runs r left join agent_upgrades u on u.run_id = r.id where r.id = %s"
                " group by r.id",
                (run_id,),
            ).fetchone()
        )
        rate = settings.upgrade_halt_failure_rate if rate is None else rate
        sample = settings.upgrade_halt_min_sample if sample is None else sample
        if done < sample or failed / done <= rate:
            return False
        conn.execute("update upgrade_runs set status = 'halted' where id = %s and status = 'running'", (run_id,))
        conn.execute(
            "update agent_upgrades set status = 'cancelled', finished_at = now()"
            " where run_id = %s and status = 'pending'",
            (run_id,),
        )
    return True


def halt(run_id: str) -> int:
    with get_pool().connection() as conn, conn.transaction():
        conn.execute(
            "update upgrade_runs set status = 'halted' where id = %s and status in ('pending', 'running')", (run_id,)
        )
        return conn.execute(
            "update agent_upgrades set status = 'cancelled', finished_at = now()"
            " where run_id = %s and status = 'pending'",
            (run_id,),
        ).rowcount


def counts(run_id: str) -> dict[str, int]:
    with get_pool().connection() as conn:
        return dict(
            conn.execute(
                "select status, count(*) from agent_upgrades where run_id = %s group by status", (run_id,)
            ).fetchall()
        )


def finish_if_done(run_id: str) -> None:
    with get_pool().connection() as conn, conn.transaction():
        left = one(
            conn.execute(
                "select count(*) from agent_upgrades where run_id = %s and status in ('pending', 'running')", (run_id,)
            ).fetchone()
        )[0]
        if left:
            return
        by_status: dict[str, int] = dict(
            conn.execute(
                "select status, count(*) from agent_upgrades where run_id = %s group by status", (run_id,)
            ).fetchall()
        )
        updated = conn.execute(
            "update upgrade_runs set status = case when status = 'halted' then 'halted' else 'completed' end,"
            " counts = counts || %s, finished_at = now() where id = %s and finished_at is null returning status",
            (Jsonb(by_status), run_id),
        ).fetchone()
    if updated:
        events.emit("upgrade.done", run_id=str(run_id), status=updated[0], counts=by_status)


def requeue_stale(settings: Settings, client) -> int:
    """Attempts whose heartbeat went quiet (their worker died) go back to pending and to the queue."""
    with get_pool().connection() as conn, conn.transaction():
        rows = conn.execute(
            "update agent_upgrades set status = 'pending', lease = null where status = 'running'"
            " and heartbeat_at < now() - %s * interval '1 second' returning run_id::text, agent_id",
            (settings.upgrade_stale_after_s,),
        ).fetchall()
    if rows:
        client.enqueue_many("upgrade_agent", [{"run_id": r, "agent_id": a} for r, a in rows])
    return len(rows)


def run_state(run_id: str, agents_limit: int = 0) -> dict | None:
    """A run as its operator sees it: what it upgrades to, its policy, its status, its counts by agent status
    (live while it runs) and, with `agents_limit`, that many of its agents with their diff and error."""
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        run = cur.execute(
            "select id::text as run_id, template_name as template, to_version as version, dry_run, cohort, status,"
            " (counts->>'total')::int as total, halt_failure_rate, halt_min_sample, created_at, finished_at"
            " from upgrade_runs where id = %s",
            (run_id,),
        ).fetchone()
        if run is None:
            return None
        run["counts"] = dict(
            conn.execute(
                "select status, count(*) from agent_upgrades where run_id = %s group by status", (run_id,)
            ).fetchall()
        )
        if agents_limit > 0:
            run["agents"] = cur.execute(
                "select agent_id, user_id::text, from_version, status, diff, error, attempts, finished_at"
                " from agent_upgrades where run_id = %s order by agent_id limit %s",
                (run_id, agents_limit),
            ).fetchall()
    run["finished"] = run["finished_at"] is not None
    return run
