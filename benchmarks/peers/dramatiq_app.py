"""Dramatiq, with the settings its documentation gives for reliable delivery.

Dramatiq acks a message only after the actor returns (its default: "acks late"), keeps
RabbitMQ queues durable and messages persistent, and with ``confirm_delivery=True``
waits for RabbitMQ's publisher confirm on every send. On Redis, messages a worker
holds are kept in a per-worker ack set until acked (the broker's default).

- one actor ``order_placed`` on queue ``orders`` (namespace/queue prefix per run), which
  validates the event with the same pydantic model nerve's function gets; default
  middleware (retries, time limit, age limit, ...), ``Worker(worker_threads=8)``.
- the producer calls ``actor.send(event)`` per event (Dramatiq's client is blocking).

Dramatiq has no fan-out (one message, one actor) and no open-loop latency client here:
it runs the throughput workload only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from benchmarks.peers.common import URLS, Config, OrderEvent, Tracker, event_dicts, warmup_dict

SYNC = True
SETTINGS = {
    "redis": "RedisBroker (namespace per run), acks after the actor returns (default), "
    "Worker(worker_threads=8), default middleware; actor.send per event",
    "rabbitmq": "RabbitmqBroker(confirm_delivery=True): durable queue, persistent messages, "
    "publisher confirms; acks after the actor returns, Worker(worker_threads=8), "
    "prefetch 2 x threads (default); actor.send per event",
}


def _broker(cfg: Config) -> Any:
    if cfg.broker == "redis":
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=URLS["redis"], namespace=cfg.name)
    if cfg.broker == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=URLS["rabbitmq"], confirm_delivery=True)
    raise SystemExit(f"dramatiq: no {cfg.broker!r} here (redis, rabbitmq)")


def _queue(cfg: Config) -> str:
    return cfg.name if cfg.broker == "rabbitmq" else "orders"


def _actor(cfg: Config, broker: Any, tracker: Tracker | None) -> Any:
    import dramatiq

    def order_placed(body: dict[str, Any]) -> None:
        assert tracker is not None
        tracker.handle(OrderEvent.model_validate(body))

    return dramatiq.actor(order_placed, broker=broker, queue_name=_queue(cfg))


def produce_sync(cfg: Config) -> dict[str, float]:
    broker = _broker(cfg)
    actor = _actor(cfg, broker, None)
    bodies = event_dicts(cfg.events)
    warm = warmup_dict()
    deadline = time.monotonic() + 60
    import os

    while not os.path.exists(cfg.ready):
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer never saw a warm-up event")
        actor.send(warm)
        for _ in range(100):
            if os.path.exists(cfg.ready):
                break
            time.sleep(0.01)
    first = time.time()
    for body in bodies:
        actor.send(body)
    last = time.time()
    broker.close()
    return {"first_publish": first, "last_publish": last, "published": len(bodies)}


def consume_sync(cfg: Config) -> None:
    import dramatiq

    tracker = Tracker(cfg)
    broker = _broker(cfg)
    _actor(cfg, broker, tracker)
    worker = dramatiq.Worker(broker, worker_threads=8)
    worker.start()
    try:
        while not tracker.finished and not tracker.expired():
            time.sleep(0.02)
        time.sleep(0.5)  # let the last acks go out
    finally:
        stopper = threading.Thread(target=worker.stop, daemon=True)
        stopper.start()
        stopper.join(20)
        broker.close()


async def teardown(broker: str, name: str, fanout: int) -> None:
    from benchmarks.peers import cleanup

    await cleanup.delete(
        broker, queues=[name, f"{name}.DQ", f"{name}.XQ"], key_prefixes=[f"{name}:"]
    )
