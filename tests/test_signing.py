"""Signed envelopes (FLEET_SIGNING_KEY): forged, unsigned, stale and replayed ones are rejected, on both brokers."""

from __future__ import annotations

import time
import uuid

import pytest

from fleet.shared.middleware.signing import EnvelopeSigning

from .conftest import make_client, started_fleet
from .helpers import dead_letters, pgmq_send, wait_for

KEY = "test-signing-key-0123456789"


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def signed_fleet(request, services, tmp_path_factory):
    with started_fleet(services, request.param, tmp_path_factory.mktemp("signed"), FLEET_SIGNING_KEY=KEY) as f:
        yield f


def send_raw(fleet, message) -> None:
    """Put an already-encoded envelope on the queue as an attacker would, bypassing enqueue's middleware."""
    if fleet.kind == "pgmq":
        pgmq_send(fleet.dsn, message.queue_name, message.encode().decode())
    else:
        fleet.client.broker.do_enqueue(message.queue_name, message.options["redis_message_id"], message.encode())


def signed_message(fleet, trace: str, key: str = KEY, sig_ts_shift_ms: int = 0):
    message = fleet.client.message("echo", {"message": "signed"}, trace)
    if fleet.kind == "redis":
        message.options["redis_message_id"] = str(uuid.uuid4())  # what RedisBroker.enqueue adds before signing
    signer = EnvelopeSigning(key.encode(), 300)
    signer.before_enqueue(None, message, None)
    if sig_ts_shift_ms:
        message.options["sig_ts"] += sig_ts_shift_ms
        message.options["sig"] = signer.digest(message)
    return message


def test_signed_envelope_runs(signed_fleet):
    trace = signed_fleet.trace()
    signed_fleet.client.enqueue("echo", {"message": "hello"}, trace_id=trace)
    evs = signed_fleet.wait_done(trace, 1)
    assert [e for e in evs if e["type"] == "job.succeeded"]


def test_forged_and_unsigned_envelopes_are_rejected(signed_fleet):
    forger = make_client(signed_fleet.kind, FLEET_SIGNING_KEY="not-the-real-key-xyz")
    unsigned = make_client(signed_fleet.kind)
    try:
        forged_trace, unsigned_trace = signed_fleet.trace(), signed_fleet.trace()
        forger.enqueue("echo", {"message": "forged"}, trace_id=forged_trace)
        unsigned.enqueue("echo", {"message": "unsigned"}, trace_id=unsigned_trace)
        signed_fleet.wait_done(forged_trace, 1)
        signed_fleet.wait_done(unsigned_trace, 1)
    finally:
        forger.broker.close()
        unsigned.broker.close()
    (forged,) = dead_letters(signed_fleet.dsn, forged_trace)
    (plain,) = dead_letters(signed_fleet.dsn, unsigned_trace)
    assert (
        forged["reason"] == "permanent error: SignatureRejected: forged or altered envelope: signature does not match"
    )
    assert (
        plain["reason"] == "permanent error: SignatureRejected: unsigned envelope rejected (FLEET_SIGNING_KEY is set)"
    )
    assert KEY not in forged["reason"]


def test_altered_envelope_is_rejected(signed_fleet):
    trace = signed_fleet.trace()
    message = signed_message(signed_fleet, trace)
    message.args[0]["message"] = "tampered"
    send_raw(signed_fleet, message)
    dl = wait_for(lambda: dead_letters(signed_fleet.dsn, trace), 60, what="the altered envelope's dead letter")
    assert "forged or altered envelope" in dl[0]["reason"]


def test_replayed_and_stale_envelopes_are_rejected(signed_fleet):
    trace = signed_fleet.trace()
    message = signed_message(signed_fleet, trace)
    send_raw(signed_fleet, message)
    signed_fleet.wait_done(trace, 1)
    time.sleep(0.3)
    send_raw(signed_fleet, message)  # the same envelope again
    dl = wait_for(lambda: dead_letters(signed_fleet.dsn, trace), 60, what="the replay's dead letter")
    assert (
        dl[0]["reason"]
        == "permanent error: SignatureRejected: replayed envelope: this signed message already completed"
    )

    stale_trace = signed_fleet.trace()
    send_raw(signed_fleet, signed_message(signed_fleet, stale_trace, sig_ts_shift_ms=-400_000))
    dl = wait_for(lambda: dead_letters(signed_fleet.dsn, stale_trace), 60, what="the stale envelope's dead letter")
    assert "outside the replay window (300s)" in dl[0]["reason"]


