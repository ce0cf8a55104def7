"""The dashboard and the alert rules against a real Prometheus scraping a real fleet that works.

Every PromQL expression of deploy/grafana/dashboards/fleet.json must return data, and every alert of
deploy/prometheus/alerts.yml must fire once its threshold is lowered to what a short test can reach
(promtool's unit tests in alerts.test.yml prove the real thresholds).
"""

from __future__ import annotations

import json
import math
import subprocess
import time

import httpx
import pytest
import yaml

from shared.db import connect
from shared.workload import Workload

from .conftest import make_client, worker_env
from .embedding_support import API_KEY, embed_env
from .helpers import WorkerGroup, wait_for
from .prometheus_support import DEPLOY, Prometheus, binary

# What each alert needs to fire within a test, and why. None: the test's fleet really is in that state.
TEST_THRESHOLDS = {
    "FleetQueueBacklogOld": ("> 300", "> 0"),  # the maintenance queue holds a message nobody reads
    "FleetDeadLettersGrowing": None,  # the workload dead-letters echo jobs while Prometheus watches
    "FleetJobErrorRatioHigh": ("> 0.05", "> 0"),
    "FleetJobLatencyHigh": ("> 120", "> 0"),
    "FleetChatFirstTokenSlow": ("> 5", "> 0"),
    "FleetProviderErrors": ("> 0.2", ">= 0"),
    "FleetProviderDown": ("== 0", ">= 0"),
    "FleetQueueNotConsumed": None,  # no worker consumes the maintenance queue here
    "FleetSchedulerNotRunning": None,  # no scheduler runs in this test
    "FleetBrokerUnreachable": ("== 0", "== 1"),
    "FleetExporterDown": ("== 0", "== 1"),
}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$queue": ".*"}
CONSUMED = ["echo", "embed", "embed_memories", "chat", "health", "lifecycle", "agents", "upgrade_jobs",
            "upgrade_agents"]


def alert_rules() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


def rules_for_test() -> dict:
    rules = alert_rules()
    for rule in rules["groups"][0]["rules"]:
        name = rule["alert"]
        assert name in TEST_THRESHOLDS, f"alert {name} has no live test: add it to TEST_THRESHOLDS"
        if TEST_THRESHOLDS[name]:
            old, new = TEST_THRESHOLDS[name]
            assert old in rule["expr"], f"{name}: expected '{old}' in {rule['expr']!r}"
            rule["expr"] = rule["expr"].replace(old, new)
        rule["for"] = "0s"
    return rules


def dashboard_queries() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "fleet.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for old, new in GRAFANA_VARIABLES.items():
        exprs = [e.replace(old, new) for e in exprs]
    assert all("$" not in e for e in exprs), [e for e in exprs if "$" in e]
    return exprs


def test_the_dashboard_file_is_what_its_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DEPLOY / "grafana" / "dashboards" / "fleet.json").read_text() == module.render(), \
        "run: python deploy/grafana/build_dashboard.py"
    board = json.loads(module.render())
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "queue"}
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")


def test_promtool_accepts_the_config_and_the_rules_and_their_unit_tests_pass():
    promtool = binary("promtool")
    folder = DEPLOY / "prometheus"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    tested = {t["alertname"] for case in yaml.safe_load((folder / "alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert {r["alert"] for r in alert_rules()["groups"][0]["rules"]} == tested, "every alert needs a firing unit test"


@pytest.fixture(scope="module")
def observed(services, sim, tmp_path_factory):
    """A fleet (all queues but maintenance) scraped every second by a real Prometheus, after two rounds
    of work in every family: counters must move between scrapes for rates to show."""
    from .embedding_support import reset_sim

    reset_sim(sim)
    workdir = tmp_path_factory.mktemp("observability")
    env = worker_env(services, "pgmq", **embed_env(sim), CHAT_API_BASE=f"{sim.url}/v1", CHAT_API_KEY=API_KEY,
                     LETTA_API_BASE_URL=sim.url, LETTA_API_KEY=API_KEY, HEALTH_PROVIDERS="chat,embedding,letta")
    group = WorkerGroup(env, processes=2, threads=4, metrics=True, log_dir=workdir, queues=CONSUMED).start()
    prometheus = None
    client = make_client("pgmq")
    try:
        prometheus = Prometheus(workdir, [f"127.0.0.1:{group.metrics_port}"], rules_for_test()).start()
        wait_for(lambda: prometheus.query('up{job="fleet"} == 1'), 30, 0.5, what="the first scrape")
        work = Workload(client, connect)
        client.enqueue("housekeeping", {})  # on the maintenance queue, which nobody consumes here
        work.agents(4)
        wait_for(lambda: work.agents_created() == 4, 60, 0.2, what="4 agents")
        for _ in range(2):
            httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [500, 500]})  # provider errors, retried
            work.echo(60)
            work.embeddings(32)
            work.chats(3)
            work.health()
            work.lifecycle(1)
            work.upgrade()
            wait_for(work.settled, 120, 0.2, what="the workload to settle")
            time.sleep(3)  # a few scrapes between the rounds
        yield prometheus
    finally:
        if prometheus:
            prometheus.stop()
        client.broker.close()
        code = group.terminate()
        assert code == 0, group.logs()[-3000:]


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_query_returns_data(observed):
    empty = [expr for expr in dashboard_queries() if not finite(observed.query(expr))]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    queues = httpx.get(f"{observed.url}/api/v1/label/queue/values", params={"match[]": "fleet_queue_depth"}).json()
    assert set(CONSUMED + ["maintenance"]) <= set(queues["data"])  # the $queue variable's choices


def test_every_alert_fires_when_its_condition_holds(observed):
    names = set(TEST_THRESHOLDS)
    deadline = time.monotonic() + 30
    while (missing := names - {n for n, state in observed.alerts().items() if state == "firing"}) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, f"alerts that did not fire: {sorted(missing)}"


def test_one_scrape_shows_every_worker_process(observed):
    text = None
    for sample in observed.query("fleet_worker_processes"):
        text = sample
    assert text and float(text["value"][1]) == 2  # both processes of the group, through one exporter
    consumers = {r["metric"]["queue"]: float(r["value"][1]) for r in observed.query("fleet_queue_consumers")}
    assert consumers.get("echo") == 2 and "maintenance" not in consumers
