"""Fuzzed input through real workers: arbitrary JSON, wrong types, huge strings, deep nesting, NUL
characters and invalid UTF-8, for every actor and for raw messages written with SQL. Each message
either succeeds or ends in the dead letters with a reason; the producer gets a clear error for what
cannot be enqueued; the workers never die or hang."""

from __future__ import annotations

import json
import os
import random
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

from fleet.shared.errors import InvalidPayload
from fleet.shared.registry import JOB_TYPES

from .conftest import started_fleet
from .embedding_support import API_KEY, embed_env
from .helpers import wait_for

ACTORS = sorted(JOB_TYPES)
MAX_PAYLOAD = 200_000


def nested(depth: int, kind: type):
    value: object = 1
    for _ in range(depth):
        value = [value] if kind is list else {"a": value}
    return value


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
hostile = st.one_of(
    json_values,
    st.integers(1, 3000).map(lambda depth: nested(depth, list)),  # deep nesting
    st.integers(1, 3000).map(lambda depth: nested(depth, dict)),
    st.integers(MAX_PAYLOAD - 1000, MAX_PAYLOAD + 1000).map(lambda n: {"message": "x" * n}),  # around the limit
    st.text(alphabet=st.sampled_from(["a", "\x00", "é", "\u2028", "\U0001f600"]), max_size=30).map(
        lambda t: {"message": t, "session_id": t, "content": t}
    ),
)
# Valid-looking payloads with one field of the wrong type.
SHAPES = {
    "echo": {"message": "hi"},
    "chat_completion": {"session_id": "s", "content": "hi"},
    "embed_documents": {"documents": [{"source_id": "a", "chunk_index": 0, "content": "x"}]},
    "create_agent": {"user_id": str(uuid.uuid4()), "template": "t", "version": "1.0.0"},
    "memory_lifecycle": {"project_id": "p"},
    "upgrade_agent": {"run_id": str(uuid.uuid4()), "agent_id": "a"},
}


def wrong_types(actor: str):
    shape = SHAPES.get(actor, {"x": 1})
    return st.sampled_from(sorted(shape)).flatmap(lambda key: json_values.map(lambda v: {**shape, key: v}))


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def fuzz_fleet(request, services, sim, tmp_path_factory):
    with started_fleet(
        services,
        request.param,
        tmp_path_factory.mktemp(f"fuzz-{request.param}"),
        **embed_env(sim),
        CHAT_API_BASE=f"{sim.url}/v1",
        CHAT_API_KEY=API_KEY,
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
        FLEET_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD),
        FLEET_MAX_RETRIES="0",
    ) as f:
        yield f


def settle(fleet, trace: str, count: int) -> None:
    try:
        if count:
            fleet.wait_done(trace, count, timeout=120)
    except AssertionError:
        from .helpers import events

        story = events(fleet.dsn, trace_id=trace)
        done = {e["job_id"] for e in story if e["type"] in ("job.succeeded", "job.dead")}
        stuck = [(e["type"], e["job_id"], e["payload"]) for e in story if e["job_id"] not in done]
        raise AssertionError(f"{count - len(done)} job(s) did not finish: {stuck}") from None
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        blank = conn.execute(
            "select count(*) from dead_letters where trace_id = %s and coalesce(reason, '') = ''", (trace,)
        ).fetchone()[0]
    assert blank == 0, "a dead letter without a reason"
    assert fleet.workers.alive(), fleet.workers.logs()[-3000:]


# A few hundred random examples per actor, from a new random seed each run (FLEET_FUZZ_SEED replays one,
# FLEET_FUZZ_EXAMPLES changes the count). Each example is one job; they are enqueued as drawn and checked
# together once they settle. No shrinking: it would replay real jobs for minutes; the seed reproduces.
EXAMPLES = int(os.environ.get("FLEET_FUZZ_EXAMPLES", "200"))


def fuzz(strategy, act, label: str) -> int:
    """Call act(value) for EXAMPLES values drawn from `strategy`; returns the seed used."""
    chosen = int(os.environ.get("FLEET_FUZZ_SEED") or random.SystemRandom().getrandbits(32))

    @seed(chosen)
    @settings(
        max_examples=EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate,),
    )
    @given(strategy)
    def one(value):
        act(value)

    print(f"{label}: FLEET_FUZZ_SEED={chosen}")  # shown by pytest with the failure's captured output
    one()
    return chosen


