"""The shop example, end to end: in-process on memory://, and a multi-process chaos run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from examples.shop import invariants, load
from examples.shop.app import (
    OUT_OF_STOCK,
    PAYMENT_DECLINED,
    SHIPPED_PENDING,
    TERMINAL_STATES,
    OrderCreated,
    app,
)
from examples.shop.chaos import fails, with_failures
from nerve import Runtime
from nerve.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[1]


def expected_outcomes(orders: list[OrderCreated], stock: dict[str, int]) -> Counter[str]:
    """The terminal states these orders must reach, worked out from their data alone.

    The rules: an order is cancelled out of stock when some line cannot be reserved; a
    reserved order is declined when its amount in cents is a multiple of 7. Only SKUs
    whose total demand exceeds their stock can run short; for the answer not to depend
    on the order in which orders are handled, such SKUs must be bought one unit at a
    time, alone, by orders that are never declined (so no stock ever comes back).
    """
    demand: Counter[str] = Counter()
    for order in orders:
        for line in order.lines:
            demand[line.sku] += line.qty
    scarce = {sku for sku, qty in demand.items() if qty > stock[sku]}
    outcomes: Counter[str] = Counter()
    left = {sku: stock[sku] for sku in scarce}
    for order in orders:
        skus = {line.sku for line in order.lines}
        if skus & scarce:
            assert len(order.lines) == 1 and order.lines[0].qty == 1, order
            assert order.amount_cents % 7 != 0, order
            (sku,) = skus
            if left[sku] > 0:
                left[sku] -= 1
                outcomes[SHIPPED_PENDING] += 1
            else:
                outcomes[OUT_OF_STOCK] += 1
        elif order.amount_cents % 7 == 0:
            outcomes[PAYMENT_DECLINED] += 1
        else:
            outcomes[SHIPPED_PENDING] += 1
    return outcomes


async def terminal_states(store: SqliteStore) -> Counter[str]:
    rows = await store.query("SELECT state, count(*) AS n FROM orders GROUP BY state")
    return Counter({row["state"]: row["n"] for row in rows})


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


# ---------------------------------------------------------------------------------------
# in-process, memory://


def test_generator_is_deterministic_and_mixes_outcomes() -> None:
    first = list(load.generate(seed=3, count=200))
    assert first == list(load.generate(seed=3, count=200))
    assert first != list(load.generate(seed=4, count=200))
    outcomes = expected_outcomes(first, load.initial_stock(200))
    assert sum(outcomes.values()) == 200
    assert set(outcomes) == set(TERMINAL_STATES), outcomes


@pytest.mark.parametrize("fail_rate", [0.0, 0.3])
async def test_hundred_orders_in_process(fail_rate: float) -> None:
    orders = list(load.generate(seed=11, count=100))
    stock = load.initial_stock(100)
    expected = expected_outcomes(orders, stock)
    assert all(expected[state] > 0 for state in TERMINAL_STATES), expected

    shop = with_failures(app, fail_rate, seed=5) if fail_rate else app
    async with Runtime(shop, broker="memory://") as rt:
        await load.seed_stock(rt.store, stock)
        placed = await load.place_orders(rt.client, orders)
        assert placed == 100

        async def all_terminal() -> bool:
            states = await terminal_states(rt.store)
            return sum(states[s] for s in TERMINAL_STATES) == 100

        await wait_for(all_terminal, 30, "100 terminal orders")
        await rt.wait_idle(timeout=30)

        assert await terminal_states(rt.store) == expected
        assert await invariants.check(rt.store) == []
        assert await rt.transport.dead_letters() == []  # type: ignore[attr-defined]
        retried = sum(r.stats.retried for r in rt.runners.values())
        if fail_rate:
            assert retried > 0
        else:
            assert retried == 0


async def test_invariants_catch_broken_state() -> None:
    """The check is not vacuous: corrupting each service's tables trips it."""
    orders = list(load.generate(seed=1, count=30))
    async with Runtime(app, broker="memory://") as rt:
        await load.seed_stock(rt.store, load.initial_stock(30))
        await load.place_orders(rt.client, orders)
        await rt.wait_idle(timeout=30)
        assert await invariants.check(rt.store) == []
        states = {r["order_id"]: r["state"] for r in await rt.store.query("SELECT * FROM orders")}
        shipped = next(o for o, s in states.items() if s == SHIPPED_PENDING)

        declined = next(o for o, s in states.items() if s == PAYMENT_DECLINED)
        corruptions = [
            (
                "UPDATE stock SET available = available - 1 WHERE sku = 'sku-mug'",
                "stock of sku-mug is not conserved",
            ),
            (
                "INSERT INTO notifications SELECT * FROM notifications "
                f"WHERE order_id = '{shipped}'",
                f"order {shipped} ({SHIPPED_PENDING}) got notifications",
            ),
            (
                f"UPDATE orders SET outcomes = 2 WHERE order_id = '{shipped}'",
                f"order {shipped} ({SHIPPED_PENDING}) saw 2 outcomes",
            ),
            (
                f"DELETE FROM shipments WHERE order_id = '{shipped}'",
                f"order {shipped} ({SHIPPED_PENDING}) has 0 shipments",
            ),
            (
                f"UPDATE reservations SET state = 'reserved' WHERE order_id = '{declined}'",
                f"order {declined} ({PAYMENT_DECLINED}): its stock was not released",
            ),
            (
                "INSERT INTO payments VALUES ('ord-nope', 'cust-0001', 100, 'succeeded')",
                "payments exist for order ord-nope, which was never placed",
            ),
            (
                f"UPDATE orders SET state = 'placed' WHERE order_id = '{shipped}'",
                f"order {shipped} (placed) never reached a terminal state",
            ),
            (
                "UPDATE stock SET available = -5, received = received - 5 - available "
                "WHERE sku = 'sku-kettle'",
                "stock of sku-kettle is negative",
            ),
        ]
        for number, (sql, expected) in enumerate(corruptions):
            unit = rt.store.unit("corrupt", f"corruption-{number}")
            await unit.execute(sql)
            await unit.commit([])
            problems = await invariants.check(rt.store)
            assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_chaos_failures_are_deterministic() -> None:
    ids = [f"evt-{n}" for n in range(10_000)]
    hits = [i for i in ids if fails(1, "payments", i, 0.1)]
    assert hits == [i for i in ids if fails(1, "payments", i, 0.1)]
    assert 800 < len(hits) < 1200
    assert hits != [i for i in ids if fails(2, "payments", i, 0.1)]
    assert not any(fails(1, "payments", i, 0.0) for i in ids)
