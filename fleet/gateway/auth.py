"""Who is calling: a Supabase-style JWT (HS256 with the project's JWT secret, or an asymmetric key
from a JWKS) when GATEWAY_VERIFY_JWT is on. Its `sub` (a UUID) is the user.

Keys from GATEWAY_JWKS_URL are trusted for GATEWAY_JWKS_TTL_S after the fetch that returned them,
so a key removed from the set is refused once that has passed; a token naming a kid the set does not
hold fetches the set again, at most once per GATEWAY_JWKS_MIN_REFETCH_S (a flood of made-up kids
costs the identity provider one request per interval). A key named in the token (jku, x5u) is never
fetched."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass, field

import httpx
import jwt
import structlog
from fastapi import Request

from fleet.gateway.errors import ApiError
from fleet.gateway.settings import GatewaySettings

# The key type each asymmetric algorithm needs: a token whose alg does not fit its kid's key is refused.
KEY_TYPES = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}
JWKS_FETCH_TIMEOUT_S = 5.0

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Caller:
    user_id: str | None  # the token's sub; None when tokens are not verified
    client: str  # who a rate limit counts against: the user, else the client address
    claims: dict = field(default_factory=dict, compare=False)  # the verified token's claims

    def may_see(self, owner: str | None) -> bool:
        return self.user_id is None or (owner is not None and str(owner) == self.user_id)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


class JwksKeys:
    """The key set at a JWKS URL by kid, with a time-to-live and a rate-limited refetch."""

    def __init__(self, url: str, ttl_s: float, min_refetch_s: float) -> None:
        self.url, self.ttl_s, self.min_refetch_s = url, ttl_s, min_refetch_s
        self.keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}  # kid: (key, the alg the set names for it)
        self.fetched_at: float | None = None  # the last fetch that succeeded
        self.tried_at: float | None = None  # the last attempt, successful or not
        self._lock = asyncio.Lock()

    def _fresh(self, now: float) -> bool:
        return self.fetched_at is not None and now - self.fetched_at < self.ttl_s

    def _may_fetch(self, now: float) -> bool:
        return self.tried_at is None or now - self.tried_at >= self.min_refetch_s

    async def key(self, kid: str) -> tuple[jwt.PyJWK, str | None]:
        async with self._lock:  # concurrent requests for an unknown kid wait for one fetch
            now = time.monotonic()
            if not self._fresh(now):
                self.keys = {}  # past their time-to-live: not trusted until fetched again
            if (not self._fresh(now) or kid not in self.keys) and self._may_fetch(now):
                await self._fetch(now)
            if kid in self.keys:
                return self.keys[kid]
        if self.fetched_at is None or not self._fresh(time.monotonic()):
            raise ApiError(
                503,
                "jwks_unavailable",
                "the signing keys could not be fetched (GATEWAY_JWKS_URL); repeat the request in a moment",
                {"Retry-After": str(max(1, int(self.min_refetch_s)))},
            )
        raise _unauthorized(f"no key for the token's kid {kid!r} in the key set")

    async def _fetch(self, now: float) -> None:
        self.tried_at = now
        try:
            async with httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_S, follow_redirects=False) as http:
                response = await http.get(self.url)
                response.raise_for_status()
                listed = response.json()["keys"]
                keys = {}
                for data in listed:
                    if isinstance(data, dict) and data.get("kid") and data.get("use", "sig") == "sig":
                        try:
                            keys[str(data["kid"])] = (jwt.PyJWK(data), data.get("alg"))
                        except jwt.PyJWKError:
                            continue  # a key of a type this gateway cannot use: not one it verifies with
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            # the old keys stay until their time-to-live; the caller answers 503 after that
            log.warning("gateway.jwks_fetch_failed", error_class=type(e).__name__, keys_held=len(self.keys))
            return
        self.keys, self.fetched_at = keys, now


class Authenticator:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._jwks = (
            JwksKeys(settings.jwks_url, settings.jwks_ttl_s, settings.jwks_min_refetch_s) if settings.jwks_url else None
        )
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
        return Caller(user, f"user:{user}", claims)

    def require_operator(self, request: Request, caller: Caller) -> None:
        """A 403 unless the caller is an operator: the operator claim in a verified token, or the operator key.
        Without verified tokens and without an operator key, every caller is trusted (development mode, or a
        backend that signs its requests)."""
        if self.settings.verify_jwt and self.settings.operator_role in _claim_values(
            caller.claims, self.settings.operator_claim
        ):
            return
        key = self.settings.operator_key
        sent = request.headers.get("x-operator-key")
        if key is not None and sent is not None and hmac.compare_digest(sent.encode(), key.get_secret_value().encode()):
            return
        if key is None and not self.settings.verify_jwt:
            return
        raise ApiError(
            403,
            "operator_only",
            f"this route is for operators: a token whose {self.settings.operator_claim}"
            f" claim includes {self.settings.operator_role!r}, or the X-Operator-Key header",
        )

    async def _verify(self, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg is None:
                raise jwt.InvalidTokenError(f"algorithm {alg!r} is not accepted")  # as _key_for says
            key = await self._key_for(header, alg)
            audience = self.settings.jwt_audience or None  # empty: no audience check
            issuer = self.settings.jwt_issuer
            required = ["exp", "sub"] + (["iss"] if issuer else [])
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                options={"require": required, "verify_aud": audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except jwt.InvalidSignatureError:
            raise _unauthorized("the token's signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized("the token's issuer is not GATEWAY_JWT_ISSUER") from None
        except jwt.PyJWTError as e:  # malformed tokens, and keys that do not fit the algorithm
            raise _unauthorized(f"invalid token: {e}") from None

    async def _key_for(self, header: dict, alg: str | None):
        if alg == "HS256" and self.settings.jwt_secret is not None:
            return self.settings.jwt_secret.get_secret_value()
        if alg in KEY_TYPES and self._jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise jwt.InvalidTokenError("a token signed with a key from the key set names its kid")
            jwk, named_alg = await self._jwks.key(kid)
            if jwk.key_type != KEY_TYPES[alg] or named_alg not in (None, alg):
                raise jwt.InvalidTokenError(f"algorithm {alg!r} does not fit the {jwk.key_type} key {kid!r}")
            return jwk.key
        raise jwt.InvalidTokenError(f"algorithm {alg!r} is not accepted")


def _claim_values(claims: dict, path: str) -> list:
    """The value at a dotted claim path, as a list (a role claim may be a string or a list of them)."""
    value: object = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
