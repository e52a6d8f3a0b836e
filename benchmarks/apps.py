"""The benchmark's nerve apps: one ``order.placed`` event type and a no-op function.

- ``app``: ``sink`` consumes ``order.placed`` and returns at once (throughput).
- ``latency_app``: ``probe`` consumes ``order.placed`` and records, per event, the
  handler's start wall time minus the event's ``time`` (which the producer sets to
  the *scheduled* send time, so a late producer shows up as latency). Once it has
  seen ``NERVE_BENCH_EXPECT`` events it writes the latencies (seconds, JSON list) to
  ``NERVE_BENCH_OUT``.

Orders are keyed by ``order_id`` (the partition key), as a real order service would
declare them, so the broker's per-key ordering path is part of what is measured.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from nerve import App
from nerve.event import Event, uuid7

ORDER_TYPE = "order.placed"

BENCH_ORDERED = os.environ.get("NERVE_BENCH_ORDERED", "") == "1"
"""Whether the nerve functions the raw clients and the peers are measured against keep
per-key order (``$NERVE_BENCH_ORDERED=1``, ``--ordered``). By default they do not
(``ordered=False``): neither the raw clients nor the peers keep it, and on Redis an
ordered function costs the server about three times as much an event."""


class Customer(BaseModel):
    id: str
    email: str


class Line(BaseModel):
    sku: str
    qty: int
    price: str


class OrderPlaced(BaseModel):
    order_id: str
    customer: Customer
    lines: list[Line]
    currency: str
    shipping: str
    total: str


def _declare(app: App) -> None:
    app.event(ORDER_TYPE, key="order_id", description="A customer placed an order.")(OrderPlaced)


app = App("bench", source="/bench/orders")
_declare(app)


@app.function(consumes=ORDER_TYPE, concurrency=100)
async def sink(order: OrderPlaced, ctx: Any) -> None:
    """Does nothing: the cost measured is nerve's, not the handler's."""


latency_app = App("bench-latency", source="/bench/orders")
_declare(latency_app)

_latencies: list[float] = []
_expect = int(os.environ.get("NERVE_BENCH_EXPECT", "0") or 0)
_out = os.environ.get("NERVE_BENCH_OUT", "")


@latency_app.function(consumes=ORDER_TYPE, concurrency=100)
async def probe(order: OrderPlaced, ctx: Any) -> None:
    """Records handler start minus the event's (scheduled) time."""
    started = time.time()
    sent = ctx.event.time
    if sent is not None:
        _latencies.append(started - sent.timestamp())
    if _out and len(_latencies) == _expect:
        dump_latencies(_out, _latencies)


def dump_latencies(path: str, values: list[float]) -> None:
    """Write ``values`` to ``path`` atomically (the harness waits for the file)."""
    tmp = Path(path + ".tmp")
    tmp.write_bytes(orjson.dumps(values))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------
# Realistic order payloads

_PRODUCTS = [
    ("SKU-10042", "18.90"),
    ("SKU-20417", "24.50"),
    ("SKU-30991", "4.20"),
    ("SKU-41230", "59.00"),
    ("SKU-55801", "21.75"),
    ("SKU-60077", "32.10"),
]
_NAMES = ["ada.lovelace", "grace.hopper", "alan.turing", "edsger.dijkstra", "barbara.liskov"]


def order_payload(rng: random.Random) -> dict[str, Any]:
    """One order as a JSON-ready dict: 2 line items, amounts as decimal strings."""
    lines = []
    cents = 495  # shipping
    for sku, price in rng.sample(_PRODUCTS, 2):
        qty = rng.randint(1, 4)
        cents += qty * int(price.replace(".", ""))
        lines.append({"sku": sku, "qty": qty, "price": price})
    return {
        "order_id": uuid7(),
        "customer": {
            "id": f"cus_{rng.randrange(10**9):09d}",
            "email": rng.choice(_NAMES) + "@example.com",
        },
        "lines": lines,
        "currency": "EUR",
        "shipping": "4.95",
        "total": f"{cents / 100:.2f}",
    }


def make_orders(count: int, seed: int = 7) -> list[Event]:
    """``count`` ready-made ``order.placed`` events (validated, partition-keyed)."""
    rng = random.Random(seed)
    return [app.make_event(order_payload(rng), type=ORDER_TYPE) for _ in range(count)]
