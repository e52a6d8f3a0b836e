"""taskiq with its broker packages (taskiq-nats, taskiq-redis, taskiq-aio-pika).

- nats: ``PullBasedJetStreamBroker`` (a JetStream stream per run, a durable pull
  consumer, ``pull_consume_batch=BATCH``, ``pull_consume_timeout=0.2``: without a
  timeout, a fetch waits until it has BATCH messages);
- redis: ``RedisStreamBroker`` (a stream per run, a consumer group, ``xread_count=BATCH``);
- rabbitmq: ``AioPikaBroker`` (durable exchange, durable quorum queue per run, persistent
  messages, aio-pika's publisher confirms, ``qos=BATCH``).

The worker runs in-process with ``taskiq.api.run_receiver_task`` (what ``taskiq worker``
runs), ``ack_time=WHEN_EXECUTED`` (ack after the task returns), ``max_async_tasks=100``;
no result backend. The task takes the event as a pydantic model (taskiq validates it).
The producer calls ``await task.kiq(event)``, a batch of them concurrently.
Throughput workload only.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from benchmarks.peers.common import URLS, Config, OrderEvent, Tracker, publish_all, serve_until

SETTINGS = {
    "nats": "PullBasedJetStreamBroker: JetStream stream, durable pull consumer (batch "
    "BATCH, fetch timeout 0.2 s); ack when executed; max_async_tasks 100; kiq per event",
    "redis": "RedisStreamBroker: stream + consumer group (xread_count BATCH); ack when "
    "executed; max_async_tasks 100; kiq per event",
    "rabbitmq": "AioPikaBroker: durable exchange, durable quorum queue, persistent "
    "messages, publisher confirms (aio-pika default), qos BATCH; ack when executed; "
    "max_async_tasks 100; kiq per event",
}


def _broker(cfg: Config) -> Any:
    if cfg.broker == "nats":
        from taskiq_nats import PullBasedJetStreamBroker

        return PullBasedJetStreamBroker(
            URLS["nats"],
            subject=f"{cfg.name}.ev",
            stream_name=cfg.name,
            durable="tq",
            pull_consume_batch=cfg.batch,
            # Without a timeout a fetch of BATCH waits until BATCH messages are there.
            pull_consume_timeout=0.2,
        )
    if cfg.broker == "redis":
        from taskiq_redis import RedisStreamBroker

        return RedisStreamBroker(
            URLS["redis"], queue_name=cfg.name, consumer_group_name="tq", xread_count=cfg.batch
        )
    if cfg.broker == "rabbitmq":
        from taskiq_aio_pika import AioPikaBroker
        from taskiq_aio_pika.exchange import Exchange
        from taskiq_aio_pika.queue import Queue

        return AioPikaBroker(
            URLS["rabbitmq"],
            exchange=Exchange(name=cfg.name),
            task_queues=[Queue(name=cfg.name, routing_key=cfg.name)],
            dead_letter_queue=Queue(name=f"{cfg.name}.dlq"),
            qos=cfg.batch,
        )
    raise SystemExit(f"taskiq: no {cfg.broker!r} here (nats, redis, rabbitmq)")


def _task(broker: Any, tracker: Tracker | None) -> Any:
    @broker.task(task_name="order_placed")
    async def order_placed(event: OrderEvent) -> None:
        assert tracker is not None
        tracker.handle(event)

    return order_placed


async def produce(cfg: Config) -> dict[str, float]:
    broker = _broker(cfg)
    task = _task(broker, None)
    await broker.startup()
    try:

        async def send(body: dict[str, Any]) -> Any:
            return await task.kiq(body)

        return await publish_all(cfg, send)
    finally:
        await broker.shutdown()


async def consume(cfg: Config) -> None:
    from taskiq.acks import AcknowledgeType
    from taskiq.api import run_receiver_task

    tracker = Tracker(cfg)
    broker = _broker(cfg)
    _task(broker, tracker)
    worker = asyncio.create_task(
        run_receiver_task(
            broker,
            run_startup=True,
            max_async_tasks=100,
            ack_time=AcknowledgeType.WHEN_EXECUTED,
        )
    )
    try:
        await serve_until(tracker)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(worker, 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 10)


async def teardown(broker: str, name: str, fanout: int) -> None:
    from benchmarks.peers import cleanup

    await cleanup.delete(
        broker,
        streams=[name],
        queues=[name, f"{name}.dlq"],
        exchanges=[name],
        key_prefixes=[name],
    )
