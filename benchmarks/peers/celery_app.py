"""Celery, with the settings its documentation gives for reliable delivery.

``task_acks_late=True`` (ack after the task returns) and
``task_reject_on_worker_lost=True``, no result backend (``task_ignore_result``); on
RabbitMQ durable queues, persistent messages and ``confirm_publish=True``; on Redis a
key prefix per run (``global_keyprefix``). The worker is ``--pool solo`` (one task at a
time in the worker's main thread; the task is a no-op), default prefetch multiplier
(4), without gossip, mingle, heartbeats and remote control.

- one task ``order_placed`` on a queue per run, which validates the event with the same
  pydantic model nerve's function gets;
- the producer calls ``task.apply_async(args=[event], queue=...)`` per event (Celery's
  client is blocking).

Throughput workload only (Celery has no fan-out of one message to several tasks).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from benchmarks.peers.common import URLS, Config, OrderEvent, Tracker, event_dicts, warmup_dict

SYNC = True
SETTINGS = {
    "redis": "task_acks_late, task_reject_on_worker_lost, no result backend; worker --pool "
    "solo, prefetch multiplier 4 (default); apply_async per event",
    "rabbitmq": "task_acks_late, task_reject_on_worker_lost, no result backend, durable "
    "queue, persistent messages, confirm_publish=True; worker --pool solo, prefetch "
    "multiplier 4 (default); apply_async per event",
}


def _app(cfg: Config, tracker: Tracker | None) -> tuple[Any, Any]:
    from celery import Celery

    if cfg.broker not in ("redis", "rabbitmq"):
        raise SystemExit(f"celery: no {cfg.broker!r} here (redis, rabbitmq)")
    url = URLS["redis"] if cfg.broker == "redis" else URLS["rabbitmq"].replace("amqp", "pyamqp")
    options: dict[str, Any] = (
        {"global_keyprefix": f"{cfg.name}:", "visibility_timeout": 3600}
        if cfg.broker == "redis"
        else {"confirm_publish": True}
    )
    app = Celery(cfg.name, broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue=cfg.name,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )

    @app.task(name="order_placed")
    def order_placed(body: dict[str, Any]) -> None:
        assert tracker is not None
        tracker.handle(OrderEvent.model_validate(body))

    return app, order_placed


def produce_sync(cfg: Config) -> dict[str, float]:
    app, task = _app(cfg, None)
    bodies = event_dicts(cfg.events)
    warm = warmup_dict()
    deadline = time.monotonic() + 60
    while not os.path.exists(cfg.ready):
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer never saw a warm-up event")
        task.apply_async(args=[warm], queue=cfg.name)
        for _ in range(100):
            if os.path.exists(cfg.ready):
                break
            time.sleep(0.01)
    first = time.time()
    for body in bodies:
        task.apply_async(args=[body], queue=cfg.name)
    last = time.time()
    app.close()
    return {"first_publish": first, "last_publish": last, "published": len(bodies)}


def consume_sync(cfg: Config) -> None:
    tracker = Tracker(cfg)
    app, _ = _app(cfg, tracker)

    def watch() -> None:  # a warm shutdown once done (or out of time)
        while not tracker.finished and not tracker.expired():
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    app.worker_main(
        [
            "worker", "--pool=solo", "--loglevel=WARNING", "-Q", cfg.name,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--hostname=bench-{cfg.name}@localhost",
        ]
    )  # fmt: skip


async def teardown(broker: str, name: str, fanout: int) -> None:
    from benchmarks.peers import cleanup

    await cleanup.delete(broker, queues=[name], exchanges=[name], key_prefixes=[f"{name}:"])
