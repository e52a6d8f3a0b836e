"""What must hold in the shop once it is idle, whatever crashed, retried or ran twice.

:func:`check` reads every service's tables and returns the invariants that are
violated (an empty list when all hold):

- Stock is never negative, and it is conserved: for every SKU, the units received
  equal the units available plus those reserved for open orders plus those shipped;
  the ``reserved`` counter equals the reservations held.
- Every order ends in exactly one terminal state, having seen exactly one outcome.
- Each order gets exactly one notification, the one for its outcome.
- A rejected order has no reservation, payment or shipment.
- A declined order paid nothing and got its stock back (every reservation released);
  a shipped order paid once, has one shipment and its stock left the warehouse.
- Each payment followed the card rule, and nothing exists for an unknown order.

Services update their tables independently (the broker carries the news from one to
the next), so cross-service invariants hold once nothing is in flight: run the check
when the shop is idle.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection

from examples.shop.app import (
    OUT_OF_STOCK,
    PAYMENT_DECLINED,
    SHIPPED_PENDING,
    TERMINAL_STATES,
    card_declines,
)
from nerve.store.sqlite import SqliteStore


async def check(store: SqliteStore, *, dead_lettered: Collection[str] = ()) -> list[str]:
    """The violated invariants, as sentences; empty if every invariant holds.

    ``dead_lettered`` names orders whose ``order.created`` sits in a dead-letter queue:
    they are allowed to stay open, but must have had no effect anywhere.
    """
    problems: list[str] = []
    problems += await _stock(store)

    orders = {
        r["order_id"]: (r["state"], r["outcomes"])
        for r in await store.query("SELECT order_id, state, outcomes FROM orders")
    }
    reservations: dict[str, Counter[str]] = defaultdict(Counter)
    for r in await store.query("SELECT order_id, state FROM reservations"):
        reservations[r["order_id"]][r["state"]] += 1
    payments: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for r in await store.query("SELECT order_id, status, amount_cents FROM payments"):
        payments[r["order_id"]].append((r["status"], r["amount_cents"]))
    shipments = Counter(r["order_id"] for r in await store.query("SELECT order_id FROM shipments"))
    notes: dict[str, list[str]] = defaultdict(list)
    for r in await store.query("SELECT order_id, kind FROM notifications ORDER BY kind"):
        notes[r["order_id"]].append(r["kind"])

    for name, records in (
        ("reservations", reservations),
        ("payments", payments),
        ("shipments", shipments),
        ("notifications", notes),
    ):
        for order_id in sorted(set(records) - set(orders)):
            problems.append(f"{name} exist for order {order_id}, which was never placed")

    for order_id, (state, outcomes) in sorted(orders.items()):
        held = reservations.get(order_id, Counter())
        paid = payments.get(order_id, [])
        shipped = shipments.get(order_id, 0)
        told = notes.get(order_id, [])
        where = f"order {order_id} ({state})"

        if state not in TERMINAL_STATES:
            if order_id not in dead_lettered:
                problems.append(f"{where} never reached a terminal state")
            elif held or paid or shipped or told:
                problems.append(f"{where} was dead-lettered but has effects")
            continue
        if outcomes != 1:
            problems.append(f"{where} saw {outcomes} outcomes, not exactly one")
        if told != [state]:
            problems.append(f"{where} got notifications {told}, not exactly one {state!r}")
        for status, amount in paid:
            if (status == "declined") != card_declines(amount):
                problems.append(f"{where}: a payment of {amount} cents was {status}")

        if state == OUT_OF_STOCK:
            if paid:
                problems.append(f"{where} was rejected for stock but has a payment")
            if held or shipped:
                problems.append(f"{where} was rejected for stock but holds stock or a shipment")
        elif state == PAYMENT_DECLINED:
            if [status for status, _ in paid] != ["declined"]:
                problems.append(f"{where} has payments {paid}, not exactly one declined")
            if not held or set(held) != {"released"}:
                problems.append(f"{where}: its stock was not released ({dict(held)})")
            if shipped:
                problems.append(f"{where} has a shipment")
        elif state == SHIPPED_PENDING:
            if [status for status, _ in paid] != ["succeeded"]:
                problems.append(f"{where} has payments {paid}, not exactly one succeeded")
            if not held or set(held) != {"shipped"}:
                problems.append(f"{where}: its stock was not handed to shipping ({dict(held)})")
            if shipped != 1:
                problems.append(f"{where} has {shipped} shipments, not exactly one")
    return problems


async def _stock(store: SqliteStore) -> list[str]:
    problems = []
    held: dict[tuple[str, str], int] = {
        (r["sku"], r["state"]): r["qty"]
        for r in await store.query(
            "SELECT sku, state, sum(qty) AS qty FROM reservations GROUP BY sku, state"
        )
    }
    for r in await store.query("SELECT sku, received, available, reserved FROM stock"):
        sku, received, available, reserved = r["sku"], r["received"], r["available"], r["reserved"]
        open_ = held.get((sku, "reserved"), 0)
        shipped = held.get((sku, "shipped"), 0)
        if available < 0 or reserved < 0:
            problems.append(
                f"stock of {sku} is negative: {available} available, {reserved} reserved"
            )
        if reserved != open_:
            problems.append(f"stock of {sku}: {reserved} counted as reserved, {open_} held")
        if received != available + open_ + shipped:
            problems.append(
                f"stock of {sku} is not conserved: received {received} != available "
                f"{available} + reserved {open_} + shipped {shipped}"
            )
    return problems
