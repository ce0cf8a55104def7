"""The gateway's production toggles and its answers to bad input, over real HTTP: JWT (HS256 with a
shared secret, RS256 from a JWKS served on loopback), HMAC request signing with replay protection,
per-user rate limits, and a 4xx naming the problem for each bad request, with nothing enqueued."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fleet.gateway.signing import sign

from .embedding_support import reset_sim
from .gateway_support import Sse, chat_calls, fleet_with_gateway, new_key, post_sse

SECRET = "super-secret-jwt-token-with-at-least-32-characters"
HMAC_KEY = "hmac-key-for-the-gateway-tests"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ALICE, BOB, CAROL = (str(uuid.uuid4()) for _ in range(3))


def someone() -> str:
    """A user of their own (each user has GATEWAY_CHAT_RATE_LIMIT_PER_MIN requests a minute, bad ones included)."""
    return str(uuid.uuid4())


class JwksServer:
    """A JWKS endpoint on loopback, as an identity provider publishes its public keys: `keys` (kid: RSA
    private key) may be changed while it runs, and `fetches` counts the requests it answered."""

    def __init__(self, keys: dict | None = None) -> None:
        self.keys = dict(keys) if keys is not None else {"k1": RSA_KEY}
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.fetches += 1
                jwks = [
                    json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key()))
                    | {"kid": kid, "use": "sig", "alg": "RS256"}
                    for kid, k in list(server.keys.items())
                ]
                body = json.dumps({"keys": jwks}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def token(sub: str, *, exp_in: float = 300, key=SECRET, alg="HS256", kid=None) -> str:
    claims = {"sub": sub, "aud": "authenticated", "role": "authenticated", "exp": int(time.time() + exp_in)}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def signed(
    method: str,
    path: str,
    body: bytes,
    *,
    bearer: str | None,
    ts: float | str | None = None,
    key=HMAC_KEY,
    idempotency_key: str | None = None,
) -> dict:
    """Headers for a signed request; `path` is the target as sent (with its query string)."""
    stamp = ts if isinstance(ts, str) else str(int(ts if ts is not None else time.time()))
    auth = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    idem = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    signature = sign(
        key,
        stamp,
        method,
        path,
        body,
        authorization=auth.get("Authorization", ""),
        idempotency_key=idempotency_key or "",
    )
    return {"X-Timestamp": stamp, "X-Signature": signature} | auth | idem


@pytest.fixture(scope="module")
def sgw(services, sim, tmp_path_factory):
    jwks = JwksServer()
    env = {
        "GATEWAY_DEV": "false",
        "GATEWAY_DOCS": "false",
        "GATEWAY_VERIFY_JWT": "true",
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_JWKS_URL": jwks.url,
        "GATEWAY_HMAC_KEY": HMAC_KEY,
        "GATEWAY_HMAC_WINDOW_S": "60",
        "GATEWAY_MAX_BODY_BYTES": "4096",
        "GATEWAY_CHAT_RATE_LIMIT_PER_MIN": "3",
        "REQUIRE_IDEMPOTENCY": "true",
        "FLEET_MAX_PAYLOAD_BYTES": "1024",
    }
    try:
        with fleet_with_gateway(
            services, sim, "pgmq", tmp_path_factory.mktemp("gw-sec"), gateway_env=env, REQUIRE_IDEMPOTENCY="true"
        ) as f:
            yield f
    finally:
        jwks.stop()


@pytest.fixture(autouse=True)
def quick_sim(sim):
    reset_sim(sim)
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 0, "tokens_per_s": 0, "answer_tokens": 6})


def chat(sgw, user_token, body, *, headers=None, sign_it=True, raw: bytes | None = None):
    content = raw if raw is not None else json.dumps(body).encode()
    hdrs = (
        signed("POST", "/v1/chat", content, bearer=user_token) if sign_it else {"Authorization": f"Bearer {user_token}"}
    ) | (headers or {})
    return post_sse(sgw.url, "/v1/chat", content, headers=hdrs)


def get(sgw, path: str, user_token: str) -> httpx.Response:
    return httpx.get(f"{sgw.url}{path}", headers=signed("GET", path, b"", bearer=user_token))


def question(session=None, **extra) -> dict:
    return {"session_id": session or f"s-{uuid.uuid4()}", "content": "hi", "idempotency_key": new_key()} | extra


def queued_and_recorded(sgw) -> tuple[int, int]:
    with psycopg.connect(sgw.fleet.dsn, autocommit=True) as conn:
        sent = conn.execute("select total_messages from pgmq.metrics('chat')").fetchone()[0]
        jobs = conn.execute("select count(*) from gateway_jobs").fetchone()[0]
    return sent, jobs


def test_jwt_hs256_and_jwks_tokens_are_accepted_and_the_user_owns_the_job(sgw):
    r = chat(sgw, token(ALICE), question())
    assert r.status == 200 and r.types()[-1] == "chat.done", (r.status, r.body)
    job_id, trace_id = r.headers["x-job-id"], r.headers["x-trace-id"]
    rs = chat(sgw, token(ALICE, key=RSA_KEY, alg="RS256", kid="k1"), question())
    assert rs.status == 200 and rs.types()[-1] == "chat.done", (rs.status, rs.body)
    assert get(sgw, f"/v1/jobs/{job_id}", token(ALICE)).json()["state"] == "succeeded"
    assert get(sgw, f"/v1/traces/{trace_id}", token(ALICE)).status_code == 200
    # another user sees neither the job, nor its stream, nor its trace
    assert get(sgw, f"/v1/jobs/{job_id}", token(BOB)).status_code == 404
    assert get(sgw, f"/v1/jobs/{job_id}/stream", token(BOB)).status_code == 404
    assert get(sgw, f"/v1/traces/{trace_id}", token(BOB)).status_code == 404


@pytest.mark.parametrize(
    "bad, why",
    [
        (lambda: token(ALICE, exp_in=-30), "expired"),
        (lambda: token(ALICE, key="a-forged-secret-that-is-also-long-enough-32"), "signature"),
        (
            lambda: token(
                ALICE, key=rsa.generate_private_key(public_exponent=65537, key_size=2048), alg="RS256", kid="k1"
            ),
            "signature",
        ),
        (
            lambda: jwt.encode(
                {"sub": ALICE, "aud": "authenticated", "exp": int(time.time()) + 60}, None, algorithm="none"
            ),
            "algorithm",
        ),
        (lambda: token("not-a-uuid"), "sub"),
        (lambda: "", "Authorization"),
    ],
)
def test_bad_tokens_get_401_and_enqueue_nothing(sgw, bad, why):
    before = queued_and_recorded(sgw)
    r = chat(sgw, bad(), question())
    assert r.status == 401 and r.body["error"] == "unauthorized" and why in r.body["message"], r.body
    assert queued_and_recorded(sgw) == before


def test_session_ids_are_each_users_own_so_none_can_be_squatted_or_probed(sgw):
    """Two users sending the same session id get two sessions: no 403 tells the second that the id is
    taken (which would reveal the first user's session), and neither sees the other's history."""
    alice, bob, session = someone(), someone(), "s1"
    first = chat(sgw, token(alice), question(session, content="alice's secret"))
    assert first.status == 200 and first.types()[-1] == "chat.done", (first.status, first.body)
    second = chat(sgw, token(bob), question(session, content="bob asks"))
    assert second.status == 200 and second.types()[-1] == "chat.done", (second.status, second.body)
    with psycopg.connect(sgw.fleet.dsn, autocommit=True) as conn:
        owners = dict(
            conn.execute(
                "select id, user_id::text from chat_sessions where id = any(%s)",
                ([f"u:{alice}:{session}", f"u:{bob}:{session}", session],),
            ).fetchall()
        )
        bobs = [
            r[0]
            for r in conn.execute(
                "select content from messages where session_id = %s and role = 'user'", (f"u:{bob}:{session}",)
            )
        ]
    assert owners == {f"u:{alice}:{session}": alice, f"u:{bob}:{session}": bob}
    assert bobs == ["bob asks"]


def test_hmac_signatures_forged_stale_and_replayed_are_refused(sgw):
    body, user = json.dumps(question()).encode(), token(someone())
    before = queued_and_recorded(sgw)
    cases = {
        "missing": {"Authorization": f"Bearer {user}"},
        "forged": signed("POST", "/v1/chat", body, bearer=user, key="not-the-key"),
        "stale": signed("POST", "/v1/chat", body, bearer=user, ts=time.time() - 120),
        "other path": signed("POST", "/v1/embed", body, bearer=user),
    }
    for name, headers in cases.items():
        r = post_sse(sgw.url, "/v1/chat", body, headers=headers)
        assert r.status == 401 and r.body["error"] == "bad_signature", (name, r.body)
    assert queued_and_recorded(sgw) == before
    good = signed("POST", "/v1/chat", body, bearer=user)
    assert post_sse(sgw.url, "/v1/chat", body, headers=good).status == 200
    replay = post_sse(sgw.url, "/v1/chat", body, headers=good)
    assert replay.status == 401 and "already used" in replay.body["message"]


def test_the_per_user_rate_limit_answers_429_with_retry_after(sgw, sim):
    for _ in range(3):
        assert chat(sgw, token(CAROL), question()).status == 200
    before, calls = queued_and_recorded(sgw), len(chat_calls(sim))
    r = chat(sgw, token(CAROL), question())
    assert r.status == 429 and r.body["error"] == "rate_limited" and r.headers["retry-after"] == "60"
    assert queued_and_recorded(sgw) == before and len(chat_calls(sim)) == calls
    assert chat(sgw, token(someone()), question()).status == 200  # another user has their own budget


@pytest.mark.parametrize(
    "raw, status, code, names",
    [
        (b'{"session_id": "s", "content": ', 400, "malformed_json", "JSON"),
        (b"", 400, "malformed_json", "empty"),
        (json.dumps(question(temperatur=0.5)).encode(), 422, "invalid_request", "temperatur"),
        (json.dumps(question(user_id=str(uuid.uuid4()))).encode(), 422, "invalid_request", "user_id"),
        (
            json.dumps({"session_id": "s", "idempotency_key": "k"}).encode(),
            422,
            "invalid_request",
            "content or messages",
        ),
        (json.dumps(question(content="x" * 5000)).encode(), 413, "body_too_large", "4096"),
        (json.dumps(question(content="x" * 1500)).encode(), 413, "payload_too_large", "FLEET_MAX_PAYLOAD_BYTES"),
        (json.dumps({"session_id": "s", "content": "hi"}).encode(), 400, "idempotency_key_required", "Idempotency-Key"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem_and_enqueues_nothing(sgw, raw, status, code, names):
    before = queued_and_recorded(sgw)
    r = chat(sgw, token(someone()), None, raw=raw)
    assert r.status == status and r.body["error"] == code and names in r.body["message"], r.body
    assert queued_and_recorded(sgw) == before


def test_a_bad_last_event_id_is_refused_before_anything_is_written(sgw):
    session = f"s-{uuid.uuid4()}"
    before = queued_and_recorded(sgw)
    r = chat(sgw, token(someone()), question(session), headers={"Last-Event-ID": "seven"})
    assert r.status == 400 and r.body["error"] == "bad_last_event_id", r.body
    assert queued_and_recorded(sgw) == before
    with psycopg.connect(sgw.fleet.dsn, autocommit=True) as conn:
        assert conn.execute("select count(*) from chat_sessions where id = %s", (session,)).fetchone()[0] == 0


def embed(sgw, user_token: str, body: dict) -> Sse:
    content = json.dumps(body | {"idempotency_key": new_key()}).encode()
    return post_sse(sgw.url, "/v1/embed", content, headers=signed("POST", "/v1/embed", content, bearer=user_token))


def vectors_of(sgw, *source_ids: str) -> dict[str, str]:
    with psycopg.connect(sgw.fleet.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select source_id, content from vector_documents where source_id = any(%s)", (list(source_ids),)
        ).fetchall()
    return dict(rows)


def test_a_users_inline_documents_stay_in_their_own_key_space(sgw):
    alice, bob, doc = someone(), someone(), f"doc-{uuid.uuid4()}"
    r = embed(sgw, token(alice), {"documents": [{"source_id": doc, "content": "alice's words"}]})
    assert r.status == 200 and r.types()[-1] == "embed.done", (r.status, r.body, r.types())
    r = embed(sgw, token(bob), {"documents": [{"source_id": doc, "content": "bob's words"}]})
    assert r.status == 200 and r.types()[-1] == "embed.done", (r.status, r.body, r.types())
    # the same id from two users: two rows, neither overwrites the other, no unscoped row
    assert vectors_of(sgw, doc, f"u:{alice}:{doc}", f"u:{bob}:{doc}") == {
        f"u:{alice}:{doc}": "alice's words",
        f"u:{bob}:{doc}": "bob's words",
    }
    # an id already in the user's own space is kept as it is (not scoped twice)
    r = embed(sgw, token(alice), {"documents": [{"source_id": f"u:{alice}:{doc}", "content": "alice again"}]})
    assert r.status == 200 and vectors_of(sgw, f"u:{alice}:{doc}") == {f"u:{alice}:{doc}": "alice again"}


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"documents": [{"source_id": "u:{victim}:doc-1", "content": "overwrite"}]}, 403, "source_id_out_of_scope"),
        ({"source": "articles", "ids": [1, 2]}, 403, "registered_source_refused"),
    ],
)
def test_a_user_cannot_write_another_users_or_a_registered_sources_vectors(sgw, body, status, code):
    victim = someone()
    body = json.loads(json.dumps(body).replace("{victim}", victim))
    with psycopg.connect(sgw.fleet.dsn, autocommit=True) as conn:
        before = conn.execute("select total_messages from pgmq.metrics('embed')").fetchone()[0]
    r = embed(sgw, token(someone()), body)
    assert r.status == status and r.body["error"] == code, r.body
    with psycopg.connect(sgw.fleet.dsn, autocommit=True) as conn:
        assert conn.execute("select total_messages from pgmq.metrics('embed')").fetchone()[0] == before
