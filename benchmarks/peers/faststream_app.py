"""FastStream, configured the way its documentation recommends for reliable delivery.

- nats: a JetStream file stream ``NAME`` (subject ``NAME.ev``); each handler a durable
  push consumer (FastStream's default subscriber, faster than its pull consumer here;
  ``NERVE_BENCH_FASTSTREAM_NATS=pull`` for ``PullSub(batch_size=BATCH)``),
  ``AckPolicy.ACK`` (ack after the handler returns); the producer's
  ``broker.publish(..., stream=NAME, timeout=10)`` awaits the PubAck.
- rabbitmq: a durable fanout exchange ``NAME``, one durable quorum queue per handler,
  ``Channel(prefetch_count=BATCH)``, ``AckPolicy.ACK``; the producer publishes
  ``persist=True`` on a channel with publisher confirms (FastStream's default) and awaits
  each confirm.
- redis: a stream ``NAME``; each handler its own consumer group (``StreamSub(group=...,
  max_records=BATCH)``), ``AckPolicy.ACK`` (XACK after the handler returns).
- kafka: ``KafkaBroker(acks="all")``, a topic, a consumer group per handler,
  ``AckPolicy.ACK`` (the offset is committed after the handler returns).

Handlers take the event as a pydantic model (FastStream validates it), as nerve's do.
FastStream's two log lines per message (its default) are turned off (``logger=None``).

``python -m benchmarks.peers faststream produce|consume --broker nats ...``
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.peers.common import URLS, Config, OrderEvent, Tracker, publish_all, serve_until

NATS_PULL = os.environ.get("NERVE_BENCH_FASTSTREAM_NATS", "push") == "pull"
"""FastStream's default JetStream subscriber is a push consumer (faster here than its
pull consumer); ``NERVE_BENCH_FASTSTREAM_NATS=pull`` measures ``PullSub(batch_size=BATCH)``."""

SETTINGS = {
    "nats": "JetStream file stream; a durable push consumer per handler (FastStream's "
    "default subscriber; NERVE_BENCH_FASTSTREAM_NATS=pull: PullSub batch_size BATCH), "
    "AckPolicy.ACK (ack after the handler); publish awaits the PubAck",
    "rabbitmq": "durable fanout exchange, durable quorum queue per handler, prefetch BATCH, "
    "AckPolicy.ACK; persistent messages, publisher confirms awaited",
    "redis": "Redis Stream, a consumer group per handler (StreamSub max_records BATCH), "
    "AckPolicy.ACK (XACK after the handler); no Redis persistence beyond the server's",
    "kafka": "KafkaBroker(acks='all'); a topic (1 partition), a consumer group per handler, "
    "max_records BATCH, AckPolicy.ACK (offset committed after the handler); publish awaits "
    "the broker's ack",
}


Publish = Callable[[dict[str, Any]], Awaitable[Any]]


def build(cfg: Config, tracker: Tracker | None) -> tuple[Any, Publish]:
    """The broker with ``cfg.fanout`` subscribers (when ``tracker``), and a publish."""
    from faststream import AckPolicy

    quiet: dict[str, Any] = {"logger": None}  # no log line per message

    def handler(k: int) -> Callable[[OrderEvent], Awaitable[None]]:
        async def handle(event: OrderEvent) -> None:
            assert tracker is not None
            tracker.handle(event, k)

        handle.__name__ = f"handle_{k}"
        return handle

    if cfg.broker == "nats":
        from faststream.nats import JStream, NatsBroker, PullSub
        from nats.js.api import StorageType

        nats_broker = NatsBroker(URLS["nats"], **quiet)
        subject = f"{cfg.name}.ev"
        stream = JStream(cfg.name, subjects=[subject], storage=StorageType.FILE)
        for k in range(cfg.fanout if tracker else 0):
            nats_broker.subscriber(
                subject,
                stream=stream,
                durable=f"fs{k}",
                pull_sub=PullSub(batch_size=cfg.batch) if NATS_PULL else False,
                ack_policy=AckPolicy.ACK,
            )(handler(k))

        async def publish_nats(body: dict[str, Any]) -> Any:
            return await nats_broker.publish(body, subject, stream=cfg.name, timeout=10.0)

        return nats_broker, publish_nats
    if cfg.broker == "rabbitmq":
        from faststream.rabbit import (
            Channel,
            ExchangeType,
            QueueType,
            RabbitBroker,
            RabbitExchange,
            RabbitQueue,
        )

        rabbit = RabbitBroker(URLS["rabbitmq"], **quiet)
        exchange = RabbitExchange(cfg.name, type=ExchangeType.FANOUT, durable=True)
        for k in range(cfg.fanout if tracker else 0):
            queue = RabbitQueue(f"{cfg.name}.{k}", durable=True, queue_type=QueueType.QUORUM)
            rabbit.subscriber(
                queue,
                exchange,
                channel=Channel(prefetch_count=cfg.batch),
                ack_policy=AckPolicy.ACK,
            )(handler(k))

        async def publish_rabbit(body: dict[str, Any]) -> Any:
            return await rabbit.publish(body, exchange=exchange, persist=True)

        return rabbit, publish_rabbit
    if cfg.broker == "redis":
        from faststream.redis import RedisBroker, StreamSub

        redis_broker = RedisBroker(URLS["redis"], **quiet)
        for k in range(cfg.fanout if tracker else 0):
            redis_broker.subscriber(
                stream=StreamSub(
                    cfg.name, group=f"fs{k}", consumer="c1", max_records=cfg.batch, last_id="0"
                ),
                ack_policy=AckPolicy.ACK,
            )(handler(k))

        async def publish_redis(body: dict[str, Any]) -> Any:
            return await redis_broker.publish(body, stream=cfg.name)

        return redis_broker, publish_redis
    if cfg.broker == "kafka":
        from faststream.kafka import KafkaBroker

        kafka_broker = KafkaBroker(URLS["kafka"], acks="all", **quiet)
        for k in range(cfg.fanout if tracker else 0):
            kafka_broker.subscriber(
                cfg.name,
                group_id=f"fs{k}",
                auto_offset_reset="earliest",
                max_records=cfg.batch,
                ack_policy=AckPolicy.ACK,
            )(handler(k))

        async def publish_kafka(body: dict[str, Any]) -> Any:
            return await kafka_broker.publish(body, cfg.name)

        return kafka_broker, publish_kafka
    raise SystemExit(f"faststream: no {cfg.broker!r} here (nats, rabbitmq, redis, kafka)")


async def produce(cfg: Config) -> dict[str, float]:
    broker, publish = build(cfg, None)
    await broker.connect()
    try:
        return await publish_all(cfg, publish)
    finally:
        await broker.stop()


async def consume(cfg: Config) -> None:
    tracker = Tracker(cfg)
    broker, _ = build(cfg, tracker)
    if cfg.broker == "kafka":
        from benchmarks.peers.kafka_server import create_topic

        await create_topic(cfg.name)
    await broker.start()
    try:
        await serve_until(tracker)
    finally:
        await asyncio.wait_for(broker.stop(), 30)


async def teardown(broker: str, name: str, fanout: int) -> None:
    """Delete what a run created (streams, queues, keys)."""
    from benchmarks.peers import cleanup

    await cleanup.delete(
        broker,
        streams=[name],
        queues=[f"{name}.{k}" for k in range(fanout)],
        exchanges=[name],
        key_prefixes=[name],
    )
