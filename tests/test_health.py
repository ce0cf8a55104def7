"""Provider health: real probes of the simulator over HTTP, states in Postgres, workers that wait for a
provider that is down and resume by themselves."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest

from fleet.shared.config import Settings
from fleet.shared.health import ProviderDown, refresh

from .conftest import make_client, worker_env
from .embedding_support import API_KEY, docs, embed_env, sim_log, stored
from .helpers import WorkerGroup, events, wait_for

pytestmark = pytest.mark.usefixtures("fresh_sim")


@pytest.fixture(autouse=True)
def clean_health(services):
    def clear():
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            conn.execute("delete from provider_health")
            conn.execute("delete from provider_health_checks")

    clear()
    yield
    clear()  # later tests must not find a provider marked down


def settings_for(sim, **extra) -> Settings:
    values = {
        "CHAT_API_BASE": f"{sim.url}/v1",
        "CHAT_API_KEY": API_KEY,
        "EMBEDDING_API_BASE": f"{sim.url}/v1",
        "EMBEDDING_API_KEY": API_KEY,
        "HEALTH_DEGRADED_MS": 1000,
        "HEALTH_DOWN_AFTER": 2,
        "HEALTH_PROBE_TIMEOUT_S": 2,
    } | extra
    return Settings(**values)


def states(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return dict(conn.execute("select provider, status from provider_health").fetchall())


def test_states_follow_the_provider_healthy_degraded_down_healthy(services, sim):
    settings = settings_for(sim)
    refresh(settings)
    assert states(services["dsn"]) == {"chat": "healthy", "embeddings": "healthy"}

    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 1200, "ttft_ms": 1200})  # slow, still answering
    refresh(settings)
    assert states(services["dsn"]) == {"chat": "degraded", "embeddings": "degraded"}

    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 0, "ttft_ms": 0, "error_rate_5xx": 1.0})
    result = {s["provider"]: s for s in refresh(settings)}
    assert states(services["dsn"]) == {"chat": "degraded", "embeddings": "degraded"}  # one failure
    assert result["chat"]["error_class"] == "ProviderError" and "500" in result["chat"]["error"]
    refresh(settings)
    assert states(services["dsn"]) == {"chat": "down", "embeddings": "down"}  # HEALTH_DOWN_AFTER=2

    httpx.post(f"{sim.url}/_sim/config", json={"error_rate_5xx": 0.0})
    refresh(settings)
    assert states(services["dsn"]) == {"chat": "healthy", "embeddings": "healthy"}
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        row = conn.execute(
            "select consecutive_failures, last_error_class, last_success_at is not null"
            " from provider_health where provider = 'chat'"
        ).fetchone()
        checks = conn.execute("select count(*) from provider_health_checks").fetchone()[0]
    assert row == (0, "ProviderError", True)  # the last error is kept for the operator
    assert checks == 10  # five refreshes, two providers, every probe recorded
    probes = [r for r in sim_log(sim) if r["path"] == "/v1/chat/completions"]
    assert probes and all(r["max_tokens"] == 1 and r["stream"] is False for r in probes)  # one-token probes


def test_probe_history_is_pruned_by_retention(services, sim):
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(
            "insert into provider_health_checks (provider, kind, status, ok, checked_at)"
            " values ('chat', 'chat', 'healthy', true, now() - interval '48 hours')"
        )
    refresh(settings_for(sim, HEALTH_RETENTION_H=24))
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        old = conn.execute(
            "select count(*) from provider_health_checks where checked_at < now() - interval '1 day'"
        ).fetchone()[0]
        new = conn.execute("select count(*) from provider_health_checks").fetchone()[0]
    assert old == 0 and new == 2


def test_workers_wait_for_a_down_provider_and_resume_by_themselves(services, sim, tmp_path):
    httpx.post(f"{sim.url}/_sim/config", json={"error_rate_5xx": 1.0})
    settings = settings_for(sim)
    refresh(settings)
    refresh(settings)
    assert states(services["dsn"])["embeddings"] == "down"
    httpx.post(f"{sim.url}/_sim/reset")
    env = worker_env(services, "pgmq", **embed_env(sim))
    client = make_client("pgmq")
    prefix = f"down-{uuid.uuid4().hex[:8]}"
    trace = str(uuid.uuid4())
    group = WorkerGroup(env, threads=2, metrics=True, log_dir=tmp_path).start()
    try:
        client.enqueue("embed_documents", {"documents": docs(prefix, 3)}, trace_id=trace)
        wait_for(
            lambda: len([e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.deferred"]) >= 2,
            30,
            what="the job to be deferred while the provider is down",
        )
        assert [r for r in sim_log(sim) if r["path"] == "/v1/embeddings"] == []  # not hammered
        deferred = [e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.deferred"]
        assert deferred[0]["payload"]["error_class"] == "ProviderDown"
        assert deferred[1]["payload"]["delay_ms"] >= 250  # backoff, not a tight loop

        httpx.post(f"{sim.url}/_sim/config", json={"error_rate_5xx": 0.0})
        health_trace = str(uuid.uuid4())
        client.enqueue("refresh_provider_health", {}, trace_id=health_trace)  # the scheduled job, run now
        wait_for(
            lambda: [e for e in events(services["dsn"], trace_id=health_trace) if e["type"] == "health.refreshed"],
            60,
            what="the health refresh",
        )
        assert states(services["dsn"])["embeddings"] == "healthy"
        wait_for(lambda: len(stored(services["dsn"], prefix)) == 3, 60, what="the job to resume and finish")
        metrics = httpx.get(f"http://127.0.0.1:{group.metrics_port}/metrics").text
        assert 'fleet_provider_up{kind="embedding",provider="embeddings"} 1.0' in metrics
        assert "fleet_provider_probe_seconds_bucket" in metrics
    finally:
        assert group.terminate() == 0
        client.broker.close()
    assert not [e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.dead"]


def test_fleet_health_cli_and_status_show_providers(services, sim):
    import json
    import os

    from .helpers import fleet_cli

    env = dict(os.environ) | {
        k: str(v)
        for k, v in {
            "CHAT_API_BASE": f"{sim.url}/v1",
            "CHAT_API_KEY": API_KEY,
            "EMBEDDING_API_BASE": f"{sim.url}/v1",
            "EMBEDDING_API_KEY": API_KEY,
        }.items()
    }
    rows = json.loads(fleet_cli("health", "--refresh", "--json", env=env).stdout)
    assert {r["provider"]: r["status"] for r in rows} == {"chat": "healthy", "embeddings": "healthy"}
    status = json.loads(fleet_cli("status", "--json", env=env).stdout)
    assert {p["provider"] for p in status["providers"]} == {"chat", "embeddings"}
    assert "healthy" in fleet_cli("status", env=env).stdout


def test_letta_is_probed_on_its_health_endpoint_when_configured(services, sim):
    result = {s["provider"]: s for s in refresh(settings_for(sim, LETTA_API_BASE_URL=sim.url, HEALTH_PROVIDERS="chat"))}
    assert set(result) == {"chat", "letta"}
    assert result["letta"]["status"] == "healthy" and result["letta"]["kind"] == "letta"
    refresh(settings_for(sim, LETTA_API_BASE_URL="http://127.0.0.1:9", HEALTH_PROVIDERS="", HEALTH_DOWN_AFTER=1))
    assert states(services["dsn"])["letta"] == "down"  # nothing listens there: a connection error


def test_a_stale_row_of_a_model_no_longer_configured_defers_nothing(services, sim):
    """Only the configured model's state counts; an old row left `down` is history."""
    from fleet.shared.health import _cache, check_available

    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(
            "insert into provider_health (provider, model, kind, status, consecutive_failures)"
            " values ('chat', 'a-model-used-last-month', 'chat', 'down', 40)"
        )
    refresh(settings_for(sim))  # probes the configured model (CHAT_MODEL_DEFAULT, the default here)
    _cache.clear()
    check_available("chat")  # does not raise ProviderDown
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute("update provider_health set status = 'down' where model <> 'a-model-used-last-month'")
    _cache.clear()
    with pytest.raises(ProviderDown):
        check_available("chat")


