"""Who is calling: the bearer token of a request (API.md, Access, ``AUTH_MODE``).

``AUTH_MODE=none``: customer calls name their ``userId`` and are trusted (a gateway in
front checked it); only admin calls need a token, the ``ADMIN_TOKEN``.

``AUTH_MODE=jwt``: a customer call carries a JWT (RFC 7519) verified by PyJWT against
one configured key source: an HS256 secret, a PEM public key (RS256 for RSA, ES256 for
P-256) or a JWKS URL (the key chosen by the token's ``kid``).  Only the algorithm of
the key is accepted, so ``alg: none`` and an HS256 token "signed" with a public key
(algorithm confusion) are refused by the library, not by code here.  The user is
``sub``; admin calls take the ``ADMIN_TOKEN`` or a token holding the admin scope.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import g, request

from shared.config import ConfigError, Settings
from shared.domain.errors import ErrorCode
from web.errors import ApiError, unavailable

log = logging.getLogger(__name__)

# A token past this is refused unread (API.md): nothing honest is that long.
MAX_TOKEN_BYTES = 8 * 1024
# A key set is fetched again for an unknown kid at most this often (API.md) ...
JWKS_REFETCH_SECONDS = 60.0
# ... and, while no set was ever fetched (nothing can be verified), retried this often.
JWKS_RETRY_WITHOUT_KEYS_SECONDS = 5.0
JWKS_FETCH_TIMEOUT_SECONDS = 2.0
JWKS_MAX_BYTES = 256 * 1024
# What a key set may hold: public signature keys of the algorithms API.md names.
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})
# Verified tokens kept for their lifetime, so a client's repeated token costs a dict
# look-up, not a signature check (bounded: the whole map is dropped when full).
VERIFIED_CACHE_SIZE = 10_000

_MAX_ID = 2**63 - 1
_SUB = re.compile(r"[1-9][0-9]{0,18}")
REALM = 'Bearer realm="shop"'


@dataclass(frozen=True)
class Identity:
    """The verified caller: a user (``sub``), possibly with the admin scope; or the
    ``ADMIN_TOKEN`` (admin, no user)."""

    user_id: int | None
    admin: bool


ADMIN_TOKEN_IDENTITY = Identity(user_id=None, admin=True)


def unauthenticated(message: str, *, token_sent: bool) -> ApiError:
    challenge = f'{REALM}, error="invalid_token"' if token_sent else REALM
    return ApiError(
        401, ErrorCode.UNAUTHENTICATED, message, headers={"WWW-Authenticate": challenge}
    )


def forbidden(message: str) -> ApiError:
    return ApiError(403, ErrorCode.FORBIDDEN, message)


class KeyServerDown(Exception):
    """The key set could not be fetched and no cached key fits the token."""


class UnknownKey(Exception):
    """The key set (fetched recently) has no key for the token's kid."""


