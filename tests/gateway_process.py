"""`fleet gateway` as a real process, started and stopped by PID (tests, benchmarks, conformance)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from fleet.ops.processes import stop_process, wait_for
from fleet.shared.services import free_port

ROOT = Path(__file__).resolve().parents[1]


class GatewayProcess:
    def __init__(self, env: dict, log_dir: Path, port: int | None = None) -> None:
        self.env, self.port = dict(env), port or free_port()
        self.log_path = log_dir / f"gateway-{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> GatewayProcess:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.ops.cli", "gateway", "--port", str(self.port)],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: self._ready() or self.proc.poll() is not None, timeout, 0.1, "the gateway to be ready")
        except AssertionError:
            self.stop()
            raise
        assert self.proc.poll() is None, f"the gateway exited at start:\n{self.logs()[-3000:]}"
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout, group=False)
        self.log.close()
        return code

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
