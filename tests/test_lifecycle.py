"""Memory lifecycle on crafted data sets in a real Postgres with pgvector."""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest

from fleet.shared.config import Settings
from fleet.simulator import Simulator
from fleet.workers.lifecycle.actions import run_lifecycle, undo_run

VEC = Simulator()


@pytest.fixture
def project(services):
    return f"p-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def db(services):
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        yield conn


def settings(**extra) -> Settings:
    return Settings(
        **(
            {"LIFECYCLE_ARCHIVE_AFTER_DAYS": 30, "LIFECYCLE_DECAY_HALF_LIFE_DAYS": 30, "EMBEDDING_MODEL_DEFAULT": "m1"}
            | extra
        )
    )


def add(
    db,
    project: str,
    *,
    type_="semantic",
    pinned=False,
    expires_days=None,
    ttl_s=None,
    accessed_days=0,
    created_days=0,
    confidence=1.0,
    status="activated",
    text=None,
    vector=None,
    model=None,
    status_days=0,
) -> str:
    row = db.execute(
        "insert into memories (project_id, type, pinned, expires_at, governance, last_accessed_at, created_at,"
        " confidence, status, embedding, embedding_model, status_changed_at) values (%s, %s, %s,"
        " case when %s::float is null then null else now() + %s::float * interval '1 day' end, %s,"
        " now() - %s * interval '1 day', now() - %s * interval '1 day', %s, %s, %s::vector, %s,"
        " now() - %s * interval '1 day') returning id",
        (
            project,
            type_,
            pinned,
            expires_days,
            expires_days,
            json.dumps({"ttl_s": ttl_s} if ttl_s else {}),
            accessed_days,
            created_days,
            confidence,
            status,
            json.dumps(vector) if vector is not None else None,
            model,
            status_days,
        ),
    ).fetchone()[0]
    if text is not None:
        db.execute(
            "insert into memory_payloads (memory_id, content, size_bytes) values (%s, %s, %s)", (row, text, len(text))
        )
    return str(row)


def status(db, mid: str) -> str:
    return db.execute("select status from memories where id = %s", (mid,)).fetchone()[0]


def run(project, **kwargs):
    enqueued = []
    result = run_lifecycle(
        project=project, enqueue=enqueued.extend, settings=kwargs.pop("settings", settings()), **kwargs
    )
    return result, enqueued


def test_expire_by_date_and_by_ttl_never_pinned(db, project):
    past = add(db, project, expires_days=-1)
    ttl = add(db, project, ttl_s=60, created_days=1)
    fresh_ttl = add(db, project, ttl_s=86400 * 10, created_days=1)
    future = add(db, project, expires_days=5)
    pinned = add(db, project, expires_days=-1, pinned=True)
    bad_ttl = db.execute(
        'insert into memories (project_id, governance) values (%s, \'{"ttl_s": "soon"}\') returning id', (project,)
    ).fetchone()[0]
    result, _ = run(project, actions=["expire"])
    assert result.counts == {"expire": 2}
    assert [status(db, m) for m in (past, ttl, fresh_ttl, future, pinned)] == [
        "expired",
        "expired",
        "activated",
        "activated",
        "activated",
    ]
    assert status(db, str(bad_ttl)) == "activated"  # a malformed ttl is ignored, not fatal


def test_archive_stale_and_decay_confidence(db, project):
    stale = add(db, project, accessed_days=40)
    recent = add(db, project, accessed_days=2, confidence=0.8)
    pinned = add(db, project, accessed_days=400, pinned=True, confidence=0.9)
    result, _ = run(project, actions=["archive", "decay"])
    assert status(db, stale) == "archived" and status(db, recent) == "activated"
    assert status(db, pinned) == "activated"
    conf = dict(db.execute("select id::text, confidence from memories where project_id = %s", (project,)).fetchall())
    assert conf[recent] == pytest.approx(0.8 * 0.5 ** (2 / 30), rel=1e-3)
    assert conf[pinned] == pytest.approx(0.9)
    assert result.counts == {"archive": 1, "decay": 1}
    again, _ = run(project, actions=["decay"])
    assert again.counts == {"decay": 0}  # decayed today: not again