def test_an_outage_defers_chats_instead_of_using_up_their_retries(services, sim, tmp_path):
    """The job's own failed calls (CHAT_PROVIDER_MAX_RETRIES + 1 per attempt) mark the provider down
    after HEALTH_DOWN_AFTER of them, long before its FLEET_MAX_RETRIES run out; once down, its attempts
    are deferred; a worker probes again after HEALTH_RECHECK_S and the chat completes by itself."""
    httpx.post(f"{sim.url}/_sim/config", json={"error_rate_5xx": 1.0})
    env = worker_env(
        services,
        "pgmq",
        CHAT_API_BASE=f"{sim.url}/v1",
        CHAT_API_KEY=API_KEY,
        CHAT_MODEL_DEFAULT="sim-chat",
        HEALTH_DOWN_AFTER="3",
        CHAT_PROVIDER_MAX_RETRIES="2",
        HEALTH_RECHECK_S="1",
        FLEET_MAX_RETRIES="1",
    )
    client = make_client("pgmq")
    group = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        stream = client.stream_chat(f"s-{uuid.uuid4()}", "hello during an outage", idempotency_key=str(uuid.uuid4()))
        wait_for(
            lambda: [e for e in events(services["dsn"], trace_id=stream.trace_id) if e["type"] == "job.deferred"],
            30,
            what="the chat to be deferred",
        )
        calls = [r for r in sim_log(sim) if r["path"] == "/v1/chat/completions"]
        assert [c["status"] for c in calls][:3] == [500, 500, 500]  # one attempt: a call and two retries
        assert states(services["dsn"])["chat"] == "down"
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            origins = conn.execute("select origin, count(*) from provider_health_checks group by 1").fetchall()
        assert dict(origins).get("job") == 3  # the three failed calls of the first attempt
        httpx.post(f"{sim.url}/_sim/config", json={"error_rate_5xx": 0.0})
        list(stream)
        assert stream.status == "complete"
    finally:
        assert group.terminate() == 0
        client.broker.close()
    kinds = [e["type"] for e in events(services["dsn"], trace_id=stream.trace_id)]
    assert "job.dead" not in kinds and kinds.count("job.retrying") <= 1


