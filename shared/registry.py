"""Job types: the `job` decorator (`from fleet import job`) and the registry it fills.

    @job(SummarizeJob, queue="summaries", max_retries=5, rate_limit=RateLimit(60))
    def summarize(payload: SummarizeJob) -> None: ...

Declaring a job registers its job type (name, queue, description, payload model, options) and builds no
broker: a producer that imports the module can enqueue it (`client.enqueue(summarize, SummarizeJob(...))`),
and a worker process (`fleet.workers.start()`) declares every registered job on its broker as a dramatiq
actor. The fleet's own families are declared the same way, in the modules named by FAMILY_MODULES; a
user's modules are named by FLEET_JOBS (`fleet worker --jobs myapp.jobs`). Both are loaded by name, on the
first look-up of a job type, so the platform imports no family. A name no loaded module declares is looked
up in the `job_types` table, which every worker fills with what it serves (`publish`).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pydantic

from fleet.shared.brokers.pgmq.broker import QUEUE_NAME
from fleet.shared.errors import InvalidPayload, PermanentError, describe
from fleet.shared.payloads import problem

if TYPE_CHECKING:
    import dramatiq

M = TypeVar("M", bound=pydantic.BaseModel)

# The modules declaring the fleet's own job types, loaded by name like a FLEET_JOBS module.
FAMILY_MODULES = (
    "fleet.workers.agents.actors",
    "fleet.workers.agents.upgrade_actors",
    "fleet.workers.chat.actors",
    "fleet.workers.echo",
    "fleet.workers.embed.actors",
    "fleet.workers.health",
    "fleet.workers.housekeeping",
    "fleet.workers.lifecycle.actors",
)
MAX_QUEUE_NAME = 47  # pgmq.validate_queue_name: 'template_pgmq_q_' + the name fits Postgres's 63-byte identifiers


class UnknownJobType(LookupError):
    pass


class InvalidJobDeclaration(ValueError):
    """A `@job` declaration the fleet cannot serve (a bad queue name, a payload that is not a model...)."""


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` starts of the job per sliding window of `window_s`, across every process (dramatiq's
    WindowRateLimiter, on Redis or Postgres: fleet.shared.ratelimit). A job over the limit is deferred: put
    back with a delay, keeping its retries. Job types naming the same `key` share one limit."""

    limit: int
    window_s: int = 60
    key: str | None = None  # default: the job type's name

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_s < 1:
            raise InvalidJobDeclaration(f"a rate limit needs limit >= 1 and window_s >= 1, not {self}")


@dataclass(frozen=True)
class Lease:
    """An exclusive lease per key: while one job holds the lease named by its payload's `field` (for example
    one per agent, as upgrades hold), another job with the same value is deferred. The holder renews it
    while it runs; the lease of a worker that died expires after `ttl_s`."""

    field: str
    ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.ttl_s < 2:
            raise InvalidJobDeclaration("a lease's ttl_s must be at least 2 seconds")