def test_capacity_eviction_archives_lowest_confidence_oldest_first(db, project):
    ids = [add(db, project, type_="episodic", confidence=0.1 * (i % 10) + 0.05, accessed_days=i) for i in range(12)]
    keep_pinned = add(db, project, type_="episodic", confidence=0.01, pinned=True)
    result, _ = run(project, actions=["evict"], settings=settings(LIFECYCLE_TYPE_CAPS={"episodic": 10}))
    # 13 activated, cap 10: 80% is 8, so 5 go; the pinned one is never among them
    assert result.counts == {"evict": 5}
    archived = {
        r[0]
        for r in db.execute("select id::text from memories where project_id = %s and status = 'archived'", (project,))
    }
    assert keep_pinned not in archived
    lowest = sorted(ids, key=lambda m: db.execute("select confidence from memories where id = %s", (m,)).fetchone()[0])[
        :5
    ]
    assert archived == set(lowest)


def test_near_duplicates_are_merged_by_vector_similarity(db, project):
    base = VEC.vector("m1", "the user prefers dark mode")
    near = [x + (0.01 if i % 7 == 0 else 0) for i, x in enumerate(base)]
    other = VEC.vector("m1", "the deploy runs on fridays")
    old = add(db, project, vector=base, model="m1", created_days=5)
    new = add(db, project, vector=near, model="m1", created_days=1)
    different = add(db, project, vector=other, model="m1", created_days=3)
    pinned_old = add(db, project, type_="episodic", vector=other, model="m1", created_days=9, pinned=True)
    newer_dup = add(db, project, type_="episodic", vector=other, model="m1", created_days=1)
    result, _ = run(project, actions=["merge"])
    assert result.counts == {"merge": 2}
    merged = dict(
        db.execute(
            "select id::text, merged_into::text from memories where project_id = %s and status = 'merged'", (project,)
        ).fetchall()
    )
    assert merged == {old: new, newer_dup: pinned_old}  # the newer one is kept; a pinned one always is
    assert status(db, different) == "activated"


def test_reembed_enqueues_missing_and_other_model_embeddings(db, project):
    missing = add(db, project, text="no vector yet")
    other = add(db, project, text="old model", vector=VEC.vector("m0", "old model"), model="m0")
    current = add(db, project, text="current", vector=VEC.vector("m1", "current"), model="m1")
    add(db, project)  # no payload: nothing to embed
    result, enqueued = run(project, actions=["reembed"])
    assert result.counts == {"reembed": 2}
    assert sorted(i for job in enqueued for i in job["ids"]) == sorted([missing, other])
    assert current not in json.dumps(enqueued)


def test_purge_deletes_only_old_deleted_payloads(db, project):
    old = add(db, project, status="deleted", status_days=40, text="gone")
    recent = add(db, project, status="deleted", status_days=1, text="kept for now")
    result, _ = run(project, actions=["purge"])
    assert result.counts == {"purge": 1}
    payloads = {
        r[0]
        for r in db.execute(
            "select memory_id::text from memory_payloads where memory_id = any(%s::uuid[])", ([old, recent],)
        )
    }
    assert payloads == {recent}
    assert status(db, old) == "deleted"  # the memory row itself stays


def test_dry_run_reports_and_changes_nothing_then_undo_restores(db, project):
    add(db, project, expires_days=-1)
    add(db, project, accessed_days=40)
    add(db, project, accessed_days=3, confidence=0.7)
    snapshot = lambda: db.execute(
        "select id, status, confidence, merged_into from memories where project_id = %s"  # noqa: E731
        " order by id",
        (project,),
    ).fetchall()
    before = snapshot()
    dry, _ = run(project, dry_run=True)
    assert snapshot() == before
    assert (
        db.execute("select count(*) from memory_lifecycle_actions where run_id = %s", (dry.run_id,)).fetchone()[0] == 0
    )
    real, _ = run(project)
    assert (
        {k: v for k, v in real.counts.items() if v}
        == {k: v for k, v in dry.counts.items() if v}
        == {"expire": 1, "archive": 1, "decay": 1}
    )
    assert snapshot() != before
    assert undo_run(real.run_id) == 3
    assert snapshot_statuses(db, project) == sorted(r[1] for r in before)


