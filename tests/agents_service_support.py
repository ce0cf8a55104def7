"""The Agent Management Service's smoke flow over real HTTP, shared by `make test` (the Letta simulator) and
`make conformance` (a real Letta server): publish v1, a user creates their agent, /me shows it with the
billing endpoints, publish v2, a dry run shows the diff, apply, /me shows v2 with memory unchanged."""

from __future__ import annotations

import copy
import time
import uuid

import httpx
import jwt

from .gateway_support import Sse, post_sse

SECRET = "agents-service-secret-of-at-least-32-bytes"
BILLING = "https://billing.example.test"
JWT_ENV = {"GATEWAY_VERIFY_JWT": "true", "GATEWAY_JWT_SECRET": SECRET, "GATEWAY_DEV": "false", "GATEWAY_DOCS": "true"}


def token(sub: str, *, role: str | None = None) -> str:
    claims = {"sub": sub, "aud": "authenticated", "role": "authenticated", "exp": int(time.time() + 600)}
    if role is not None:
        claims["app_metadata"] = {"fleet_role": role}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(tok: str) -> dict:
    return {"Authorization": f"Bearer {tok}"}


OPERATOR_SUB = str(uuid.uuid4())


def operator() -> dict:
    """An operator's headers, with a token minted now: a token minted at import would expire during a long
    run (the conformance suite runs for minutes before it reaches these tests)."""
    return bearer(token(OPERATOR_SUB, role="operator"))


def billing_endpoint(user: str) -> str:
    return f"{BILLING}/api/v1/agents/{user}/messages"


def newer(template: dict) -> dict:
    """Version 2: another system prompt and tags, and a new persona that upgrades must never apply."""
    v2 = copy.deepcopy(template)
    v2["agents"][0]["system"] = template["agents"][0]["system"] + " Answer in two sentences at most."
    v2["agents"][0]["tags"] = [*template["agents"][0].get("tags", []), "v2"]
    v2["blocks"][0]["value"] = "A new persona that upgrades must never apply."
    return v2


def publish(url: str, name: str, version: str, content: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/templates",
        json={"name": name, "version": version, "content": content},
        headers=operator() if headers is None else headers,
        timeout=30,
    )


def create(url: str, user_token: str, template: str, **body) -> Sse:
    return post_sse(url, "/v1/agents", {"template": template} | body, headers=bearer(user_token), timeout=120)


def me(url: str, user_token: str) -> dict:
    response = httpx.get(f"{url}/v1/me", headers=bearer(user_token), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def upgrade(url: str, body: dict) -> tuple[Sse, dict]:
    """Runs an upgrade to its end through the progress stream; returns the stream and the run's state."""
    sse = post_sse(url, "/v1/upgrades", body, headers=operator(), timeout=180)
    assert sse.status == 200, sse.body
    assert sse.types()[0] == "ready" and sse.types()[-1] == "upgrade.done", sse.types()
    run = sse.headers["x-run-id"]
    state = httpx.get(f"{url}/v1/upgrades/{run}", headers=operator(), timeout=30).json()
    return sse, state


def smoke_flow(url: str, template: dict) -> dict:
    """The brief's flow, asserted step by step; returns what later checks use."""
    name, user = f"ams-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    user_token = token(user)
    # 1. publish v1
    published = publish(url, name, "1.0.0", template)
    assert published.status_code == 201, published.text
    # 2. a user creates an agent: the stream ends with its id
    created = create(url, user_token, name)
    assert created.status == 200, created.body
    assert created.types()[0] == "ready" and created.types()[-1] == "agent.done", created.frames
    done = created.frames[-1]
    assert done["created"] is True and done["template"] == f"{name}@1.0.0"
    agent_id = done["agent_id"]
    # 3. /me shows it, both billing endpoints forced
    profile = me(url, user_token)
    assert (profile["letta_agent_id"], profile["template"], profile["version"]) == (agent_id, name, "1.0.0")
    assert profile["agent_error"] is None, profile["agent_error"]
    assert profile["agent"]["model_endpoint"] == profile["agent"]["embedding_endpoint"] == billing_endpoint(user)
    blocks_before = profile["agent"]["blocks"]
    # 4. publish v2
    assert publish(url, name, "2.0.0", newer(template)).status_code == 201
    # 5. a dry run shows the diff and changes nothing
    cohort = {"user_ids": [user]}
    dry_sse, dry = upgrade(url, {"template": name, "version": "2.0.0", "dry_run": True, "cohort": cohort})
    assert dry["dry_run"] is True and dry["status"] == "completed" and dry["counts"] == {"succeeded": 1}, dry
    assert dry_sse.frames[-1]["counts"] == {"succeeded": 1}
    (agent,) = dry["agents"]
    assert agent["agent_id"] == agent_id and {"system", "tags"} <= set(agent["diff"]), agent
    assert me(url, user_token)["version"] == "1.0.0"
    # 6. apply
    _, applied = upgrade(url, {"template": name, "version": "2.0.0", "dry_run": False, "cohort": cohort})
    assert applied["status"] == "completed" and applied["counts"] == {"succeeded": 1}, applied
    # 7. /me shows v2, memory blocks unchanged, billing still forced
    after = me(url, user_token)
    assert (after["letta_agent_id"], after["version"]) == (agent_id, "2.0.0")
    assert after["agent"]["blocks"] == blocks_before
    assert after["agent"]["model_endpoint"] == after["agent"]["embedding_endpoint"] == billing_endpoint(user)
    assert after["last_upgrade"]["status"] == "succeeded" and after["last_upgrade"]["to_version"] == "2.0.0"
    return {
        "name": name,
        "user": user,
        "token": user_token,
        "agent_id": agent_id,
        "job_id": created.headers["x-job-id"],
        "run_id": applied["run_id"],
    }
