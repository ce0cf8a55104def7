"""The gateway's own settings (GATEWAY_*); the fleet's (DATABASE_URL, FLEET_BROKER, REQUIRE_IDEMPOTENCY,
CHAT_MODELS, ...) stay in fleet.shared.config."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fleet.shared.config import comma_separated

MIN_HS256_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key is at least as long as the hash (256 bits)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=False)

    host: str = Field("127.0.0.1", alias="GATEWAY_HOST", description="The address the gateway listens on.")
    port: int = Field(
        8080, alias="GATEWAY_PORT", ge=0, le=65535, description="The port the gateway listens on (0: any free port)."
    )
    dev: bool = Field(
        False,
        alias="GATEWAY_DEV",
        description=(
            "development mode: the chat page at `/`, the gateway may start without JWT or HMAC, /readyz counts"
            " open streams; never in production"
        ),
    )
    docs: bool = Field(False, alias="GATEWAY_DOCS", description="serve /openapi.json and /docs")
    max_body_bytes: int = Field(
        1_000_000,
        alias="GATEWAY_MAX_BODY_BYTES",
        ge=256,
        description=(
            "The largest request body accepted, on every method; a larger "
            "one is a 413 before any credential is checked."
        ),
    )
    keepalive_s: float = Field(
        15.0,
        alias="GATEWAY_KEEPALIVE_S",
        gt=0,
        description=(
            "Seconds of quiet after which a stream sends a `: keepalive` comment and checks for a stored answer."
        ),
    )
    stream_timeout_s: float = Field(
        600.0,
        alias="GATEWAY_STREAM_TIMEOUT_S",
        gt=0,
        description=(
            "Seconds after which a stream with no final frame ends with a StreamTimeout error frame (the job goes on)."
        ),
    )
    keep_frames_s: float = Field(300.0, alias="GATEWAY_KEEP_FRAMES_S", ge=0)  # pgmq resume buffer after a job's end

    # Connection limits, enforced by the gateway's own HTTP protocol (fleet.gateway.connections).
    max_connections: int = Field(
        2048,
        alias="GATEWAY_MAX_CONNECTIONS",
        ge=1,
        description=("open connections per process; one more gets a 503 and is closed (SSE streams count)"),
    )
    idle_timeout_s: float = Field(
        5.0,
        alias="GATEWAY_IDLE_TIMEOUT_S",
        gt=0,
        description=(
            "a connection with no request in progress (new, or kept alive after a response) is closed after this"
        ),
    )
    header_timeout_s: float = Field(
        10.0,
        alias="GATEWAY_HEADER_TIMEOUT_S",
        gt=0,
        description=("a request's headers must be complete this long after its first byte"),
    )
    body_timeout_s: float = Field(
        30.0,
        alias="GATEWAY_BODY_TIMEOUT_S",
        gt=0,
        description=("a request's body must be complete this long after its headers"),
    )
    max_streams_per_user: int = Field(
        10,
        alias="GATEWAY_MAX_STREAMS_PER_USER",
        ge=0,
        description=("SSE streams one verified user may hold open at once in a process (0: no cap); one more is a 429"),
    )
    read_rate_limit_per_min: int = Field(
        600,
        alias="GATEWAY_READ_RATE_LIMIT_PER_MIN",
        ge=0,
        description=(
            "requests a minute per caller on the GET routes (job, trace, stream resume), across processes; 0: no limit"
        ),
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        alias="GATEWAY_MODELS",
        description=(
            "comma-separated chat models a client may name (of those the workers accept: CHAT_MODEL_DEFAULT,"
            " CHAT_MODELS, CHAT_CONTEXT_WINDOWS); empty: all of those. Embed jobs may name only"
            " EMBEDDING_MODEL_DEFAULT and the models of EMBED_MODEL_INPUT_TOKENS"
        ),
    )
    client_roles: Annotated[list[str], NoDecode] = Field(
        ["user"],
        alias="GATEWAY_CLIENT_ROLES",
        description=("comma-separated message roles a client may send in `messages` (of user, assistant, system)"),
    )

    # Production toggles, off by default.
    verify_jwt: bool = Field(
        False,
        alias="GATEWAY_VERIFY_JWT",
        description=(
            "Require a JWT (HS256 with GATEWAY_JWT_SECRET, or keys from "
            "GATEWAY_JWKS_URL) on every route but the health checks."
        ),
    )
    jwt_secret: SecretStr | None = Field(None, alias="GATEWAY_JWT_SECRET")  # HS256 (Supabase's JWT secret)
    jwks_url: str | None = Field(None, alias="GATEWAY_JWKS_URL")  # asymmetric keys (RS256, ES256)
    jwt_audience: str | None = Field(
        "authenticated",
        alias="GATEWAY_JWT_AUDIENCE",
        description="The `aud` a token must carry (Supabase issues `authenticated`).",
    )
    jwt_issuer: str | None = Field(
        None,
        alias="GATEWAY_JWT_ISSUER",
        description=("when set, a token's iss must equal it (Supabase: https://<project>.supabase.co/auth/v1)"),
    )
    jwks_ttl_s: float = Field(
        300.0,
        alias="GATEWAY_JWKS_TTL_S",
        gt=0,
        description=(
            "how long keys fetched from GATEWAY_JWKS_URL are trusted before the set is fetched again; a key"
            " removed from the set is refused once this has passed"
        ),
    )
    jwks_min_refetch_s: float = Field(
        30.0,
        alias="GATEWAY_JWKS_MIN_REFETCH_S",
        ge=0,
        description=("a token with an unknown kid fetches the set again at most once per this many seconds"),
    )
    hmac_key: SecretStr | None = Field(
        None,
        alias="GATEWAY_HMAC_KEY",
        description=(
            "The shared key of HMAC-signed requests (X-Signature over the method, "
            "path, query, token, idempotency key, timestamp and body)."
        ),
    )
    hmac_window_s: int = Field(
        300,
        alias="GATEWAY_HMAC_WINDOW_S",
        ge=1,
        description=(
            "How far X-Timestamp may be from the gateway's clock, in seconds; a signature is accepted once within it."
        ),
    )
    chat_rate_limit_per_min: int = Field(
        120,
        alias="GATEWAY_CHAT_RATE_LIMIT_PER_MIN",
        ge=0,
        description=(
            "POST /v1/chat requests a minute per caller (the user, else the client address), across processes;"
            " 0: no limit. The workers' provider limit is CHAT_RATE_LIMIT_PER_MIN, fleet-wide"
        ),
    )
    embed_rate_limit_per_min: int = Field(
        120,
        alias="GATEWAY_EMBED_RATE_LIMIT_PER_MIN",
        ge=0,
        description=(
            "POST /v1/embed requests a minute per caller, across processes; 0: no limit. The workers' provider"
            " limit is EMBED_RATE_LIMIT_PER_MIN, fleet-wide"
        ),
    )
    probe_rate_limit_per_min: int = Field(
        600,
        alias="GATEWAY_PROBE_RATE_LIMIT_PER_MIN",
        ge=0,
        description=(
            "requests a minute per client address and route on the routes that answer without the database"
            " (/healthz, /readyz, /metrics, the chat page, /openapi.json, /docs), counted in each process;"
            " 0: no limit"
        ),
    )
    agent_rate_limit_per_min: int = Field(
        30,
        alias="GATEWAY_AGENT_RATE_LIMIT_PER_MIN",
        ge=0,
        description=("POST /v1/agents requests a minute per caller, across processes; 0: no limit"),
    )
    operator_rate_limit_per_min: int = Field(
        120,
        alias="GATEWAY_OPERATOR_RATE_LIMIT_PER_MIN",
        ge=0,
        description=(
            "operator POST requests (publish, upgrade, halt) a minute per caller, across processes; 0: no limit"
        ),
    )

    # Operators (templates and upgrades): a verified token whose claim says so, or the operator key.
    operator_claim: str = Field(
        "app_metadata.fleet_role",
        alias="GATEWAY_OPERATOR_CLAIM",
        min_length=1,
        description=(
            "the token claim (a dotted path) that holds the caller's role; only claims the identity provider"
            " sets belong here (Supabase: app_metadata, never user_metadata, which users edit)"
        ),
    )
    operator_role: str = Field(
        "operator",
        alias="GATEWAY_OPERATOR_ROLE",
        min_length=1,
        description=("the value (or one of the values) of GATEWAY_OPERATOR_CLAIM that makes a caller an operator"),
    )
    operator_key: SecretStr | None = Field(
        None,
        alias="GATEWAY_OPERATOR_KEY",
        description=(
            "a key that makes a request an operator's when sent as X-Operator-Key; when set, it is required of"
            " operator requests without the operator claim, also when tokens are not verified"
        ),
    )

    # May verified users embed registered sources (`source` + `ids`)? Their rows are the operator's.
    users_embed_sources: bool = Field(False, alias="GATEWAY_USERS_EMBED_SOURCES")

    @field_validator("jwt_secret", "jwks_url", "hmac_key", "jwt_issuer", "operator_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """`GATEWAY_HMAC_KEY=` (as compose passes an unset variable) is no key, not an empty one."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("models", "client_roles", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return comma_separated(value)

    @field_validator("client_roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = set(value) - {"user", "assistant", "system"}
        if unknown or "user" not in value:
            raise ValueError("GATEWAY_CLIENT_ROLES is a list of user, assistant, system and includes user")
        return value


class UnprotectedGateway(RuntimeError):
    """Outside development mode the gateway starts only with a way to tell callers apart."""


def require_protection(gw: GatewaySettings) -> None:
    """Fail closed: with GATEWAY_DEV=false, GATEWAY_VERIFY_JWT or GATEWAY_HMAC_KEY must be on; an HS256
    secret has at least MIN_HS256_SECRET_BYTES bytes (checked here, not in a validator, whose error
    would quote the secret)."""
    if gw.jwt_secret is not None and len(gw.jwt_secret.get_secret_value().encode()) < MIN_HS256_SECRET_BYTES:
        raise UnprotectedGateway(
            f"GATEWAY_JWT_SECRET has fewer than {MIN_HS256_SECRET_BYTES} bytes; an HS256 secret needs at least 256 bits"
        )
    if gw.operator_key is not None and len(gw.operator_key.get_secret_value().encode()) < MIN_HS256_SECRET_BYTES:
        raise UnprotectedGateway(f"GATEWAY_OPERATOR_KEY has fewer than {MIN_HS256_SECRET_BYTES} bytes")
    if not gw.dev and not gw.verify_jwt and gw.hmac_key is None:
        raise UnprotectedGateway(
            "the gateway refuses to start unprotected: GATEWAY_DEV=false, but neither GATEWAY_VERIFY_JWT=true"
            " (with GATEWAY_JWT_SECRET or GATEWAY_JWKS_URL) nor GATEWAY_HMAC_KEY is set; set one of them,"
            " or GATEWAY_DEV=true for local development only"
        )


@lru_cache(maxsize=1)
def gateway_settings() -> GatewaySettings:
    return GatewaySettings()
