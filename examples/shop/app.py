"""The shop: five small services that turn an order into a shipment, or a refusal.

::

    event                 service          what it does              emits
    order.created      -> inventory        reserves every line       stock.reserved | stock.rejected
    stock.reserved     -> payments         charges the customer      payment.succeeded | .failed
    payment.succeeded  -> shipping         prepares the parcel       shipment.prepared
    payment.failed     -> inventory        releases the stock        stock.released (compensation)
    shipment.prepared  -> inventory        hands stock to shipping
    order.created and every outcome (stock.rejected, payment.failed, shipment.prepared)
                       -> orders           records the order's state
    every outcome      -> notifications    tells the customer

Terminal states of an order (the ``orders`` table):

- ``shipped-pending``              paid for; the shipment is being prepared
- ``cancelled: out of stock``      inventory could not reserve every line
- ``cancelled: payment declined``  the card was declined; the reserved stock went back

**The payment rule.** The card network here is a deterministic stand-in: a charge is
declined when its amount in cents is a multiple of 7 (see :func:`card_declines`).

**Bad orders.** An order for a SKU that is not in the warehouse can never succeed:
inventory dead-letters it (``raise DeadLetter(...)``) for an operator to look at. An
order whose data breaks its model (a quantity of 0 or less) never reaches a handler:
the runtime dead-letters it as ``invalid-data``.

Every event is keyed by ``order_id``, so each service handles one order's events in
the order they happened, while different orders proceed in parallel. Each service
keeps its state in its own tables through ``ctx.store``: those writes commit in one
transaction with the runtime's record that the event was handled, and emitted events
are published only after that commit. So although the broker delivers at least once,
every effect below happens exactly once; no table needs a UNIQUE constraint to
defend itself against duplicates (and :mod:`examples.shop.invariants` counts them).
"""

from __future__ import annotations

import time
from collections import Counter

from pydantic import BaseModel, Field

from nerve import App, Context, DeadLetter, Event, RetryPolicy
from nerve.http import Endpoints

app = App("shop")

SHIPPED_PENDING = "shipped-pending"
OUT_OF_STOCK = "cancelled: out of stock"
PAYMENT_DECLINED = "cancelled: payment declined"
TERMINAL_STATES = (SHIPPED_PENDING, OUT_OF_STOCK, PAYMENT_DECLINED)

RETRY = RetryPolicy(max_attempts=10, base=0.1, cap=5.0)
"""Transient failures (a crashed handler, a timeout) are retried with backoff: 0.1 s,
0.2 s, 0.4 s ... up to 5 s, ten attempts in all, before the event is dead-lettered."""


# ---------------------------------------------------------------------------------------
# Events. Each is a Pydantic model bound to a type name; key="order_id" keeps the events
# of one order in order.


class OrderLine(BaseModel):
    sku: str
    qty: int = Field(gt=0)


@app.event("order.created", key="order_id")
class OrderCreated(BaseModel):
    """A customer placed an order (priced by the storefront)."""

    order_id: str
    customer_id: str
    lines: list[OrderLine] = Field(min_length=1)
    amount_cents: int = Field(ge=0)


@app.event("stock.reserved", key="order_id")
class StockReserved(BaseModel):
    """Inventory set aside every line of the order."""

    order_id: str
    customer_id: str
    lines: list[OrderLine]
    amount_cents: int


@app.event("stock.rejected", key="order_id")
class StockRejected(BaseModel):
    """Inventory could not reserve the order: ``skus`` are short."""

    order_id: str
    customer_id: str
    skus: list[str]


@app.event("stock.released", key="order_id")
class StockReleased(BaseModel):
    """Inventory put an order's reservation back (the compensation of a failed payment)."""

    order_id: str
    lines: list[OrderLine]


@app.event("payment.succeeded", key="order_id")
class PaymentSucceeded(BaseModel):
    """The customer was charged ``amount_cents``."""

    order_id: str
    customer_id: str
    lines: list[OrderLine]
    amount_cents: int