@pytest.mark.parametrize("signed_fleet", ["pgmq"], indirect=True)  # raw SQL producers exist on pgmq only
def test_raw_sql_jobs_run_but_an_envelope_cannot_claim_to_be_raw(signed_fleet):
    """Jobs written by SQL (`pgmq.send` of a plain JSON object, the embedding trigger, ams_enqueue_upgrade)
    carry no envelope and run; an unsigned envelope whose options say it is raw is still rejected."""
    raw_trace = signed_fleet.trace()
    pgmq_send(signed_fleet.dsn, "echo", {"message": f"from sql {raw_trace}", "record": True})
    wait_for(lambda: f"from sql {raw_trace}" in _echo_done(signed_fleet.dsn), 60, what="the raw job to run")
    claim_trace = signed_fleet.trace()
    message = signed_fleet.client.message("echo", {"message": "claims raw"}, claim_trace)
    message.options["raw"] = True
    send_raw(signed_fleet, message)
    dl = wait_for(
        lambda: dead_letters(signed_fleet.dsn, claim_trace), 60, what="the claimed-raw envelope's dead letter"
    )
    assert (
        dl[0]["reason"] == "permanent error: SignatureRejected: unsigned envelope rejected (FLEET_SIGNING_KEY is set)"
    )


def _echo_done(dsn: str) -> list[str]:
    from .helpers import events

    return [e["payload"].get("message") for e in events(dsn, type="echo.done")]


def test_two_copies_of_a_signed_envelope_at_once_run_only_once(signed_fleet):
    """Replay detection claims the signature before the job runs: a copy sent while the first still runs is
    rejected too (the old check-then-record-after let both run)."""
    from .helpers import events

    trace = signed_fleet.trace()
    message = signed_fleet.client.message("echo", {"message": "twice at once", "sleep_ms": 6000, "record": True}, trace)
    if signed_fleet.kind == "redis":
        message.options["redis_message_id"] = str(uuid.uuid4())
    EnvelopeSigning(KEY.encode(), 300).before_enqueue(None, message, None)
    send_raw(signed_fleet, message)
    send_raw(signed_fleet, message)  # on Redis a second entry of the same message id in the queue's list
    dl = wait_for(lambda: dead_letters(signed_fleet.dsn, trace), 60, what="the second copy's dead letter")
    assert (
        dl[0]["reason"]
        == "permanent error: SignatureRejected: replayed envelope: a copy of this signed message is already running"
    )
    wait_for(
        lambda: [e for e in events(signed_fleet.dsn, trace_id=trace) if e["type"] == "echo.done"],
        60,
        what="the first copy to finish",
    )
    time.sleep(0.5)
    assert len([e for e in events(signed_fleet.dsn, trace_id=trace) if e["type"] == "echo.done"]) == 1


def test_a_forged_copy_of_a_retry_cannot_cancel_the_genuine_one(signed_fleet):
    """The signature is checked before the attempt is claimed: a forged envelope naming a real job's id and
    retry number is rejected without claiming that attempt, so the genuine signed retry still runs."""
    from .helpers import events

    trace = signed_fleet.trace()
    genuine = signed_fleet.client.message("echo", {"message": "genuine retry", "record": True}, trace)
    genuine.options["retries"] = 1
    forged = genuine.copy(args=({"message": "forged retry", "record": True},))
    for message in (genuine, forged):
        if signed_fleet.kind == "redis":
            message.options["redis_message_id"] = str(uuid.uuid4())
    EnvelopeSigning(KEY.encode(), 300).before_enqueue(None, genuine, None)
    EnvelopeSigning(b"not-the-real-key-xyz", 300).before_enqueue(None, forged, None)
    send_raw(signed_fleet, forged)
    dl = wait_for(lambda: dead_letters(signed_fleet.dsn, trace), 60, what="the forged copy's dead letter")
    assert "forged or altered envelope" in dl[0]["reason"]
    send_raw(signed_fleet, genuine)
    done = wait_for(
        lambda: [e for e in events(signed_fleet.dsn, trace_id=trace) if e["type"] == "echo.done"],
        60,
        what="the genuine retry to run",
    )
    assert [e["payload"]["message"] for e in done] == ["genuine retry"]


@pytest.mark.parametrize("kind", ["pgmq", "redis"])
def test_a_signed_job_whose_worker_was_killed_runs_again_when_redelivered(services, kind, tmp_path):
    """A redelivery after the worker died is no replay: on pgmq it carries its message id; on Redis the claim's
    holder (the dead worker's broker id) has no heartbeat, by which Redis gave the message back. Two copies at
    once are still refused (test_two_copies_of_a_signed_envelope_at_once_run_only_once)."""
    from .conftest import worker_env
    from .helpers import WorkerGroup, events

    env = worker_env(services, kind, FLEET_SIGNING_KEY=KEY)  # FLEET_VISIBILITY_TIMEOUT_S=4
    client = make_client(kind, FLEET_SIGNING_KEY=KEY)
    trace = str(uuid.uuid4())
    first = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        client.enqueue("echo", {"message": "killed mid-run", "sleep_ms": 2000, "record": True}, trace_id=trace)
        wait_for(
            lambda: [e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.started"],
            30,
            what="the signed job to start",
        )
        first.kill()
        second = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
        try:
            wait_for(
                lambda: [e for e in events(services["dsn"], trace_id=trace) if e["type"] == "echo.done"],
                40,
                what="the redelivered job to run",
            )
        finally:
            assert second.terminate() == 0
    finally:
        first.kill()
        client.broker.close()
    assert dead_letters(services["dsn"], trace) == []
