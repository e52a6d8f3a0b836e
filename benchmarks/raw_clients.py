"""The raw-client side of ``python -m benchmarks brokers``: the same durable work as
nerve's adapters, written directly against each broker's client library.

``python -m benchmarks.raw_clients produce BROKER NAME N BATCH READY_FILE`` and
``python -m benchmarks.raw_clients consume BROKER NAME N BATCH READY_FILE DONE_FILE``;
``setup`` / ``teardown`` are called by the harness (``benchmarks/brokers.py``).

- nats: nats-py JetStream; a file stream ``NAME`` (subject ``NAME.ev``), a durable
  pull consumer with explicit ack; the producer awaits every PubAck (a batch is
  published concurrently, then awaited); the consumer fetches up to BATCH and acks each.
- rabbitmq: aio-pika; a durable quorum queue ``NAME``, persistent messages, publisher
  confirms (a batch is published concurrently, then every confirm awaited), manual ack,
  prefetch = BATCH.
- redis: redis-py Streams; XADD a batch in one pipeline; XREADGROUP up to BATCH, then
  one XACK for the batch.
- postgres: asyncpg; a table ``NAME.q``; the producer inserts a batch in one
  transaction (``unnest``) with ``pg_notify``; the consumer claims up to BATCH rows with
  ``FOR UPDATE SKIP LOCKED``, handles them and deletes them in the same transaction
  (at-least-once), and LISTENs when the table is empty.

Every message body is the same structured CloudEvent bytes nerve sends; the consumer
"handles" a message by parsing it with orjson. With ``$NERVE_BENCH_RAW_TYPED=1`` (the
``raw-typed`` side of the reports) it also validates the event's data with the pydantic
model nerve's function receives (``benchmarks.apps.OrderPlaced``), as a typed handler
written against the raw client would: the difference between the two raw sides is what
validation costs, which nerve always does. A first ``warmup`` message (re-sent every
second until the consumer has seen it) tells the producer the consumer is ready; the
clock starts after it. The consumer writes ``time.time()`` to DONE_FILE after acking
the N-th event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks.apps import OrderPlaced

WARMUP = b"warmup"
TYPED = os.environ.get("NERVE_BENCH_RAW_TYPED", "") == "1"
TYPED_SETTING = (
    "the raw client, its consumer also validating each event's data with the pydantic "
    "model nerve's function receives (`OrderPlaced.model_validate`)"
)
"""What the ``raw-typed`` side is, as the reports say it."""
HOST = "127.0.0.1"
NATS_URL = f"nats://{HOST}:4222"
AMQP_URL = f"amqp://guest:guest@{HOST}:5672/"
REDIS_URL = f"redis://{HOST}:6379/0"
PG_DSN = f"postgresql://postgres@{HOST}:5432/test"

SETTINGS = {
    "nats": "nats-py JetStream: file stream, 1 replica, durable pull consumer, AckPolicy "
    "EXPLICIT, fetch(batch=BATCH), msg.ack() per message; producer awaits each PubAck",
    "rabbitmq": "aio-pika: durable quorum queue, delivery_mode PERSISTENT, publisher "
    "confirms awaited, prefetch BATCH, manual message.ack() per message",
    "redis": "redis-py asyncio Streams: pipelined XADD per batch; XREADGROUP COUNT BATCH "
    "BLOCK 1000, one XACK per batch (entries are not XDEL'd)",
    "postgres": "asyncpg: INSERT ... unnest($1::bytea[]) + pg_notify per batch; consumer "
    "SELECT ... ORDER BY id LIMIT BATCH FOR UPDATE SKIP LOCKED, DELETE, COMMIT; LISTEN "
    "when empty (0.2 s poll)",
}


def _exists(path: str) -> bool:
    return Path(path).exists()


def write_time(path: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(repr(time.time()))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------
# Setup / teardown (run by the harness)


async def setup(broker: str, name: str) -> None:
    if broker == "nats":
        import nats
        from nats.js import api

        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            await js.add_stream(
                name=name, subjects=[f"{name}.ev"], storage=api.StorageType.FILE, num_replicas=1
            )
            await js.add_consumer(
                name,
                api.ConsumerConfig(
                    durable_name="raw",
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=30,
                    max_ack_pending=1000,
                ),
            )
        finally:
            await nc.close()
    elif broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(AMQP_URL)
        async with conn:
            channel = await conn.channel()
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    elif broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        try:
            await client.xgroup_create(name, "raw", id="0", mkstream=True)
        finally:
            await client.aclose()
    elif broker == "postgres":
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(
                f"CREATE SCHEMA {name}; "
                f"CREATE TABLE {name}.q (id bigserial PRIMARY KEY, body bytea NOT NULL)"
            )
        finally:
            await conn.close()
    else:
        raise ValueError(broker)


async def teardown(broker: str, name: str) -> None:
    if broker == "nats":
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().delete_stream(name)
        finally:
            await nc.close()
    elif broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(AMQP_URL)
        async with conn:
            channel = await conn.channel()
            await channel.queue_delete(name)
    elif broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        try:
            await client.delete(name)
        finally:
            await client.aclose()
    elif broker == "postgres":
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()


# ---------------------------------------------------------------------------------------
# Producers: publish(batch of bodies) per broker, then the common timing loop


async def _warmup(publish: Any, ready: str) -> None:
    deadline = time.monotonic() + 60
    while not _exists(ready):
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer never saw the warm-up message")
        await publish([WARMUP])
        for _ in range(100):
            if _exists(ready):
                return
            await asyncio.sleep(0.01)


async def _timed(publish: Any, bodies: list[bytes], batch: int, ready: str) -> dict[str, float]:
    await _warmup(publish, ready)
    first, cpu = time.time(), time.process_time()
    for start in range(0, len(bodies), batch):
        await publish(bodies[start : start + batch])
    return {
        "first_publish": first,
        "last_publish": time.time(),
        "published": len(bodies),
        "publish_cpu": time.process_time() - cpu,  # seconds of CPU (this process) publishing
    }


async def produce(broker: str, name: str, count: int, batch: int, ready: str) -> dict[str, float]:
    from benchmarks.apps import make_orders
    from nerve.event import encode

    bodies = [encode(e) for e in make_orders(count)]
    if broker == "nats":
        import nats

        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        subject = f"{name}.ev"

        async def publish(chunk: list[bytes]) -> None:
            await asyncio.gather(*(js.publish(subject, body) for body in chunk))

        try:
            return await _timed(publish, bodies, batch, ready)
        finally:
            await nc.close()
    if broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(AMQP_URL)
        async with conn:
            channel = await conn.channel(publisher_confirms=True)
            exchange = channel.default_exchange
            persistent = aio_pika.DeliveryMode.PERSISTENT

            async def publish(chunk: list[bytes]) -> None:
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                body, delivery_mode=persistent, content_type="application/json"
                            ),
                            routing_key=name,
                        )
                        for body in chunk
                    )
                )

            return await _timed(publish, bodies, batch, ready)
    if broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)

        async def publish(chunk: list[bytes]) -> None:
            pipe = client.pipeline(transaction=False)
            for body in chunk:
                pipe.xadd(name, {"e": body})
            await pipe.execute()

        try:
            return await _timed(publish, bodies, batch, ready)
        finally:
            await client.aclose()
    if broker == "postgres":
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        insert = f"INSERT INTO {name}.q (body) SELECT unnest($1::bytea[])"

        async def publish(chunk: list[bytes]) -> None:
            async with conn.transaction():
                await conn.execute(insert, chunk)
                await conn.execute("SELECT pg_notify($1, '')", name)

        try:
            return await _timed(publish, bodies, batch, ready)
        finally:
            await conn.close()
    raise ValueError(broker)


# ---------------------------------------------------------------------------------------
# Consumers


class Counter:
    def __init__(self, expect: int, ready: str, done: str) -> None:
        self.expect, self.ready, self.done = expect, ready, done
        self.seen = 0
        self.finished = asyncio.Event()

    def handle(self, body: bytes) -> None:
        if body == WARMUP:
            if not Path(self.ready).exists():
                Path(self.ready).touch()
            return
        doc = orjson.loads(body)
        if TYPED:
            OrderPlaced.model_validate(doc["data"])
        self.seen += 1

    def acked(self) -> None:
        if self.seen >= self.expect and not self.finished.is_set():
            write_time(self.done)
            self.finished.set()


async def consume(broker: str, name: str, count: int, batch: int, ready: str, done: str) -> None:
    counter = Counter(count, ready, done)
    deadline = time.monotonic() + 300
    if broker == "nats":
        import nats
        from nats.errors import TimeoutError as NatsTimeout

        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind("raw", stream=name)
        try:
            while time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(batch, timeout=1.0)
                except NatsTimeout:
                    continue
                for msg in msgs:
                    counter.handle(msg.data)
                    await msg.ack()
                counter.acked()
        finally:
            await nc.close()
    elif broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(AMQP_URL)
        async with conn:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=batch)
            queue = await channel.get_queue(name, ensure=False)

            async def on_message(message: Any) -> None:
                counter.handle(message.body)
                await message.ack()
                counter.acked()

            await queue.consume(on_message)
            await asyncio.wait_for(asyncio.Event().wait(), deadline - time.monotonic())
    elif broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        try:
            while time.monotonic() < deadline:
                reply = await client.xreadgroup("raw", "c1", {name: ">"}, batch, 1000)
                for _stream, entries in reply or []:
                    ids = []
                    for entry_id, fields in entries:
                        counter.handle(fields[b"e"])
                        ids.append(entry_id)
                    if ids:
                        await client.xack(name, "raw", *ids)
                counter.acked()
        finally:
            await client.aclose()
    elif broker == "postgres":
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        listener = await asyncpg.connect(PG_DSN)
        wake = asyncio.Event()
        await listener.add_listener(name, lambda *_: wake.set())
        claim = f"SELECT id, body FROM {name}.q ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        delete = f"DELETE FROM {name}.q WHERE id = ANY($1::bigint[])"
        try:
            while time.monotonic() < deadline:
                wake.clear()
                async with conn.transaction():
                    rows = await conn.fetch(claim, batch)
                    for row in rows:
                        counter.handle(row["body"])
                    if rows:
                        await conn.execute(delete, [row["id"] for row in rows])
                counter.acked()
                if not rows:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), 0.2)
        finally:
            await listener.close()
            await conn.close()
    else:
        raise ValueError(broker)


def main(
    argv: list[str],
    producer: Any = None,
    consumer: Any = None,
    kinds: Sequence[str] | None = None,
) -> None:
    """``produce|consume KIND NAME N BATCH READY [DONE]``: run ``producer`` (it prints
    its JSON result) or ``consumer`` under uvloop. KIND is the broker here, one of
    ``kinds`` for another side's module (``benchmarks.pg_sql``)."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    mode, kind, name, *rest = argv
    if kinds is not None and kind not in kinds:
        raise SystemExit(f"unknown side {kind!r}: choose from {', '.join(kinds)}")
    if mode == "produce":
        run = producer or produce
        result = asyncio.run(run(kind, name, int(rest[0]), int(rest[1]), rest[2]))
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    elif mode == "consume":
        run = consumer or consume
        asyncio.run(run(kind, name, int(rest[0]), int(rest[1]), rest[2], rest[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: produce or consume")


if __name__ == "__main__":
    main(sys.argv[1:])
