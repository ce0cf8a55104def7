"""The dashboard and the alert rules against a real Prometheus scraping a real fleet that works.

Every PromQL expression of deploy/grafana/dashboards/fleet.json must return data, and every alert of
deploy/prometheus/alerts.yml must fire once the fleet is driven into its condition: the real rule where a
short test can reach it, else the same condition at a lower threshold, and only where it holds
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

from fleet.shared.db import connect
from fleet.shared.services import free_port

from .conftest import make_client, worker_env
from .embedding_support import API_KEY, embed_env
from .helpers import WorkerGroup, wait_for
from .prometheus_support import DEPLOY, Prometheus, binary
from .workload import Workload

# Each alert is driven into its own condition. None: the real rule, unchanged. A pair: the same condition
# at a threshold a short test can reach (a 2 s backlog for a 5 min one), never one that always holds; the
# alert test also checks that a scaled alert fires only where its condition holds (ALERT_WHERE).
TEST_THRESHOLDS = {
    "FleetQueueBacklogOld": ("> 300", "> 2"),  # the maintenance queue holds a message nobody reads
    "FleetDeadLettersGrowing": None,  # the workload dead-letters echo jobs while Prometheus watches
    "FleetJobErrorRatioHigh": None,  # the fixture dead-letters over 5% of the echo jobs
    "FleetJobLatencyHigh": ("> 120", "> 1"),  # over 5% of the echo jobs sleep 1.5 s
    "FleetChatFirstTokenSlow": ("> 5", "> 0.5"),  # the provider takes 1 s to the first token
    "FleetProviderErrors": None,  # the embedding provider answers 500 to most of its requests
    "FleetProviderDown": None,  # a health probe finds a provider down (HEALTH_DOWN_AFTER=1)
    "FleetQueueNotConsumed": None,  # no worker consumes the maintenance queue here
    "FleetSchedulerNotRunning": None,  # no scheduler runs in this test
    "FleetBrokerUnreachable": None,  # a second exporter whose DATABASE_URL points at nothing
    "FleetExporterDown": None,  # a scrape target where no exporter listens
}
# (label, where the condition holds, where it does not): a scaled alert fires for the first, not the second.
ALERT_WHERE = {
    "FleetQueueBacklogOld": ("queue", "maintenance", "echo"),
    "FleetJobLatencyHigh": ("queue", "echo", "lifecycle"),
    "FleetProviderErrors": ("provider", "embeddings", "letta"),
}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$queue": ".*"}
CONSUMED = [
    "echo",
    "embed",
    "embed_memories",
    "chat",
    "health",
    "lifecycle",
    "agents",
    "upgrade_jobs",
    "upgrade_agents",
]


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
    assert (DEPLOY / "grafana" / "dashboards" / "fleet.json").read_text() == module.render(), (
        "run: python deploy/grafana/build_dashboard.py"
    )
    board = json.loads(module.render())
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "queue"}
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")


def test_promtool_accepts_the_config_and_the_rules_and_their_unit_tests_pass():
    promtool = binary("promtool")
    folder = DEPLOY / "prometheus"
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        done = subprocess.run([promtool, *args], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    tested = {
        t["alertname"]
        for case in yaml.safe_load((folder / "alerts.test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert {r["alert"] for r in alert_rules()["groups"][0]["rules"]} == tested, "every alert needs a firing unit test"


@pytest.fixture(scope="module")
def observed(services, sim, tmp_path_factory):
    """A fleet (all queues but maintenance) scraped every second by a real Prometheus, after two rounds
    of work in every family: counters must move between scrapes for rates to show. Beside it, an exporter
    that cannot reach its database and a target where nothing listens."""
    from .embedding_support import reset_sim

    reset_sim(sim)
    workdir = tmp_path_factory.mktemp("observability")
    env = worker_env(
        services,
        "pgmq",
        **embed_env(sim),
        CHAT_API_BASE=f"{sim.url}/v1",
        CHAT_API_KEY=API_KEY,
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
        HEALTH_PROVIDERS="chat,embedding,letta",
        HEALTH_DOWN_AFTER="1",
    )
    group = WorkerGroup(env, processes=2, threads=4, metrics=True, log_dir=workdir, queues=CONSUMED).start()
    blind = blind_exporter(env, workdir)
    prometheus = None
    client = make_client("pgmq")
    try:
        targets = [f"127.0.0.1:{group.metrics_port}", f"127.0.0.1:{blind.port}", f"127.0.0.1:{free_port()}"]
        prometheus = Prometheus(workdir, targets, rules_for_test()).start()
        prometheus.fleet_port = group.metrics_port
        wait_for(lambda: prometheus.query('up{job="fleet"} == 1'), 30, 0.5, what="the first scrape")
        prometheus.work_started = time.time()
        work = Workload(client, connect)
        client.enqueue("housekeeping", {})  # on the maintenance queue, which nobody consumes here
        work.agents(4)
        wait_for(lambda: work.agents_created() == 4, 60, 0.2, what="4 agents")
        for _ in range(2):
            work_round(work, client, sim)
            time.sleep(3)  # a few scrapes between the rounds
        httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [503] * 3})  # the next probe finds a provider down
        work.health()
        wait_for(work.settled, 60, 0.2, what="the health probe")
        yield prometheus
    finally:
        if prometheus:
            prometheus.stop()
        blind.stop()
        client.broker.close()
        code = group.terminate()
        assert code == 0, group.logs()[-3000:]


def work_round(work, client, sim) -> None:
    """Every family once, plus what drives the alerts: echo jobs that fail permanently (over 5% dead) or
    sleep 1.5 s (over 5% slow), an embedding provider that fails most requests, a chat provider slow to
    its first token."""
    work.echo(60)
    client.enqueue_many(
        "echo", [{"message": "dead", "fail": "permanent"}] * 6 + [{"message": "slow", "sleep_ms": 1500}] * 8
    )
    wait_for(work.settled, 120, 0.2, what="the echo jobs to settle")
    httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [500] * 6})  # retried within the jobs
    work.embeddings(32)
    wait_for(work.settled, 120, 0.2, what="the embeddings to settle")
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 1000})
    work.chats(3)
    wait_for(work.settled, 120, 0.2, what="the chats to settle")
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 0})
    work.health()
    work.lifecycle(1)
    work.upgrade()
    wait_for(work.settled, 120, 0.2, what="the workload to settle")


class blind_exporter:
    """`fleet metrics` with a DATABASE_URL where no database listens: it serves, and says the broker is down."""

    def __init__(self, env: dict, workdir) -> None:
        import subprocess
        import sys

        self.port = free_port()
        mdir = workdir / "blind-metrics"
        mdir.mkdir()
        blind_env = env | {
            "DATABASE_URL": f"postgresql://fleet@127.0.0.1:{free_port()}/nothing",
            "PROMETHEUS_MULTIPROC_DIR": str(mdir),
            "FLEET_METRICS_PORT": str(self.port),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.ops.cli", "metrics"],
            env=blind_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _answers(self.port), 60, 0.2, what="the blind exporter")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def finite_at_some_point(result: list[dict]) -> bool:
    return any(math.isfinite(float(value)) for r in result for _, value in r["values"])


def test_every_dashboard_query_returns_data(observed):
    # Evaluated over the whole workload, not only now: a rate over a one-minute window of jobs that ended
    # longer ago (a loaded machine) is no data, although the panel showed it while they ran.
    span = (observed.work_started, time.time())
    empty = [expr for expr in dashboard_queries() if not finite_at_some_point(observed.query_range(expr, *span))]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    queues = httpx.get(f"{observed.url}/api/v1/label/queue/values", params={"match[]": "fleet_queue_depth"}).json()
    assert set(CONSUMED + ["maintenance"]) <= set(queues["data"])  # the $queue variable's choices


def test_every_alert_fires_when_its_condition_holds(observed):
    names = set(TEST_THRESHOLDS)
    deadline = time.monotonic() + 120  # rule evaluations and their `for` spells, on a loaded machine too
    while (missing := names - {a["labels"]["alertname"] for a in firing(observed)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, f"alerts that did not fire: {sorted(missing)}"
    alerts = firing(observed)
    for name, (label, holds, does_not) in ALERT_WHERE.items():
        where = {a["labels"].get(label) for a in alerts if a["labels"]["alertname"] == name}
        assert holds in where and does_not not in where, f"{name} fired for {label} {where}"
    down = {
        a["labels"]["instance"]
        for a in alerts
        if a["labels"]["alertname"] in ("FleetExporterDown", "FleetBrokerUnreachable")
    }
    assert len(down) == 2 and f"127.0.0.1:{observed.fleet_port}" not in down  # the healthy exporter fired neither


def firing(prometheus) -> list[dict]:
    body = httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()
    return [a for a in body["data"]["alerts"] if a["state"] == "firing"]


def test_one_scrape_shows_every_worker_process(observed):
    text = None
    for sample in observed.query("fleet_worker_processes"):
        text = sample
    assert text and float(text["value"][1]) == 2  # both processes of the group, through one exporter
    consumers = {r["metric"]["queue"]: float(r["value"][1]) for r in observed.query("fleet_queue_consumers")}
    assert consumers.get("echo") == 2 and "maintenance" not in consumers
