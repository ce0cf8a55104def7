"""Worker processes started and stopped by PID, for the tests, the soak and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from fleet.shared.cli import worker_command
from fleet.shared.services import free_port


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
    """`dramatiq fleet.workers` as real processes, in their own process group so a test or the soak can SIGKILL them all."""

    def __init__(self, env: dict, *, processes: int = 1, threads: int = 4, metrics: bool = False, log_dir: Path,
                 queues: list[str] | None = None):
        self.env = dict(env)
        self.queues = queues
        self.processes = processes
        self.threads = threads
        self.metrics_port = free_port() if metrics else 0
        self.log_path = log_dir / f"workers-{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerGroup":
        env = dict(self.env)
        mdir = self.log_path.with_suffix(".metrics")
        mdir.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
        if self.metrics_port:
            env["FLEET_METRICS_PORT"] = str(self.metrics_port)
        cmd = worker_command(self.queues, self.processes, self.threads, self.metrics_port)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])
        # dramatiq handles SIGTERM only once its workers have booted: wait for them.
        try:
            wait_for(lambda: self.logs().count("Worker process is ready for action.") >= self.processes or not self.alive(),
                     60, what="worker processes to boot")
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
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode if self.proc else 0

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")
