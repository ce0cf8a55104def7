"""A job type declared outside the package (examples/summaries) on every guarantee the fleet gives its own,
with real worker processes (`dramatiq fleet.workers:start` with FLEET_JOBS) on both brokers: published to
job_types, refused at the edge when its payload is bad, nothing lost to a worker killed mid-job, a permanent
failure dead-lettered and replayed after the fix, an idempotent repeat run once, a rate limit that holds
across two processes, and a message naming a job type no worker knows dead-lettered with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dramatiq
import httpx
import psycopg
import pydantic
import pytest

from fleet.ops.processes import stop_process
from fleet.shared.errors import InvalidPayload
from fleet.shared.registry import InvalidJobDeclaration, job, job_type

from .conftest import make_client, worker_env
from .embedding_support import API_KEY, reset_sim
from .helpers import ROOT, WorkerGroup, events, fleet_cli, wait_for

EXAMPLE = ROOT / "examples" / "summaries"
sys.path.insert(0, str(EXAMPLE))  # the application's package, as its own deployment would install it

from summaries.jobs import SummarizeJob, summarize  # noqa: E402


@dataclass
class UserFleet:
    kind: str
    dsn: str = field(repr=False)
    env: dict = field(repr=False)
    client: object
    log_dir: Path
    workers: WorkerGroup | None = None


class OtherJob(pydantic.BaseModel):
    x: int


def user_env(services, kind: str, sim, **extra) -> dict:
    path = os.pathsep.join(p for p in (str(EXAMPLE), os.environ.get("PYTHONPATH")) if p)
    return worker_env(
        services,
        kind,
        FLEET_JOBS="summaries.jobs",
        PYTHONPATH=path,
        CHAT_API_BASE=f"{sim.url}/v1",
        CHAT_API_KEY=API_KEY,
        CHAT_MODEL_DEFAULT="sim-chat",
        HEALTH_RECHECK_S="600",
        **extra,
    )


def group(uf: UserFleet, *, processes: int = 1, **extra) -> WorkerGroup:
    return WorkerGroup(uf.env | extra, processes=processes, threads=4, log_dir=uf.log_dir, queues=["summaries"]).start()


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def ufleet(request, services, sim, tmp_path_factory):
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute((EXAMPLE / "summaries" / "schema.sql").read_text())
    env = user_env(services, request.param, sim)
    uf = UserFleet(
        request.param,
        services["dsn"],
        env,
        make_client(request.param),
        tmp_path_factory.mktemp(f"user-jobs-{request.param}"),
    )
    uf.workers = group(uf)
    try:
        yield uf
    finally:
        code = uf.workers.terminate()
        uf.client.broker.close()
        assert code == 0, uf.workers.logs()[-3000:]


@pytest.fixture(autouse=True)
def quick_sim(sim):
    reset_sim(sim)
    return sim


def store_document(dsn: str, text: str = "The fleet runs jobs. " * 20) -> str:
    doc = f"doc-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into summary_documents (document_id, body) values (%s, %s)", (doc, text))
    return doc


def summary_of(dsn: str, doc: str) -> dict | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select summary, job_id from document_summaries where document_id = %s", (doc,)).fetchone()
    return {"summary": row[0], "job_id": row[1]} if row else None


def of_type(dsn: str, job_id: str, kind: str) -> list[dict]:
    return events(dsn, job_id=job_id, type=kind)


def test_the_declaration_checks_its_queue_name_and_model():
    for bad in ("Summaries", "summaries-v2", "1st", "x" * 48, ""):
        with pytest.raises(InvalidJobDeclaration, match="invalid queue name"):
            job(SummarizeJob, queue=bad)(lambda payload: None)
    with pytest.raises(InvalidJobDeclaration, match="pydantic model"):
        job(dict, queue="fine")  # type: ignore[type-var]
    with pytest.raises(InvalidJobDeclaration, match="lease field"):
        job(SummarizeJob, queue="fine", lease="no_such_field")
    jt = summarize.type
    assert (jt.name, jt.queue, jt.module) == ("summarize", "summaries", "summaries.jobs")
    assert jt.description.startswith("Summarises a stored document")
    assert jt.options.lease is not None and jt.options.lease.field == "document_id"


def test_the_worker_publishes_what_it_serves(ufleet):
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        row = conn.execute(
            "select queue, payload_schema, options, module from job_types where name = 'summarize'"
        ).fetchone()
        builtin = conn.execute("select queue from job_types where name = 'chat_completion'").fetchone()
    queue, schema, options, module = row
    assert queue == "summaries" and module == "summaries.jobs" and builtin == ("chat",)
    assert schema["required"] == ["document_id"] and "max_words" in schema["properties"]
    assert options["max_retries"] == 4 and options["lease"]["field"] == "document_id"
    assert options["rate_limit"]["limit"] >= 1


def test_a_bad_payload_is_refused_at_the_edge(ufleet):
    with pytest.raises(InvalidPayload, match="document_id"):
        ufleet.client.enqueue(summarize, {"document_id": ""})
    with pytest.raises(InvalidPayload, match="max_words"):
        ufleet.client.enqueue("summarize", {"document_id": "d", "max_words": 10_000})
    with pytest.raises(InvalidPayload, match="takes a SummarizeJob"):
        ufleet.client.enqueue(summarize, OtherJob(x=1))  # type: ignore[arg-type]
    done = fleet_cli("enqueue", "summarize", '{"document_id": "d", "surprise": 1}', env=ufleet.env, check=False)
    assert done.returncode == 2 and "surprise" in done.stderr, done.stderr


def test_a_worker_killed_mid_job_loses_nothing(ufleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 2500})  # the answer starts after the kill
    doc = store_document(ufleet.dsn)
    sent = ufleet.client.enqueue(summarize, SummarizeJob(document_id=doc))
    wait_for(lambda: of_type(ufleet.dsn, sent.job_id, "job.started"), 60, what="the job to start")
    ufleet.workers.kill()
    assert summary_of(ufleet.dsn, doc) is None
    ufleet.workers = group(ufleet)
    stored = wait_for(lambda: summary_of(ufleet.dsn, doc), 90, what="the summary after a restart")
    assert stored["job_id"] == sent.job_id and len(stored["summary"].split()) > 3
    assert len(of_type(ufleet.dsn, sent.job_id, "job.started")) >= 2  # the killed attempt and the one that ran


def test_a_permanent_failure_is_dead_lettered_and_replays_after_the_fix(ufleet):
    doc = f"missing-{uuid.uuid4().hex[:10]}"
    sent = ufleet.client.enqueue(summarize, SummarizeJob(document_id=doc))

    def dead_letter():
        with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
            return conn.execute(
                "select id, reason, attempts from dead_letters where message_id = %s", (sent.job_id,)
            ).fetchone()

    dl_id, reason, attempts = wait_for(dead_letter, 60, what="the dead letter")
    assert reason == f"permanent error: PermanentError: document {doc!r} is not stored" and attempts == 1
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:  # the fix: the document is stored
        conn.execute("insert into summary_documents (document_id, body) values (%s, 'Now it exists.')", (doc,))
    # A producer without the application's module: the job type comes from job_types.
    env = {k: v for k, v in ufleet.env.items() if k not in ("FLEET_JOBS", "PYTHONPATH")}
    done = fleet_cli("dlq", "retry", str(dl_id), env=env)
    assert "re-enqueued 1" in done.stdout
    stored = wait_for(lambda: summary_of(ufleet.dsn, doc), 60, what="the replayed summary")
    assert stored["job_id"] != sent.job_id


def test_an_idempotent_repeat_runs_once(ufleet):
    doc = store_document(ufleet.dsn)
    key = f"summary:{doc}"
    first = ufleet.client.enqueue(summarize, SummarizeJob(document_id=doc), idempotency_key=key)
    again = ufleet.client.enqueue(summarize, SummarizeJob(document_id=doc), idempotency_key=key)
    assert again.duplicate and again.job_id == first.job_id and not first.duplicate
    wait_for(lambda: of_type(ufleet.dsn, first.job_id, "job.succeeded"), 60, what="the job to succeed")
    later = ufleet.client.enqueue("summarize", {"document_id": doc}, idempotency_key=key)
    assert later.duplicate and later.job_id == first.job_id
    assert len(of_type(ufleet.dsn, first.job_id, "job.started")) == 1
    assert summary_of(ufleet.dsn, doc)["job_id"] == first.job_id
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        runs = conn.execute(
            "select count(*) from bus_events where type = 'job.started' and actor = 'summarize'"
            " and trace_id = %s::uuid",
            (first.trace_id,),
        ).fetchone()[0]
    assert runs == 1


def clear_rate_counters(uf: UserFleet) -> None:
    if uf.kind == "redis":
        import redis

        client = redis.Redis.from_url(uf.env["REDIS_URL"])
        for key in client.scan_iter("*fleet:job:summarize*"):
            client.delete(key)
        client.close()
    else:
        with psycopg.connect(uf.dsn, autocommit=True) as conn:
            conn.execute("delete from rate_limit_counters where key like 'fleet:job:summarize%%'")


def test_the_rate_limit_holds_across_two_processes(ufleet):
    """Two summaries per ten minutes, two worker processes, five jobs: two run, three are deferred."""
    ufleet.workers.terminate()
    clear_rate_counters(ufleet)
    limited = group(ufleet, processes=2, SUMMARIES_PER_WINDOW="2", SUMMARIES_WINDOW_S="600")
    try:
        docs = [store_document(ufleet.dsn) for _ in range(5)]
        sent = ufleet.client.enqueue_many(summarize, [SummarizeJob(document_id=d) for d in docs])

        def settled():
            done = [s for s in sent if of_type(ufleet.dsn, s.job_id, "job.succeeded")]
            deferred = [s for s in sent if of_type(ufleet.dsn, s.job_id, "job.deferred")]
            return (done, deferred) if len(done) == 2 and len(deferred) == 3 else None

        done, deferred = wait_for(settled, 90, what="two summaries and three deferred jobs")
        assert {s.job_id for s in done}.isdisjoint(s.job_id for s in deferred)
        assert sum(summary_of(ufleet.dsn, d) is not None for d in docs) == 2
        reasons = [e["payload"] for s in deferred for e in of_type(ufleet.dsn, s.job_id, "job.deferred")]
        assert all(r["error_class"] == "RateLimitExceeded" for r in reasons), reasons
    finally:
        assert limited.terminate() == 0, limited.logs()[-3000:]
        if ufleet.kind == "pgmq":
            with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
                conn.execute("select pgmq.purge_queue('summaries')")
        else:
            ufleet.client.broker.flush("summaries")
        clear_rate_counters(ufleet)
        ufleet.workers = group(ufleet)


def test_a_job_type_no_worker_knows_is_dead_lettered_with_the_reason(ufleet):
    trace = str(uuid.uuid4())
    message = dramatiq.Message(
        queue_name="summaries",
        actor_name="summarise_typo",
        args=({"document_id": "d"},),
        kwargs={},
        options={"trace_id": trace},
    )
    ufleet.client.broker.declare_queue("summaries")
    ufleet.client.broker.enqueue(message)

    def dead_letter():
        with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
            return conn.execute(
                "select reason from dead_letters where message_id = %s", (message.message_id,)
            ).fetchone()

    (reason,) = wait_for(dead_letter, 60, what="the unknown job's dead letter")
    assert reason == "unknown actor 'summarise_typo'"
    with pytest.raises(Exception, match="unknown job type 'summarise_typo'"):
        job_type("summarise_typo")


def test_fleet_worker_serves_the_modules_jobs_names(ufleet):
    env = {k: v for k, v in ufleet.env.items() if k != "FLEET_JOBS"}
    missing = fleet_cli("worker", "--jobs", "summaries.no_such_module", "--queues", "summaries", env=env, check=False)
    assert missing.returncode == 2 and "summaries.no_such_module" in missing.stderr, missing.stderr
    unknown = fleet_cli("worker", "--queues", "summaries", env=env, check=False)
    assert unknown.returncode == 2 and "unknown queue 'summaries'" in unknown.stderr, unknown.stderr
    ufleet.workers.terminate()
    log = open(ufleet.log_dir / f"fleet-worker-{uuid.uuid4().hex[:6]}.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.ops.cli",
            "worker",
            "--jobs",
            "summaries.jobs",
            "--queues",
            "summaries",
            "--threads",
            "2",
            "--metrics-port",
            "0",
        ],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        doc = store_document(ufleet.dsn)
        sent = ufleet.client.enqueue(summarize, SummarizeJob(document_id=doc))
        stored = wait_for(lambda: summary_of(ufleet.dsn, doc), 90, what="the summary from `fleet worker --jobs`")
        assert stored["job_id"] == sent.job_id
    finally:
        stop_process(proc, 60)
        log.close()
        ufleet.workers = group(ufleet)


def test_the_kubernetes_renderer_deploys_the_applications_worker_type(services):
    """deploy/k8s/render.py on the example's Procfile: a Deployment running `fleet worker --jobs`, probed on its
    metrics port, and a KEDA trigger on the summaries queue's depth whose query the database answers."""
    import kubernetes_validate

    from .test_deploy import KUBERNETES_VERSION, k8s

    image = "ghcr.io/your-org/summaries:1"
    objs = {(o["kind"], o["metadata"]["name"]): o for o in k8s.objects(EXAMPLE / "Procfile", image)}
    dep, scaled = objs[("Deployment", "fleet-summaries")], objs[("ScaledObject", "fleet-summaries")]
    kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == image and k8s.option(container["args"], "--jobs") == ["summaries.jobs"]
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == k8s.DEFAULT_TIME_LIMIT_S + 30
    (trigger,) = scaled["spec"]["triggers"]
    assert "pgmq.metrics('summaries')" in trigger["metadata"]["query"]
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute("select pgmq.create('summaries')")
        assert isinstance(conn.execute(trigger["metadata"]["query"]).fetchone()[0], int)


