"""nerve's own PostgreSQL statements without nerve's runtime: the floor of the
``postgresql://`` design, as sides of ``python -m benchmarks brokers --brokers postgres
--sides nerve,raw,sql,sql-norec``.

The work is the raw client's (``benchmarks.raw_clients``: a producer process publishing
pre-encoded events in batches, one consumer loop claiming a batch, parsing each event
and acking the batch), but every statement is the one nerve's adapter and store run:

- ``sql``: the producer runs the transport's publish statement per batch (log row and
  delivery row, one autocommitted statement; ``PostgresTransport._insert``, routed to
  the one group without the routing check); the consumer claims up to BATCH with the
  transport's claim (a lease and a fencing token per row, the store's processed check
  joined in), parses each event, then commits the batch as nerve's default store does:
  one statement recording each event as processed and acking its delivery
  (``PostgresStore.commit_records``).
- ``sql-norec``: the same, but the batch is acked without idempotency records
  (``PostgresConsumer.ack_many``: delete and count, one statement) and the claim does
  not look records up. What the records cost is the difference to ``sql``.

Nothing of the runtime runs: no envelope decoding into an ``Event``, no validation, no
concurrency, no tracing or metrics. So nerve/sql says what the runtime costs, and
sql/raw what nerve's SQL design costs against a plain ``SKIP LOCKED`` queue.

``python -m benchmarks.pg_sql produce SIDE NAME N BATCH READY_FILE`` and
``python -m benchmarks.pg_sql consume SIDE NAME N BATCH READY_FILE DONE_FILE``.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

from benchmarks import raw_clients
from benchmarks.raw_clients import PG_DSN, WARMUP, Counter, _timed

SIDES = ("sql", "sql-norec")
SETTINGS = {
    "sql": "nerve's statements without its runtime: the transport's publish statement per "
    "batch; one consumer loop: the transport's claim (BATCH rows, leases, the store's "
    "processed check), parse, the store's commit (records + acks, one statement)",
    "sql-norec": "as sql, without idempotency records: claim, parse, ack_many (delete + "
    "count, one statement)",
}
GROUP = "sink"


def transport_url(name: str) -> str:
    return f"{PG_DSN}?schema={name}"


def store_url(name: str) -> str:
    return f"{PG_DSN}?schema={name}_store"


async def produce(side: str, name: str, count: int, batch: int, ready: str) -> dict[str, float]:
    from benchmarks.apps import make_orders
    from nerve.event import encode
    from nerve.transport.postgres import PostgresTransport

    rows = [(e.id, e.type, encode(e)) for e in make_orders(count)]
    transport = PostgresTransport(transport_url(name))
    await transport.start()
    try:
        async with transport._connection("publish") as conn:

            async def publish(chunk: list[Any]) -> None:
                if chunk == [WARMUP]:
                    chunk = [(str(uuid.uuid4()), "warmup", WARMUP)]
                n = len(chunk)
                index = list(range(1, n + 1))
                await transport._insert(conn, chunk, index, [GROUP] * n, [None] * n, {GROUP})

            return await _timed(publish, rows, batch, ready)
    finally:
        await transport.close()


async def consume(side: str, name: str, count: int, batch: int, ready: str, done: str) -> None:
    from nerve.app import Subscription
    from nerve.store.postgres import PostgresStore
    from nerve.transport.postgres import PostgresTransport

    counter = Counter(count, ready, done)
    transport = PostgresTransport(transport_url(name))
    await transport.start()
    store = PostgresStore(store_url(name))
    await store.start()
    try:
        subscription = Subscription(group=GROUP, patterns=("order.placed", "warmup"))
        await transport.declare([subscription])
        if side == "sql":
            store._brokers()  # claims look records up; commits ack in the same statement
        consumer = transport.consumer(subscription)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not counter.finished.is_set():
            got = await consumer.fetch(batch, 1.0)
            if not got:
                continue
            for delivery in got:
                counter.handle(delivery.raw)
            if side == "sql":
                await store.commit_records([(GROUP, d.event_id, []) for d in got])
                lost = [d for d in got if not d.acked_within]
            else:
                lost = list(await consumer.ack_many(got))
            if lost:
                raise RuntimeError(f"{len(lost)} leases lost")
            counter.acked()
    finally:
        await store.close()
        await transport.close()


async def teardown(name: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(
            f"DROP SCHEMA IF EXISTS {name} CASCADE; DROP SCHEMA IF EXISTS {name}_store CASCADE"
        )
    finally:
        await conn.close()


def main(argv: list[str]) -> None:
    raw_clients.main(argv, produce, consume, SIDES)


if __name__ == "__main__":
    main(sys.argv[1:])
