"""The nerve side of ``python -m benchmarks brokers``.

- ``app``: ``sink`` consumes ``order.placed`` (the events of ``benchmarks/apps.py``,
  concurrency 100, the default 30 s timeout, unordered unless ``BENCH_ORDERED``) and does
  nothing, except counting: a warm-up order (customer id ``cus_warmup``) makes it touch
  ``$NERVE_BENCH_READY``; after the ``$NERVE_BENCH_EXPECT``-th other event it writes
  ``time.time()`` to ``$NERVE_BENCH_DONE``. (That is when the handler of the last event
  starts; nerve acks it right after the handler returns.)
- ``python -m benchmarks.broker_apps BROKER_URL N BATCH READY_FILE``: the producer.
  It publishes a warm-up event every second until the consumer has seen one, then the
  N events of ``make_orders`` with ``client.publish_events`` in batches of BATCH (with
  ``$NERVE_BENCH_GO`` set, only once that file exists: ``benchmarks brokers --profile``
  attaches its profiler to the consumer first).
  Prints one JSON line: ``{"first_publish": wall time, "last_publish": wall time,
  "publish_cpu": CPU seconds of this process from the first publish to the last}``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.apps import BENCH_ORDERED, ORDER_TYPE, OrderPlaced, _declare, make_orders
from nerve import App

WARMUP_CUSTOMER = "cus_warmup"

app = App("bench", source="/bench/orders")
_declare(app)

_expect = int(os.environ.get("NERVE_BENCH_EXPECT", "0") or 0)
_ready = os.environ.get("NERVE_BENCH_READY", "")
_done = os.environ.get("NERVE_BENCH_DONE", "")
_seen = 0


@app.function(consumes=ORDER_TYPE, concurrency=100, ordered=BENCH_ORDERED)
async def sink(order: OrderPlaced, ctx: Any) -> None:
    """Does nothing but count (the cost measured is nerve's, not the handler's)."""
    global _seen
    if order.customer.id == WARMUP_CUSTOMER:
        if _ready and not _exists(_ready):
            _touch(_ready)
        return
    _seen += 1
    if _done and _seen == _expect:
        _write_time(_done)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _touch(path: str) -> None:
    Path(path).touch()


def _write_time(path: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(repr(time.time()))
    tmp.replace(path)


async def produce(broker: str, count: int, batch: int, ready: str) -> dict[str, float]:
    from nerve.runtime import Client
    from nerve.transport import from_url

    events = make_orders(count + 1)
    warm = events.pop()
    payload = warm.data if isinstance(warm.data, dict) else orjson.loads(warm.data)
    payload["customer"]["id"] = WARMUP_CUSTOMER
    transport = from_url(broker)
    await transport.start()
    client = Client(app, transport)
    try:
        deadline = time.monotonic() + 60
        while not _exists(ready):
            if time.monotonic() > deadline:
                raise TimeoutError("the consumer never saw the warm-up event")
            # a new event (new id) each time: brokers deduplicate by id
            await client.publish_events([app.make_event(payload, type=ORDER_TYPE)])
            for _ in range(100):
                if _exists(ready):
                    break
                await asyncio.sleep(0.01)
        go = os.environ.get("NERVE_BENCH_GO", "")  # a profiler attaches first
        while go and not _exists(go):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{go} did not appear")
            await asyncio.sleep(0.01)
        first, cpu = time.time(), time.process_time()
        for start in range(0, count, batch):
            await client.publish_events(events[start : start + batch])
        last, cpu = time.time(), time.process_time() - cpu
    finally:
        await transport.close()
    return {"first_publish": first, "last_publish": last, "published": count, "publish_cpu": cpu}


def main(argv: list[str]) -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    broker, count, batch, ready = argv
    result = asyncio.run(produce(broker, int(count), int(batch), ready))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
