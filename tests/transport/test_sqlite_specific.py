"""The embedded broker's own behaviour, beyond the conformance suite."""

from __future__ import annotations

from pathlib import Path

from nerve.app import Subscription
from nerve.event import Event
from nerve.transport.sqlite import SqliteTransport


async def test_a_claim_is_not_fsynced_but_everything_after_it_is(tmp_path: Path) -> None:
    transport = SqliteTransport(f"sqlite:///{tmp_path}/nerve.db?synchronous=FULL")
    await transport.start()
    try:
        await transport.declare([Subscription("g", ("t.*",))])
        consumer = transport.consumer(Subscription("g", ("t.*",)))
        await transport.publish([Event(type="t.one", source="/test", data={"n": 1})])
        (delivery,) = await consumer.fetch(10, 1.0)
        assert delivery.attempt == 1
        # the claim relaxed the connection for its one statement and put it back: the
        # ack (and every other write) commits with synchronous=FULL (2)
        level = await transport._worker.call(
            lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
        )
        assert level == 2
        await delivery.ack()
        stats = {s.group: s for s in await transport.stats()}
        assert stats["g"].processed == 1
    finally:
        await transport.close()
