"""Settings, environment first (a `.env` file is read too).

Names follow the platform's existing variables (DATABASE_URL, REDIS_URL, ...);
the fleet's own knobs are prefixed FLEET_.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Descriptions that several families' settings share.
PROVIDER_RETRIES = "Retries of one provider call inside a job, before the job itself is retried."
RATE_LIMIT = "Provider requests per minute across every process; 0: no limit. A job that meets it is delayed."
CALL_TIMEOUT = "Timeout of one provider call."


class Settings(BaseSettings):
    # Aliases only: a field name such as `home` must never pick up an unrelated variable like HOME.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=False)

    # Where the fleet runs: its database, its broker and its local state.
    database_url: SecretStr | None = Field(
        None,
        alias="DATABASE_URL",
        description=(
            "The PostgreSQL every process uses (results, bus_events, dead letters; the queues on pgmq). Required:"
            " a process without it exits, unless FLEET_EMBEDDED is set. Port 6543 is taken for a transaction pooler."
        ),
    )
    redis_url: SecretStr | None = Field(
        None,
        alias="REDIS_URL",
        description=(
            "The Redis of the Redis broker, required when FLEET_BROKER=redis; on that broker the rate limits and a"
            " streaming job's frames go through it too."
        ),
    )
    broker: Literal["pgmq", "redis"] = Field(
        "pgmq",
        alias="FLEET_BROKER",
        description=("The queues: pgmq in PostgreSQL (no other dependency), or dramatiq's Redis broker."),
    )
    home: Path = Field(
        Path(".fleet"),
        alias="FLEET_HOME",
        description=("Local state: the embedded services' data and logs, and the metrics files of worker processes."),
    )
    embedded: bool = Field(
        False,
        alias="FLEET_EMBEDDED",
        description=(
            "Development only: with no DATABASE_URL (or no REDIS_URL on the Redis broker), use an embedded"
            " PostgreSQL (Redis) under FLEET_HOME, started if it is not running. Off, a process without them exits"
            " at once saying so. `fleet demo`, `fleet services up` and the Makefile's targets start their own."
        ),
    )

    # Delivery.
    visibility_timeout_s: int = Field(
        30,
        alias="FLEET_VISIBILITY_TIMEOUT_S",
        ge=2,
        description=(
            "pgmq: how long a message read by a worker stays invisible; a heartbeat extends it while the job runs,"
            " so a dead worker's message reappears within this time."
        ),
    )
    poll_interval_ms: int = Field(
        1000,
        alias="FLEET_POLL_INTERVAL_MS",
        ge=10,
        description=(
            "pgmq: how often an idle consumer reads its queue besides being woken by NOTIFY (delayed messages and"
            " expired visibility fire no NOTIFY)."
        ),
    )
    pooler: bool | None = Field(
        None,
        alias="FLEET_DB_POOLER",
        description=(
            "Whether DATABASE_URL is a transaction pooler (no prepared statements, polling instead of LISTEN);"
            " unset: true for port 6543."
        ),
    )
    redis_maintenance_chance: int = Field(
        50_000,
        alias="FLEET_REDIS_MAINTENANCE_CHANCE",
        ge=1,
        le=1_000_000,
        description=(
            "Redis broker: how often, per million commands, a worker looks for dead workers' messages to requeue."
        ),
    )

    # Retries (job level) and limits.
    max_retries: int = Field(
        5,
        alias="FLEET_MAX_RETRIES",
        ge=0,
        description=("Retries of a job that fails with a transient error, before it is dead-lettered."),
    )
    min_backoff_ms: int = Field(
        1000,
        alias="FLEET_MIN_BACKOFF_MS",
        ge=1,
        description=("The first retry's backoff; each retry doubles it, jittered between half and all of it."),
    )
    max_backoff_ms: int = Field(
        300_000,
        alias="FLEET_MAX_BACKOFF_MS",
        ge=1,
        description=("The longest backoff between retries (a provider's longer Retry-After is honoured)."),
    )
    time_limit_ms: int = Field(
        600_000,
        alias="FLEET_TIME_LIMIT_MS",
        ge=100,
        description=("How long one attempt of a job may run before it is stopped."),
    )
    jobs: str = Field(
        "",
        alias="FLEET_JOBS",
        description=(
            "Modules declaring your own job types (`@job`), comma-separated, for example myapp.jobs,other.jobs:"
            " workers load them beside the fleet's own families (`fleet worker --jobs` adds to it), and producers"
            " load them to enqueue those jobs by name."
        ),
    )
    max_payload_bytes: int = Field(
        1_000_000,
        alias="FLEET_MAX_PAYLOAD_BYTES",
        ge=1024,
        description=("The largest message a producer may enqueue; a larger one is refused at enqueue."),
    )
    unreachable_budget_s: float = Field(
        60.0,
        alias="FLEET_UNREACHABLE_BUDGET_S",
        gt=0,
        description=(
            "How long a retry's enqueue, a dead letter or a job's events wait out an unreachable database or Redis."
        ),
    )

    # Envelope signing (off unless a key is set).
    signing_key: SecretStr | None = Field(
        None,
        alias="FLEET_SIGNING_KEY",
        description=("HMAC key: producers sign each message and workers refuse an unsigned or wrongly signed one."),
    )
    signing_window_s: int = Field(
        300, alias="FLEET_SIGNING_WINDOW_S", ge=1, description=("How old a signed message may be (against replay).")
    )

    # Observability.
    metrics_host: str = Field(
        "127.0.0.1",
        alias="FLEET_METRICS_HOST",
        description=("Address the metrics exporter (/metrics, /healthz, /readyz) listens on; 0.0.0.0 in a container."),
    )
    metrics_port: int = Field(
        9191,
        alias="FLEET_METRICS_PORT",
        description=("Port of the metrics exporter; 0 disables it for `fleet worker`."),
    )
    log_level: str = Field("INFO", alias="FLEET_LOG_LEVEL", description="structlog's level for the JSON logs.")

    # The embed family (OpenAI-compatible; DeepInfra by default).
    embedding_api_base: str = Field(
        "https://api.deepinfra.com/v1/openai",
        alias="EMBEDDING_API_BASE",
        description=("The embeddings provider's OpenAI-compatible base URL."),
    )
    embedding_model_default: str = Field(
        "BAAI/bge-m3", alias="EMBEDDING_MODEL_DEFAULT", description=("The model a job uses when it names none.")
    )
    embedding_api_key: SecretStr | None = Field(
        None, alias="EMBEDDING_API_KEY", description=("The embeddings provider's API key.")
    )
    embed_max_batch: int = Field(
        64, alias="EMBED_MAX_BATCH", ge=1, le=2048, description=("Inputs per provider request, at most.")
    )
    embed_max_tokens_per_request: int = Field(
        16_000,
        alias="EMBED_MAX_TOKENS_PER_REQUEST",
        ge=1,
        description=("Tokens per provider request, at most: batches are split by tokens as well as by count."),
    )
    embed_chunk_tokens: int = Field(
        512,
        alias="EMBED_CHUNK_TOKENS",
        ge=16,
        description=("The size a document is chunked to before embedding, in tokens."),
    )
    embed_model_input_tokens: dict[str, int] = Field(
        default_factory=dict,
        alias="EMBED_MODEL_INPUT_TOKENS",
        description=(
            'What each model reads of one input ({"model": tokens}); a longer input is cut by the server without a'
            " word, so chunks are kept within it (built-in values in workers/embed/embedding.py"
            " KNOWN_INPUT_TOKENS)."
        ),
    )
    embed_provider_max_retries: int = Field(2, alias="EMBED_PROVIDER_MAX_RETRIES", ge=0, description=PROVIDER_RETRIES)
    embed_rate_limit_per_min: int = Field(0, alias="EMBED_RATE_LIMIT_PER_MIN", ge=0, description=RATE_LIMIT)
    embed_timeout_s: float = Field(30.0, alias="EMBED_TIMEOUT_S", gt=0, description=CALL_TIMEOUT)
    embed_sources: dict[str, dict] = Field(
        default_factory=dict,
        alias="EMBED_SOURCES",
        description=(
            "Source tables whose rows are embedded by reference (JSON: a name -> its spec, the Source model of"
            " workers/embed/embedding.py)."
        ),
    )

    # The chat family (OpenAI-compatible, streaming).
    chat_api_base: str = Field(
        "https://api.deepinfra.com/v1/openai",
        alias="CHAT_API_BASE",
        description=("The chat provider's OpenAI-compatible base URL."),
    )
    chat_model_default: str = Field(
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        alias="CHAT_MODEL_DEFAULT",
        description="The model a chat uses when it names none.",
    )
    chat_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        alias="CHAT_MODELS",
        description=(
            "Comma-separated chat models a job may name besides CHAT_MODEL_DEFAULT and the models of"
            " CHAT_CONTEXT_WINDOWS; a job naming another model is dead-lettered."
        ),
    )
    chat_api_key: SecretStr | None = Field(
        None, alias="CHAT_API_KEY", description=("The chat provider's API key (OPENAI_API_KEY when unset).")
    )
    openai_api_key: SecretStr | None = Field(
        None, alias="OPENAI_API_KEY", description=("The chat provider's API key when CHAT_API_KEY is unset.")
    )
    chat_rate_limit_per_min: int = Field(0, alias="CHAT_RATE_LIMIT_PER_MIN", ge=0, description=RATE_LIMIT)
    require_idempotency: bool = Field(
        False, alias="REQUIRE_IDEMPOTENCY", description=("Refuse a chat job without an idempotency key.")
    )
    chat_context_tokens: int = Field(
        6000,
        alias="CHAT_CONTEXT_TOKENS",
        ge=100,
        description=("The session history's budget, in tokens (within the model's context window when it is known)."),
    )
    chat_context_windows: dict[str, int] = Field(
        default_factory=dict,
        alias="CHAT_CONTEXT_WINDOWS",
        description=(
            'Each model\'s context window ({"model": tokens}); the history is fitted into it, leaving room for the'
            " answer (max_tokens, else CHAT_ANSWER_RESERVE_TOKENS) and the chat template's own tokens. A model it"
            " does not name has the window its server reports or names when it refuses a longer prompt."
        ),
    )
    chat_answer_reserve_tokens: int = Field(
        512,
        alias="CHAT_ANSWER_RESERVE_TOKENS",
        ge=1,
        description=("Room left for the answer in the context window when a chat sets no max_tokens."),
    )
    chat_template_tokens_per_message: int | None = Field(
        None,
        alias="CHAT_TEMPLATE_TOKENS_PER_MESSAGE",
        ge=0,
        description=(
            "Tokens the chat template adds per message (role markers), counted in estimates when the server sends"
            " no usage. Unset: measured against the server's own usage, else 4."
        ),
    )
    chat_template_tokens: int | None = Field(
        None,
        alias="CHAT_TEMPLATE_TOKENS",
        ge=0,
        description=(
            "Tokens the chat template adds once (the reply's opening, a system prompt of its own), counted in"
            " estimates when the server sends no usage. Unset: measured against the server's own usage, else 3."
        ),
    )
    chat_keepalive_s: float = Field(
        5.0,
        alias="CHAT_KEEPALIVE_S",
        gt=0,
        description=("How often a streaming chat sends a keepalive frame while the provider is silent."),
    )
    chat_timeout_s: float = Field(120.0, alias="CHAT_TIMEOUT_S", gt=0, description=CALL_TIMEOUT)
    chat_provider_max_retries: int = Field(2, alias="CHAT_PROVIDER_MAX_RETRIES", ge=0, description=PROVIDER_RETRIES)

    # Provider health (probes by the scheduler, and what jobs' calls report).
    health_refresh_interval_s: float = Field(
        60.0, alias="HEALTH_REFRESH_INTERVAL_S", gt=0, description=("How often the scheduler probes every provider.")
    )
    health_probe_timeout_s: float = Field(
        5.0, alias="HEALTH_PROBE_TIMEOUT_S", gt=0, description=("Timeout of one probe.")
    )
    health_degraded_ms: float = Field(
        2000.0, alias="HEALTH_DEGRADED_MS", gt=0, description=("A provider answering slower than this is degraded.")
    )
    health_down_after: int = Field(
        3, alias="HEALTH_DOWN_AFTER", ge=1, description=("Consecutive failed probes after which a provider is down.")
    )
    health_down_quiet_s: float = Field(
        1.0,
        alias="HEALTH_DOWN_QUIET_S",
        gt=0,
        description=(
            "Jobs' failed calls mark a provider down only if none of its calls succeeded for this long: a provider"
            " that answers some calls is degraded, and deferring every job would stop the work it can still do."
        ),
    )
    health_recheck_s: float = Field(
        10.0,
        alias="HEALTH_RECHECK_S",
        gt=0,
        description=("A provider that is down is probed again by a worker when its state is older than this."),
    )
    health_retention_h: float = Field(
        24.0, alias="HEALTH_RETENTION_H", gt=0, description=("How long probe history (provider_health_checks) is kept.")
    )
    health_providers: str = Field(
        "chat,embedding",
        alias="HEALTH_PROVIDERS",
        description=("The providers probed, comma-separated; letta too when LETTA_API_BASE_URL is set."),
    )

    # The gateway's rows in the platform's housekeeping.
    gateway_jobs_retention_days: float = Field(
        30.0,
        alias="GATEWAY_JOBS_RETENTION_DAYS",
        gt=0,
        description=("Housekeeping deletes the gateway's job owner rows (gateway_jobs) older than this."),
    )

    # The agents family: Letta, the billing proxy and cohort upgrades.
    letta_api_base_url: str | None = Field(
        None, alias="LETTA_API_BASE_URL", description=("The Letta server agents are created and upgraded on.")
    )
    letta_api_key: SecretStr | None = Field(None, alias="LETTA_API_KEY", description="The Letta server's API key.")
    letta_max_retries: int = Field(
        2,
        alias="LETTA_MAX_RETRIES",
        ge=0,
        description=("Retries of one Letta call inside a job, before the job itself is retried."),
    )
    zuplo_base_url: str | None = Field(
        None,
        alias="ZUPLO_BASE_URL",
        description=(
            "The billing proxy every agent's model calls must go through; the agents queue refuses to start without it."
        ),
    )
    upgrade_halt_failure_rate: float = Field(
        0.2,
        alias="UPGRADE_HALT_FAILURE_RATE",
        gt=0,
        le=1,
        description=("A run halts when more than this share of its finished agents failed ..."),
    )
    upgrade_halt_min_sample: int = Field(
        20, alias="UPGRADE_HALT_MIN_SAMPLE", ge=1, description=("... once at least this many have finished.")
    )
    upgrade_heartbeat_s: float = Field(
        5.0,
        alias="UPGRADE_HEARTBEAT_S",
        gt=0,
        description=("How often an agent's upgrade in progress records that it is alive."),
    )
    upgrade_stale_after_s: float = Field(
        60.0,
        alias="UPGRADE_STALE_AFTER_S",
        gt=0,
        description=("An upgrade whose heartbeat is older than this is requeued by the scheduler."),
    )

    # The lifecycle family: memories' expiry, archiving, decay, eviction, merging, re-embedding and purging.
    lifecycle_interval_s: float = Field(
        3600.0, alias="LIFECYCLE_INTERVAL_S", gt=0, description=("How often the scheduler enqueues a lifecycle run.")
    )
    lifecycle_archive_after_days: float = Field(
        30.0,
        alias="LIFECYCLE_ARCHIVE_AFTER_DAYS",
        gt=0,
        description=("A memory not accessed for this long is archived."),
    )
    lifecycle_decay_half_life_days: float = Field(
        30.0,
        alias="LIFECYCLE_DECAY_HALF_LIFE_DAYS",
        gt=0,
        description=("Half-life of a memory's confidence since its last access."),
    )
    lifecycle_min_confidence: float = Field(
        0.05, alias="LIFECYCLE_MIN_CONFIDENCE", ge=0, le=1, description=("The floor a memory's confidence decays to.")
    )
    lifecycle_merge_threshold: float = Field(
        0.95,
        alias="LIFECYCLE_MERGE_THRESHOLD",
        gt=0,
        le=1,
        description=(
            "Memories more similar than this are merged: the older, unpinned one into the newer or pinned one."
        ),
    )
    lifecycle_purge_after_days: float = Field(
        30.0,
        alias="LIFECYCLE_PURGE_AFTER_DAYS",
        ge=0,
        description=("The payloads of memories deleted longer ago than this are purged for good."),
    )
    lifecycle_batch_size: int = Field(
        1000,
        alias="LIFECYCLE_BATCH_SIZE",
        ge=1,
        le=100_000,
        description=("Memories changed per statement, so that a run holds no long lock."),
    )
    lifecycle_type_caps: dict[str, int] = Field(
        default_factory=dict,
        alias="LIFECYCLE_TYPE_CAPS",
        description=(
            'Active memories of a type per project ({"type": count}): past 80% of it, the oldest, least confident'
            " are archived down to 80%."
        ),
    )

    @property
    def chat_key(self) -> str | None:
        """CHAT_API_KEY, falling back to OPENAI_API_KEY."""
        key = self.chat_api_key or self.openai_api_key
        return key.get_secret_value() if key else None

    @property
    def uses_pooler(self) -> bool:
        """A transaction pooler (Supavisor, PgBouncer) cannot keep prepared statements or LISTEN."""
        if self.pooler is not None:
            return self.pooler
        if self.database_url is None:
            return False
        return urlsplit(self.database_url.get_secret_value()).port == 6543

    @field_validator("chat_models", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return comma_separated(value)

    def allowed_chat_models(self) -> list[str]:
        """The chat models a job may name: a payload never picks a model the configuration does not name."""
        return list(dict.fromkeys([self.chat_model_default, *self.chat_models, *self.chat_context_windows]))

    def secrets(self) -> list[str]:
        """Every secret value this process knows, for redaction."""
        values: list[str] = []
        for secret in (
            self.signing_key,
            self.database_url,
            self.redis_url,
            self.embedding_api_key,
            self.chat_api_key,
            self.openai_api_key,
            self.letta_api_key,
        ):
            if secret is not None:
                values.append(secret.get_secret_value())
        for url in (self.database_url, self.redis_url):
            if url is not None:
                password = urlsplit(url.get_secret_value()).password
                if password:
                    values.append(password)
        return [v for v in values if len(v) >= 6]


def comma_separated(value):
    """`a, b,c` as ["a", "b", "c"] (a list setting given in the environment); a list stays as it is."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI change the environment)."""
    get_settings.cache_clear()
