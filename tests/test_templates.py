"""Agent templates: SemVer precedence (Python and SQL agree), immutability, monotonic versions,
Agent File validation, and the CLI."""

from __future__ import annotations

import copy
import json
import uuid

import psycopg
import pytest

from fleet.workers.agents.agentfile import InvalidAgentFile, parse_agent_file
from fleet.workers.agents.semver import InvalidVersion, Version
from fleet.workers.agents.templates import TemplateError, diff_versions, list_templates, publish

# SemVer 2.0 section 11's own example, plus build metadata and numeric vs alphanumeric identifiers
ORDERED = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1-0",
    "1.0.1-1a",
    "1.0.1",
    "1.2.0",
    "1.10.0",
    "2.0.0-x.7.z.92",
    "2.0.0",
]

AGENT = {
    "agents": [
        {
            "name": "support",
            "system": "You help customers.",
            "llm_config": {
                "model": "gpt-4o-mini",
                "model_endpoint_type": "openai",
                "model_endpoint": "https://x/v1",
                "context_window": 32000,
            },
            "embedding_config": {
                "embedding_model": "bge-m3",
                "embedding_endpoint_type": "openai",
                "embedding_endpoint": "https://x/v1",
                "embedding_dim": 1024,
            },
            "block_ids": ["b1", "b2"],
            "tool_ids": ["t1"],
            "tool_rules": [{"tool_name": "send_message", "type": "exit_loop"}],
            "tags": ["support"],
        }
    ],
    "blocks": [
        {"id": "b1", "label": "persona", "value": "I am kind.", "limit": 2000},
        {"id": "b2", "label": "human", "value": "", "limit": 2000},
    ],
    "tools": [{"id": "t1", "name": "send_message"}],
    "metadata": {"source": "test"},
}


def test_semver_precedence_table_in_python_and_sql(services):
    versions = [Version(v) for v in ORDERED]
    assert all(a < b for a, b in zip(versions, versions[1:]))
    assert sorted(reversed(versions)) == versions
    assert Version("1.0.0+build.5") == Version("1.0.0+other") and Version("1.0.0-rc.1+b") == Version("1.0.0-rc.1")
    pairs = [(a, b) for a in ORDERED for b in ORDERED]
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        sql = conn.execute(
            "select a, b, fleet_semver_cmp(a, b) from unnest(%s::text[], %s::text[]) as t(a, b)",
            ([a for a, _ in pairs], [b for _, b in pairs]),
        ).fetchall()
        assert conn.execute("select fleet_semver_cmp('1.0.0+a', '1.0.0+b')").fetchone()[0] == 0
    for a, b, cmp in sql:
        expected = (Version(a) > Version(b)) - (Version(a) < Version(b))
        assert cmp == expected, (a, b)
    for bad in ("1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0+"):
        with pytest.raises(InvalidVersion):
            Version(bad)


def test_versions_only_go_up_and_rows_never_change(services):
    name = f"t-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0-rc.1", AGENT)
    publish(name, "1.0.0", AGENT)
    for lower in ("1.0.0", "1.0.0+rebuild", "0.9.0", "1.0.0-rc.2"):
        with pytest.raises(TemplateError) as e:
            publish(name, lower, AGENT)
        assert "highest published version, 1.0.0" in str(e.value) or "already published" in str(e.value)
    publish(name, "1.1.0-beta", AGENT)
    assert [r["version"] for r in list_templates(name)] == ["1.0.0-rc.1", "1.0.0", "1.1.0-beta"]
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        for statement in (
            "update agent_templates set content = '{}' where name = %s",
            "delete from agent_templates where name = %s",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is immutable: publish a new version"):
                conn.execute(statement, (name,))
        # the database refuses a lower version even from plain SQL
        with pytest.raises(psycopg.errors.CheckViolation, match="highest published version, 1.1.0-beta"):
            conn.execute(
                "insert into agent_templates (name, version, content, sha256) values (%s, '1.0.5', '{}', '')", (name,)
            )


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda a: a["agents"].append(copy.deepcopy(a["agents"][0])), "exactly one agent, this file has 2"),
        (lambda a: a["agents"][0]["block_ids"].append("b9"), "blocks this file does not define: b9"),
        (lambda a: a["agents"][0]["tool_ids"].append("t9"), "tools this file does not define: t9"),
        (
            lambda a: a["agents"][0]["tool_rules"].append({"tool_name": "web", "type": "run_first"}),
            "tool rules name tools the agent does not have: web",
        ),
        (
            lambda a: a["agents"][0]["llm_config"].update(api_key="abc123"),
            "secret values (at agents[0].llm_config.api_key)",
        ),
        (lambda a: a["blocks"][0].update(value="use sk-live0123456789abcdefXYZ"), "secret values (at blocks[0].value)"),
        (lambda a: a["agents"][0].pop("llm_config"), "agents.0.llm_config: Field required"),
    ],
)
def test_invalid_agent_files_are_refused_with_the_reason(change, reason):
    content = copy.deepcopy(AGENT)
    change(content)
    with pytest.raises(
        InvalidAgentFile, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        parse_agent_file(content)


def test_diff_covers_upgraded_fields_and_leaves_memory_alone(services):
    name = f"d-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    newer = copy.deepcopy(AGENT)
    newer["agents"][0]["system"] = "You help customers, briefly."
    newer["agents"][0]["llm_config"]["model"] = "gpt-4o"
    newer["blocks"][0]["value"] = "I am very kind."
    publish(name, "1.1.0", newer)
    d = diff_versions(name, "1.0.0", "1.1.0")
    assert set(d["changes"]) == {"system", "llm_config"}
    assert d["changes"]["llm_config"]["to"]["model"] == "gpt-4o"
    assert d["initial_memory_changed"] is True


def test_templates_cli(services, tmp_path):
    from .test_cli_and_services import fleet_cli

    name = f"c-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "agent.af"
    path.write_text(json.dumps(AGENT))
    assert (
        f"published {name}@1.0.0"
        in fleet_cli("templates", "publish", str(path), "--name", name, "--version", "1.0.0").stdout
    )
    again = fleet_cli("templates", "publish", str(path), "--name", name, "--version", "0.1.0", check=False)
    assert again.returncode == 2 and "greater than the highest published version, 1.0.0" in again.stderr
    rows = json.loads(fleet_cli("templates", "list", "--name", name, "--json").stdout)
    assert [r["version"] for r in rows] == ["1.0.0"]
    path.write_text(json.dumps({"agents": []}))
    bad = fleet_cli("templates", "publish", str(path), "--name", name, "--version", "2.0.0", check=False)
    assert bad.returncode == 2 and "exactly one agent" in bad.stderr
