"""Who is calling: a Supabase-style JWT (HS256 with the project's JWT secret, or an asymmetric key
from a JWKS) when GATEWAY_VERIFY_JWT is on. Its `sub` (a UUID) is the user."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import jwt
from fastapi import Request

from fleet.gateway.errors import ApiError
from fleet.gateway.settings import GatewaySettings

ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")


@dataclass(frozen=True)
class Caller:
    user_id: str | None  # the token's sub; None when tokens are not verified
    client: str  # who a rate limit counts against: the user, else the client address

    def may_see(self, owner: str | None) -> bool:
        return self.user_id is None or (owner is not None and str(owner) == self.user_id)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


class Authenticator:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300) if settings.jwks_url else None
        if settings.verify_jwt and settings.jwt_secret is None and self._jwks is None:
            raise ValueError("GATEWAY_VERIFY_JWT needs GATEWAY_JWT_SECRET or GATEWAY_JWKS_URL")

    async def caller(self, request: Request) -> Caller:
        address = request.client.host if request.client else "unknown"
        if not self.settings.verify_jwt:
            return Caller(None, f"addr:{address}")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("an Authorization: Bearer <JWT> header is required")
        claims = await self._verify(token.strip())
        try:
            user = str(uuid.UUID(str(claims.get("sub"))))
        except ValueError:
            raise _unauthorized("the token's sub is not a user id (a UUID)") from None
        return Caller(user, f"user:{user}")

    async def _verify(self, token: str) -> dict:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = await self._key_for(token, alg)
            audience = self.settings.jwt_audience or None  # empty: no audience check
            return jwt.decode(token, key, algorithms=[alg], audience=audience,
                              options={"require": ["exp", "sub"], "verify_aud": audience is not None})
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except jwt.InvalidSignatureError:
            raise _unauthorized("the token's signature does not verify") from None
        except jwt.PyJWKClientError as e:
            raise _unauthorized(f"no key for the token: {e}") from None
        except jwt.InvalidTokenError as e:
            raise _unauthorized(f"invalid token: {e}") from None

    async def _key_for(self, token: str, alg: str | None):
        if alg == "HS256" and self.settings.jwt_secret is not None:
            return self.settings.jwt_secret.get_secret_value()
        if alg in ASYMMETRIC and self._jwks is not None:
            # PyJWKClient fetches with urllib (blocking); its keys are cached, so this is rare.
            return (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
        raise jwt.InvalidTokenError(f"algorithm {alg!r} is not accepted")