def test_a_lease_defers_a_second_job_for_the_same_document(ufleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 2000})  # the first holds the lease for two seconds
    doc = store_document(ufleet.dsn)
    first, second = ufleet.client.enqueue_many(summarize, [SummarizeJob(document_id=doc)] * 2)

    def both_done():
        return all(of_type(ufleet.dsn, s.job_id, "job.succeeded") for s in (first, second))

    wait_for(both_done, 90, what="both jobs to succeed")
    deferred = [e["payload"] for s in (first, second) for e in of_type(ufleet.dsn, s.job_id, "job.deferred")]
    assert deferred and all(d["error_class"] == "LeaseHeld" for d in deferred), deferred
    assert f"document_id={doc}" in deferred[0]["error"]


def test_dead_letters_false_records_the_death_without_a_row(services):
    """In one process on dramatiq's StubBroker, with the fleet's retry and dead-letter middleware."""
    from dramatiq import Worker
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import CurrentMessage

    from fleet.shared import events as event_sink
    from fleet.shared.errors import PermanentError
    from fleet.shared.middleware import ClassifiedRetries, DeadLetters

    broker = StubBroker(middleware=[CurrentMessage(), ClassifiedRetries(max_retries=0), DeadLetters()])
    suffix = uuid.uuid4().hex[:8]

    def failing(payload: SummarizeJob) -> None:
        raise PermanentError("refused on purpose")

    kept = job(SummarizeJob, queue="kept_letters", name=f"kept_{suffix}")(failing)
    quiet = job(SummarizeJob, queue="quiet_letters", name=f"quiet_{suffix}", dead_letters=False)(failing)
    sent = {j.name: j.declare(broker).send({"document_id": "d"}).message_id for j in (kept, quiet)}
    worker = Worker(broker, worker_timeout=100)
    worker.start()
    try:
        broker.join("kept_letters", fail_fast=False)
        broker.join("quiet_letters", fail_fast=False)
    finally:
        worker.stop()
    event_sink.flush()
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        rows = dict(
            conn.execute(
                "select message_id, reason from dead_letters where message_id = any(%s)", (list(sent.values()),)
            ).fetchall()
        )
    assert rows == {sent[kept.name]: "permanent error: PermanentError: refused on purpose"}
    deaths = wait_for(lambda: of_type(services["dsn"], sent[quiet.name], "job.dead"), 30, what="the job.dead event")
    assert deaths[0]["payload"]["dead_letter"] is False
