"""The Agent Management Service over HTTP, on both brokers, against the Letta simulator: the brief's smoke
flow, then who may reach what, repeats, and the refusals a template or a run gets."""

from __future__ import annotations

import uuid

import httpx
import jwt
import pytest

from .agents_service_support import (
    BILLING,
    JWT_ENV,
    operator,
    SECRET,
    bearer,
    create,
    me,
    publish,
    smoke_flow,
    token,
    upgrade,
)
from .embedding_support import API_KEY
from .gateway_support import fleet_with_gateway, get_sse
from .test_templates import AGENT


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def ams(request, services, sim, tmp_path_factory):
    with fleet_with_gateway(
        services,
        sim,
        request.param,
        tmp_path_factory.mktemp(f"ams-{request.param}"),
        gateway_env=JWT_ENV,
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
        ZUPLO_BASE_URL=BILLING,
    ) as f:
        yield f


@pytest.fixture(scope="module")
def flow(ams):
    return smoke_flow(ams.url, AGENT)


def letta_agents_named(sim, name: str) -> list[str]:
    return [a for a, agent in httpx.get(f"{sim.url}/_sim/letta").json()["agents"].items() if agent["name"] == name]


def test_publish_create_me_and_upgrade(flow):
    assert flow["agent_id"]  # the flow asserts each step itself


def test_a_repeated_create_returns_the_same_agent(ams, flow, sim):
    again = create(ams.url, flow["token"], flow["name"])
    assert again.headers["x-job-id"] == flow["job_id"] and again.headers["x-idempotent-replay"] == "true"
    assert again.frames[-1]["type"] == "agent.done" and again.frames[-1]["agent_id"] == flow["agent_id"]
    # a new idempotency key is a new job, which finds the agent the user has
    keyed = create(ams.url, flow["token"], flow["name"], idempotency_key=f"k-{uuid.uuid4()}")
    assert keyed.headers["x-job-id"] != flow["job_id"]
    done = keyed.frames[-1]
    assert (done["type"], done["agent_id"], done["created"]) == ("agent.done", flow["agent_id"], False)
    assert letta_agents_named(sim, f"{flow['name']}-{flow['user']}") == [flow["agent_id"]]
    # the job's stream resumes from its Last-Event-ID, on the events rebuilt from the table
    resumed = get_sse(
        ams.url, f"/v1/jobs/{flow['job_id']}/stream", headers=bearer(flow["token"]) | {"Last-Event-ID": "1"}
    )
    assert resumed.types()[-1] == "agent.done" and all(int(f["_id"]) > 1 for f in resumed.frames)


def test_a_user_reaches_only_their_own_agent(ams, flow):
    other = token(str(uuid.uuid4()))
    assert me(ams.url, other)["letta_agent_id"] is None
    mine = httpx.get(f"{ams.url}/v1/me", params={"user_id": flow["user"]}, headers=bearer(other))
    assert mine.status_code == 403 and mine.json()["error"] == "not_your_agent"
    theirs = create(ams.url, other, flow["name"], user_id=flow["user"])
    assert theirs.status == 403 and theirs.body["error"] == "not_your_agent"
    job = httpx.get(f"{ams.url}/v1/jobs/{flow['job_id']}", headers=bearer(other))
    assert job.status_code == 404
    assert httpx.get(f"{ams.url}/v1/me").status_code == 401


OPERATOR_ROUTES = [
    ("POST", "/v1/templates", {"name": "x", "version": "1.0.0", "content": AGENT}),
    ("GET", "/v1/templates", None),
    ("GET", "/v1/templates/x/1.0.0", None),
    ("GET", "/v1/templates/x/diff?from_version=1.0.0&to_version=2.0.0", None),
    ("POST", "/v1/upgrades", {"template": "x", "version": "1.0.0"}),
    ("GET", f"/v1/upgrades/{uuid.uuid4()}", None),
    ("GET", f"/v1/upgrades/{uuid.uuid4()}/stream", None),
    ("POST", f"/v1/upgrades/{uuid.uuid4()}/halt", None),
]


@pytest.mark.parametrize("method,path,body", OPERATOR_ROUTES, ids=[f"{m} {p}" for m, p, _ in OPERATOR_ROUTES])
def test_operator_routes_refuse_user_tokens(ams, method, path, body):
    response = httpx.request(method, f"{ams.url}{path}", json=body, headers=bearer(token(str(uuid.uuid4()))))
    assert response.status_code == 403 and response.json()["error"] == "operator_only", response.text
    # a role the user can set themselves (user_metadata) is not the operator claim
    claims = jwt.decode(token(str(uuid.uuid4())), options={"verify_signature": False})
    forged = jwt.encode(claims | {"user_metadata": {"fleet_role": "operator"}}, SECRET, algorithm="HS256")
    assert httpx.request(method, f"{ams.url}{path}", json=body, headers=bearer(forged)).status_code == 403


