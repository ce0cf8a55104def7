"""The gateway's own settings (GATEWAY_*); the fleet's (DATABASE_URL, FLEET_BROKER, REQUIRE_IDEMPOTENCY,
CHAT_RATE_LIMIT_PER_MIN, EMBED_RATE_LIMIT_PER_MIN, ...) stay in fleet.shared.config."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=False)

    host: str = Field("127.0.0.1", alias="GATEWAY_HOST")
    port: int = Field(8080, alias="GATEWAY_PORT", ge=0, le=65535)
    dev: bool = Field(True, alias="GATEWAY_DEV")  # the chat page at `/`
    max_body_bytes: int = Field(1_000_000, alias="GATEWAY_MAX_BODY_BYTES", ge=256)
    keepalive_s: float = Field(15.0, alias="GATEWAY_KEEPALIVE_S", gt=0)
    stream_timeout_s: float = Field(600.0, alias="GATEWAY_STREAM_TIMEOUT_S", gt=0)
    keep_frames_s: float = Field(300.0, alias="GATEWAY_KEEP_FRAMES_S", ge=0)  # pgmq resume buffer after a job's end

    # Production toggles, off by default.
    verify_jwt: bool = Field(False, alias="GATEWAY_VERIFY_JWT")
    jwt_secret: SecretStr | None = Field(None, alias="GATEWAY_JWT_SECRET")  # HS256 (Supabase's JWT secret)
    jwks_url: str | None = Field(None, alias="GATEWAY_JWKS_URL")  # asymmetric keys (RS256, ES256)
    jwt_audience: str | None = Field("authenticated", alias="GATEWAY_JWT_AUDIENCE")
    hmac_key: SecretStr | None = Field(None, alias="GATEWAY_HMAC_KEY")
    hmac_window_s: int = Field(300, alias="GATEWAY_HMAC_WINDOW_S", ge=1)
    # May verified users embed registered sources (`source` + `ids`)? Their rows are the operator's.
    users_embed_sources: bool = Field(False, alias="GATEWAY_USERS_EMBED_SOURCES")

    @field_validator("jwt_secret", "jwks_url", "hmac_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """`GATEWAY_HMAC_KEY=` (as compose passes an unset variable) is no key, not an empty one."""
        return None if isinstance(value, str) and not value.strip() else value


class UnprotectedGateway(RuntimeError):
    """Outside development mode the gateway starts only with a way to tell callers apart."""


def require_protection(gw: GatewaySettings) -> None:
    """Fail closed: with GATEWAY_DEV=false, GATEWAY_VERIFY_JWT or GATEWAY_HMAC_KEY must be on."""
    if not gw.dev and not gw.verify_jwt and gw.hmac_key is None:
        raise UnprotectedGateway(
            "the gateway refuses to start unprotected: GATEWAY_DEV=false, but neither GATEWAY_VERIFY_JWT=true"
            " (with GATEWAY_JWT_SECRET or GATEWAY_JWKS_URL) nor GATEWAY_HMAC_KEY is set; set one of them,"
            " or GATEWAY_DEV=true for local development only")


@lru_cache(maxsize=1)
def gateway_settings() -> GatewaySettings:
    return GatewaySettings()
