"""Load for the shop: a deterministic order generator, stock seeding and a paced producer.

The mix of orders (``seed`` fixes every choice, so a run can be repeated exactly):

- About one order in eight is for the limited edition (:data:`LIMITED_SKU`): one unit,
  at a price that is never declined. The warehouse holds only a few of them (see
  :func:`initial_stock`), so once they are gone the rest are cancelled out of stock:
  whatever order the orders are handled in, exactly ``max(0, limited orders - limited
  stock)`` of them are cancelled.
- The others buy one to three different regular products, one to three units each.
  Regular stock covers every order, so they are never short; the payment rule of
  :mod:`examples.shop.app` (amounts that are a multiple of 7 cents are declined) cancels
  about one in seven of them.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

from examples.shop.app import OrderCreated, OrderLine
from nerve import Client
from nerve.event import uuid7
from nerve.store.sqlite import SqliteStore

CATALOGUE: dict[str, int] = {
    "sku-kettle": 2_499,
    "sku-mug": 899,
    "sku-teapot": 3_450,
    "sku-green-tea": 1_275,
    "sku-black-tea": 1_150,
    "sku-strainer": 640,
}
"""Regular products and their prices in cents."""

LIMITED_SKU = "sku-golden-teapot"
LIMITED_PRICE = 4_999
"""4999 cents is not a multiple of 7: a limited-edition order is never declined."""

LIMITED_SHARE = 0.125
MAX_QTY = 3


def price(sku: str) -> int:
    return LIMITED_PRICE if sku == LIMITED_SKU else CATALOGUE[sku]


def initial_stock(orders: int | None) -> dict[str, int]:
    """The warehouse for a run of ``orders`` orders (None: an endless run).

    Regular products: enough for every order to buy ``MAX_QTY`` of each. The limited
    edition: one unit per twenty orders (a hundred for an endless run).
    """
    regular = 1_000_000 if orders is None else MAX_QTY * max(1, orders)
    limited = 100 if orders is None else max(1, orders // 20)
    return {**dict.fromkeys(CATALOGUE, regular), LIMITED_SKU: limited}


def generate(seed: int = 7, count: int | None = None) -> Iterator[OrderCreated]:
    """``count`` orders (None: endless), the same ones for the same ``seed``."""
    rng = random.Random(seed)
    numbers = itertools.count(1) if count is None else range(1, count + 1)
    for n in numbers:
        customer_id = f"cust-{rng.randrange(1, 1000):04d}"
        if rng.random() < LIMITED_SHARE:
            lines = [OrderLine(sku=LIMITED_SKU, qty=1)]
        else:
            skus = rng.sample(sorted(CATALOGUE), rng.randint(1, 3))
            lines = [OrderLine(sku=sku, qty=rng.randint(1, MAX_QTY)) for sku in skus]
        yield OrderCreated(
            order_id=f"ord-{n:07d}",
            customer_id=customer_id,
            lines=lines,
            amount_cents=sum(price(line.sku) * line.qty for line in lines),
        )


async def seed_stock(store: SqliteStore, stock: Mapping[str, int]) -> None:
    """Receive ``stock`` into the warehouse (what a deployment's data import would do).

    Writes the inventory's ``stock`` table in one transaction; call it after the store
    has been started with the app's tables.
    """
    unit = store.unit("seed_stock", uuid7())
    try:
        await unit.executemany(
            "INSERT INTO stock (sku, received, available, reserved) VALUES (?, ?, ?, 0) "
            "ON CONFLICT (sku) DO UPDATE SET received = stock.received + excluded.received, "
            "available = stock.available + excluded.available",
            [(sku, qty, qty) for sku, qty in stock.items()],
        )
    except BaseException:
        await unit.rollback()
        raise
    await unit.commit([])


async def place_orders(
    client: Client,
    orders: Iterable[OrderCreated],
    *,
    rate: float | None = None,
    admit: Callable[[], Awaitable[None]] | None = None,
    on_placed: Callable[[OrderCreated], None] | None = None,
    batch: int = 50,
) -> int:
    """Publish ``orders``, at most ``rate`` per second (None: as fast as the broker
    takes them, in concurrent batches of ``batch``). Returns how many were placed.

    ``admit`` is awaited before each batch: a caller can make it wait to apply
    backpressure. ``on_placed`` is called for each order once the broker has it.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 orders per second, got {rate}")
    size = batch if rate is None else max(1, min(batch, int(rate / 20)))
    placed = 0
    next_at = time.monotonic()
    for chunk in _chunks(orders, size):
        if admit is not None:
            await admit()
        if rate is not None:
            now = time.monotonic()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at = max(next_at, now) + len(chunk) / rate
        await asyncio.gather(*(client.publish(order) for order in chunk))
        placed += len(chunk)
        if on_placed is not None:
            for order in chunk:
                on_placed(order)
    return placed


def _chunks(items: Iterable[OrderCreated], size: int) -> Iterator[list[OrderCreated]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
