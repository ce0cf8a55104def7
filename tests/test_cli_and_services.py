"""The `fleet` CLI as an operator runs it, and the embedded services' lifecycle."""

from __future__ import annotations

import json
import uuid

import psycopg

from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

from .helpers import dead_letters, fleet_cli, wait_for


def test_services_up_twice_reuses_and_down_stops(tmp_path):
    pg, rd = EmbeddedPostgres(tmp_path), EmbeddedRedis(tmp_path)
    try:
        dsn = pg.up()
        pid = (pg.data / "postmaster.pid").read_text().split()[0]
        assert pg.up() == dsn and (pg.data / "postmaster.pid").read_text().split()[0] == pid
        with psycopg.connect(dsn) as conn:
            # pgvector works on this CPU: distance and an HNSW index
            conn.execute("create extension if not exists vector")
            conn.execute("create table v (e vector(32))")
            conn.execute(
                "insert into v select array_agg(random())::vector from generate_series(1, 32) g, generate_series(1, 200) r group by r"
            )
            conn.execute("create index on v using hnsw (e vector_cosine_ops)")
            assert len(conn.execute("select e <=> (select e from v limit 1) from v order by 1 limit 3").fetchall()) == 3
        url = rd.up()
        assert rd.up() == url and rd.running()
    finally:
        assert pg.down()
        assert rd.down()
    assert not pg.running() and not rd.running()


def test_enqueue_jsonl_status_events_and_dlq_retry(pgmq_fleet, tmp_path):
    trace = str(uuid.uuid4())
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "\n".join(json.dumps(p) for p in [{"message": "a"}, {"message": "b"}, {"fail": "permanent", "message": "c"}])
        + "\n"
    )
    out = fleet_cli("enqueue", "echo", "--file", str(jobs), "--trace-id", trace).stdout
    assert "enqueued 3 job(s) on echo" in out
    pgmq_fleet.wait_done(trace, 3)

    status = json.loads(fleet_cli("status", "--json").stdout)
    echo = next(q for q in status["queues"] if q["queue"] == "echo")
    assert {"depth", "visible", "in_flight", "oldest_age_s", "dead_letters", "succeeded_1m", "failed_1m"} <= echo.keys()
    assert echo["succeeded_1m"] >= 2 and echo["dead_letters"] >= 1

    story = fleet_cli("events", "--trace", trace).stdout
    assert story.count("job.started") == 3 and story.count("job.succeeded") == 2 and "job.dead" in story

    listed = json.loads(fleet_cli("dlq", "list", "--queue", "echo", "--error-class", "PermanentError", "--json").stdout)
    mine = [d for d in listed if d["trace_id"] == trace]
    assert len(mine) == 1 and "echo asked to fail permanently: c" in mine[0]["reason"]
    shown = json.loads(fleet_cli("dlq", "show", str(mine[0]["id"])).stdout)
    assert shown["message"]["args"][0] == {"fail": "permanent", "message": "c"}

    assert "re-enqueued 1 dead letter(s)" in fleet_cli("dlq", "retry", str(mine[0]["id"])).stdout
    # it fails again (the payload still asks to), so a second dead letter appears, with the same trace
    wait_for(lambda: len(dead_letters(pgmq_fleet.dsn, trace)) == 2, 20, what="the retried job's second dead letter")
    assert "re-enqueued 0 dead letter(s)" in fleet_cli("dlq", "retry", str(mine[0]["id"])).stdout  # once only


def test_dlq_retry_refuses_a_payload_whose_secrets_were_masked(pgmq_fleet):
    """A dead letter's payload is stored with secret-looking values masked: enqueued again it would carry
    the mask, so retry refuses it by name and says which fields; an unmasked one beside it is retried."""
    secret, plain = str(uuid.uuid4()), str(uuid.uuid4())
    # not an echo payload (the SDK refuses it): sent as the message a producer without the model would send
    client = pgmq_fleet.client
    client.broker.enqueue(client.message("echo", {"message": "with a secret", "meta": {"api_key": "k-1"}}, secret))
    pgmq_fleet.client.enqueue("echo", {"message": "plain", "fail": "permanent"}, trace_id=plain)
    pgmq_fleet.wait_done(secret, 1)
    pgmq_fleet.wait_done(plain, 1)
    listed = {d["trace_id"]: d["id"] for d in json.loads(fleet_cli("dlq", "list", "--queue", "echo", "--json").stdout)}
    masked, unmasked = listed[secret], listed[plain]
    out = fleet_cli("dlq", "retry", str(masked), str(unmasked), check=False)
    assert out.returncode == 1 and "re-enqueued 1 dead letter(s)" in out.stdout
    assert f"dead letter {masked} not retried" in out.stderr and "$.meta.api_key" in out.stderr
    assert "k-1" not in out.stderr


