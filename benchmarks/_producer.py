"""The nerve producer process: ``python -m benchmarks._producer MODE BROKER_URL ...``.

- ``throughput BROKER N BATCH``: builds N order events up front, then publishes them
  with ``client.publish_events`` in batches of BATCH, one batch after another.
- ``latency BROKER RATE SECONDS``: open loop. Send times are fixed in advance
  (``t0 + i / RATE``); at each one a single-event publish is started *without*
  waiting for earlier ones, and the event's ``time`` is the scheduled send time, so a
  producer or broker that falls behind shows up as latency (no coordinated omission).

Prints one JSON line: ``{"first_publish": wall time, "last_publish": wall time, ...}``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime

import orjson

from benchmarks.apps import app, make_orders
from benchmarks.peers.common import settle_gc
from nerve.observe import default_tracing
from nerve.runtime import Client
from nerve.transport import Transport, from_url


def _use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _client(transport: Transport) -> Client:
    """A client that traces what it publishes when the ``OTEL_*`` variables ask for
    spans (as ``nerve run`` does), so the events carry their ``traceparent``."""
    client = Client(app, transport)
    client.tracing = default_tracing(f"{app.name}-producer")
    return client


async def throughput(broker: str, count: int, batch: int) -> dict[str, float]:
    events = make_orders(count)
    transport = from_url(broker)
    await transport.start()
    client = _client(transport)
    settle_gc()  # as every producer of `benchmarks compare` does before its timed part
    try:
        first = time.time()
        for start in range(0, count, batch):
            await client.publish_events(events[start : start + batch])
        last = time.time()
    finally:
        await transport.close()
        if client.tracing is not None:
            client.tracing.shutdown()
    return {"first_publish": first, "last_publish": last, "published": count}


async def latency(broker: str, rate: float, seconds: float) -> dict[str, float]:
    count = int(rate * seconds)
    events = make_orders(count)
    transport = from_url(broker)
    await transport.start()
    client = _client(transport)
    settle_gc()  # the events made up front (~13 ms a full collection) stay out of it
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    behind = 0.0
    try:
        t0 = time.time() + 0.1
        for i, event in enumerate(events):
            due = t0 + i / rate
            wait = due - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                behind = max(behind, -wait)
            timed = event.evolve(time=datetime.fromtimestamp(due, UTC))
            task = loop.create_task(client.publish_events([timed]))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), 60)
        last = time.time()
    finally:
        await transport.close()
        if client.tracing is not None:
            client.tracing.shutdown()
    return {"first_publish": t0, "last_publish": last, "published": count, "max_behind_s": behind}


def main(argv: list[str]) -> None:
    mode, broker, *rest = argv
    uvloop = _use_uvloop()
    if mode == "throughput":
        result = asyncio.run(throughput(broker, int(rest[0]), int(rest[1])))
    elif mode == "latency":
        result = asyncio.run(latency(broker, float(rest[0]), float(rest[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["uvloop"] = uvloop
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
