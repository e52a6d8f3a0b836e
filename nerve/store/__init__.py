"""Durable state beside the broker: idempotency records, the outbox, ``ctx.store``.

SQLite on one machine (``sqlite:///.nerve/store.db``, the default beside the embedded
broker), ``memory://`` for tests; PostgreSQL when several machines share the work
(with the PostgreSQL adapter).
"""

from nerve.store.sqlite import SqliteStore, SqliteUnit, default_store_url

__all__ = ["SqliteStore", "SqliteUnit", "default_store_url", "store_from_url"]


def store_from_url(url: str) -> SqliteStore:
    return SqliteStore(url)
