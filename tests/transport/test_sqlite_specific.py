"""The embedded broker's own behaviour, beyond the conformance suite."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

from nerve.app import Subscription
from nerve.event import Event
from nerve.transport.sqlite import SqliteConsumer, SqliteTransport


def _levels(statements: list[str]) -> dict[str, set[str]]:
    """The sync level each kind of write ran with, from a connection's statement trace
    (FULL until a ``PRAGMA synchronous=...`` says otherwise)."""
    level = "FULL"
    seen: dict[str, set[str]] = {}
    for sql in statements:
        text = " ".join(sql.split()).upper()
        if text.startswith("PRAGMA SYNCHRONOUS="):
            level = text.split("=", 1)[1]
            continue
        for kind in ("INSERT INTO LOG", "UPDATE DELIVERIES", "DELETE FROM DELIVERIES"):
            if text.startswith(kind):
                seen.setdefault(kind, set()).add(level)
    return seen


@contextlib.asynccontextmanager
async def _traced(
    tmp_path: Path, synchronous: str
) -> AsyncIterator[tuple[SqliteTransport, SqliteConsumer, list[str]]]:
    """A started transport with group ``g`` declared, a consumer of it, and the list
    its writer connection's statements are traced into from then on."""
    transport = SqliteTransport(f"sqlite:///{tmp_path}/nerve.db?synchronous={synchronous}")
    await transport.start()
    statements: list[str] = []
    try:
        await transport.declare([Subscription("g", ("t.*",))])
        await transport._worker.call(lambda conn: conn.set_trace_callback(statements.append))
        yield transport, transport.consumer(Subscription("g", ("t.*",))), statements
    finally:
        await transport._worker.call(lambda conn: conn.set_trace_callback(None))
        await transport.close()


async def test_leases_and_acks_are_not_fsynced_but_publishes_and_nacks_are(
    tmp_path: Path,
) -> None:
    async with _traced(tmp_path, "FULL") as (transport, consumer, statements):
        await transport.publish([Event(type="t.one", source="/test", data={"n": 1})])
        (delivery,) = await consumer.fetch(10, 1.0)
        assert delivery.attempt == 1
        await delivery.ack()
        # the lease (UPDATE) and the ack (DELETE) ran relaxed, the publish with FULL
        assert _levels(statements) == {
            "INSERT INTO LOG": {"FULL"},
            "UPDATE DELIVERIES": {"NORMAL"},
            "DELETE FROM DELIVERIES": {"NORMAL"},
        }
        # ... and the connection was put back: what comes next commits with FULL (2)
        level = await transport._worker.call(
            lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
        )
        assert level == 2
        statements.clear()
        await transport.publish([Event(type="t.two", source="/test", data={"n": 2})])
        (delivery,) = await consumer.fetch(10, 1.0)
        await delivery.nack(0.0)  # a nack is fsynced (its lease is not)
        assert _levels(statements) == {
            "INSERT INTO LOG": {"FULL"},
            "UPDATE DELIVERIES": {"NORMAL", "FULL"},
        }
        stats = {s.group: s for s in await transport.stats()}
        assert stats["g"].processed == 1
        assert stats["g"].retried == 1


async def test_with_synchronous_normal_nothing_is_switched(tmp_path: Path) -> None:
    async with _traced(tmp_path, "NORMAL") as (transport, consumer, statements):
        await transport.publish([Event(type="t.one", source="/test", data={"n": 1})])
        (delivery,) = await consumer.fetch(10, 1.0)
        await delivery.ack()
        assert not [s for s in statements if "synchronous" in s.lower()]
        assert (await transport.stats())[0].processed == 1


async def test_pruning_reads_about_what_it_deletes(tmp_path: Path) -> None:
    """The log is pruned every 30 s in the writer's thread: the first row within the
    retention bounds the delete, so a long log of young events costs a prune a few
    VM instructions, not a pass over every row (as it once did)."""
    transport = SqliteTransport(f"sqlite:///{tmp_path}/nerve.db")
    await transport.start()
    try:
        await transport.declare([Subscription("g", ("t.*",))])
        old, young = 300, 5000

        def fill(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO log (event_id, type, published_at, body) VALUES (?, 't', ?, x'00')",
                [(f"e{n}", time.time() - (2 * 86400 if n < old else 0)) for n in range(young)],
            )
            conn.commit()

        await transport._worker.call(fill)
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        await transport._worker.call(lambda conn: conn.set_progress_handler(count, 100))
        try:
            assert await transport.prune_log() == old
            first = steps
            assert await transport.prune_log() == 0
        finally:
            await transport._worker.call(lambda conn: conn.set_progress_handler(None, 1))
        # in hundreds of SQLite VM instructions; a pass over the log: about 300
        assert steps - first < 10, steps - first
        assert first < old, first
        assert len(await transport.read_log(0, 2 * young)) == young - old
    finally:
        await transport.close()