def test_a_provider_that_answers_some_calls_is_degraded_not_down(services, sim):
    """Jobs' failed calls mark a provider down only when none of its calls got through for
    HEALTH_DOWN_QUIET_S: under a storm of failures with successes among them, the jobs keep running."""
    from fleet.shared.errors import TransientError
    from fleet.shared.health import _cache, _success_written, note_failure, note_success

    # A quiet spell far longer than the writes below take on any machine; the spell's end is reached by
    # moving the last success back in the database (the clock the rule reads), not by sleeping.
    settings = settings_for(sim, HEALTH_DOWN_AFTER=3, HEALTH_DOWN_QUIET_S=120.0)
    _cache.clear()
    _success_written.clear()
    note_success("embeddings", settings)
    for _ in range(3):
        note_failure("embeddings", TransientError("a 5xx among successes"), settings)
    assert states(services["dsn"])["embeddings"] == "degraded"
    with psycopg.connect(services["dsn"], autocommit=True) as conn:  # HEALTH_DOWN_QUIET_S with no success
        conn.execute(
            "update provider_health set last_success_at = now() - interval '121 seconds' where provider = 'embeddings'"
        )
    for _ in range(3):
        note_failure("embeddings", TransientError("nothing gets through"), settings)
    assert states(services["dsn"])["embeddings"] == "down"


# -- the health bookkeeping never changes the outcome of a provider call --


