"""Every setting says what it does: a description in code, which the settings reference is generated from."""

from __future__ import annotations

from fleet.shared.config import Settings


def test_every_setting_has_a_description_and_an_environment_name():
    fields = Settings.model_fields
    assert [name for name, f in fields.items() if not (f.description or "").strip()] == []
    assert [name for name, f in fields.items() if not f.alias] == []
    # the names the platform already uses
    aliases = {f.alias for f in fields.values()}
    assert {
        "DATABASE_URL",
        "REDIS_URL",
        "FLEET_BROKER",
        "CHAT_API_BASE",
        "CHAT_RATE_LIMIT_PER_MIN",
        "EMBED_MAX_BATCH",
        "EMBEDDING_API_BASE",
        "EMBEDDING_API_KEY",
        "EMBEDDING_MODEL_DEFAULT",
        "LETTA_API_BASE_URL",
        "ZUPLO_BASE_URL",
        "REQUIRE_IDEMPOTENCY",
        "EMBED_PROVIDER_MAX_RETRIES",
    } <= aliases
