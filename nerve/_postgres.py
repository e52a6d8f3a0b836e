"""What nerve's PostgreSQL parts share: how they pass integer and text columns, and how
they create their tables."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

__all__ = ["int_array", "lock_ddl", "text_array"]


def int_array(values: Iterable[int | None]) -> str:
    """A PostgreSQL array literal of ``values`` (ints; None for NULL), for a parameter
    written ``$n::text::bigint[]`` (or ``int[]``).

    One string, made in C (``map(str)`` and a join): a list parameter has asyncpg check
    every element with ``isinstance(element, collections.abc.Iterable)``, a call into
    ``ABCMeta.__instancecheck__`` each (about 120 ns), several per event on the commit
    path. Only ints and None are written (a bool would print as ``True``)."""
    return "{" + ",".join(map(str, values)).replace("None", "NULL") + "}"


_ESCAPE = re.compile(rb'\\[^"\\]')
"""In a JSON array: an escape other than a quote's or a backslash's (a control character,
which a PostgreSQL array literal does not read as JSON does), or a false alarm."""


def text_array(values: Sequence[str | None]) -> str:
    """A PostgreSQL array literal of ``values`` (strings; None for NULL), for a parameter
    written ``$n::text::text[]``: a list parameter costs asyncpg two
    ``ABCMeta.__instancecheck__`` calls an element (see :func:`int_array`).

    Made in C as a JSON array (orjson), which is the array literal's own syntax where
    no string holds a control character: quoted strings with ``\\"`` and ``\\\\``
    escaped, ``null`` for NULL. With a control character (JSON writes it as an escape
    the literal would not read back) each string is quoted here instead."""
    dumped = orjson.dumps(values)
    if _ESCAPE.search(dumped) is None:
        return "{" + dumped[1:-1].decode() + "}"
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


async def lock_ddl(conn: Any, name: str) -> None:
    """Inside a transaction on ``conn`` (asyncpg): wait until no other process holds the
    lock ``name``, and hold it until the transaction ends. ``CREATE ... IF NOT EXISTS``
    races: two processes creating the same table at once can fail on ``pg_type``'s
    unique index, so one process at a time creates a part's tables."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