def _fail_health_writes(dsn: str) -> None:
    """The database refuses every health write of a job: the state update and the history insert."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "create or replace function test_refuse_health() returns trigger language plpgsql as"
            " $$ begin raise exception 'health writes refused by the test'; end $$"
        )
        conn.execute(
            "create trigger test_refuse_health before update on provider_health"
            " for each row execute function test_refuse_health()"
        )
        conn.execute(
            "alter table provider_health_checks add constraint test_no_job_checks check (origin <> 'job') not valid"
        )


def _allow_health_writes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop trigger if exists test_refuse_health on provider_health")
        conn.execute("alter table provider_health_checks drop constraint if exists test_no_job_checks")


def test_a_failed_health_write_never_resends_a_paid_embedding_call(services, sim):
    """After a failure, a job's successful call resets the run of failures; if that write fails, the
    answer (already paid for) is still returned, and the provider is called exactly once."""
    from fleet.shared.health import _cache
    from fleet.shared.providers.embeddings import EmbeddingsClient

    settings = settings_for(sim, EMBED_PROVIDER_MAX_RETRIES=2)
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(
            "insert into provider_health (provider, model, kind, status, consecutive_failures)"
            " values ('embeddings', %s, 'embedding', 'degraded', 1)",
            (settings.embedding_model_default,),
        )
    _fail_health_writes(services["dsn"])
    _cache.clear()
    try:
        result = EmbeddingsClient(settings).embed(["first text", "second text"])
    finally:
        _allow_health_writes(services["dsn"])
    assert len(result.vectors) == 2
    assert len(sim_log(sim)) == 1


def test_a_failed_health_write_leaves_the_providers_own_error_to_surface(services, sim):
    """A provider fault is noted as a failed check; if that write fails, the provider's error (with its
    status and Retry-After) is still the one raised, and nothing is sent again because of the database."""
    from fleet.shared.errors import ProviderError
    from fleet.shared.health import _cache
    from fleet.shared.providers.chat import ChatClient

    httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [500]})
    _fail_health_writes(services["dsn"])
    _cache.clear()
    try:
        with pytest.raises(ProviderError) as raised:
            list(ChatClient(settings_for(sim, CHAT_PROVIDER_MAX_RETRIES=0)).stream([{"role": "user", "content": "hi"}]))
    finally:
        _allow_health_writes(services["dsn"])
    assert raised.value.status == 500
    assert [r["status"] for r in sim_log(sim)] == [500]


# -- no connection is held across a provider call --


def test_no_database_connection_is_held_while_a_down_provider_is_probed_again(services, sim):
    """The recheck of a down provider claims the row, then probes with no connection in hand (the probe
    may take HEALTH_PROBE_TIMEOUT_S), then records the result in a connection of its own."""
    import threading
    import time

    from fleet.shared.db import get_pool
    from fleet.shared.health import _cache, check_available

    settings = settings_for(sim, HEALTH_RECHECK_S=1, HEALTH_PROBE_TIMEOUT_S=20)
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 6000})  # the probe takes 6 s
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(
            "insert into provider_health (provider, model, kind, status, consecutive_failures, checked_at)"
            " values ('embeddings', %s, 'embedding', 'down', 2, now() - interval '1 hour')",
            (settings.embedding_model_default,),
        )
    pool = get_pool()
    _cache.clear()

    def held() -> int:
        stats = pool.get_stats()
        return stats["pool_size"] - stats["pool_available"]

    def claimed() -> bool:
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            return conn.execute(
                "select checked_at > now() - interval '1 minute' from provider_health where provider = 'embeddings'"
            ).fetchone()[0]

    recheck = threading.Thread(target=check_available, args=("embeddings", settings))
    recheck.start()
    wait_for(claimed, 30, 0.02, "the recheck to claim the row")
    # The claim's connection goes back to the pool once its block ends; from then on, while the probe is
    # out, none may be taken again.
    wait_for(lambda: held() == 0 or not recheck.is_alive(), 30, 0.01, "the claim's connection to come back")
    samples = []
    for _ in range(20):
        samples.append(held())
        time.sleep(0.02)
    probing = recheck.is_alive()  # 0.4 s of samples inside a 6 s probe
    recheck.join(30)
    assert probing and max(samples) == 0, f"connections held during the probe: {samples}"
    assert states(services["dsn"])["embeddings"] == "degraded"  # it answered, slowly (above HEALTH_DEGRADED_MS)