def test_template_refusals_are_4xx_with_their_reasons(ams, flow):
    name = flow["name"]
    for version in ("2.0.0", "1.5.0"):  # published already (versions are immutable), and lower
        refused = publish(ams.url, name, version, AGENT)
        assert refused.status_code == 409 and refused.json()["error"] == "template_refused"
        assert "greater than the highest published version, 2.0.0" in refused.json()["message"]
    assert publish(ams.url, name, "three", AGENT).json()["error"] == "bad_version"
    broken = dict(AGENT, tools=[])
    refused = publish(ams.url, f"x-{uuid.uuid4().hex[:8]}", "1.0.0", broken)
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_agent_file", refused.text
    bad_name = publish(ams.url, "Not A Name", "1.0.0", AGENT)
    assert bad_name.status_code == 422
    unknown = create(ams.url, token(str(uuid.uuid4())), f"none-{uuid.uuid4().hex[:8]}")
    assert unknown.status == 404 and unknown.body["error"] == "template_not_found"
    missing = create(ams.url, token(str(uuid.uuid4())), name, version="9.9.9")
    assert missing.status == 404


def test_templates_are_listed_read_and_diffed(ams, flow):
    name = flow["name"]
    listed = httpx.get(f"{ams.url}/v1/templates", params={"name": name}, headers=operator()).json()["templates"]
    assert [t["version"] for t in listed] == ["1.0.0", "2.0.0"]
    read = httpx.get(f"{ams.url}/v1/templates/{name}/1.0.0", headers=operator()).json()
    assert read["content"] == AGENT
    diff = httpx.get(
        f"{ams.url}/v1/templates/{name}/diff",
        params={"from_version": "1.0.0", "to_version": "2.0.0"},
        headers=operator(),
    ).json()
    assert {"system", "tags"} <= set(diff["changes"]) and diff["initial_memory_changed"] is True
    assert httpx.get(f"{ams.url}/v1/templates/{name}/7.0.0", headers=operator()).status_code == 404


def test_runs_are_read_halted_and_repeated_by_key(ams, flow):
    run = httpx.get(f"{ams.url}/v1/upgrades/{flow['run_id']}", headers=operator()).json()
    assert run["status"] == "completed" and run["dry_run"] is False
    halted = httpx.post(f"{ams.url}/v1/upgrades/{flow['run_id']}/halt", headers=operator()).json()
    assert halted["cancelled"] == 0 and halted["status"] == "completed"  # a finished run stays as it ended
    assert httpx.get(f"{ams.url}/v1/upgrades/{uuid.uuid4()}", headers=operator()).status_code == 404
    assert httpx.get(f"{ams.url}/v1/upgrades/not-a-run", headers=operator()).status_code == 404
    body = {
        "template": flow["name"],
        "version": "2.0.0",
        "cohort": {"user_ids": [flow["user"]]},
        "halt_failure_rate": 0.5,
        "halt_min_sample": 3,
        "idempotency_key": f"k-{uuid.uuid4()}",
    }
    first, state = upgrade(ams.url, body)
    repeat, again = upgrade(ams.url, body)
    assert first.headers["x-run-id"] == repeat.headers["x-run-id"]  # one run for the key
    assert (state["halt_failure_rate"], state["halt_min_sample"]) == (0.5, 3)
    assert again["counts"] == state["counts"] == {"skipped": 1}  # already on 2.0.0
    resumed = get_sse(ams.url, f"/v1/upgrades/{state['run_id']}/stream", headers=operator() | {"Last-Event-ID": "7"})
    assert resumed.types() == ["ready", "upgrade.done"] and resumed.frames[0]["_id"] == "8"


def test_me_answers_with_the_reason_when_letta_cannot_be_asked(ams, flow, tmp_path):
    from fleet.shared.services import free_port

    from .gateway_process import GatewayProcess

    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with GatewayProcess(ams.gateway.env | {"LETTA_API_BASE_URL": unreachable}, tmp_path) as gateway:
        profile = me(gateway.url, flow["token"])
    assert profile["letta_agent_id"] == flow["agent_id"] and profile["version"] == "2.0.0"  # from the database
    assert profile["agent"] is None and "connection failed" in profile["agent_error"], profile["agent_error"]
