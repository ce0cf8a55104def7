"""`job`: declare a fleet actor whose single argument is validated by a pydantic model.

Validation failure is permanent (InvalidPayload): straight to the dead letters, no retries.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import dramatiq
import pydantic

from fleet.shared.errors import InvalidPayload, PermanentError, describe
from fleet.shared.payloads import problem
from fleet.shared.registry import job_type

M = TypeVar("M", bound=pydantic.BaseModel)


def job(model: type[M], **options: Any) -> Callable[[Callable[[M], Any]], dramatiq.Actor]:
    def decorator(fn: Callable[[M], Any]) -> dramatiq.Actor:
        jt = job_type(fn.__name__)

        @functools.wraps(fn)
        def run(payload: Any = None) -> Any:
            if (why := problem(payload)) is not None:
                raise InvalidPayload(f"invalid {jt.name} payload: {why}")
            try:
                parsed = model.model_validate(payload)
            except pydantic.ValidationError as e:
                raise InvalidPayload(f"invalid {jt.name} payload: {describe(e)}") from None
            return fn(parsed)

        # Permanent errors are expected outcomes: dramatiq logs them without a traceback.
        options.setdefault("throws", (PermanentError,))
        return dramatiq.actor(run, actor_name=jt.name, queue_name=jt.queue, **options)

    return decorator
