"""The raw clients for the fan-out and latency workloads of ``python -m benchmarks
compare`` (the throughput workload uses ``benchmarks/raw_clients.py``, unchanged).

Same durable work as there, with K handlers (one durable consumer/group/queue each):

- nats: nats-py JetStream, a file stream, K durable pull consumers (explicit ack,
  ``fetch(BATCH)``, ``msg.ack()`` per message); the producer awaits every PubAck.
- rabbitmq: aio-pika, a durable fanout exchange and K durable quorum queues, persistent
  messages, publisher confirms awaited, prefetch BATCH, ack per message.
- redis: redis-py Streams, K consumer groups, XREADGROUP COUNT BATCH, one XACK per batch.
- kafka: aiokafka, a topic, acks=all, K consumer groups with manual commits after each
  batch (also the throughput workload: ``raw_clients.py`` has no Kafka side).

A raw handler parses the body with orjson and does nothing else. Consumers declare
what they read from before the warm-up hand-shake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from benchmarks.peers.common import URLS, Config, Tracker, publish_all, serve_until

SETTINGS = {
    "nats": "nats-py JetStream: file stream, a durable pull consumer per handler, explicit "
    "ack per message, fetch(BATCH); publish awaits each PubAck",
    "rabbitmq": "aio-pika: durable fanout exchange, durable quorum queue per handler, "
    "persistent messages, publisher confirms awaited, prefetch BATCH, ack per message",
    "redis": "redis-py Streams: a consumer group per handler, XREADGROUP COUNT BATCH, "
    "one XACK per batch",
    "kafka": "aiokafka: a topic (1 partition); producer acks=all, send_and_wait per event "
    "(a batch concurrently); a consumer group per handler, auto commit off, "
    "getmany(max_records=BATCH), commit after handling each batch",
}


async def produce(cfg: Config) -> dict[str, float]:
    if cfg.broker == "nats":
        import nats

        nc = await nats.connect(URLS["nats"])
        js = nc.jetstream()
        subject = f"{cfg.name}.ev"

        async def send_nats(body: dict[str, Any]) -> Any:
            return await js.publish(subject, orjson.dumps(body))

        try:
            return await publish_all(cfg, send_nats)
        finally:
            await nc.close()
    if cfg.broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(URLS["rabbitmq"])
        async with conn:
            exchange: Any = None

            async def send_rabbit(body: dict[str, Any]) -> Any:
                nonlocal exchange
                if exchange is None:  # declared by the consumer: fails until it is, and
                    channel = await conn.channel(publisher_confirms=True)  # closes the channel
                    exchange = await channel.get_exchange(cfg.name, ensure=True)
                message = aio_pika.Message(
                    orjson.dumps(body),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_type="application/json",
                )
                return await exchange.publish(message, routing_key="")

            return await publish_all(cfg, send_rabbit)
    if cfg.broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(URLS["redis"])

        async def send_redis(body: dict[str, Any]) -> Any:
            return await client.xadd(cfg.name, {"e": orjson.dumps(body)})

        async def send_batch(chunk: list[dict[str, Any]]) -> Any:
            pipe = client.pipeline(transaction=False)
            for body in chunk:
                pipe.xadd(cfg.name, {"e": orjson.dumps(body)})
            return await pipe.execute()

        try:
            return await publish_all(cfg, send_redis, send_batch)
        finally:
            await client.aclose()
    if cfg.broker == "kafka":
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=URLS["kafka"], acks="all")
        await producer.start()

        async def send_kafka(body: dict[str, Any]) -> Any:
            return await producer.send_and_wait(cfg.name, orjson.dumps(body))

        try:
            return await publish_all(cfg, send_kafka)
        finally:
            await producer.stop()
    raise SystemExit(f"raw: no {cfg.broker!r} here (nats, rabbitmq, redis, kafka)")


async def consume(cfg: Config) -> None:
    tracker = Tracker(cfg)
    loops: list[asyncio.Task[None]] = []
    if cfg.broker == "nats":
        import nats
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js import api

        nc = await nats.connect(URLS["nats"])
        js = nc.jetstream()
        await js.add_stream(
            name=cfg.name, subjects=[f"{cfg.name}.ev"], storage=api.StorageType.FILE
        )

        async def pull(k: int) -> None:
            sub = await js.pull_subscribe(f"{cfg.name}.ev", durable=f"raw{k}", stream=cfg.name)
            while not tracker.finished:
                try:
                    msgs = await sub.fetch(cfg.batch, timeout=1.0)
                except NatsTimeout:
                    continue
                for msg in msgs:
                    tracker.handle_raw(msg.data, k)
                    await msg.ack()

        loops = [asyncio.create_task(pull(k)) for k in range(cfg.fanout)]
        try:
            await serve_until(tracker)
        finally:
            await _cancel(loops)
            await nc.close()
    elif cfg.broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(URLS["rabbitmq"])
        async with conn:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=cfg.batch)
            exchange = await channel.declare_exchange(
                cfg.name, aio_pika.ExchangeType.FANOUT, durable=True
            )
            for k in range(cfg.fanout):
                queue = await channel.declare_queue(
                    f"{cfg.name}.{k}", durable=True, arguments={"x-queue-type": "quorum"}
                )
                await queue.bind(exchange)

                def on_message(k: int) -> Callable[[Any], Awaitable[None]]:
                    async def handle(message: Any) -> None:
                        tracker.handle_raw(message.body, k)
                        await message.ack()

                    return handle

                await queue.consume(on_message(k))
            await serve_until(tracker)
    elif cfg.broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(URLS["redis"])
        for k in range(cfg.fanout):
            await client.xgroup_create(cfg.name, f"raw{k}", id="0", mkstream=True)

        async def read(k: int) -> None:
            while not tracker.finished:
                reply = await client.xreadgroup(f"raw{k}", "c1", {cfg.name: ">"}, cfg.batch, 1000)
                for _stream, entries in reply or []:
                    ids = []
                    for entry_id, fields in entries:
                        tracker.handle_raw(fields[b"e"], k)
                        ids.append(entry_id)
                    if ids:
                        await client.xack(cfg.name, f"raw{k}", *ids)

        loops = [asyncio.create_task(read(k)) for k in range(cfg.fanout)]
        try:
            await serve_until(tracker)
        finally:
            await _cancel(loops)
            await client.aclose()
    elif cfg.broker == "kafka":
        from aiokafka import AIOKafkaConsumer

        from benchmarks.peers.kafka_server import create_topic

        await create_topic(cfg.name)
        consumers = [
            AIOKafkaConsumer(
                cfg.name,
                bootstrap_servers=URLS["kafka"],
                group_id=f"raw{k}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            for k in range(cfg.fanout)
        ]

        async def poll(k: int) -> None:
            consumer = consumers[k]
            await consumer.start()
            while not tracker.finished:
                got = await consumer.getmany(timeout_ms=500, max_records=cfg.batch)
                for records in got.values():
                    for record in records:
                        tracker.handle_raw(record.value, k)
                if got:
                    await consumer.commit()

        loops = [asyncio.create_task(poll(k)) for k in range(cfg.fanout)]
        try:
            await serve_until(tracker)
        finally:
            await _cancel(loops)
            for consumer in consumers:
                with contextlib.suppress(Exception):
                    await consumer.stop()
    else:
        raise SystemExit(f"raw: no {cfg.broker!r} here (nats, rabbitmq, redis, kafka)")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def teardown(broker: str, name: str, fanout: int) -> None:
    from benchmarks.peers import cleanup

    await cleanup.delete(
        broker,
        streams=[name],
        queues=[f"{name}.{k}" for k in range(fanout)],
        exchanges=[name],
        key_prefixes=[name],
    )
