"""The fleet's dramatiq middleware, each small and named after what it does."""

from __future__ import annotations

from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit

from fleet.shared.config import Settings
from fleet.shared.middleware.attempts import AttemptClaims
from fleet.shared.middleware.deadletters import DeadLetters
from fleet.shared.middleware.events import JobEvents
from fleet.shared.middleware.metrics import Metrics
from fleet.shared.middleware.retries import ClassifiedRetries
from fleet.shared.middleware.signing import EnvelopeSigning, EnvelopeVerification
from fleet.shared.middleware.startup import RequiredSettings
from fleet.shared.middleware.trace import TraceContext


def fleet_middleware(settings: Settings) -> list:
    stack = [
        RequiredSettings(settings),
        AgeLimit(),
        TimeLimit(time_limit=settings.time_limit_ms),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        CurrentMessage(),
        TraceContext(),
        Metrics(),
        *_verification(settings),  # before anything that writes for a message
        AttemptClaims(),  # before JobEvents: a skipped copy records job.skipped, not job.started
        JobEvents(),
        ClassifiedRetries(
            max_retries=settings.max_retries, min_backoff=settings.min_backoff_ms, max_backoff=settings.max_backoff_ms
        ),
        DeadLetters(),
    ]
    if settings.signing_key is not None:
        # Last: it signs the envelope after every other middleware has set its options.
        stack.append(
            EnvelopeSigning(
                settings.signing_key.get_secret_value().encode(), settings.signing_window_s, settings.time_limit_ms
            )
        )
    return stack


def _verification(settings: Settings) -> list:
    if settings.signing_key is None:
        return []
    return [
        EnvelopeVerification(
            settings.signing_key.get_secret_value().encode(), settings.signing_window_s, settings.time_limit_ms
        )
    ]


__all__ = [
    "fleet_middleware",
    "ClassifiedRetries",
    "DeadLetters",
    "EnvelopeSigning",
    "EnvelopeVerification",
    "JobEvents",
    "Metrics",
    "TraceContext",
]