@app.event("payment.failed", key="order_id")
class PaymentFailed(BaseModel):
    """The charge was declined."""

    order_id: str
    customer_id: str
    reason: str


@app.event("shipment.prepared", key="order_id")
class ShipmentPrepared(BaseModel):
    """Shipping is preparing the parcel."""

    order_id: str
    customer_id: str
    shipment_id: str
    lines: list[OrderLine]


# ---------------------------------------------------------------------------------------
# inventory: reserves stock, releases it when payment fails, hands it over to shipping.

app.store_tables(
    """
    CREATE TABLE IF NOT EXISTS stock (
        sku       TEXT PRIMARY KEY,
        received  INTEGER NOT NULL,  -- units ever put into the warehouse
        available INTEGER NOT NULL,  -- free to reserve
        reserved  INTEGER NOT NULL   -- set aside for orders not yet shipped
    );
    CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT NOT NULL,
        sku      TEXT NOT NULL,
        qty      INTEGER NOT NULL,
        state    TEXT NOT NULL       -- reserved | released | shipped
    );
    CREATE INDEX IF NOT EXISTS reservations_by_order ON reservations (order_id);
    """
)


@app.function(
    consumes=[OrderCreated, PaymentFailed, ShipmentPrepared],
    emits=[StockReserved, StockRejected, StockReleased],
    retry=RETRY,
)
async def inventory(event: OrderCreated | PaymentFailed | ShipmentPrepared, ctx: Context) -> None:
    """Reserve stock for new orders, release it when payment fails, and hand it over
    to shipping once the shipment is prepared."""
    match event:
        case OrderCreated():
            await _reserve(event, ctx)
        case PaymentFailed():
            lines = await _settle_reservation(event.order_id, "released", ctx)
            ctx.emit(StockReleased(order_id=event.order_id, lines=lines))
        case ShipmentPrepared():
            await _settle_reservation(event.order_id, "shipped", ctx)


async def _reserve(order: OrderCreated, ctx: Context) -> None:
    wanted = Counter[str]()
    for line in order.lines:
        wanted[line.sku] += line.qty
    short = []
    # Lock the order's stock rows first, in sku order: on a PostgreSQL store (READ
    # COMMITTED) two orders of one sku would otherwise both read the same `available`
    # and oversell. (SQLite stores run one unit at a time; the no-op UPDATE is portable.)
    await ctx.store.executemany(
        "UPDATE stock SET available = available WHERE sku = ?", [(sku,) for sku in sorted(wanted)]
    )
    for sku, qty in sorted(wanted.items()):
        available = await ctx.store.fetchval("SELECT available FROM stock WHERE sku = ?", (sku,))
        if available is None:
            raise DeadLetter(f"order {order.order_id}: sku {sku!r} is not in the warehouse")
        if available < qty:
            short.append(sku)
    if short:
        ctx.emit(StockRejected(order_id=order.order_id, customer_id=order.customer_id, skus=short))
        return
    await ctx.store.executemany(
        "UPDATE stock SET available = available - ?, reserved = reserved + ? WHERE sku = ?",
        [(qty, qty, sku) for sku, qty in wanted.items()],
    )
    await ctx.store.executemany(
        "INSERT INTO reservations (order_id, sku, qty, state) VALUES (?, ?, ?, 'reserved')",
        [(order.order_id, sku, qty) for sku, qty in wanted.items()],
    )
    ctx.emit(
        StockReserved(
            order_id=order.order_id,
            customer_id=order.customer_id,
            lines=order.lines,
            amount_cents=order.amount_cents,
        )
    )


