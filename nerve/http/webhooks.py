"""Standard Webhooks (https://www.standardwebhooks.com/) verification.

A webhook request carries three headers:

- ``webhook-id``: the message id (the same on every retry of one message);
- ``webhook-timestamp``: Unix seconds when it was signed;
- ``webhook-signature``: space-separated ``v1,<base64>`` signatures, each an
  HMAC-SHA256 over ``{id}.{timestamp}.{raw body}`` with a secret; several may be
  present while a sender rotates its secret.

A secret is ``whsec_<base64 bytes>``. nerve accepts a message when one signature
matches one of the source's secrets (constant-time comparison, over the raw bytes as
received), and its timestamp is within the tolerance (5 minutes) of now, either way.
The verified payload becomes a CloudEvent of the source's configured type, with
``id`` = the webhook-id and ``source`` = ``/webhooks/<name>``; messages already
accepted (by webhook-id, recorded durably) are acknowledged and not published again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nerve.errors import ConfigError
from nerve.http.problems import Problem

__all__ = ["TOLERANCE", "SeenMessages", "WebhookSource", "sign", "verify"]

SEEN_TABLE = "http_webhooks_seen"
"""The table of the store's SQLite file that :class:`SeenMessages` keeps."""
TOLERANCE = 300.0
"""Seconds a signed timestamp may be away from now (either way)."""
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_MSG_ID = re.compile(r"^[\x21-\x7e]{1,256}$")


def _decode_secret(secret: str) -> bytes:
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            "a webhook secret must be 'whsec_' followed by base64 bytes, as the sender shows it"
        ) from None
    if len(key) < 16:
        raise ConfigError("a webhook secret must hold at least 16 bytes (128 bits)")
    return key


@dataclass(frozen=True)
class WebhookSource:
    """``POST /webhooks/<name>``: verified with ``secrets``, published as ``type``."""

    name: str
    type: str
    secrets: tuple[str, ...]
    tolerance: float = TOLERANCE

    def __post_init__(self) -> None:
        if not _SOURCE_NAME.match(self.name):
            raise ConfigError(
                f"webhook source name {self.name!r}: use 1-64 characters of a-z, 0-9, '_', '-'"
            )
        if not self.secrets:
            raise ConfigError(
                f"webhook source {self.name!r} has no secret; set "
                f"{self.env_var()} to the sender's 'whsec_...' secret"
            )
        object.__setattr__(self, "_keys", tuple(_decode_secret(s) for s in self.secrets))

    def env_var(self) -> str:
        return env_var(self.name)

    @property
    def keys(self) -> tuple[bytes, ...]:
        keys: tuple[bytes, ...] = object.__getattribute__(self, "_keys")
        return keys

    @classmethod
    def from_env(cls, name: str, type: str) -> WebhookSource:
        """Secrets from ``NERVE_WEBHOOK_SECRET_<NAME>`` (space-separated for rotation)."""
        value = os.environ.get(env_var(name), "")
        return cls(name=name, type=type, secrets=tuple(value.split()))


def env_var(name: str) -> str:
    return "NERVE_WEBHOOK_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of a message (for senders and tests)."""
    mac = hmac.new(_decode_secret(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(
    source: WebhookSource,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
) -> tuple[str, int]:
    """Check a request's signature; returns (webhook-id, timestamp) or raises a 400/401
    :class:`Problem` saying what is wrong."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    missing = [
        n
        for n, v in (
            ("webhook-id", msg_id),
            ("webhook-timestamp", stamp),
            ("webhook-signature", signatures),
        )
        if not v
    ]
    if missing or msg_id is None or stamp is None or signatures is None:
        raise Problem(
            401,
            "webhook-unsigned",
            f"missing header(s) {', '.join(missing)}: webhooks must be signed as Standard "
            "Webhooks (webhook-id, webhook-timestamp, webhook-signature)",
        )
    if not _MSG_ID.match(msg_id):
        raise Problem(400, "webhook-malformed", "webhook-id must be 1-256 printable characters")
    if not stamp.isdigit() or len(stamp) > 12:
        raise Problem(400, "webhook-malformed", "webhook-timestamp must be Unix seconds")
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > source.tolerance:
        raise Problem(
            401,
            "webhook-stale",
            f"webhook-timestamp is {int(current - timestamp)} s away from now, over the "
            f"{int(source.tolerance)} s tolerance (a replay, or the sender's clock is wrong)",
        )
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in source.keys]
    if _any_match(signatures.split(), expected):
        return msg_id, timestamp
    raise Problem(
        401,
        "webhook-bad-signature",
        "no webhook-signature matches this source's secret(s) over the raw body",
    )


def _any_match(candidates: Sequence[str], expected: Sequence[bytes]) -> bool:
    ok = False
    for candidate in candidates[:16]:
        version, _, value = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        for digest in expected:
            # no early exit: every pair is compared, in constant time each
            ok |= hmac.compare_digest(given, digest)
    return ok


class SeenMessages:
    """The webhook-ids already accepted, per source, durably (SQLite ``path``).

    Kept for ``retention`` seconds (7 days: senders retry a message for up to days,
    always with the same webhook-id)."""

    def __init__(self, path: str, retention: float = 7 * 86400.0) -> None:
        import threading

        from nerve._sqlite import connect

        self.path = path
        self.retention = retention
        self._lock = threading.Lock()
        self._conn = connect(path)
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SEEN_TABLE} (source TEXT NOT NULL, "
            "msg_id TEXT NOT NULL, seen_at REAL NOT NULL, PRIMARY KEY (source, msg_id))"
        )
        self._recorded = 0

    async def seen(self, source: str, msg_id: str) -> bool:
        def check() -> bool:
            with self._lock:
                row = self._conn.execute(
                    f"SELECT 1 FROM {SEEN_TABLE} WHERE source = ? AND msg_id = ?",
                    (source, msg_id),
                ).fetchone()
            return row is not None

        return await asyncio.to_thread(check)

    async def record(self, source: str, msg_id: str) -> None:
        def write() -> None:
            now = time.time()
            with self._lock:
                self._conn.execute(
                    f"INSERT OR IGNORE INTO {SEEN_TABLE} (source, msg_id, seen_at) "
                    "VALUES (?, ?, ?)",
                    (source, msg_id, now),
                )
                self._recorded += 1
                if self._recorded % 1000 == 1:
                    self._conn.execute(
                        f"DELETE FROM {SEEN_TABLE} WHERE seen_at < ?", (now - self.retention,)
                    )

        await asyncio.to_thread(write)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
