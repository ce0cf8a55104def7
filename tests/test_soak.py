"""The short chaos soak and the provider fault storm, as `make soak` runs them at full size: real worker
processes SIGKILLed and restarted, PostgreSQL and Redis restarted, the outcome read from the database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_soak(tmp_path: Path, *args: str) -> list[dict]:
    out, log = tmp_path / "soak.json", tmp_path / "soak.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", *args, "--json", str(out)],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            code = proc.wait(270)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the soak stops its workers and services on SIGTERM
            code = proc.wait(60)
    text = log.read_text(errors="replace")
    assert code == 0, text[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("broker", ["pgmq", "redis"])
def test_chaos_soak_loses_nothing_and_applies_nothing_twice(broker, tmp_path):
    (report,) = run_soak(
        tmp_path, "--broker", broker, "--jobs", "1500", "--time-limit", "200", "--kill-every", "1.5", "--min-stops", "3"
    )
    assert report["settled"] and report["problems"] == [], report["problems"]
    assert report["kills"] + report["sigterms"] >= 3 and report["kills"] >= 2 and report["pg_restarts"] == 1
    assert report["stops_before_enqueue_end"] >= 1  # a worker group was stopped while jobs were still arriving
    assert report["redis_restarts"] == (1 if broker == "redis" else 0)
    assert all(row["lost"] == 0 and row["final"] == row["enqueued"] for row in report["jobs"].values())
    assert report["jobs"]["echo"]["dead"] > 0  # the workload's planted permanent failures, with reasons
    assert report["embeddings"]["rows"] == report["embeddings"]["documents"] and report["embeddings"]["duplicated"] == 0
    assert report["chat"]["answers"] == report["chat"]["chats"] and report["chat"]["duplicated"] == 0
    (run,) = report["upgrades"]
    assert run["agents"] == {"succeeded": report["agents"]["requested"]}
    assert run["patched_twice"] == 0 and run["succeeded_without_patch"] == 0
    assert report["secret_leaks"] == []


def test_fault_storm_settles_with_backoff_and_no_worker_dies(tmp_path):
    (report,) = run_soak(tmp_path, "--broker", "pgmq", "--jobs", "800", "--faults", "--no-chaos", "--time-limit", "200")
    assert report["settled"] and report["problems"] == [] and report["groups_died"] == 0, report["problems"]
    statuses = report["provider_log"]["statuses"]
    assert statuses.get("500", 0) > 0 and statuses.get("429", 0) > 0 and statuses.get("timeout", 0) > 0
    assert report["provider_log"]["retried_inputs"] > 0 and report["provider_log"]["retry_after_violations"] == 0
    assert 1 < report["provider_log"]["max_sends_per_input"] <= 18  # (8 job retries + 1) x (1 call retry + 1)
    assert report["permanent_retried"] == 0
    assert all(row["lost"] == 0 for row in report["jobs"].values())
