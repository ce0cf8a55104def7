"""Optional HMAC signatures on envelopes (FLEET_SIGNING_KEY), with a replay window.

Each enqueue signs the whole envelope (queue, actor, arguments, options, id, timestamps).
A worker rejects an unsigned, forged or altered envelope, one signed longer ago than
FLEET_SIGNING_WINDOW_S, and a replay: each signature is claimed before its job runs, so a second copy is
rejected whether the first is still running or completed (see _claim for redeliveries).
Raw JSON messages written into pgmq from SQL carry no envelope: they come from inside
the database, whose roles are their trust boundary, and are accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

from dramatiq.middleware import Middleware, MiddlewareError

from fleet.shared import claims
from fleet.shared.capabilities import capabilities_of
from fleet.shared.db import get_pool
from fleet.shared.errors import PermanentError

SIGNATURE_OPTIONS = ("sig", "sig_ts")


class SignatureRejected(MiddlewareError, PermanentError):
    pass


class EnvelopeSigning(Middleware):
    """Signs each envelope at enqueue: last in the stack, after every other middleware set its options."""

    def __init__(self, key: bytes, window_s: int, time_limit_ms: int = 600_000) -> None:
        self.key = key
        self.window_ms = window_s * 1000
        self.time_limit_ms = time_limit_ms

    def digest(self, message) -> str:
        options = {k: v for k, v in message.options.items() if k not in SIGNATURE_OPTIONS}
        body = json.dumps(
            [
                message.queue_name,
                message.actor_name,
                list(message.args),
                message.kwargs,
                options,
                message.message_id,
                message.message_timestamp,
                message.options.get("sig_ts"),
            ],
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hmac.new(self.key, body.encode(), hashlib.sha256).hexdigest()

    def before_enqueue(self, broker, message, delay):
        message.options.pop("sig", None)
        message.options["sig_ts"] = int(time.time() * 1000)
        message.options["sig"] = self.digest(message)


class EnvelopeVerification(EnvelopeSigning):
    """Checks and claims each envelope before it runs: early in the stack, before any middleware that writes
    for a message (attempt claims, events), so a forged or replayed envelope leaves nothing behind."""

    def before_enqueue(self, broker, message, delay):
        pass  # signing is EnvelopeSigning's

    def before_process_message(self, broker, message):
        # Set by the pgmq consumer on the jobs it wrapped from raw SQL JSON, never read from the content
        # (an envelope whose options say "raw" is still checked); their retries are envelopes, signed.
        if getattr(message, "from_sql", False) is True:
            return
        sig, signed_at = message.options.get("sig"), message.options.get("sig_ts")
        if not isinstance(sig, str) or not isinstance(signed_at, int):
            raise SignatureRejected("unsigned envelope rejected (FLEET_SIGNING_KEY is set)")
        if not hmac.compare_digest(sig, self.digest(message)):
            raise SignatureRejected("forged or altered envelope: signature does not match")
        age_ms = int(time.time() * 1000) - signed_at
        if age_ms > self.window_ms or age_ms < -60_000:
            raise SignatureRejected(
                f"envelope signed {age_ms // 1000}s ago is outside the replay window ({self.window_ms // 1000}s)"
            )
        self._claim(broker, message, signed_at)

    def _claim(self, broker, message, signed_at: int) -> None:
        """Claim the signature before the job runs, so two copies running at once cannot both pass. A claim
        whose job is still running is taken over only by a redelivery of the same pgmq message, by any copy
        once the Redis worker that holds it is dead (the judgement by which Redis gives its messages back),
        or once the job's time limit has passed since it was claimed."""
        sig, holder = message.options["sig"], redis_holder(broker)
        expires = datetime.fromtimestamp((signed_at + self.window_ms) / 1000, tz=UTC)
        claim = {"state": "running", "delivery": getattr(message, "pgmq_id", None), "holder": holder}
        with get_pool().connection() as conn:
            if claims.claim_envelope(conn, sig, claim, expires, self.time_limit_ms):
                return
            state, old_holder = claims.envelope_state(conn, sig)
            if state == "running" and old_holder and holder and redis_worker_dead(broker, old_holder):
                if claims.take_over_envelope(conn, sig, claim, old_holder):
                    return
        if state == "running":
            raise SignatureRejected("replayed envelope: a copy of this signed message is already running")
        raise SignatureRejected("replayed envelope: this signed message already completed")

    def after_process_message(self, broker, message, *, result=None, exception=None):
        # A failed attempt keeps its claim `running`: its retry is a new envelope with a new signature, and
        # on pgmq a redelivery of the same message (its retry could not be enqueued) may take it over.
        sig = message.options.get("sig")
        if exception is not None or not isinstance(sig, str):
            return
        with get_pool().connection() as conn:
            claims.envelope_done(conn, sig)


def redis_holder(broker) -> str | None:
    """The worker process that claims a signature, where the broker can tell whether it lives (Redis:
    dramatiq's broker id, which it heartbeats)."""
    return broker.broker_id if capabilities_of(broker).worker_liveness else None


def redis_worker_dead(broker, worker_id: str) -> bool:
    return not broker.worker_alive(worker_id)