@pytest.mark.parametrize("actor", ACTORS)
def test_every_actor_survives_hostile_payloads(fuzz_fleet, actor):
    from fleet.shared.client import FleetClient
    from fleet.shared.config import Settings

    client = FleetClient(
        fuzz_fleet.client.broker, Settings(FLEET_BROKER=fuzz_fleet.kind, FLEET_MAX_PAYLOAD_BYTES=MAX_PAYLOAD)
    )
    trace, sent = str(uuid.uuid4()), []

    def enqueue(payload):  # what the SDK refuses must be refused with InvalidPayload naming the reason
        try:
            client.enqueue(actor, payload, trace_id=trace)
            sent.append(payload)
        except InvalidPayload as e:
            assert str(e), "an InvalidPayload without a message"

    chosen = fuzz(hostile | wrong_types(actor), enqueue, f"{actor} on {fuzz_fleet.kind}")
    try:
        settle(fuzz_fleet, trace, len(sent))
    except AssertionError as e:
        raise AssertionError(f"{e}\n(replay with FLEET_FUZZ_SEED={chosen})") from None


raw_bodies = st.one_of(  # JSON text as a SQL producer would write it
    json_values.map(json.dumps),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "1" + "]" * depth),
    st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.integers(MAX_PAYLOAD - 1000, MAX_PAYLOAD + 1000).map(lambda n: json.dumps({"message": "x" * n})),
    st.text(max_size=20).map(lambda t: json.dumps({"message": t + "\x00"})),
)


# Raw SQL producers write to pgmq; on Redis only the SDK produces.
@pytest.mark.parametrize("fuzz_fleet", ["pgmq"], indirect=True)
def test_raw_sql_messages_are_wrapped_or_dead_lettered(fuzz_fleet):
    sent = []
    with psycopg.connect(fuzz_fleet.dsn, autocommit=True) as conn:

        def send(body):
            try:
                sent.append(conn.execute("select pgmq.send('echo', %s::jsonb)", (body,)).fetchone()[0])
            except psycopg.errors.UntranslatableCharacter:
                pass  # Postgres itself refuses \u0000 in jsonb: nothing was enqueued

        chosen = fuzz(raw_bodies, send, "raw SQL bodies")
        ids = [f"pgmq:echo:{m}" for m in sent]

        def settled():
            return conn.execute("select count(*) from pgmq.q_echo where msg_id = any(%s)", (sent,)).fetchone()[0] == 0

        def outcomes():
            done = {
                r[0]
                for r in conn.execute(
                    "select job_id from bus_events where job_id = any(%s) and type = 'job.succeeded'"
                    " union select message_id from dead_letters where message_id = any(%s) and reason <> ''",
                    (ids, ids),
                )
            }
            return done >= set(ids)

        try:
            wait_for(settled, 120, what="raw messages to be processed or dead-lettered")
            wait_for(outcomes, 30, what="an outcome for every raw message")
        except AssertionError as e:
            raise AssertionError(f"{e}\n(replay with FLEET_FUZZ_SEED={chosen})") from None
    assert fuzz_fleet.workers.alive()


@pytest.mark.parametrize("fuzz_fleet", ["pgmq"], indirect=True)
def test_invalid_utf8_from_a_raw_producer_is_refused_by_postgres(fuzz_fleet):
    with (
        psycopg.connect(fuzz_fleet.dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CharacterNotInRepertoire),
    ):
        conn.execute("select pgmq.send('echo', convert_from('\\x7b2261223a22ff227d'::bytea, 'UTF8')::jsonb)")


any_floats = st.floats()  # NaN and the infinities included
awkward = st.recursive(
    st.none() | st.booleans() | st.integers() | any_floats | st.text(alphabet=st.sampled_from(["a", "\x00", "é"])),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(
            st.text(alphabet=st.sampled_from(["k", "\x00"]), max_size=3) | st.integers(), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=500, database=None, deadline=None)
@given(
    st.one_of(
        awkward,
        st.integers(60, 70).map(lambda depth: nested(depth, dict)),
        st.integers(60, 70).map(lambda depth: nested(depth, list)),
    )
)
def test_the_quick_payload_check_agrees_with_the_one_that_names_the_problem(payload):
    """payloads.problem answers most payloads with a scan that builds no paths; it must refuse exactly
    what the full walk refuses, with the full walk's reason."""
    from fleet.shared.payloads import _described, problem

    assert problem(payload) == _described(payload)