def snapshot_statuses(db, project):
    return sorted(r[0] for r in db.execute("select status from memories where project_id = %s", (project,)))


def test_two_runs_at_once_do_not_double_apply(db, project):
    db.execute(
        "insert into memories (project_id, last_accessed_at) select %s, now() - interval '60 days'"
        " from generate_series(1, 3000)",
        (project,),
    )
    results = []

    def go():
        results.append(
            run_lifecycle(
                project=project, actions=["archive"], batch_size=200, settings=settings(), enqueue=lambda _: None
            )
        )

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.counts["archive"] for r in results) == 3000
    recorded = db.execute(
        "select count(*), count(distinct memory_id) from memory_lifecycle_actions a"
        " join memories m on m.id = a.memory_id where m.project_id = %s",
        (project,),
    ).fetchone()
    assert recorded == (3000, 3000)


def test_rls_by_project_membership(db, project):
    member, outsider = str(uuid.uuid4()), str(uuid.uuid4())
    mine = add(db, project, text="secret plan")
    db.execute("insert into project_members (project_id, user_id) values (%s, %s)", (project, member))

    def visible(sub):
        with db.transaction():
            db.execute("set local role authenticated")
            db.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub}),))
            return (
                [r[0] for r in db.execute("select id::text from memories where project_id = %s", (project,))],
                [r[0] for r in db.execute("select content from memory_payloads where memory_id = %s", (mine,))],
            )

    assert visible(member) == ([mine], ["secret plan"])
    assert visible(outsider) == ([], [])


def test_cli_runs_the_lifecycle_job_and_reembeds_through_the_workers(services, sim, db, project, tmp_path):
    import os

    from .conftest import worker_env
    from .embedding_support import embed_env, reset_sim
    from .helpers import WorkerGroup, wait_for
    from .test_cli_and_services import fleet_cli

    reset_sim(sim)
    started = db.execute("select now()").fetchone()[0]
    stale = add(db, project, accessed_days=45)
    needs_vector = add(db, project, text="remember the release checklist")
    env = worker_env(services, "pgmq", **embed_env(sim))
    group = WorkerGroup(env, threads=4, metrics=True, log_dir=tmp_path).start()
    try:
        cli_env = dict(os.environ) | embed_env(sim)
        dry = json.loads(fleet_cli("lifecycle", "run", "--project", project, "--dry-run", "--json", env=cli_env).stdout)
        assert dry["dry_run"] is True and dry["counts"]["archive"] == 1 and dry["counts"]["reembed"] == 1
        assert status(db, stale) == "activated"
        out = fleet_cli("lifecycle", "run", "--project", project, env=cli_env).stdout
        assert "archive  1" in out and "reembed  1" in out
        assert status(db, stale) == "archived"
        wait_for(
            lambda: (
                db.execute("select embedding_model from memories where id = %s", (needs_vector,)).fetchone()[0]
                == "BAAI/bge-m3"
            ),
            60,
            what="the memory's embedding",
        )
        # The worker's connections are all new here: the vector must be written on the first attempt.
        assert (
            db.execute(
                "select count(*) from bus_events where actor = 'embed_memories' and type = 'job.retrying'"
                " and created_at >= %s",
                (started,),
            ).fetchone()[0]
            == 0
        )
        import httpx

        metrics = httpx.get(f"http://127.0.0.1:{group.metrics_port}/metrics").text
        assert 'fleet_lifecycle_actions_total{action="archive"}' in metrics
        run_id = out.split()[1]
        assert "restored 1 memory(ies)" in fleet_cli("lifecycle", "undo", run_id, env=cli_env).stdout
        assert status(db, stale) == "activated"
    finally:
        assert group.terminate() == 0


