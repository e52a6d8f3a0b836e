"""What nerve's PostgreSQL parts share: how they pass integer columns, and how they
create their tables."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["int_array", "lock_ddl"]


def int_array(values: Iterable[int | None]) -> str:
    """A PostgreSQL array literal of ``values`` (ints; None for NULL), for a parameter
    written ``$n::text::bigint[]`` (or ``int[]``).

    One string, made in C (``map(str)`` and a join): a list parameter has asyncpg check
    every element with ``isinstance(element, collections.abc.Iterable)``, a call into
    ``ABCMeta.__instancecheck__`` each (about 120 ns), several per event on the commit
    path. Only ints and None are written (a bool would print as ``True``)."""
    return "{" + ",".join(map(str, values)).replace("None", "NULL") + "}"


async def lock_ddl(conn: Any, name: str) -> None:
    """Inside a transaction on ``conn`` (asyncpg): wait until no other process holds the
    lock ``name``, and hold it until the transaction ends. ``CREATE ... IF NOT EXISTS``
    races: two processes creating the same table at once can fail on ``pg_type``'s
    unique index, so one process at a time creates a part's tables."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
