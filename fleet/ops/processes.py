"""Worker processes: the command and environment `fleet worker` runs, and WorkerGroup, started and stopped
by PID, for the tests, the soak, the demo and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from fleet.shared.capabilities import capabilities
from fleet.shared.config import get_settings
from fleet.shared.services import free_port


def worker_command(
    queues: list[str] | None, processes: int, threads: int, metrics_port: int | None = None
) -> list[str]:
    """`dramatiq fleet.workers:start`: dramatiq's process manager; each process sets up the broker and the actors."""
    cmd = [
        sys.executable,
        "-m",
        "dramatiq",
        "fleet.workers:start",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--skip-logging",
    ]
    if queues:
        cmd += ["--queues", *queues]
    if metrics_port != 0:
        cmd += ["--fork-function", "fleet.shared.metrics:serve"]
    return cmd


def worker_env(queues: list[str] | None, metrics_port: int | None = None) -> dict[str, str]:
    """Environment for worker processes: a resolved DATABASE_URL (with FLEET_EMBEDDED=1, the embedded
    server's, so children never race to start it; without it and without DATABASE_URL, NotConfigured)
    and a fresh multiprocess metrics directory."""
    from fleet.shared.db import database_dsn, redis_url

    settings = get_settings()
    env = dict(os.environ)
    if settings.database_url is None:
        env["DATABASE_URL"] = database_dsn(settings)
        env.setdefault("FLEET_DB_POOLER", "false")
    if capabilities(settings).queues_in_redis and settings.redis_url is None:
        env["REDIS_URL"] = redis_url(settings)
    # Wiped at start (prometheus_client's rule): files of processes from an earlier run would count.
    mdir = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or settings.home / "metrics" / str(os.getpid())).resolve()
    mdir.mkdir(parents=True, exist_ok=True)
    for f in mdir.glob("*.db"):
        f.unlink()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
    if metrics_port:
        env["FLEET_METRICS_PORT"] = str(metrics_port)
    env["FLEET_WORKER_QUEUES"] = ",".join(queues) if queues else "all"
    return env


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerGroup:
    """`dramatiq fleet.workers:start` as real processes, in their own process group so a test or the soak can
    SIGKILL them all."""

    def __init__(
        self,
        env: dict,
        *,
        processes: int = 1,
        threads: int = 4,
        metrics: bool = False,
        log_dir: Path,
        queues: list[str] | None = None,
    ):
        self.env = dict(env)
        self.queues = queues
        self.processes = processes
        self.threads = threads
        self.metrics_port = free_port() if metrics else 0
        self.log_path = log_dir / f"workers-{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerGroup:
        env = dict(self.env)
        mdir = self.log_path.with_suffix(".metrics")
        mdir.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
        if self.metrics_port:
            env["FLEET_METRICS_PORT"] = str(self.metrics_port)
        cmd = worker_command(self.queues, self.processes, self.threads, self.metrics_port)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        # dramatiq handles SIGTERM only once its workers have booted: wait for them.
        try:
            wait_for(
                lambda: self.logs().count("Worker process is ready for action.") >= self.processes or not self.alive(),
                60,
                what="worker processes to boot",
            )
        except AssertionError:
            self.kill()  # never leave a group running that its caller will not stop
            raise
        assert self.alive(), f"workers exited at start:\n{self.logs()[-3000:]}"
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group: no chance to requeue or ack."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to dramatiq's main process, which stops its workers gracefully."""
        code = stop_process(self.proc, timeout) if self.proc else 0
        self.log.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_process(proc: subprocess.Popen, timeout: float = 30, *, group: bool = True) -> int:
    """SIGTERM (workers finish or requeue what they hold), SIGKILL only if it will not stop: to its whole
    process group when it leads one (started with start_new_session). Returns its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # dramatiq's main process passes it on to its workers
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def start_simulator(config: dict) -> tuple[subprocess.Popen, str]:
    """The provider simulator as its own process, for a demo or benchmark with no provider configured."""
    import json

    import httpx

    from fleet.shared.services import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.simulator", "--port", str(port), "--config", json.dumps(config)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(f"{url}/health", timeout=0.5)
            return proc, url
        except httpx.TransportError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the provider simulator did not start") from e
            time.sleep(0.05)
