"""The soak's verdict: what a run proved and its problems (a planted secret found anywhere, a provider
called more often than the retries allow, jobs not final, a scheduler or worker group that died)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

SECRET_KEY = "sk-soak-planted-secret-6f1d2c9a8b7e"  # must never appear in logs, events, dead letters, metrics


@dataclass
class Outcome:
    broker: str
    faults: bool
    chaos_on: bool
    settled: bool
    enqueued_s: float
    settle_s: float
    time_limit_s: float


def soak_report(
    work, chaos, o: Outcome, scheduler: subprocess.Popen, home: Path, logs: Path, sim_url: str, env: dict
) -> dict:
    """What the run proved, and its problems (each a reason for the soak to fail)."""
    from fleet.shared.db import connect
    from tests.workload import problems

    patches = httpx.get(f"{sim_url}/_sim/letta").json()["patches"]
    report = work.report(patches)
    report.update(
        {
            "broker": o.broker,
            "faults": o.faults,
            "jobs_enqueued": sum(work.enqueued.values()),
            "settled": o.settled,
            "enqueue_s": round(o.enqueued_s, 1),
            "settle_s": round(o.settle_s, 1),
            "kills": chaos.kills,
            "groups_died": chaos.deaths,
            "sigterms": len(chaos.sigterm_stop_s),
            "sigterm_stop_s_max": round(max(chaos.sigterm_stop_s, default=0), 2),
            "stops_before_enqueue_end": sum(1 for t in chaos.stopped_at if t < o.enqueued_s),
            "pg_restarts": chaos.pg_restarts,
            "redis_restarts": chaos.redis_restarts,
            "chaos_errors": chaos.errors[:5],
        }
    )
    report["problems"] = problems(report) + ([] if o.settled else [f"did not settle within {o.time_limit_s:.0f}s"])
    if not o.settled:
        report["unfinished_sample"] = work.unfinished()
        report["queues"] = queue_snapshot()
    if scheduler.poll() is not None:
        report["problems"].append(f"the scheduler exited with {scheduler.returncode}")
    if not o.chaos_on and chaos.deaths:
        report["problems"].append(f"{chaos.deaths} worker group(s) died without being killed")
    report["secret_leaks"] = leaks(home, connect, chaos.groups)
    if report["problems"]:  # keep what explains them: the home folder is removed below
        kept = Path(tempfile.mkdtemp(prefix=f"fleet-soak-logs-{o.broker}-"))
        shutil.copytree(logs, kept / "logs")
        report["logs_kept"] = str(kept)
    if report["secret_leaks"]:
        report["problems"].append(f"a secret appears in {report['secret_leaks']}")
    if o.faults:
        # Each job attempt makes at most EMBED_PROVIDER_MAX_RETRIES + 1 calls, and a job has FLEET_MAX_RETRIES + 1.
        sends_allowed = (int(env["FLEET_MAX_RETRIES"]) + 1) * (int(env["EMBED_PROVIDER_MAX_RETRIES"]) + 1)
        report["provider_log"] = provider_log_checks(sim_url, sends_allowed)
        report["problems"] += report["provider_log"]["problems"]
    return report


def queue_snapshot() -> list[dict]:
    from fleet.shared.status import queue_stats

    return [q for q in queue_stats() if q["depth"]]


def secrets_in_play() -> dict[str, str]:
    """The planted provider key and the real passwords of the database and Redis this run uses."""
    from psycopg.conninfo import conninfo_to_dict

    found = {"provider key": SECRET_KEY, "database password": conninfo_to_dict(os.environ["DATABASE_URL"])["password"]}
    if os.environ.get("REDIS_URL"):
        from urllib.parse import urlsplit

        found["redis password"] = urlsplit(os.environ["REDIS_URL"]).password
    return {name: value for name, value in found.items() if value}


def scrape(port: int) -> bytes:
    """The exporter of a group the chaos just restarted may not listen yet: wait for it."""
    from fleet.ops.processes import wait_for

    def get():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).content
        except httpx.TransportError:
            return None

    return wait_for(get, 30, 0.2, what=f"the exporter on port {port}")


def leaks(home: Path, connect, groups) -> list[str]:
    """Where a secret shows up: worker logs, metrics files and a live scrape, bus_events, dead letters."""
    found = []
    secrets = secrets_in_play()
    blobs = [
        (str(p.relative_to(home)), p.read_bytes())
        for p in home.rglob("*")
        if p.is_file() and p.suffix in (".log", ".db") and "pg" not in p.relative_to(home).parts[:1]
    ]
    for group in groups:
        if group.alive() and group.metrics_port:
            blobs.append((f"/metrics of {group.log_path.name}", scrape(group.metrics_port)))
    for where, blob in blobs:
        found += [f"{where}: {name}" for name, value in secrets.items() if value.encode() in blob]
    with connect() as conn:
        for table, column in (
            ("bus_events", "payload::text"),
            (
                "dead_letters",
                "coalesce(reason, '') || coalesce(error, '') || coalesce(message::text, '') || coalesce(raw::text, '')",
            ),
        ):
            for name, value in secrets.items():
                n = conn.execute(f"select count(*) from {table} where strpos({column}, %s) > 0", (value,)).fetchone()[0]
                if n:
                    found.append(f"{table} ({n} rows): {name}")
    return found


def provider_log_checks(sim_url: str, sends_allowed: int) -> dict:
    """From the simulator's request log: a retry of an embedding request that got 429 waited for
    Retry-After, and no documents were sent more often than the retry policy allows (no retry storm).
    (Permanent failures not retried is read from the dead letters' attempts.)"""
    log = httpx.get(f"{sim_url}/_sim/log").json()
    out = {"requests": len(log), "statuses": {}, "retry_after_violations": 0, "problems": []}
    for entry in log:
        out["statuses"][str(entry.get("status"))] = out["statuses"].get(str(entry.get("status")), 0) + 1
    from fleet.shared.health import PROBE_INPUT

    by_input: dict = {}  # a job's embedding request carries its documents: a retry sends the same ones
    for entry in log:
        if entry.get("inputs") and entry["inputs"] != PROBE_INPUT:  # probes from different jobs look alike
            by_input.setdefault(json.dumps(entry["inputs"], sort_keys=True), []).append(entry)
    out["retried_inputs"] = sum(1 for entries in by_input.values() if len(entries) > 1)
    out["other_copies"] = 0  # the same documents sent by another job or another delivery: not a retry
    early = []
    for entries in by_input.values():
        for before, after in zip(entries, entries[1:]):
            if before.get("status") != 429:
                continue
            if not _same_sender(before, after):
                out["other_copies"] += 1
                continue
            waited = after["t"] - before.get("answered", before["t"])  # from when the 429 went out
            if waited < 0.9:  # Retry-After is 1 s
                early.append(f"{after.get('request_id')} {waited:.3f}s after the 429 to {before.get('request_id')}")
    out["retry_after_violations"] = len(early)
    if early:
        out["problems"].append(f"{len(early)} request(s) retried before Retry-After: " + "; ".join(early[:5]))
    out["max_sends_per_input"] = max((len(entries) for entries in by_input.values()), default=0)
    if out["max_sends_per_input"] > sends_allowed:
        out["problems"].append(
            f"documents sent {out['max_sends_per_input']} times, the retry policy allows {sends_allowed}"
        )
    return out


def _same_sender(before: dict, after: dict) -> bool:
    """Whether `after` retries `before`: the same job, and the next try of its attempt (same delivery) or a
    later attempt. Requests are tagged X-Request-Id `<job>/<attempt>/<delivery>`; a second live copy of one
    attempt (another delivery) sends the same documents without having seen the first copy's 429."""
    b, a = (before.get("request_id") or "").split("/"), (after.get("request_id") or "").split("/")
    if len(b) != 3 or len(a) != 3:
        return True  # untagged: counted as a retry, the strict reading
    return b[0] == a[0] and (b[1] != a[1] or b[2] == a[2])
