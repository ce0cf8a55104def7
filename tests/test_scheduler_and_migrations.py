"""Scheduler leadership with two schedulers, and through a broker outage; migrations that refuse a changed file."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from fleet.shared.leadership import current_leader
from fleet.shared.migrate import MigrationError, migrate
from fleet.shared.scheduler import Periodic, Scheduler

from .conftest import make_client
from .helpers import wait_for


def test_two_schedulers_one_leader_and_takeover(services):
    name = f"test-{uuid.uuid4().hex[:8]}"
    periodic = [Periodic(name, "echo", 0.3, payload=lambda: {"message": "tick"})]
    client = make_client("pgmq")
    a, b = Scheduler(periodic, tick_s=0.1, client=client), Scheduler(periodic, tick_s=0.1, client=client)
    ta, tb = threading.Thread(target=a.run, daemon=True), threading.Thread(target=b.run, daemon=True)
    ta.start()
    wait_for(lambda: a.is_leader, 60, what="the first scheduler to lead")
    tb.start()
    time.sleep(1.0)
    assert a.is_leader and not b.is_leader
    assert (current_leader() or "").startswith("fleet-scheduler:")
    # while a leads, the job is enqueued about every 0.3 s, never doubled
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        first = conn.execute("select last_enqueued_at from scheduler_runs where name = %s", (name,)).fetchone()[0]
    a.stop()
    ta.join(10)
    wait_for(lambda: b.is_leader, 60, what="the second scheduler to take over")

    def enqueued_since() -> bool:
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            return conn.execute(
                "select last_enqueued_at > %s from scheduler_runs where name = %s", (first, name)
            ).fetchone()[0]

    wait_for(enqueued_since, 30, what="the new leader to enqueue the periodic job")
    b.stop()
    tb.join(10)
    client.broker.close()


def test_scheduler_does_not_repeat_a_job_that_is_not_due(services):
    name = f"hourly-{uuid.uuid4().hex[:8]}"
    s = Scheduler([Periodic(name, "echo", 3600)], client=make_client("pgmq"))
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        assert s.tick(conn) == [name]
        assert s.tick(conn) == []
        assert Scheduler([Periodic(name, "echo", 3600)], client=s.client).tick(conn) == []  # a new leader too
    s.client.broker.close()


def test_scheduler_keeps_a_job_due_while_the_broker_is_unreachable(services):
    """A broker outage must not kill the scheduler nor skip the job: it stays due and goes out once the broker is back."""
    from fleet.shared.services import free_port

    name = f"outage-{uuid.uuid4().hex[:8]}"
    down = make_client("redis", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    up = make_client("redis", REDIS_URL=services["redis_url"])
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        assert Scheduler([Periodic(name, "echo", 3600)], client=down).tick(conn) == []
        assert conn.execute("select count(*) from scheduler_runs where name = %s", (name,)).fetchone()[0] == 0
        assert Scheduler([Periodic(name, "echo", 3600)], client=up).tick(conn) == [name]
    down.broker.close()
    up.broker.close()


def test_migrations_apply_once_and_refuse_a_changed_file(services, tmp_path):
    version = "2099" + uuid.uuid4().hex[:10].translate(str.maketrans("abcdef", "123456"))
    table = f"mig_test_{version}"
    f = tmp_path / f"{version}_probe.sql"
    f.write_text(f"create table {table} (x int);")
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        assert migrate(conn, tmp_path) == [version]
        assert migrate(conn, tmp_path) == []  # a no-op the second time
        f.write_text(f"create table {table} (x int, y int);")
        with pytest.raises(MigrationError, match=f"{version}_probe.sql was changed after it was applied"):
            migrate(conn, tmp_path)
        conn.execute(f"drop table {table}")
        conn.execute("delete from fleet_migrations where version = %s", (version,))


def test_failed_migration_is_rolled_back(services, tmp_path):
    version = "2098" + uuid.uuid4().hex[:10].translate(str.maketrans("abcdef", "123456"))
    (tmp_path / f"{version}_broken.sql").write_text(f"create table half_{version} (x int); select no_such_function();")
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrate(conn, tmp_path)
        assert conn.execute("select to_regclass(%s)", (f"half_{version}",)).fetchone()[0] is None
        assert conn.execute("select count(*) from fleet_migrations where version = %s", (version,)).fetchone()[0] == 0


def test_a_built_wheel_carries_every_migration_and_module(tmp_path):
    """`fleet migrate` from an installed wheel: the migrations ship inside the package (fleet/migrations,
    a link to sql/ in the repository), byte for byte; so do shared/ and workers/, as fleet.shared and
    fleet.workers, and nothing else is installed beside `fleet`."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in (
        "pyproject.toml",
        "README.md",
        "fleet",
        "shared",
        "workers",
        "sql",
    ):  # a clean tree: the build leaves its files there
        copy = shutil.copytree if (root / name).is_dir() else shutil.copy2
        copy(root / name, src / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("fleet-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        shipped = {Path(n).name: z.read(n) for n in names if n.startswith("fleet/migrations/")}
        # the platform and the families (shared/ and workers/, linked from fleet/) are fleet.shared and fleet.workers
        modules = {n: z.read(n) for n in names if n.startswith(("fleet/shared/", "fleet/workers/"))}
    assert shipped == {p.name: p.read_bytes() for p in (root / "sql").glob("*.sql")}
    expected = {
        f"fleet/{p.relative_to(root)}": p.read_bytes()
        for folder in ("shared", "workers")
        for p in (root / folder).rglob("*")
        if p.is_file() and p.suffix != ".pyc"  # every module and data file (the Redis broker's Lua script)
    }
    assert modules == expected
    assert not any(n.startswith(("shared/", "workers/")) for n in names)  # one import name: fleet