def test_dry_run_takes_no_row_locks_so_a_real_run_meanwhile_skips_nothing(db, project):
    """A dry run in progress (here held at a point where the old one waited, holding every row it had
    changed) must leave the rows free: a real run started meanwhile expires all of them."""
    expiring = [add(db, project, expires_days=-1) for _ in range(5)]
    add(db, project)
    add(db, project)
    caps = settings(LIFECYCLE_TYPE_CAPS={"semantic": 1})
    dry: dict = {}
    with psycopg.connect(db.info.dsn, password=db.info.password, autocommit=True) as holder:
        holder.execute("select pg_advisory_lock(hashtext(%s))", (f"evict:{project}:semantic",))
        thread = threading.Thread(target=lambda: dry.update(result=run(project, dry_run=True, settings=caps)[0]))
        thread.start()

        def dry_run_waits_or_ended():
            waiting = db.execute(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and wait_event = 'advisory'"
            ).fetchone()[0]
            return waiting or not thread.is_alive()

        from .helpers import wait_for

        wait_for(dry_run_waits_or_ended, 60, what="the dry run to reach evict")
        real, _ = run(project, actions=["expire"])
        holder.execute("select pg_advisory_unlock_all()")
    thread.join(30)
    assert real.counts == {"expire": len(expiring)}
    assert all(status(db, m) == "expired" for m in expiring)
    assert dry["result"].counts["evict"] >= 1  # the dry run itself ran evict on its copy


def test_a_memory_the_provider_refuses_is_dead_lettered_alone_and_the_rest_embedded(
    services, sim, db, project, tmp_path
):
    """embed_memories halves a batch down to the memory the provider refuses even alone (as embed jobs do):
    every other memory gets its vector, the refused one goes to the dead letters by itself, replayable."""
    import httpx

    from fleet.shared.deadletters import get_dead_letter, payload_of

    from .conftest import make_client, worker_env
    from .embedding_support import embed_env, reset_sim
    from .helpers import WorkerGroup, wait_for

    reset_sim(sim)
    httpx.post(f"{sim.url}/_sim/config", json={"error_style": "infinity", "max_input_chars": 1000})
    fine = [add(db, project, text=f"the release checklist, step {i}") for i in range(7)]
    refused = add(db, project, text="x" * 1001)
    trace = str(uuid.uuid4())
    group = WorkerGroup(worker_env(services, "pgmq", **embed_env(sim)), threads=2, log_dir=tmp_path).start()
    client = make_client("pgmq")
    try:
        client.enqueue("embed_memories", {"ids": [*fine[:3], refused, *fine[3:]]}, trace_id=trace)

        def finished():
            return db.execute(
                "select 1 from bus_events where trace_id = %s and type in ('job.succeeded', 'job.dead')", (trace,)
            ).fetchone()

        wait_for(finished, 120, what="the embed_memories job to end")
        models = dict(
            db.execute(
                "select id::text, embedding_model from memories where id = any(%s::uuid[])", ([*fine, refused],)
            ).fetchall()
        )
        assert {m: models[m] for m in fine} == {m: "BAAI/bge-m3" for m in fine}
        assert models[refused] is None
        assert (
            db.execute(
                "select type from bus_events where trace_id = %s and type like 'job.%%' order by id desc limit 1",
                (trace,),
            ).fetchone()[0]
            == "job.succeeded"
        )
        ((letter_id, reason),) = db.execute(
            "select id, reason from dead_letters where trace_id = %s", (trace,)
        ).fetchall()
        assert reason.startswith(f"permanent error: InputTooLarge: memory:{refused}:") and "xxxxxxxxxx" not in reason
        queue, actor, payload = payload_of(get_dead_letter(letter_id))
        assert (actor, payload) == ("embed_memories", {"ids": [refused]})  # a retry embeds that memory alone
    finally:
        reset_sim(sim)
        client.broker.close()
        assert group.terminate() == 0