@dataclass(frozen=True)
class JobOptions:
    """None: the fleet's setting (FLEET_MAX_RETRIES, FLEET_MIN_BACKOFF_MS, ...). Times in milliseconds, as
    dramatiq's. An actor's max_backoff is capped by FLEET_MAX_BACKOFF_MS, the operator's ceiling."""

    max_retries: int | None = None  # transient failures retried this many times, then dead-lettered
    min_backoff: int | None = None
    max_backoff: int | None = None
    time_limit: int | None = None  # an attempt running longer is interrupted (and retried)
    rate_limit: RateLimit | None = None
    lease: Lease | None = None
    dead_letters: bool = True  # False: a failed job is recorded by its job.dead event only, no dead letter row

    def actor_options(self) -> dict[str, Any]:
        """The options dramatiq's middleware read from the actor."""
        chosen = {k: getattr(self, k) for k in ("max_retries", "min_backoff", "max_backoff", "time_limit")}
        options = {k: v for k, v in chosen.items() if v is not None}
        if not self.dead_letters:
            options["dead_letters"] = False
        return options

    def public(self) -> dict[str, Any]:
        """As published in job_types.options."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class JobType:
    name: str  # the actor's name
    queue: str
    description: str
    model: type[pydantic.BaseModel] | None = field(default=None, compare=False)  # None: known from job_types only
    options: JobOptions = JobOptions()
    module: str = ""

    def schema(self) -> dict[str, Any] | None:
        return self.model.model_json_schema() if self.model is not None else None

    def validate(self, payload: Any) -> Any:
        """The payload as JSON-ready data, checked by the model when it is at hand (InvalidPayload if not)."""
        if isinstance(payload, pydantic.BaseModel):
            if self.model is not None and not isinstance(payload, self.model):
                raise InvalidPayload(f"{self.name} takes a {self.model.__name__}, not a {type(payload).__name__}")
            return payload.model_dump(mode="json", exclude_unset=True)
        if (why := problem(payload)) is not None:
            raise InvalidPayload(f"{self.name} payload refused: {why}")
        if self.model is not None:
            parse(self, payload)
        return payload


def parse(jt: JobType, payload: Any) -> Any:
    assert jt.model is not None
    try:
        return jt.model.model_validate(payload)
    except pydantic.ValidationError as e:
        raise InvalidPayload(f"invalid {jt.name} payload: {describe(e)}") from None


def validate_queue_name(queue: str) -> str:
    if not isinstance(queue, str) or not QUEUE_NAME.match(queue):
        raise InvalidJobDeclaration(
            f"invalid queue name {queue!r}: a queue name is 1 to {MAX_QUEUE_NAME} lowercase letters, digits and"
            " underscores, starting with a letter (pgmq's table names and Redis's keys both hold it)"
        )
    return queue


class Job(Generic[M]):
    """A declared job type: call it to run the job in this process (the payload is validated first), give
    it to `FleetClient.enqueue` to enqueue it. `actor` is its dramatiq actor, once a worker declared it."""

    def __init__(self, fn: Callable[[M], Any], model: type[M], job_type: JobType) -> None:
        self.fn_unwrapped = fn
        self.model = model
        self.type = job_type
        self._actor: dramatiq.Actor[..., Any] | None = None
        functools.update_wrapper(self, fn)

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def queue(self) -> str:
        return self.type.queue

    def __call__(self, payload: M | dict[str, Any]) -> Any:
        return self.fn(payload if not isinstance(payload, pydantic.BaseModel) else payload.model_dump(mode="json"))

    def fn(self, payload: Any = None) -> Any:
        """What the worker runs for a message: the payload checked and parsed, then the job's guards
        (its lease, its rate limit), then the function."""
        if (why := problem(payload)) is not None:
            raise InvalidPayload(f"invalid {self.name} payload: {why}")
        parsed = parse(self.type, payload)
        from fleet.shared.guards import guarded

        with guarded(self.type, parsed):
            return self.fn_unwrapped(parsed)

    @property
    def actor(self) -> dramatiq.Actor[..., Any]:
        if self._actor is None:
            raise RuntimeError(
                f"job {self.name!r} is not declared on a broker: a worker process declares it"
                " (fleet.workers.start()); a producer enqueues it with FleetClient.enqueue"
            )
        return self._actor

    def declare(self, broker: dramatiq.Broker) -> dramatiq.Actor[..., Any]:
        import dramatiq

        if self._actor is None or self._actor.broker is not broker:

            def run(payload: Any = None) -> Any:
                return self.fn(payload)

            run.__name__ = run.__qualname__ = self.name
            # Permanent errors are expected outcomes: dramatiq logs them without a traceback.
            declare = dramatiq.actor(
                actor_name=self.name,
                queue_name=self.queue,
                broker=broker,
                throws=(PermanentError,),
                **self.type.options.actor_options(),
            )
            self._actor = declare(run)
        return self._actor

    def __repr__(self) -> str:
        return f"Job({self.name!r}, queue={self.queue!r})"


def job(
    model: type[M],
    *,
    queue: str | None = None,
    name: str | None = None,
    description: str | None = None,
    max_retries: int | None = None,
    min_backoff: int | None = None,
    max_backoff: int | None = None,
    time_limit: int | None = None,
    rate_limit: RateLimit | int | None = None,
    lease: Lease | str | None = None,
    dead_letters: bool = True,
) -> Callable[[Callable[[M], Any]], Job[M]]:
    """Declare a job type: its function takes one argument, its payload, parsed by `model` (a pydantic model);
    a payload the model refuses is a permanent failure, dead-lettered with the validation message. `queue`
    (default: the function's name) must be a legal pgmq and Redis queue name. An int rate_limit is per
    minute; a str lease names the payload field it is held on. See JobOptions for the rest."""
    if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
        raise InvalidJobDeclaration(f"a job's payload is a pydantic model class, not {model!r}")
    if isinstance(rate_limit, int):
        rate_limit = RateLimit(rate_limit)
    if isinstance(lease, str):
        lease = Lease(lease)
    if lease is not None and lease.field not in model.model_fields:
        raise InvalidJobDeclaration(f"lease field {lease.field!r} is not a field of {model.__name__}")
    options = JobOptions(max_retries, min_backoff, max_backoff, time_limit, rate_limit, lease, dead_letters)

    def decorator(fn: Callable[[M], Any]) -> Job[M]:
        job_name = name or fn.__name__
        doc = description if description is not None else (fn.__doc__ or "").strip().split("\n\n")[0]
        jt = JobType(
            job_name, validate_queue_name(queue or job_name), " ".join(doc.split()), model, options, fn.__module__
        )
        declared = Job(fn, model, jt)
        _register(declared)
        return declared

    return decorator


# -- the registry ---------------------------------------------------------------------------------------
_jobs: dict[str, Job[Any]] = {}
_broker: dramatiq.Broker | None = None  # set by declare_actors: jobs declared later join it at once
_lock = threading.RLock()
_loaded: set[str] = set()


def _register(declared: Job[Any]) -> None:
    with _lock:
        known = _jobs.get(declared.name)
        if known is not None and known.type.module != declared.type.module:
            raise InvalidJobDeclaration(
                f"job type {declared.name!r} is declared twice: in {known.type.module} and in {declared.type.module}"
            )
        _jobs[declared.name] = declared
        if _broker is not None:
            declared.declare(_broker)


def load(modules: Iterator[str] | tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Import the modules that declare job types: the fleet's families and FLEET_JOBS's, or `modules`.
    Returns the modules imported now; an unimportable one raises ImportError naming it."""
    if modules is None:
        from fleet.shared.config import get_settings

        modules = (*FAMILY_MODULES, *job_modules(get_settings().jobs))
    fresh = []
    with _lock:
        for module in modules:
            if module not in _loaded:
                try:
                    importlib.import_module(module)
                except ImportError as e:
                    if e.name and module.startswith(e.name):
                        raise ImportError(f"job module {module!r} cannot be imported: {e}", name=e.name) from e
                    raise
                _loaded.add(module)
                fresh.append(module)
    return fresh


def job_modules(text: str | None) -> list[str]:
    """FLEET_JOBS: module names separated by commas."""
    return [m.strip() for m in (text or "").split(",") if m.strip()]


def declare_actors(broker: dramatiq.Broker) -> list[JobType]:
    """A worker process: every loaded job declared as an actor on `broker` (and every job declared later)."""
    global _broker
    with _lock:
        _broker = broker
        for declared in _jobs.values():
            declared.declare(broker)
        return [d.type for d in _jobs.values()]


def declared_jobs() -> dict[str, Job[Any]]:
    load()
    return dict(_jobs)


class _Declared(Mapping[str, JobType]):
    """JOB_TYPES: name -> JobType of every declared job, loaded on first use."""

    def __getitem__(self, name: str) -> JobType:
        return declared_jobs()[name].type

    def __iter__(self) -> Iterator[str]:
        return iter(declared_jobs())

    def __len__(self) -> int:
        return len(declared_jobs())


JOB_TYPES: Mapping[str, JobType] = _Declared()


def job_type(name: str) -> JobType:
    """By actor name, or by queue name when one job type owns that queue (`fleet enqueue embed ...`); a name
    no loaded module declares is looked up among the job types workers published (job_types)."""
    if name in _jobs:
        return _jobs[name].type
    declared = {n: j.type for n, j in declared_jobs().items()}
    if name in declared:
        return declared[name]
    by_queue = [j for j in declared.values() if j.queue == name]
    if len(by_queue) == 1:
        return by_queue[0]
    published = published_job_type(name)
    if published is not None:
        return published
    raise UnknownJobType(f"unknown job type {name!r}; registered: {', '.join(sorted(declared))}")


def queues() -> list[str]:
    return sorted({j.queue for j in JOB_TYPES.values()})


# -- job_types: what the workers serve, for SQL producers, `fleet status` and producers without the module ---
def publish(types: list[JobType]) -> None:
    """Upsert the job types this worker serves into job_types (at worker start)."""
    from psycopg.types.json import Jsonb

    from fleet.shared.db import get_pool

    rows = [(t.name, t.queue, t.description, Jsonb(t.schema()), Jsonb(t.options.public()), t.module) for t in types]
    with get_pool().connection() as conn, conn.cursor() as cur:
        cur.executemany(
            "insert into job_types (name, queue, description, payload_schema, options, module, published_at)"
            " values (%s, %s, %s, %s, %s, %s, now()) on conflict (name) do update set queue = excluded.queue,"
            " description = excluded.description, payload_schema = excluded.payload_schema,"
            " options = excluded.options, module = excluded.module, published_at = now()",
            rows,
        )


def published_job_type(name: str) -> JobType | None:
    import psycopg

    from fleet.shared.db import NotConfigured, get_pool

    try:
        with get_pool().connection() as conn:
            row = conn.execute(
                "select name, queue, description, module from job_types where name = %s"
                " or (queue = %s and (select count(*) from job_types where queue = %s) = 1)",
                (name, name, name),
            ).fetchone()
    except (
        NotConfigured,
        psycopg.Error,
    ):  # no database configured or reachable, or no job_types table yet: the name is simply unknown
        return None
    return JobType(row[0], row[1], row[2] or "", module=row[3] or "") if row else None


__all__ = [
    "JOB_TYPES",
    "FAMILY_MODULES",
    "InvalidJobDeclaration",
    "Job",
    "JobOptions",
    "JobType",
    "Lease",
    "RateLimit",
    "UnknownJobType",
    "declare_actors",
    "job",
    "job_type",
    "load",
    "publish",
    "queues",
]
