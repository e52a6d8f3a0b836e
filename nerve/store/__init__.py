"""Durable state beside the broker: idempotency records, the outbox, ``ctx.store``.

SQLite on one machine (``sqlite:///.nerve/store.db``, the default beside the embedded
broker), ``memory://`` for tests; PostgreSQL when several machines share the work: the
default beside a ``postgresql://`` broker is its own database (``default_store_url``),
where the store's commits ack the broker's deliveries in the same transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from nerve.store.sqlite import SqliteStore, SqliteUnit, default_store_url

if TYPE_CHECKING:
    from nerve.store.postgres import PostgresStore

__all__ = ["SqliteStore", "SqliteUnit", "default_store_url", "store_from_url"]


def store_from_url(url: str) -> SqliteStore | PostgresStore:
    """The store for ``url``: ``sqlite:///path``, ``memory://`` or ``postgresql://...``
    (:class:`~nerve.store.postgres.PostgresStore`, same interface; needs asyncpg)."""
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        from nerve.store.postgres import PostgresStore

        return PostgresStore(url)
    return SqliteStore(url)
