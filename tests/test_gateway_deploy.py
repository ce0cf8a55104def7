"""The gateway's deployment files: a Kubernetes Deployment probed on its HTTP port with a Service, an
HPA on CPU and a PDB (checked against the Kubernetes schemas), the compose service and the Procfile
agreeing, Prometheus scraping it, and its systemd unit through systemd-analyze."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import yaml

from .test_deploy import DEPLOY, KUBERNETES_VERSION, by_kind, k8s


def test_the_gateway_deployment_is_probed_on_its_http_port_and_scaled_on_cpu():
    args = k8s.procfile()["gateway"]
    assert args[0] == "gateway" and "--port" in args
    dep = by_kind("Deployment")["fleet-gateway"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == args
    assert container["ports"] == [{"name": "http", "containerPort": int(k8s.option(args, "--port")[0])}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"GATEWAY_HOST": "0.0.0.0", "GATEWAY_DEV": "false"}
    hpa = by_kind("HorizontalPodAutoscaler")["fleet-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fleet-gateway"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "fleet-gateway" not in by_kind("ScaledObject")
    service = by_kind("Service")["fleet-gateway"]
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert "fleet-gateway" in by_kind("PodDisruptionBudget")
    for obj in (dep, hpa, service):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_compose_and_prometheus_run_and_scrape_the_gateway():
    services = yaml.safe_load((DEPLOY / "docker" / "compose.yml").read_text())["services"]
    gateway = services["gateway"]
    assert gateway["command"] == k8s.procfile()["gateway"]
    assert gateway["environment"]["GATEWAY_HOST"] == "0.0.0.0" and gateway["ports"] == ["8080:8080"]
    assert gateway["environment"]["DATABASE_URL"] == services["chat"]["environment"]["DATABASE_URL"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert jobs["fleet-gateway"] == ["gateway:8080"]
    assert "COPY gateway ./gateway" in (DEPLOY / "docker" / "Dockerfile").read_text()


def test_the_gateway_systemd_unit_is_valid(tmp_path):
    unit = tmp_path / "fleet-gateway.service"
    shutil.copy(DEPLOY / "systemd" / "fleet-gateway.service", unit)
    assert "ExecStart=/opt/fleet/.venv/bin/fleet gateway" in unit.read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "is not executable: No such file or directory" not in line]
    assert not problems, problems
