"""Property-based requests generated from the gateway's own OpenAPI document (schemathesis), sent to
a running gateway process with JWT verification on and real workers behind it: no generated request
may get a 5xx. Bodies the document allows are real jobs; the rest must be refused with a 4xx."""

from __future__ import annotations

import time
import uuid

import hypothesis
import jwt
import pytest
import schemathesis

from .gateway_support import fleet_with_gateway
from .test_gateway_security import SECRET, token

USER = str(uuid.uuid4())


@pytest.fixture(scope="module")
def fuzz_gw(services, sim, tmp_path_factory):
    env = {
        "GATEWAY_DEV": "false",
        "GATEWAY_DOCS": "true",
        "GATEWAY_VERIFY_JWT": "true",
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_MAX_BODY_BYTES": "65536",
        "GATEWAY_STREAM_TIMEOUT_S": "20",
    }
    with fleet_with_gateway(services, sim, "pgmq", tmp_path_factory.mktemp("gw-fuzz"), gateway_env=env) as f:
        yield f


def test_no_generated_request_gets_a_5xx(fuzz_gw):
    """Each operation of the document, 25 generated requests each (a fixed seed, so a run repeats), as a user
    and, on the operator routes (which refuse users before reading a body), as an operator."""
    schema = schemathesis.openapi.from_url(f"{fuzz_gw.url}/openapi.json")
    user = {"Authorization": f"Bearer {token(USER, exp_in=3600)}"}
    operator_claims = {
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "exp": int(time.time() + 3600),
        "app_metadata": {"fleet_role": "operator"},
    }
    operator = {"Authorization": f"Bearer {jwt.encode(operator_claims, SECRET, algorithm='HS256')}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/chat",
        "/v1/embed",
        "/v1/jobs/{job_id}",
        "/v1/traces/{trace_id}",
        "/v1/agents",
        "/v1/me",
        "/v1/templates",
        "/v1/upgrades",
    }
    statuses: list[int] = []
    runs = [(op, user) for op in operations] + [
        (op, operator) for op in operations if op.path.startswith(("/v1/templates", "/v1/upgrades"))
    ]
    for operation, headers in runs:

        @hypothesis.settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy())
        def no_5xx(case):
            response = case.call(base_url=fuzz_gw.url, headers=headers, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (
                case.method,
                case.formatted_path,
                case.body,
                response.status_code,
                response.text[:500],
            )

        no_5xx()
    assert len(statuses) >= 2 * len(runs) and any(200 <= s < 300 for s in statuses), statuses
