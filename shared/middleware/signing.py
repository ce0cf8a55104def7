"""Optional HMAC signatures on envelopes (FLEET_SIGNING_KEY), with a replay window.

Each enqueue signs the whole envelope (queue, actor, arguments, options, id, timestamps).
A worker rejects an unsigned, forged or altered envelope, one signed longer ago than
FLEET_SIGNING_WINDOW_S, and one whose signature already completed once (a replay).
Raw JSON messages written into pgmq from SQL carry no envelope: they come from inside
the database, whose roles are their trust boundary, and are accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime, timezone

from dramatiq.middleware import Middleware, MiddlewareError

from ..db import get_pool
from ..errors import PermanentError

SIGNATURE_OPTIONS = ("sig", "sig_ts")


class SignatureRejected(MiddlewareError, PermanentError):
    pass


class EnvelopeSigning(Middleware):
    def __init__(self, key: bytes, window_s: int) -> None:
        self.key = key
        self.window_ms = window_s * 1000

    def digest(self, message) -> str:
        options = {k: v for k, v in message.options.items() if k not in SIGNATURE_OPTIONS}
        body = json.dumps(
            [message.queue_name, message.actor_name, list(message.args), message.kwargs, options,
             message.message_id, message.message_timestamp, message.options.get("sig_ts")],
            sort_keys=True, separators=(",", ":"), default=str,
        )
        return hmac.new(self.key, body.encode(), hashlib.sha256).hexdigest()

    def before_enqueue(self, broker, message, delay):
        message.options.pop("sig", None)
        message.options["sig_ts"] = int(time.time() * 1000)
        message.options["sig"] = self.digest(message)

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
            raise SignatureRejected(f"envelope signed {age_ms // 1000}s ago is outside the replay window ({self.window_ms // 1000}s)")
        with get_pool().connection() as conn:
            seen = conn.execute(
                "select 1 from request_dedup where scope = 'envelope' and key = %s", (sig,)
            ).fetchone()
        if seen:
            raise SignatureRejected("replayed envelope: this signed message already completed")

    def after_process_message(self, broker, message, *, result=None, exception=None):
        sig = message.options.get("sig")
        if exception is not None or not isinstance(sig, str):
            return
        expires = datetime.fromtimestamp((message.options["sig_ts"] + self.window_ms) / 1000, tz=timezone.utc)
        with get_pool().connection() as conn:
            conn.execute(
                "insert into request_dedup (scope, key, expires_at) values ('envelope', %s, %s) on conflict do nothing",
                (sig, expires),
            )
