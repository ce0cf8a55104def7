"""The CLI's destructive actions as an operator runs them in an incident: every filter and id that `fleet dlq
list`, `retry` and `purge` accept selects the same dead letters, a destructive action says how many rows it
touches, and a limit that cuts a result says so. Each test's rows are its own (a queue, a template), so
nothing else is touched."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from .helpers import fleet_cli


@pytest.fixture
def dsn(services):
    return services["dsn"]


def add_letters(dsn: str, queue: str, *specs: tuple[str, float, bool], marker: str = "") -> list[int]:
    """Dead letters of `queue`, one per (error_class, age in seconds, already retried); an echo payload each."""
    ids = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n, (error_class, age_s, retried) in enumerate(specs):
            message = {
                "queue_name": "echo",
                "actor_name": "echo",
                "args": [{"message": f"{marker}{n}"}],
                "kwargs": {},
                "options": {},
                "message_id": str(uuid.uuid4()),
                "message_timestamp": 0,
            }
            ids.append(
                conn.execute(
                    "insert into dead_letters (queue, actor, message, reason, error_class, trace_id, created_at, retried_at)"
                    " values (%s, 'echo', %s, %s, %s, %s, now() - %s * interval '1 second',"
                    " case when %s then now() end) returning id",
                    (
                        queue,
                        json.dumps(message),
                        f"{error_class}: test",
                        error_class,
                        str(uuid.uuid4()),
                        age_s,
                        retried,
                    ),
                ).fetchone()[0]
            )
    return ids


def remaining(dsn: str, queue: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("select id from dead_letters where queue = %s", (queue,))}


@pytest.fixture
def letters(dsn):
    """old permanent, old transient, new permanent, new permanent already retried."""
    queue = f"dlq-{uuid.uuid4().hex[:8]}"
    old_perm, old_trans, new_perm, new_retried = add_letters(
        dsn,
        queue,
        ("PermanentError", 7200, False),
        ("TransientError", 7200, False),
        ("PermanentError", 10, False),
        ("PermanentError", 10, True),
    )
    return queue, {"old_perm": old_perm, "old_trans": old_trans, "new_perm": new_perm, "new_retried": new_retried}


def test_purge_honours_the_error_class(dsn, letters):
    queue, ids = letters
    out = fleet_cli("dlq", "purge", "--queue", queue, "--error-class", "TransientError", "--yes")
    assert "purged 1 dead letter(s)" in out.stdout
    assert remaining(dsn, queue) == set(ids.values()) - {ids["old_trans"]}


def test_purge_honours_newer_than_and_older_than(dsn, letters):
    queue, ids = letters
    assert (
        "purged 1 dead letter(s)" in fleet_cli("dlq", "purge", "--queue", queue, "--newer-than", "3600", "--yes").stdout
    )
    assert remaining(dsn, queue) == set(ids.values()) - {ids["new_perm"]}  # the retried one needs --all
    out = fleet_cli(
        "dlq", "purge", "--queue", queue, "--older-than", "3600", "--error-class", "PermanentError", "--yes"
    )
    assert "purged 1 dead letter(s)" in out.stdout
    assert remaining(dsn, queue) == {ids["old_trans"], ids["new_retried"]}
    assert (
        "purged 1 dead letter(s)"
        in fleet_cli("dlq", "purge", "--queue", queue, "--newer-than", "3600", "--all", "--yes").stdout
    )
    assert remaining(dsn, queue) == {ids["old_trans"]}


def test_purge_honours_ids_and_names_an_id_the_filters_exclude(dsn, letters):
    queue, ids = letters
    assert "purged 1 dead letter(s)" in fleet_cli("dlq", "purge", str(ids["old_perm"]), "--yes").stdout
    assert remaining(dsn, queue) == set(ids.values()) - {ids["old_perm"]}
    out = fleet_cli("dlq", "purge", str(ids["old_trans"]), "--error-class", "PermanentError", "--yes")
    assert "purged 0 dead letter(s)" in out.stdout and str(ids["old_trans"]) in out.stderr
    assert remaining(dsn, queue) == set(ids.values()) - {ids["old_perm"]}


def test_purge_says_how_many_and_deletes_nothing_without_yes_or_with_dry_run(dsn, letters):
    queue, ids = letters
    asked = fleet_cli("dlq", "purge", "--queue", queue, "--error-class", "PermanentError", check=False)
    assert asked.returncode == 2 and "would delete 2 dead letter(s)" in asked.stderr and "--yes" in asked.stderr
    dry = fleet_cli("dlq", "purge", "--queue", queue, "--error-class", "PermanentError", "--dry-run", "--yes")
    assert "would purge 2 dead letter(s)" in dry.stdout
    assert str(ids["old_perm"]) in dry.stdout and str(ids["new_perm"]) in dry.stdout
    assert remaining(dsn, queue) == set(ids.values())


def test_a_filter_an_action_does_not_take_is_refused(dsn, letters):
    queue, ids = letters
    refused = fleet_cli("dlq", "show", str(ids["old_perm"]), "--queue", queue, check=False)
    assert refused.returncode == 2 and "unrecognized arguments: --queue" in refused.stderr
    refused = fleet_cli("dlq", "retry", "--queue", queue, "--all", check=False)
    assert refused.returncode == 2 and "unrecognized arguments: --all" in refused.stderr
    assert remaining(dsn, queue) == set(ids.values())


def test_retry_pages_through_every_selected_letter_and_a_limit_says_it_cut(dsn):
    queue, marker = f"dlq-{uuid.uuid4().hex[:8]}", f"retry-{uuid.uuid4().hex}-"
    add_letters(dsn, queue, *[("PermanentError", 60, False)] * 150, marker=marker)
    try:
        listed = fleet_cli("dlq", "list", "--queue", queue, "--limit", "5", "--json")
        assert len(json.loads(listed.stdout)) == 5 and "5 of 150 matching" in listed.stderr
        dry = fleet_cli("dlq", "retry", "--queue", queue, "--dry-run")
        assert "would re-enqueue 150 dead letter(s)" in dry.stdout
        cut = fleet_cli("dlq", "retry", "--queue", queue, "--limit", "20")
        assert "re-enqueued 20 dead letter(s)" in cut.stdout and "20 of 150 matching" in cut.stderr
        rest = fleet_cli("dlq", "retry", "--queue", queue)
        assert "re-enqueued 130 dead letter(s)" in rest.stdout and "--limit" not in rest.stderr
        with psycopg.connect(dsn, autocommit=True) as conn:
            unretried = conn.execute(
                "select count(*) from dead_letters where queue = %s and retried_at is null", (queue,)
            ).fetchone()[0]
            enqueued = conn.execute(
                "select count(*) from pgmq.q_echo where message::text like %s", (f"%{marker}%",)
            ).fetchone()[0]
        assert unretried == 0 and enqueued == 150
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("delete from pgmq.q_echo where message::text like %s", (f"%{marker}%",))


def test_upgrade_run_says_how_many_agents_its_cohort_filters_select(dsn):
    from fleet.workers.agents.templates import publish

    from .test_templates import AGENT

    name = f"op-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    publish(name, "1.1.0", AGENT)
    users = {str(uuid.uuid4()): version for version in ("1.0.0", "1.0.0", "1.0.0", "0.9.0")}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for user, version in users.items():
            conn.execute(
                "insert into user_profiles (user_id, letta_agent_id, template_name, template_version)"
                " values (%s, %s, %s, %s)",
                (user, f"agent-{user}", name, version),
            )
    runs = []
    try:
        for cohort, agents in (({}, 4), ({"from_version": "1.0.0"}, 3), ({"user_ids": list(users)[:2]}, 2)):
            out = fleet_cli("upgrade", "run", name, "1.1.0", "--dry-run", "--cohort", json.dumps(cohort)).stdout
            runs.append(out.split()[2])
            assert f"(dry run): {agents} agent(s) in the cohort" in out, (cohort, out)
    finally:  # no worker runs here: the runs' fan-outs are taken off the queue
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("delete from pgmq.q_upgrade_jobs where message->>'run_id' = any(%s)", (runs,))
            conn.execute(
                "update upgrade_runs set status = 'halted', finished_at = now() where id = any(%s::uuid[])", (runs,)
            )
            conn.execute("delete from user_profiles where template_name = %s", (name,))


def test_every_argument_of_every_command_has_help_and_actions_have_their_own_flags():
    import argparse

    from fleet.ops.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, [*path, name])
            elif not isinstance(action, argparse._HelpAction):
                yield " ".join(path), action

    missing = [f"{path} {a.option_strings or a.dest}" for path, a in walk(build_parser(), ["fleet"]) if not a.help]
    assert missing == []
    shown = fleet_cli("dlq", "show", "--help").stdout
    assert "--yes" not in shown and "--error-class" not in shown
    assert "--cohort" not in fleet_cli("upgrade", "status", "--help").stdout