def test_enqueue_payload_after_options(pgmq_fleet):
    trace = str(uuid.uuid4())
    out = json.loads(fleet_cli("enqueue", "echo", "--trace-id", trace, '{"message": "after the options"}').stdout)
    assert out["trace_id"] == trace and out["queue"] == "echo"
    assert pgmq_fleet.wait_done(trace, 1)
    refused = fleet_cli("enqueue", "echo", "{}", "--trace-id", trace, "surplus", check=False)
    assert refused.returncode == 2 and "unrecognized arguments: surplus" in refused.stderr


def test_status_table_and_bulk_dlq_retry_by_filter_and_age(pgmq_fleet):
    trace = str(uuid.uuid4())
    pgmq_fleet.client.enqueue_many(
        "echo", [{"message": f"bulk {i}", "fail": "permanent"} for i in range(3)], trace_id=trace
    )
    pgmq_fleet.wait_done(trace, 3)

    table = fleet_cli("status").stdout
    assert "scheduler leader: none" in table
    assert "queue" in table and "oldest_age_s" in table and "dead_letters" in table and "\necho " in table
    assert "provider health:" in table

    def mine(*filters: str) -> list[dict]:
        rows = json.loads(fleet_cli("dlq", "list", "--queue", "echo", *filters, "--json").stdout)
        return [d for d in rows if d["trace_id"] == trace]

    assert len(mine("--newer-than", "3600")) == 3 and mine("--older-than", "3600") == []
    assert mine("--error-class", "TransientError") == []
    for row in mine():
        assert "PermanentError: echo asked to fail permanently: bulk" in row["reason"]
    out = fleet_cli("dlq", "retry", "--queue", "echo", "--error-class", "PermanentError", "--newer-than", "3600").stdout
    assert "re-enqueued" in out and int(out.split()[1]) >= 3
    wait_for(
        lambda: len(dead_letters(pgmq_fleet.dsn, trace)) == 6, 30, what="the bulk-retried jobs' second dead letters"
    )
    assert {d["trace_id"] for d in mine("--all")} == {trace} and len(mine("--all")) == 6


def test_enqueue_rejects_unknown_job_and_bad_json():
    bad = fleet_cli("enqueue", "no_such_job", "{}", check=False)
    assert bad.returncode == 2 and "unknown job type 'no_such_job'" in bad.stderr
    bad = fleet_cli("enqueue", "echo", "{not json", check=False)
    assert bad.returncode != 0 and "the payload is not JSON" in bad.stderr


def test_enqueue_with_key_is_idempotent_from_the_cli(pgmq_fleet):
    key = f"cli-{uuid.uuid4()}"
    first = json.loads(fleet_cli("enqueue", "echo", '{"message": "once"}', "--key", key).stdout)
    second = json.loads(fleet_cli("enqueue", "echo", '{"message": "once"}', "--key", key).stdout)
    assert first["duplicate"] is False and second["duplicate"] is True and first["job_id"] == second["job_id"]


def test_migrate_cli_is_a_no_op_when_up_to_date():
    assert "(up to date)" in fleet_cli("migrate").stdout


def test_secrets_never_reach_logs_events_or_dead_letters(pgmq_fleet):
    password = psycopg.conninfo.conninfo_to_dict(pgmq_fleet.dsn)["password"]
    trace = pgmq_fleet.trace()
    # an error message that carries the database password and an API key
    pgmq_fleet.client.enqueue(
        "echo", {"fail": "permanent", "message": f"{password} sk-live0123456789abcdef"}, trace_id=trace
    )
    pgmq_fleet.wait_done(trace, 1)
    (dl,) = dead_letters(pgmq_fleet.dsn, trace)
    assert password not in dl["reason"] and "sk-live0123456789abcdef" not in dl["reason"]
    assert "[redacted]" in dl["reason"]
    with psycopg.connect(pgmq_fleet.dsn, autocommit=True) as conn:
        leaked = conn.execute(
            "select count(*) from bus_events where payload::text like %s", (f"%{password}%",)
        ).fetchone()[0]
        stored = conn.execute("select message::text from dead_letters where trace_id = %s", (trace,)).fetchone()[0]
    assert leaked == 0 and password not in stored
    assert password not in pgmq_fleet.workers.logs()