async def _settle_reservation(order_id: str, state: str, ctx: Context) -> list[OrderLine]:
    """Take an order's reserved units out of ``reserved``: back to ``available`` when
    ``state`` is 'released', out of the warehouse when 'shipped'. Returns them."""
    rows = await ctx.store.fetchall(
        "SELECT sku, qty FROM reservations WHERE order_id = ? AND state = 'reserved' "
        "ORDER BY sku",  # stock rows are locked in sku order, as _reserve does
        (order_id,),
    )
    back_on_shelf = 1 if state == "released" else 0
    await ctx.store.executemany(
        "UPDATE stock SET reserved = reserved - ?, available = available + ? WHERE sku = ?",
        [(row["qty"], row["qty"] * back_on_shelf, row["sku"]) for row in rows],
    )
    await ctx.store.execute(
        "UPDATE reservations SET state = ? WHERE order_id = ? AND state = 'reserved'",
        (state, order_id),
    )
    return [OrderLine(sku=row["sku"], qty=row["qty"]) for row in rows]


# ---------------------------------------------------------------------------------------
# payments: charges the customer once the stock is reserved.

app.store_tables(
    """
    CREATE TABLE IF NOT EXISTS payments (
        order_id     TEXT NOT NULL,
        customer_id  TEXT NOT NULL,
        amount_cents INTEGER NOT NULL,
        status       TEXT NOT NULL   -- succeeded | declined
    );
    CREATE INDEX IF NOT EXISTS payments_by_order ON payments (order_id);
    """
)


def card_declines(amount_cents: int) -> bool:
    """The stand-in card network declines every amount that is a multiple of 7 cents."""
    return amount_cents % 7 == 0


@app.function(consumes=StockReserved, emits=[PaymentSucceeded, PaymentFailed], retry=RETRY)
async def payments(order: StockReserved, ctx: Context) -> None:
    """Charge the customer for an order whose stock is reserved."""
    declined = card_declines(order.amount_cents)
    await ctx.store.execute(
        "INSERT INTO payments (order_id, customer_id, amount_cents, status) VALUES (?, ?, ?, ?)",
        (
            order.order_id,
            order.customer_id,
            order.amount_cents,
            "declined" if declined else "succeeded",
        ),
    )
    if declined:
        ctx.emit(
            PaymentFailed(
                order_id=order.order_id, customer_id=order.customer_id, reason="card declined"
            )
        )
    else:
        ctx.emit(
            PaymentSucceeded(
                order_id=order.order_id,
                customer_id=order.customer_id,
                lines=order.lines,
                amount_cents=order.amount_cents,
            )
        )


# ---------------------------------------------------------------------------------------
# shipping: prepares the parcel of a paid order.

app.store_tables(
    """
    CREATE TABLE IF NOT EXISTS shipments (
        order_id    TEXT NOT NULL,
        shipment_id TEXT NOT NULL,
        units       INTEGER NOT NULL,
        prepared_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX IF NOT EXISTS shipments_by_order ON shipments (order_id);
    """
)


@app.function(consumes=PaymentSucceeded, emits=[ShipmentPrepared], retry=RETRY)
async def shipping(paid: PaymentSucceeded, ctx: Context) -> None:
    """Prepare the shipment of a paid order."""
    shipment_id = f"shp-{paid.order_id}"
    await ctx.store.execute(
        "INSERT INTO shipments (order_id, shipment_id, units, prepared_at) VALUES (?, ?, ?, ?)",
        (paid.order_id, shipment_id, sum(line.qty for line in paid.lines), time.time()),
    )
    ctx.emit(
        ShipmentPrepared(
            order_id=paid.order_id,
            customer_id=paid.customer_id,
            shipment_id=shipment_id,
            lines=paid.lines,
        )
    )


# ---------------------------------------------------------------------------------------
# notifications: tells the customer how their order ended.

app.store_tables(
    """
    CREATE TABLE IF NOT EXISTS notifications (
        order_id    TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        kind        TEXT NOT NULL,   -- the order's terminal state
        message     TEXT NOT NULL,
        sent_at     DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX IF NOT EXISTS notifications_by_order ON notifications (order_id);
    """
)


