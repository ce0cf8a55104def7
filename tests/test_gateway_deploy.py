"""The gateway's deployment files: a Kubernetes Deployment probed on its HTTP port with a Service, an
HPA on CPU and a PDB (checked against the Kubernetes schemas), the compose service and the Procfile
agreeing, Prometheus scraping it, and its systemd unit through systemd-analyze."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from fleet.gateway.app import create_app
from fleet.gateway.settings import GatewaySettings, UnprotectedGateway, require_protection

from .gateway_process import ROOT
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
    assert env == {"GATEWAY_HOST": "0.0.0.0", "GATEWAY_DEV": "false", "GATEWAY_VERIFY_JWT": "true"}
    assert {"secretRef": {"name": "fleet-secrets"}} in container["envFrom"]  # GATEWAY_JWT_SECRET
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
    # published on every interface: production mode with verified tokens unless told otherwise
    assert gateway["environment"]["GATEWAY_DEV"] == "${GATEWAY_DEV:-false}"
    assert gateway["environment"]["GATEWAY_VERIFY_JWT"] == "${GATEWAY_VERIFY_JWT:-true}"
    assert gateway["environment"]["DATABASE_URL"] == services["chat"]["environment"]["DATABASE_URL"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert jobs["fleet-gateway"] == ["gateway:8080"]
    assert "COPY fleet ./fleet" in (DEPLOY / "docker" / "Dockerfile").read_text()  # the gateway is fleet/gateway


def test_the_gateway_systemd_unit_is_valid(tmp_path):
    unit = tmp_path / "fleet-gateway.service"
    shutil.copy(DEPLOY / "systemd" / "fleet-gateway.service", unit)
    assert "ExecStart=/opt/fleet/.venv/bin/fleet gateway" in unit.read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert not problems, problems


@pytest.mark.parametrize(
    "env, refused",
    [
        ({"GATEWAY_DEV": "false"}, True),
        ({"GATEWAY_DEV": "false", "GATEWAY_VERIFY_JWT": "false", "GATEWAY_HMAC_KEY": ""}, True),
        ({"GATEWAY_DEV": "false", "GATEWAY_VERIFY_JWT": "true", "GATEWAY_JWT_SECRET": "x" * 32}, False),
        ({"GATEWAY_DEV": "false", "GATEWAY_HMAC_KEY": "k"}, False),
        ({"GATEWAY_DEV": "true"}, False),
    ],
)
def test_the_gateway_refuses_to_start_unprotected_outside_development(monkeypatch, env, refused):
    for name in ("GATEWAY_DEV", "GATEWAY_VERIFY_JWT", "GATEWAY_JWT_SECRET", "GATEWAY_JWKS_URL", "GATEWAY_HMAC_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gw = GatewaySettings(_env_file=None)
    if not refused:
        require_protection(gw)
        return
    with pytest.raises(UnprotectedGateway, match="GATEWAY_VERIFY_JWT.*GATEWAY_HMAC_KEY"):
        require_protection(gw)
    with pytest.raises(UnprotectedGateway):
        create_app()


def test_fleet_gateway_exits_with_the_reason_when_unprotected(tmp_path):
    # A database is named (the check for one comes first) but never reached: the refusal comes before it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {
        "GATEWAY_DEV": "false",
        "DATABASE_URL": "postgresql://fleet@127.0.0.1:9/unreachable",
        "FLEET_BROKER": "pgmq",
    }
    done = subprocess.run(
        [sys.executable, "-m", "fleet.ops.cli", "gateway", "--port", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "GATEWAY_VERIFY_JWT" in done.stderr and "GATEWAY_HMAC_KEY" in done.stderr
