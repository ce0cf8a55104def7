"""A real Prometheus server for the tests: Debian's `prometheus` binary on loopback, stopped by PID."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import yaml

from fleet.shared.services import free_port

from .helpers import wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HOW_TO_INSTALL = (
    "Prometheus is not installed: `make test` installs Debian's prometheus when run as root;"
    " otherwise run `sudo apt-get install prometheus` (it provides prometheus and promtool)"
)


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, HOW_TO_INSTALL
    return path


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], rules: dict, interval: str = "1s") -> None:
        self.workdir = workdir
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
        config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
        config["rule_files"] = ["alerts.yml"]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        (workdir / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        self.log = open(self.workdir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        wait_for(lambda: self._ready() or self.proc.poll() is not None, 30, 0.2, what="prometheus to start")
        assert self.proc.poll() is None, (self.workdir / "prometheus.log").read_text()[-3000:]
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 2.0) -> list[dict]:
        """`expr` evaluated every `step` seconds from `start` to `end` (each result has `values`)."""
        r = httpx.get(
            f"{self.url}/api/v1/query_range",
            params={"query": expr, "start": start, "end": end, "step": step},
            timeout=30,
        )
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def alerts(self) -> dict[str, str]:
        """Alert name -> state (pending/firing) of the alerts active now."""
        body = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()