@app.function(consumes=[StockRejected, PaymentFailed, ShipmentPrepared], retry=RETRY)
async def notifications(
    event: StockRejected | PaymentFailed | ShipmentPrepared, ctx: Context
) -> None:
    """Tell the customer how their order ended (here: record the message we would send)."""
    match event:
        case StockRejected():
            kind = OUT_OF_STOCK
            message = (
                f"Sorry, {', '.join(event.skus)} ran out; order {event.order_id} is cancelled."
            )
        case PaymentFailed():
            kind = PAYMENT_DECLINED
            message = f"Your payment for order {event.order_id} was declined; it is cancelled."
        case ShipmentPrepared():
            kind = SHIPPED_PENDING
            message = f"Order {event.order_id} is paid; shipment {event.shipment_id} is on its way."
    ctx.log.debug("notify %s: %s", event.customer_id, message)
    await ctx.store.execute(
        "INSERT INTO notifications (order_id, customer_id, kind, message, sent_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (event.order_id, event.customer_id, kind, message, time.time()),
    )


# ---------------------------------------------------------------------------------------
# orders: the order's state, from placed to one terminal state.

app.store_tables(
    """
    CREATE TABLE IF NOT EXISTS orders (
        order_id    TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        state       TEXT NOT NULL,              -- placed, then one of TERMINAL_STATES
        outcomes    INTEGER NOT NULL DEFAULT 0, -- outcome events seen: must end at 1
        updated_at  DOUBLE PRECISION NOT NULL
    );
    """
)


@app.function(consumes=[OrderCreated, StockRejected, PaymentFailed, ShipmentPrepared], retry=RETRY)
async def orders(
    event: OrderCreated | StockRejected | PaymentFailed | ShipmentPrepared, ctx: Context
) -> None:
    """Track each order: ``placed`` when created, then the state its outcome says."""
    match event:
        case OrderCreated():
            await ctx.store.execute(
                "INSERT INTO orders (order_id, customer_id, state, updated_at) "
                "VALUES (?, ?, 'placed', ?) ON CONFLICT (order_id) DO NOTHING",
                (event.order_id, event.customer_id, time.time()),
            )
            return
        case StockRejected():
            state = OUT_OF_STOCK
        case PaymentFailed():
            state = PAYMENT_DECLINED
        case ShipmentPrepared():
            state = SHIPPED_PENDING
    await ctx.store.execute(
        "INSERT INTO orders (order_id, customer_id, state, outcomes, updated_at) "
        "VALUES (?, ?, ?, 1, ?) ON CONFLICT (order_id) DO UPDATE "
        "SET state = excluded.state, outcomes = orders.outcomes + 1, "
        "updated_at = excluded.updated_at",
        (event.order_id, event.customer_id, state, time.time()),
    )


# ---------------------------------------------------------------------------------------
# HTTP: POST /orders answers with the order's outcome, synchronously, while the flow
# underneath stays event-driven: the endpoint publishes order.created and waits for
# the first outcome event carrying its correlationid (every event emitted along the
# flow carries it; see docs/http.md). An order inventory dead-letters (an unknown SKU)
# has no outcome: the caller gets 504 and the order waits in the DLQ.

OUTCOME_OF = {
    "stock.rejected": OUT_OF_STOCK,
    "payment.failed": PAYMENT_DECLINED,
    "shipment.prepared": SHIPPED_PENDING,
}


def order_outcome(reply: Event) -> dict[str, str]:
    """The response of POST /orders: the order's terminal state."""
    return {"order_id": str(reply.data["order_id"]), "state": OUTCOME_OF[reply.type]}


http = Endpoints(app)
http.reply(
    "/orders",
    publishes=OrderCreated,
    replies=[StockRejected, PaymentFailed, ShipmentPrepared],
    respond=order_outcome,
    timeout=10.0,
    description="Place an order; answers with its outcome (shipped-pending, cancelled: ...)",
)
