"""JWTs for the tests of AUTH_MODE=jwt, and a requests auth that carries them.

The tests sign their own tokens (PyJWT), as an identity provider would; the service
only verifies.  ``UserTokens`` lets the e2e suites run unchanged in jwt mode: each
request gets the token of the user it names, or an admin token for a read that names
none (a job or an order by id), and an explicit ``Authorization`` header is left alone.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import requests

# An HS256 secret as an operator would set AUTH_JWT_SECRET (at least 32 bytes).
SECRET = "test-jwt-secret-0123456789abcdef-0123"
ADMIN_SCOPE = "shop:admin"
# The sub of the admin tokens the e2e suites read with (a user id no test uses).
ADMIN_SUB = 1


def claims(sub: int | str | None, *, lifetime: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"iat": now, "exp": now + lifetime, **extra}
    if sub is not None:
        body["sub"] = str(sub)
    return body


def hs256(sub: int | str | None, secret: str = SECRET, **extra: Any) -> str:
    return jwt.encode(claims(sub, **extra), secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_USER_IN_PATH = re.compile(r"^/v1/(?:points|users)/([0-9]+)(?:/|$)")


def user_named(request: requests.PreparedRequest) -> int | None:
    """The userId a request names: in its JSON body, its query or its path."""
    if request.body:
        raw = request.body if isinstance(request.body, bytes) else str(request.body).encode()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("userId"), int):
            return int(body["userId"])
    parts = urlsplit(request.url or "")
    query = parse_qs(parts.query).get("userId")
    if query and query[0].isdigit():
        return int(query[0])
    match = _USER_IN_PATH.match(parts.path)
    return int(match.group(1)) if match else None


class UserTokens(requests.auth.AuthBase):
    """Signs each request as the user it names (a read naming none: as an admin)."""

    def __init__(self, secret: str = SECRET) -> None:
        self._secret = secret
        self._cache: dict[int | None, str] = {}

    def token_for(self, user: int | None) -> str:
        if user not in self._cache:
            if user is None:
                self._cache[user] = hs256(ADMIN_SUB, self._secret, scope=ADMIN_SCOPE)
            else:
                self._cache[user] = hs256(user, self._secret)
        return self._cache[user]

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if "Authorization" not in request.headers:
            request.headers["Authorization"] = f"Bearer {self.token_for(user_named(request))}"
        return request