class JwksKeys:
    """The keys of ``AUTH_JWKS_URL`` by kid: fetched on first use, kept, fetched again
    for an unknown kid at most once a minute (a forged kid cannot make the service
    hammer the key server).  A failed fetch keeps the keys it had, so a key server
    that is down does not stop tokens of known keys."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.clock = clock
        self._timeout = timeout
        self._keys: dict[str, jwt.PyJWK] = {}
        self._have_set = False
        self._last_ok = False
        self._last_attempt: float | None = None
        self._lock = threading.Lock()
        self.fetches = 0  # attempts made (tests and logs)

    def key(self, kid: str | None) -> jwt.PyJWK:
        found = self._lookup(kid)
        if found is not None:
            return found
        with self._lock:  # one fetch at a time; the others then find its keys
            found = self._lookup(kid)
            if found is not None:
                return found
            if self._may_fetch():
                self._refresh()
                found = self._lookup(kid)
                if found is not None:
                    return found
            if not self._last_ok:
                raise KeyServerDown(self.url)
            raise UnknownKey(kid)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        keys = self._keys
        if kid is None:
            # A token without kid is fine against a set of one key (a common IdP setup).
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    def _may_fetch(self) -> bool:
        if self._last_attempt is None:
            return True
        spacing = JWKS_REFETCH_SECONDS if self._have_set else JWKS_RETRY_WITHOUT_KEYS_SECONDS
        return self.clock() - self._last_attempt >= spacing

    def _refresh(self) -> None:
        self._last_attempt = self.clock()
        self.fetches += 1
        try:
            keys = self._fetch()
        except Exception as exc:
            self._last_ok = False
            log.warning(
                "key set %s not fetched (keeping %d keys): %s", self.url, len(self._keys), exc
            )
            return
        self._keys = keys
        self._have_set = True
        self._last_ok = True
        log.info("key set %s fetched: kids %s", self.url, sorted(keys))

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        # The scheme is http(s): Settings refuses any other AUTH_JWKS_URL.
        req = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310
        with urllib.request.urlopen(req, timeout=self._timeout) as answer:  # noqa: S310
            raw = answer.read(JWKS_MAX_BYTES + 1)
        if len(raw) > JWKS_MAX_BYTES:
            raise ValueError(f"key set over {JWKS_MAX_BYTES} bytes")
        document = json.loads(raw)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                log.info("key set entry %r skipped: %s", entry.get("kid"), exc)
                continue
            if key.algorithm_name in JWKS_ALGORITHMS:
                keys[str(entry.get("kid", ""))] = key
        if not keys:
            raise ValueError("the key set holds no RS256 or ES256 signing key")
        return keys


def _pem_key(text: str) -> tuple[Any, str]:
    """A PEM public key (the text, or a path to a file holding it) and its algorithm."""
    pem = text if "-----BEGIN" in text else Path(text).read_text()
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigError(f"AUTH_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError("AUTH_JWT_PUBLIC_KEY: an RSA key needs at least 2048 bits")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ConfigError("AUTH_JWT_PUBLIC_KEY must be an RSA or a P-256 public key")


class TokenVerifier:
    """Verifies a bearer JWT against the configured key source (built once per process)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._static_key: Any = None
        self._algorithm = ""
        self.jwks: JwksKeys | None = None
        if settings.auth_jwt_secret:
            self._static_key, self._algorithm = settings.auth_jwt_secret.encode(), "HS256"
        elif settings.auth_jwt_public_key:
            self._static_key, self._algorithm = _pem_key(settings.auth_jwt_public_key)
        elif settings.auth_jwks_url:
            self.jwks = JwksKeys(settings.auth_jwks_url)
        else:
            raise ConfigError("AUTH_MODE=jwt needs a key source")
        self._leeway = settings.auth_leeway_seconds
        self._options: Any = {
            "require": ["exp", "sub"],
            "verify_aud": bool(settings.auth_jwt_audience),
        }
        self._verified: dict[str, tuple[Identity, float]] = {}

    def verify(self, token: str) -> Identity:
        """The token's identity, or ApiError 401 (a bad token) / 503 (no key server)."""
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthenticated(f"the token is over {MAX_TOKEN_BYTES} bytes", token_sent=True)
        cached = self._verified.get(token)
        if cached is not None and self._clock() < cached[1] + self._leeway:
            return cached[0]
        try:
            key, algorithm = self._key_for(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._settings.auth_jwt_audience or None,
                issuer=self._settings.auth_jwt_issuer or None,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            raise unauthenticated(f"the token is not valid: {exc}", token_sent=True) from None
        identity = Identity(user_id=_user_of(claims), admin=self._has_admin_scope(claims))
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified = {}
        self._verified[token] = (identity, float(claims["exp"]))
        return identity

    def _key_for(self, token: str) -> tuple[Any, str]:
        if self.jwks is None:
            return self._static_key, self._algorithm
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is not None and not isinstance(kid, str):
            raise jwt.InvalidTokenError("kid must be a string")
        try:
            key = self.jwks.key(kid)
        except KeyServerDown:
            raise unavailable("the key server is unreachable; retry later") from None
        except UnknownKey:
            raise jwt.InvalidTokenError("no key for this kid") from None
        return key, str(key.algorithm_name)

    def _has_admin_scope(self, claims: dict[str, Any]) -> bool:
        wanted = self._settings.auth_admin_scope
        scope = claims.get("scope")
        scp = claims.get("scp")
        granted: list[Any] = []
        if isinstance(scope, str):
            granted += scope.split()
        if isinstance(scp, list):
            granted += scp
        elif isinstance(scp, str):
            granted += scp.split()
        return wanted in granted


def _user_of(claims: dict[str, Any]) -> int:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _SUB.fullmatch(sub) or int(sub) > _MAX_ID:
        raise unauthenticated("the token's sub is not a user id", token_sent=True)
    return int(sub)


# ---- per request ------------------------------------------------------------


def _bearer() -> str | None:
    """The bearer token sent (None: no Authorization header); another scheme is refused."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110).
    if scheme.lower() != "bearer":
        raise unauthenticated("the Authorization header must be a Bearer token", token_sent=True)
    return token.strip()


def _is_admin_token(token: str, admin_token: str) -> bool:
    # Compared in constant time; an unset ADMIN_TOKEN matches nothing.
    return bool(admin_token) and hmac.compare_digest(token.encode(), admin_token.encode())


def authenticate_admin(settings: Settings, verifier: TokenVerifier | None) -> Identity:
    """An admin call: the ADMIN_TOKEN, or (jwt mode) a verified token with the admin scope."""
    header = request.headers.get("Authorization")
    if header is None:
        raise unauthenticated("an Authorization: Bearer token is required", token_sent=False)
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and _is_admin_token(token, settings.admin_token):
        identity = ADMIN_TOKEN_IDENTITY
    elif verifier is None or scheme.lower() != "bearer":
        raise forbidden("this token may not do that")
    else:
        identity = verifier.verify(token)
        if not identity.admin:
            raise forbidden(f"this call needs the {settings.auth_admin_scope} scope")
    g.identity = identity
    return identity


def authenticate_customer(settings: Settings, verifier: TokenVerifier, *, acts: bool) -> Identity:
    """A customer call in jwt mode: a verified token (or, to read, the ADMIN_TOKEN).

    ``acts``: the call records a job for the user, which only a user's token may do.
    """
    token = _bearer()
    if token is None:
        raise unauthenticated("an Authorization: Bearer token is required", token_sent=False)
    if _is_admin_token(token, settings.admin_token):
        if acts:
            raise forbidden("a job for a user needs that user's token")
        identity = ADMIN_TOKEN_IDENTITY
    else:
        identity = verifier.verify(token)
    g.identity = identity
    # The rate limit counts per user in jwt mode (API.md, Access).
    g.rate_key = f"user:{identity.user_id}"
    return identity


def current_identity() -> Identity | None:
    """The caller verified for this request (None: AUTH_MODE=none, or a public call)."""
    identity: Identity | None = g.get("identity")
    return identity


def token_user() -> int | None:
    """The user of this request's token (None without one)."""
    identity = current_identity()
    return None if identity is None else identity.user_id


def may_read(owner: int | None) -> bool:
    """May this request see data of ``owner`` (None: an admin's)?  Always in none mode."""
    identity = current_identity()
    if identity is None:
        return True
    return identity.admin or (owner is not None and owner == identity.user_id)


def idempotency_owner() -> str:
    """What scopes an Idempotency-Key to the token's user ('' in none mode)."""
    user = token_user()
    return "" if user is None else f"user:{user} "
