"""Publishing and reading agent templates (immutable, SemVer-ordered; the database enforces both)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from fleet.shared.db import get_pool, one
from fleet.workers.agents.agentfile import diff, needs_definition, parse_agent_file, to_letta_file
from fleet.workers.agents.semver import Version


class TemplateError(ValueError):
    """A template refused: not a SemVer version, an invalid Agent File, or a version that exists already or is
    not above the highest published."""


class TemplateNotFound(TemplateError):
    pass


def publish(name: str, version: str, content: dict[str, Any]) -> dict:
    Version(version)  # a clear message before the database's
    parse_agent_file(content)
    try:
        with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return one(
                cur.execute(
                    "insert into agent_templates (name, version, content, sha256) values (%s, %s, %s, '')"
                    " returning name, version, sha256, published_at",
                    (name, version, Jsonb(content)),
                ).fetchone()
            )
    except (psycopg.errors.CheckViolation, psycopg.errors.UniqueViolation, psycopg.errors.InvalidParameterValue) as e:
        message = e.diag.message_primary or str(e)
        if isinstance(e, psycopg.errors.UniqueViolation):
            message = f"{name}@{version} is already published; versions are immutable"
        raise TemplateError(message) from None


def list_templates(name: str | None = None) -> list[dict]:
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "select name, version, sha256, published_at from agent_templates where %s::text is null or name = %s",
            (name, name),
        ).fetchall()
    return sorted(rows, key=lambda r: (r["name"], Version(r["version"])))


def is_published(conn: psycopg.Connection[Any], name: str, version: str) -> bool:
    """On the caller's connection (inside its transaction)."""
    return (
        conn.execute("select 1 from agent_templates where name = %s and version = %s", (name, version)).fetchone()
        is not None
    )


def get(name: str, version: str) -> dict[str, Any]:
    with get_pool().connection() as conn:
        row = conn.execute(
            "select content from agent_templates where name = %s and version = %s", (name, version)
        ).fetchone()
    if row is None:
        raise TemplateNotFound(f"template {name}@{version} is not published")
    return row[0]


def diff_versions(name: str, old: str, new: str) -> dict[str, Any]:
    a, b = parse_agent_file(get(name, old)), parse_agent_file(get(name, new))
    return {
        "changes": diff(a.upgrade_view(), b.upgrade_view()),
        "initial_memory_changed": a.initial_memory() != b.initial_memory(),
        "note": "memory blocks are the initial memory of new agents; upgrades never apply them",
    }


def export(name: str, version: str, find_tool: Callable[[str], dict] | None) -> dict[str, Any]:
    """The template as an Agent File a Letta server imports (POST /v1/agents/import). A tool the template
    names without its definition is taken from the Letta server (`find_tool`, by name)."""
    template = parse_agent_file(get(name, version))
    named_only = [t.name for t in template.tools if needs_definition(t)]
    if named_only and find_tool is None:
        raise TemplateError(
            f"tools {', '.join(named_only)} have no definition in the template; set "
            "LETTA_API_BASE_URL so the export takes them from the Letta server"
        )
    definitions = {n: find_tool(n) for n in named_only} if find_tool else {}
    return to_letta_file(template, definitions)
