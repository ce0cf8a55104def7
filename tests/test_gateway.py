"""The HTTP gateway on both brokers, over real HTTP: a gateway process in front of real worker
processes and the provider simulator. Frames, idempotent replay, resume, a dropped client, embed
progress, job and trace lookups, health, metrics, the OpenAPI document, and the development chat
page in a real headless Chromium (Debian's `chromium`, installed by `make system-deps`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import httpx
import psycopg
import pytest

from fleet.shared.frames import channel

from .embedding_support import docs, reset_sim
from .gateway_support import chat_calls, fleet_with_gateway, get_sse, new_key, post_sse
from .helpers import wait_for

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def gf(request, services, sim, tmp_path_factory):
    with fleet_with_gateway(services, sim, request.param, tmp_path_factory.mktemp(f"gw-{request.param}")) as f:
        yield f


@pytest.fixture(autouse=True)
def chat_sim(sim):
    reset_sim(sim)
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 0, "tokens_per_s": 0, "answer_tokens": 12})
    return sim


def ask(gf, content="hello there", *, key=None, session=None, **kw):
    body = {"session_id": session or f"s-{uuid.uuid4()}", "content": content}
    headers = kw.pop("headers", {}) | ({"Idempotency-Key": key} if key else {})
    return post_sse(gf.url, "/v1/chat", body, headers=headers, **kw)


def stored(gf, job_id: str) -> dict | None:
    with psycopg.connect(gf.fleet.dsn, autocommit=True) as conn:
        row = conn.execute(
            "select content, status from messages where job_id = %s and role = 'assistant'", (job_id,)
        ).fetchone()
    return row and {"content": row[0], "status": row[1]}


def test_chat_frames_arrive_in_order_with_seq_as_event_ids(gf, sim):
    # 1.2 s to the first token, six times CHAT_KEEPALIVE_S: keepalives come before it on any machine
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 1200, "tokens_per_s": 200})
    r = ask(gf, key=new_key())
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    kinds = r.types()
    assert kinds[0] == "ready" and kinds[-1] == "chat.done" and kinds.count("chat.delta") == 12, kinds
    first = kinds.index("chat.delta")
    assert set(kinds[1:first]) == {"keepalive"} and set(kinds[first:-1]) == {"chat.delta"}
    seqs = [f["seq"] for f in r.frames]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(f["_id"] == str(f["seq"]) and f["_event"] == f["type"] for f in r.frames)
    job_id = r.headers["x-job-id"]
    assert all(f["job_id"] == job_id for f in r.frames)
    assert r.text() == r.frames[-1]["text"] == stored(gf, job_id)["content"]
    # the simulator counts as llama.cpp does: 2 words, 4 template tokens for the message, 3 for the reply
    assert r.frames[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "estimated": False}


def test_a_repeated_idempotency_key_replays_the_answer_with_one_provider_call(gf, sim):
    key, session = new_key(), f"s-{uuid.uuid4()}"
    first = ask(gf, key=key, session=session)
    again = ask(gf, key=key, session=session)
    by_body = post_sse(gf.url, "/v1/chat", {"session_id": session, "content": "hello there", "idempotency_key": key})
    assert first.headers["x-idempotent-replay"] == "false"
    assert again.headers["x-idempotent-replay"] == by_body.headers["x-idempotent-replay"] == "true"
    assert again.headers["x-job-id"] == by_body.headers["x-job-id"] == first.headers["x-job-id"]
    for replay in (again, by_body):
        assert replay.types()[-1] == "chat.done" and replay.frames[-1]["text"] == first.frames[-1]["text"]
    assert len(chat_calls(sim)) == 1


def leave_claim(gf, key: str, *, expires_in_s: float) -> str:
    """A claim as a gateway leaves it when it dies between claiming a key and enqueueing its job."""
    ghost = str(uuid.uuid4())
    with psycopg.connect(gf.fleet.dsn, autocommit=True) as conn:
        conn.execute(
            "insert into request_dedup (scope, key, result, expires_at) values ('gateway.chat', %s, %s,"
            " now() + %s * interval '1 second')",
            (f"-:{key}", json.dumps({"job_id": ghost, "trace_id": str(uuid.uuid4()), "pending": True}), expires_in_s),
        )
    return ghost


def test_a_key_left_pending_by_a_dead_request_is_refused_while_fresh_then_claimable_again(gf, sim):
    fresh, expired = new_key(), new_key()
    leave_claim(gf, fresh, expires_in_s=60)
    r = ask(gf, key=fresh, timeout=10)
    assert r.status == 409 and r.body["error"] == "idempotency_key_in_flight" and r.headers["retry-after"] == "1"
    ghost = leave_claim(gf, expired, expires_in_s=-1)
    r = ask(gf, key=expired, timeout=10)  # before: streamed the ghost job, which never came, until the timeout
    assert r.status == 200 and r.headers["x-idempotent-replay"] == "false" and r.headers["x-job-id"] != ghost
    assert r.types()[-1] == "chat.done" and stored(gf, r.headers["x-job-id"])["content"] == r.text()
    again = ask(gf, key=expired, timeout=10)  # the key now holds its job
    assert again.headers["x-idempotent-replay"] == "true" and again.headers["x-job-id"] == r.headers["x-job-id"]
    with psycopg.connect(gf.fleet.dsn, autocommit=True) as conn:
        left = conn.execute(
            "select result ? 'pending', expires_at > now() + interval '6 days' from request_dedup"
            " where scope = 'gateway.chat' and key = %s",
            (f"-:{expired}",),
        ).fetchone()
    assert left == (False, True)


def test_last_event_id_resumes_from_the_frame_after_it(gf, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"tokens_per_s": 40})
    key, session = new_key(), f"s-{uuid.uuid4()}"
    cut = ask(gf, key=key, session=session, stop_after=lambda fs: sum(f["type"] == "chat.delta" for f in fs) >= 3)
    last = cut.frames[-1]["seq"]
    rest = ask(gf, key=key, session=session, headers={"Last-Event-ID": str(last)})
    assert rest.frames and all(f["seq"] > last for f in rest.frames), rest.frames
    assert [f["seq"] for f in rest.frames] == list(range(last + 1, last + 1 + len(rest.frames)))
    assert rest.types()[-1] == "chat.done"
    assert cut.text() + rest.text() == rest.frames[-1]["text"]
    # the same through the job's stream URL, as an EventSource would reconnect
    tail = get_sse(gf.url, f"/v1/jobs/{cut.headers['x-job-id']}/stream", headers={"Last-Event-ID": str(last + 2)})
    assert [f["seq"] for f in tail.frames] == [f["seq"] for f in rest.frames][2:]
    assert len(chat_calls(sim)) == 1


def test_a_dropped_client_leaves_the_job_to_finish_and_the_answer_stored(gf, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"tokens_per_s": 20})
    key, session = new_key(), f"s-{uuid.uuid4()}"
    cut = ask(gf, key=key, session=session, stop_after=lambda fs: "chat.delta" in [f["type"] for f in fs])
    job_id = cut.headers["x-job-id"]
    assert cut.types()[-1] == "chat.delta"
    done = wait_for(
        lambda: (s := stored(gf, job_id)) and s["status"] == "complete" and s, 60, 0.1, "the answer to be stored"
    )
    again = ask(gf, key=key, session=session)
    assert again.frames[-1]["type"] == "chat.done" and again.frames[-1]["text"] == done["content"]
    assert len(done["content"].split()) == 12 and len(chat_calls(sim)) == 1


def test_embed_streams_status_per_batch_then_done(gf, sim):
    # A quiet spell five times GATEWAY_KEEPALIVE_S (0.5 s) long, however late the frames before it arrive:
    # the gateway's keepalive comments.
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 2500})
    prefix = f"gw-{uuid.uuid4().hex[:8]}"
    r = post_sse(gf.url, "/v1/embed", {"documents": docs(prefix, 5)}, headers={"Idempotency-Key": new_key()})
    kinds = r.types()
    assert kinds[0] == "ready" and kinds[-1] == "embed.done" and "embed.status" in kinds, kinds
    assert [f["seq"] for f in r.frames] == list(range(1, len(kinds) + 1))
    assert r.frames[-1]["embedded"] == 5 and r.frames[-1]["failed"] == 0 and r.comments >= 1
    with psycopg.connect(gf.fleet.dsn, autocommit=True) as conn:
        n = conn.execute("select count(*) from vector_documents where source_id like %s", (f"{prefix}-%",)).fetchone()[
            0
        ]
    assert n == 5
    job = httpx.get(f"{gf.url}/v1/jobs/{r.headers['x-job-id']}").json()
    assert job | {"events": 0} == {
        "job_id": r.headers["x-job-id"],
        "trace_id": r.headers["x-trace-id"],
        "kind": "embed",
        "state": "succeeded",
        "attempts": 1,
        "dead_letter": None,
        "events": 0,
    }
    trace = httpx.get(f"{gf.url}/v1/traces/{r.headers['x-trace-id']}").json()
    assert {"job.started", "embed.status", "embed.done", "job.succeeded"} <= {e["type"] for e in trace["events"]}


def test_a_failed_chat_ends_with_error_and_the_job_shows_its_dead_letter(gf, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"api_key": "sk-some-other-key-0123456789"})  # 401: permanent
    r = ask(gf, key=new_key())
    assert r.types()[-1] == "error" and r.frames[-1]["error_class"], r.frames
    job_id = r.headers["x-job-id"]
    job = wait_for(
        lambda: (j := httpx.get(f"{gf.url}/v1/jobs/{job_id}").json())["state"] == "dead" and j,
        60,
        0.1,
        "the job to be dead-lettered",
    )
    assert job["attempts"] == 1 and job["dead_letter"]["error_class"] == r.frames[-1]["error_class"]
    assert httpx.get(f"{gf.url}/v1/jobs/{uuid.uuid4()}").status_code == 404


def test_health_metrics_and_openapi(gf):
    assert httpx.get(f"{gf.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gf.url}/readyz").json()["status"] == "ready"
    ask(gf, key=new_key())
    text = httpx.get(f"{gf.url}/metrics").text
    assert 'fleet_gateway_requests_total{method="POST",route="/v1/chat",status="200"}' in text
    assert "fleet_gateway_request_duration_seconds_bucket" in text and "fleet_gateway_open_streams" in text
    doc = httpx.get(f"{gf.url}/openapi.json").json()
    assert {"/v1/chat", "/v1/embed", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/stream", "/v1/traces/{trace_id}"} <= set(
        doc["paths"]
    )
    chat = doc["components"]["schemas"]["ChatRequest"]
    assert chat["additionalProperties"] is False and "session_id" in chat["properties"]


def test_the_chat_page_streams_an_answer_in_a_real_browser(gf, sim, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: run `make system-deps` (as root it installs it)"
    from playwright.sync_api import sync_playwright

    reset_sim(sim)
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 300, "tokens_per_s": 10, "answer_tokens": 12})
    screenshot = tmp_path / "chat-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)  # a fresh profile each launch
        try:
            page = browser.new_page()
            page.goto(gf.url + "/")
            page.fill("input[name=q]", "What does the fleet do?")
            page.click("button[type=submit]")
            # part of the answer is on the page before the end: it streams
            page.wait_for_function(
                "() => { const a = document.querySelector('p.assistant');"
                " return a && a.textContent.length > 0 && !a.dataset.done; }",
                timeout=15_000,
            )
            page.wait_for_selector("p.assistant[data-done='1']", timeout=30_000)
            answer = page.inner_text("p.assistant")
            page.click("#profile button[type=submit]")  # the page shows /v1/me for its user (no agent yet)
            page.wait_for_selector("#profile-out[data-status='200']", timeout=30_000)
            profile = json.loads(page.inner_text("#profile-out"))
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot of the chat page: {screenshot}")
    with psycopg.connect(gf.fleet.dsn, autocommit=True) as conn:
        stored = conn.execute(
            "select content from messages where role = 'assistant' and session_id like 'page-%%'"
            " and status = 'complete' order by id desc limit 1"
        ).fetchone()[0]
    assert answer == stored and len(answer.split()) == 12
    assert profile["letta_agent_id"] is None and uuid.UUID(profile["user_id"])
    assert screenshot.stat().st_size > 1000


def test_importing_the_gateway_app_builds_no_broker_and_imports_no_worker():
    """The request models come from fleet.shared.jobs: the app's import alone declares no actors and starts nothing."""
    code = (
        "import sys, fleet.gateway.app, fleet.gateway.models; "
        "print(sorted(m for m in sys.modules if m == 'fleet.workers' or m.startswith('fleet.workers.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_housekeeping_prunes_old_gateway_jobs_and_expired_signatures(services):
    old, new, sig = str(uuid.uuid4()), str(uuid.uuid4()), f"sig-{uuid.uuid4()}"
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(
            "insert into gateway_jobs (job_id, trace_id, kind, created_at) values"
            " (%s, gen_random_uuid(), 'chat', now() - interval '3 days'), (%s, gen_random_uuid(), 'chat', now())",
            (old, new),
        )
        conn.execute(
            "insert into gateway_signatures (signature, expires_at) values (%s, now() - interval '1 second')", (sig,)
        )
    env = os.environ | {"GATEWAY_JOBS_RETENTION_DAYS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", "from fleet.workers.housekeeping import housekeeping; housekeeping.fn({})"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        jobs = {r[0] for r in conn.execute("select job_id from gateway_jobs where job_id = any(%s)", ([old, new],))}
        sigs = conn.execute("select count(*) from gateway_signatures where signature = %s", (sig,)).fetchone()[0]
    assert jobs == {new} and sigs == 0


@pytest.mark.parametrize("gf", ["pgmq"], indirect=True)  # the NOTIFY listener is the pgmq transport's
def test_a_stray_notification_does_not_stop_the_pgmq_listener(gf, sim):
    first = ask(gf, key=new_key(), stop_after=lambda frames: True)  # leaves: the job stays followed
    with psycopg.connect(gf.fleet.dsn, autocommit=True) as conn:
        conn.execute("select pg_notify(%s, 'not a frame')", (channel(first.headers["x-job-id"]),))
    r = ask(gf, key=new_key())  # heard through the same listener
    assert r.types()[0] == "ready" and r.types()[-1] == "chat.done"
    ready = httpx.get(f"{gf.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert "gateway.bad_notification" in gf.gateway.logs()


def test_sse_ids_keep_increasing_across_a_retried_attempt(gf, sim):
    # attempt 1 sends `ready` and keepalives, then fails (its provider call and the call's retries), and is retried
    httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [500, 500, 500]})
    r = ask(gf, key=new_key())
    job_id = r.headers["x-job-id"]
    assert r.types()[-1] == "chat.done" and r.types().count("ready") == 1, r.types()
    seqs = [f["seq"] for f in r.frames]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # before: attempt 2 numbered its frames from 1 again
    # a client resuming after one of attempt 2's frames gets exactly the frames after it
    cut = r.frames[r.types().index("chat.delta")]["seq"]
    rest = get_sse(gf.url, f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": str(cut)})
    assert rest.types()[-1] == "chat.done" and rest.frames[-1]["text"] == stored(gf, job_id)["content"]
