"""API keys and rate limits for the HTTP edge.

**Keys.** A key looks like ``nrv_<id>_<secret>``: ``id`` names the key (it shows up in
``nerve keys list`` and in logs), ``secret`` is 32 random bytes (base64url). Only the
SHA-256 of the secret is stored (the secret is high-entropy, so a fast hash is the
right one: a slow KDF protects guessable passwords, not random tokens), in the
``http_keys`` table of the store's SQLite file; ``nerve keys create`` prints the key
once. Callers send ``Authorization: Bearer nrv_...``.

**Scopes.** Each key carries scopes: event type patterns it may publish, in the App's
pattern syntax (``order.created``, ``order.*``, ``order.>``, ``>`` for every type),
and ``admin`` for the dead-letter endpoints.

**Deny by default.** Once any key has been created (revoked ones included, so revoking
the last key does not reopen the door), every request needs a valid key. With no key
at all, the server is open, and so it refuses to listen beyond loopback.

**Rate limits.** A token bucket per key (per client address when no key is
configured): ``rate`` events per second, bursts of ``burst``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from nerve._sqlite import connect
from nerve.app import matches_pattern
from nerve.errors import ConfigError

__all__ = ["ADMIN_SCOPE", "ApiKey", "KeyStore", "RateLimiter", "TokenBucket"]

ADMIN_SCOPE = "admin"
RECHECK_EVERY = 0.1
"""Seconds between checks of the key table for changes made by other processes
(``nerve keys revoke``): a revoked key is refused within this long."""
KEY_PREFIX = "nrv_"
_KEY = re.compile(r"^nrv_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")
_SCOPE = re.compile(r"^([A-Za-z0-9_\-]+|\*)(\.([A-Za-z0-9_\-]+|\*))*(\.>)?$|^>$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS http_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    scopes     TEXT NOT NULL,          -- JSON array of scopes
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key (never its secret)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None

    @property
    def admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def may_publish(self, event_type: str) -> bool:
        return any(s != ADMIN_SCOPE and matches_pattern(s, event_type) for s in self.scopes)


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate scopes; raises ConfigError naming a bad one."""
    if not scopes:
        raise ConfigError(
            "a key needs at least one scope: event type patterns it may publish "
            "('order.created', 'order.*', 'order.>', '>') and/or 'admin'"
        )
    for scope in scopes:
        if scope != ADMIN_SCOPE and not _SCOPE.match(scope):
            raise ConfigError(
                f"scope {scope!r} is not valid: use an event type or pattern ('*' is one "
                "token, '>' the rest and only at the end: 'order.*', 'order.>') or 'admin'"
            )
    return tuple(dict.fromkeys(scopes))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The API keys, in SQLite (``path``; ``:memory:`` for one process).

    Lookups are synchronous and cheap: a dict, reloaded when the file changed
    (``PRAGMA data_version``, checked at most every :data:`RECHECK_EVERY` seconds),
    so a key revoked by ``nerve keys revoke`` in another process is refused within
    0.1 s; changes made through this object apply at once.
    """

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        try:
            self._conn = connect(self.path)
            self._conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open the key store at {self.path!r}: {exc}") from None
        self._lock = threading.Lock()
        self._version: int | None = None
        self._checked = 0.0
        self._by_id: dict[str, tuple[str, ApiKey]] = {}

    def close(self) -> None:
        self._conn.close()

    # -- administration (nerve keys ...) --------------------------------------------

    def create(self, name: str, scopes: list[str] | tuple[str, ...]) -> tuple[ApiKey, str]:
        """A new key; returns it and the full secret key string (shown once)."""
        checked = check_scopes(scopes)
        if not name or len(name) > 100:
            raise ConfigError("a key needs a name of 1-100 characters (who or what uses it)")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, checked, time.time())
        with self._lock:
            self._conn.execute(
                "INSERT INTO http_keys (id, name, hash, scopes, created_at) VALUES (?,?,?,?,?)",
                (key_id, name, _hash(secret), orjson.dumps(list(checked)).decode(), key.created_at),
            )
            self._version = None  # data_version only moves for other connections' writes
        return key, f"{KEY_PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, name, scopes, created_at, revoked_at FROM http_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(r[0], r[1], tuple(orjson.loads(r[2])), r[3], r[4]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id (or by its full key string); False if no such live key."""
        match = _KEY.match(key_id)
        if match:
            key_id = match.group(1)
        with self._lock:
            cur = self._conn.execute(
                "UPDATE http_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            self._version = None
        return cur.rowcount > 0

    # -- the request path -----------------------------------------------------------

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._version is not None and now - self._checked < RECHECK_EVERY:
            return
        with self._lock:
            self._checked = now
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version:
                return
            rows = self._conn.execute(
                "SELECT id, name, hash, scopes, created_at, revoked_at FROM http_keys"
            ).fetchall()
            self._by_id = {
                r[0]: (r[2], ApiKey(r[0], r[1], tuple(orjson.loads(r[3])), r[4], r[5]))
                for r in rows
            }
            self._version = version

    @property
    def configured(self) -> bool:
        """True once any key was ever created: from then on every request needs one."""
        self._refresh()
        return bool(self._by_id)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` is, or None (unknown, wrong secret, revoked)."""
        match = _KEY.match(presented)
        if not match:
            return None
        self._refresh()
        found = self._by_id.get(match.group(1))
        if found is None:
            return None
        stored_hash, key = found
        if not hmac.compare_digest(stored_hash, _hash(match.group(2))):
            return None
        if key.revoked_at is not None:
            return None
        return key


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 if allowed, else seconds to wait before retrying."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if cost <= self.tokens:
            self.tokens -= cost
            return 0.0
        if cost > self.burst:
            return math.inf
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per caller (key id or client address), bounded in number."""

    def __init__(self, rate: float, burst: float, max_callers: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError("rate limit: rate must be > 0 events/s and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_callers = max_callers
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, caller: str, cost: float = 1.0) -> float:
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.max_callers:
                # forget the oldest callers (dicts keep insertion order)
                for old in list(self._buckets)[: self.max_callers // 10 or 1]:
                    del self._buckets[old]
            bucket = self._buckets[caller] = TokenBucket(self.rate, self.burst)
        return bucket.take(cost)
