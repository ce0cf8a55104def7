"""Deployment files checked as far as this machine can: Kubernetes objects against the Kubernetes
schemas, KEDA queries run on the real database, compose/Procfile/Prometheus targets consistent,
systemd units through systemd-analyze. (No Docker engine, cluster or KEDA runs here.)"""

from __future__ import annotations

import configparser
import importlib.util
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import psycopg
import pytest
import yaml

from fleet.shared.registry import FAMILY_MODULES, JOB_TYPES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


k8s = load(DEPLOY / "k8s" / "render.py")


def manifests() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "k8s" / "fleet.yaml").read_text()))


def by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in manifests() if o["kind"] == kind}


def test_the_manifests_are_what_the_procfile_renders():
    assert (DEPLOY / "k8s" / "fleet.yaml").read_text() == k8s.render(), "run: python deploy/k8s/render.py"


def test_every_registered_queue_has_a_worker_type():
    """Every queue of the fleet's own families (an application's come with its own Procfile)."""
    consumed = {q for args in k8s.procfile().values() for q in k8s.option(args, "--queues")}
    assert consumed == {j.queue for j in JOB_TYPES.values() if j.module in FAMILY_MODULES}


@pytest.mark.parametrize(
    "obj",
    [o for o in manifests() if o["apiVersion"] in ("v1", "apps/v1", "policy/v1")],
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}",
)
def test_kubernetes_objects_match_the_schemas(obj):
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises with the offending field


def test_a_broken_object_is_refused_by_the_validator():
    broken = by_kind("Deployment")["fleet-embed"]
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_deployments_probe_the_metrics_port_and_outlast_their_longest_job():
    for name, dep in by_kind("Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        if name in ("fleet-scheduler", "fleet-gateway"):  # the gateway's: tests/test_gateway_deploy.py
            continue
        env = {e["name"]: e["value"] for e in container["env"]}
        assert spec["terminationGracePeriodSeconds"] * 1000 > int(env["FLEET_TIME_LIMIT_MS"]), name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["ports"][0]["containerPort"] == int(k8s.option(container["args"], "--metrics-port")[0])


def test_each_worker_type_scales_on_the_depth_of_each_of_its_queues(services):
    deployments, scaled = by_kind("Deployment"), by_kind("ScaledObject")
    assert set(scaled) == set(deployments) - {"fleet-scheduler", "fleet-gateway"}  # the gateway scales on CPU
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        for name, obj in scaled.items():
            target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
            queues = k8s.option(target["spec"]["template"]["spec"]["containers"][0]["args"], "--queues")
            triggers = obj["spec"]["triggers"]
            assert [t["type"] for t in triggers] == ["postgresql"] * len(queues)
            assert len({t["name"] for t in triggers}) == len(triggers)
            for queue, trigger in zip(queues, triggers):
                meta = trigger["metadata"]
                assert f"pgmq.metrics('{queue}')" in meta["query"]
                assert meta["connectionFromEnv"] == "DATABASE_URL"
                assert float(meta["targetQueryValue"]) > 0
                value = conn.execute(meta["query"]).fetchone()[0]  # KEDA needs one integer
                assert isinstance(value, int), (name, queue, value)
    assert by_kind("PodDisruptionBudget").keys() == deployments.keys()


def test_the_pod_monitor_selects_the_worker_pods_by_their_metrics_port():
    monitor = by_kind("PodMonitor")["fleet"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for name, dep in by_kind("Deployment").items():
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        if name != "fleet-scheduler":
            ports = dep["spec"]["template"]["spec"]["containers"][0]["ports"]
            assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} & {p["name"] for p in ports}


def test_compose_runs_every_procfile_type_with_the_same_command_and_prometheus_scrapes_them():
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yml").read_text())
    services = compose["services"]
    for kind, args in k8s.procfile().items():
        assert services[kind]["command"] == args, kind
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / "docker" / source).resolve().exists(), f"{name}: {source}"
    build = services["echo"]["build"]
    assert (DEPLOY / "docker" / build["context"] / build["dockerfile"]).resolve().exists()
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for t in job["static_configs"][0]["targets"]}
    expected = {
        f"{kind}:{(k8s.option(args, '--metrics-port') or k8s.option(args, '--port'))[0]}"
        for kind, args in k8s.procfile().items()
        if kind != "scheduler"
    }
    assert targets == expected


def test_the_dockerfile_copies_what_exists_and_runs_fleet():
    lines = [
        line.split()
        for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    copied = [source for words in lines if words[0] == "COPY" for source in words[1:-1]]
    for source in copied:
        assert (ROOT / source).exists(), source
    # a link in a copied folder (fleet/shared -> ../shared) must point at something copied too
    for source in copied:
        for top, dirs, files in os.walk(ROOT / source):
            for name in dirs + files:
                if (path := Path(top) / name).is_symlink():
                    target = path.resolve().relative_to(ROOT)
                    assert any(target.is_relative_to(c) for c in copied), f"{path.relative_to(ROOT)} -> {target}"
    entry = next(" ".join(w[1:]) for w in lines if w[0] == "ENTRYPOINT")
    assert entry == '["fleet"]'


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "fleet.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["../grafana/dashboards"] == path
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"
    assert source["datasources"][0]["url"].startswith("http://prometheus:")


def test_systemd_units_are_valid(tmp_path):
    units = {
        "fleet-worker@embed.service": DEPLOY / "systemd" / "fleet-worker@.service",
        "fleet-scheduler.service": DEPLOY / "systemd" / "fleet-scheduler.service",
    }
    for name, source in units.items():
        parser = configparser.ConfigParser(strict=False, interpolation=None)  # systemd repeats keys
        parser.optionxform = str
        parser.read_string(source.read_text())
        assert {"Unit", "Service", "Install"} <= set(parser.sections())
        assert shlex.split(parser["Service"]["ExecStart"])[0].endswith("/fleet")
        shutil.copy(source, tmp_path / name)
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make system-deps` installs it (apt-get install systemd)"
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / n) for n in units)], capture_output=True, text=True
    )
    # The program itself is not installed under /opt/fleet on a test machine; anything else is an error.
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert not problems, problems
