"""What the PostgreSQL broker and store share: how they pass integer columns."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["int_array"]


def int_array(values: Iterable[int | None]) -> str:
    """A PostgreSQL array literal of ``values`` (ints; None for NULL), for a parameter
    written ``$n::text::bigint[]`` (or ``int[]``).

    One string, made in C (``map(str)`` and a join): a list parameter has asyncpg check
    every element with ``isinstance(element, collections.abc.Iterable)``, a call into
    ``ABCMeta.__instancecheck__`` each (about 120 ns), several per event on the commit
    path. Only ints and None are written (a bool would print as ``True``)."""
    return "{" + ",".join(map(str, values)).replace("None", "NULL") + "}"
