"""nerve in ``python -m benchmarks compare``: the consumer is ``nerve run`` on the Apps
below (what a user runs), the producer ``python -m benchmarks.peers nerve produce``.

- ``app``: one function ``f0`` (``order.placed``, concurrency 100, the default 30 s timeout);
- ``fanout_app``: four functions ``f0``..``f3`` on the same event type (each its own
  consumer group, so every event is handled four times).

The functions read the run's settings from ``$NERVE_BENCH_CONFIG`` (set by the harness)
and report to the shared :class:`~benchmarks.peers.common.Tracker`: handler start minus
the event's ``time`` (the *scheduled* send time) for latency, the wall time of the last
of N x K handled events for throughput. nerve acks each event right after its handler
returns.

The producer publishes with nerve's ``Client``: ``publish_events`` per batch
(throughput), or one event per publish at scheduled times (latency, open loop).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.apps import BENCH_ORDERED, ORDER_TYPE, OrderPlaced, _declare
from benchmarks.peers.common import (
    Config,
    Tracker,
    config_from_env,
    event_dicts,
    open_loop,
    warm_up,
)
from nerve import App

NERVE_URLS = {
    "nats": "nats://127.0.0.1:4222?stream={name}",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/?prefix={name}",
    "redis": "redis://127.0.0.1:6379/0?prefix={name}",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test?schema={name}",
    "kafka": "kafka://127.0.0.1:9092?prefix={name}",
    "sqlite": "sqlite:///{name}?synchronous=FULL",  # name: the database file
}

_cfg = config_from_env()
_tracker = Tracker(_cfg) if _cfg is not None else None


def _function(k: int) -> Callable[[OrderPlaced, Any], Awaitable[None]]:
    async def handle(order: OrderPlaced, ctx: Any) -> None:
        started = time.time()
        if _tracker is not None:
            sent = ctx.event.time.timestamp() if ctx.event.time is not None else None
            _tracker.saw(order.customer.id, sent, k, started)

    handle.__name__ = f"f{k}"
    handle.__qualname__ = f"f{k}"
    return handle


def _app(name: str, functions: int) -> App:
    built = App(name, source="/bench/orders")
    _declare(built)
    for k in range(functions):
        built.function(consumes=ORDER_TYPE, concurrency=100, name=f"f{k}", ordered=BENCH_ORDERED)(
            _function(k)
        )
    return built


app = _app("bench", 1)
fanout_app = _app("bench-fanout", 4)


def url(broker: str, name: str) -> str:
    return NERVE_URLS[broker].format(name=name)


async def produce(cfg: Config) -> dict[str, float]:
    from nerve.runtime import Client
    from nerve.transport import from_url

    transport = from_url(url(cfg.broker, cfg.name))
    await transport.start()
    client = Client(app, transport)
    try:

        async def send_one(body: dict[str, Any]) -> None:
            event = app.make_event(body["data"], type=ORDER_TYPE)
            if "time" in body and cfg.latency:
                from datetime import datetime

                event = event.evolve(time=datetime.fromisoformat(body["time"]))
            await client.publish_events([event])

        if cfg.latency:
            await warm_up(send_one, cfg.ready)
            return await open_loop(cfg, event_dicts(cfg.events), send_one)
        events = [app.make_event(b["data"], type=ORDER_TYPE) for b in event_dicts(cfg.events)]
        await warm_up(send_one, cfg.ready, cfg.processes)
        first = time.time()
        for start in range(0, len(events), cfg.batch):
            await client.publish_events(events[start : start + cfg.batch])
        return {"first_publish": first, "last_publish": time.time(), "published": len(events)}
    finally:
        await transport.close()


async def teardown(broker: str, name: str, fanout: int) -> None:
    from benchmarks.peers import cleanup

    groups = [f"f{k}" for k in range(fanout)]
    await cleanup.delete(
        broker,
        streams=[name, f"{name}_dlq"],
        queues=[q for g in groups for q in (f"{name}.g.{g}", f"{name}.g.{g}.dlq")],
        exchanges=[f"{name}.events"],
        key_prefixes=[f"{name}:"],
    )
    if broker == "postgres":
        import asyncpg

        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()
