"""The cost of AUTH_MODE=jwt: web CPU per job POST with HS256 and RS256 tokens against
``none``, in one run (``python -m bench.run --only auth``).

Three web processes (gunicorn, as the stack runs it) stand side by side in front of
the same database, Redis and partition workers: AUTH_MODE=none, jwt with an HS256
secret, jwt with an RSA public key.  Each variant sends the same count of
``POST /v1/points/charge`` (one point, users spread over every partition) from a
thread pool, and the CPU of that web's process tree over those requests is divided by
their count.  Rounds run every variant, each round starting with another one, so drift
on a shared machine hits them alike; the median round counts.

Variants with tokens: ``fresh`` (every request a token never seen: a full signature
check each time, the worst case) and ``reused`` (each user keeps one token, as a
client does for its lifetime: after the first request a look-up in the web's cache
of verified tokens).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.procstat import CpuMeter, wait_idle
from tests.stack import Stack

Row = dict[str, Any]

AUTH_USERS = (830_000_001, 830_000_064)
SECRET = "bench-jwt-secret-0123456789abcdef-0123"
CLIENT_THREADS = 16
WARMUP_REQUESTS = 200


@dataclass
class Variant:
    name: str  # "none", "HS256 fresh", ...
    web: Stack
    tokens: Callable[[int, int], str | None]  # (request number, user) -> token


def _users(count: int) -> list[int]:
    lo, hi = AUTH_USERS
    return [lo + n % (hi - lo + 1) for n in range(count)]


def _signer(key: Any, algorithm: str) -> Callable[[int, int], str]:
    now = int(time.time())

    def sign(n: int, user: int) -> str:
        # jti makes each token distinct (a fresh token defeats the verified-token cache).
        body = {"sub": str(user), "iat": now, "exp": now + 3600, "jti": str(n)}
        return jwt.encode(body, key, algorithm=algorithm)

    return sign


def _precomputed(sign: Callable[[int, int], str], users: list[int]) -> Callable[[int, int], str]:
    """Tokens signed before the measurement (the client's signing is not the service's)."""
    tokens = [sign(n, user) for n, user in enumerate(users)]
    return lambda n, user: tokens[n]


def _reused(sign: Callable[[int, int], str]) -> Callable[[int, int], str]:
    by_user: dict[int, str] = {}
    return lambda n, user: by_user.setdefault(user, sign(-user, user))


def _send(base: str, tokens: Callable[[int, int], str | None], users: list[int]) -> int:
    """Every POST of ``users`` (one per entry); the count of non-202 answers."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=CLIENT_THREADS)
    session.mount("http://", adapter)

    def post(item: tuple[int, int]) -> int:
        n, user = item
        token = tokens(n, user)
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        answer = session.post(
            f"{base}/v1/points/charge",
            json={"userId": user, "amount": 1},
            headers=headers,
            timeout=30,
        )
        return answer.status_code

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        statuses = list(pool.map(post, enumerate(users)))
    session.close()
    return sum(1 for s in statuses if s != 202)


def _web(database_url: str, redis_url: str, logs: Path, env: dict[str, str]) -> Stack:
    web = Stack(database_url, redis_url, logs, admin_token="bench-admin-token", extra_env=env)
    web.start("web")
    return web


def measure(
    database_url: str,
    redis_url: str,
    logs: Path,
    base_env: dict[str, str],
    *,
    requests_per_round: int = 2000,
    rounds: int = 5,
) -> list[Row]:
    """The rows of the ``auth`` scenario (the partition workers must be running)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    webs = {
        "none": _web(database_url, redis_url, logs, {**base_env, "AUTH_MODE": "none"}),
        "HS256": _web(
            database_url,
            redis_url,
            logs,
            {**base_env, "AUTH_MODE": "jwt", "AUTH_JWT_SECRET": SECRET},
        ),
        "RS256": _web(
            database_url,
            redis_url,
            logs,
            {**base_env, "AUTH_MODE": "jwt", "AUTH_JWT_PUBLIC_KEY": pem},
        ),
    }
    try:
        users = _users(requests_per_round)
        hs, rs = _signer(SECRET, "HS256"), _signer(key, "RS256")
        variants = [
            Variant("none", webs["none"], lambda n, user: None),
            Variant("HS256 reused", webs["HS256"], _reused(hs)),
            Variant("RS256 reused", webs["RS256"], _reused(rs)),
        ]
        fresh = {"HS256 fresh": (webs["HS256"], hs), "RS256 fresh": (webs["RS256"], rs)}
        for variant in variants:  # imports, pools, first connections
            _send(variant.web.base_url, variant.tokens, users[:WARMUP_REQUESTS])
        wait_idle([w.procs["web"].pid for w in webs.values()])
        # Fresh tokens for every round, signed before any measurement (none seen before).
        rounds_variants = [
            [
                *variants,
                *(
                    Variant(
                        name,
                        web,
                        _precomputed(
                            lambda n, u, s=sign, o=(r + 1) * 10 * requests_per_round: s(o + n, u),
                            users,
                        ),
                    )
                    for name, (web, sign) in fresh.items()
                ),
            ]
            for r in range(rounds)
        ]
        samples: dict[str, list[float]] = {}
        refused: dict[str, int] = {}
        for round_, round_variants in enumerate(rounds_variants):
            # Each round starts with another variant: no variant always runs first or last.
            shift = round_ % len(round_variants)
            for variant in round_variants[shift:] + round_variants[:shift]:
                pid = variant.web.procs["web"].pid
                meter = CpuMeter(lambda pid=pid: {"web": [pid]})
                meter.start()
                bad = _send(variant.web.base_url, variant.tokens, users)
                cpu = meter.stop()["web"]
                samples.setdefault(variant.name, []).append(cpu * 1e3 / len(users))
                refused[variant.name] = refused.get(variant.name, 0) + bad
    finally:
        for web in webs.values():
            web.stop()
    base = statistics.median(samples["none"])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append(
            {
                "section": "auth",
                "scenario": "auth: job POST",
                "system": name,
                "web_cpu_ms": round(median, 4),
                "rounds_ms": [round(v, 4) for v in values],
                "overhead_pct": round(100 * (median - base) / base, 1),
                "requests": requests_per_round * rounds,
                "non202": refused[name],
                "violations": [f"{refused[name]} answers were not 202"] if refused[name] else [],
            }
        )
    return rows
