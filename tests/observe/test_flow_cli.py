"""``nerve trace`` and ``nerve tail`` filters, on a real embedded broker file written by
a real runtime running the shop."""

from __future__ import annotations

import re

import orjson
import pytest
from typer.testing import CliRunner

from examples.shop import load
from examples.shop.app import SHIPPED_PENDING, OrderCreated, OrderLine, app
from examples.shop.chaos import with_failures
from nerve import Runtime
from nerve.cli import cli
from nerve.event import Event
from nerve.observe.flow import find_flow
from nerve.observe.terminal import compact_line, tail_filter

from .conftest import eventually


def nerve(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def shop_broker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A broker file where one good order shipped (with retries) and one poisoned
    order (an unknown SKU) was dead-lettered by inventory."""
    import asyncio

    path = tmp_path_factory.mktemp("flow") / "nerve.db"
    broker = f"sqlite:///{path}"
    good = OrderCreated(
        order_id="o-good",
        customer_id="c-1",
        lines=[OrderLine(sku="sku-001", qty=2)],
        amount_cents=1000,
    )
    poison = OrderCreated(
        order_id="o-poison",
        customer_id="c-2",
        lines=[OrderLine(sku="nope", qty=1)],
        amount_cents=500,
    )

    async def run() -> dict[str, str]:
        async with Runtime(with_failures(app, 1.0, seed=3), broker=broker, tracing=False) as rt:
            await load.seed_stock(rt.store, {"sku-001": 10})
            first = await rt.client.publish(good, subject="order/o-good")
            second = await rt.client.publish(poison, subject="order/o-poison")

            async def settled() -> bool:
                rows = await rt.store.query("SELECT state FROM orders WHERE order_id = 'o-good'")
                dead = await rt.transport.dead_letters()  # type: ignore[attr-defined]
                return bool(rows) and rows[0]["state"] == SHIPPED_PENDING and len(dead) == 1

            await eventually(settled, 30, "the good order shipped and the poison dead-lettered")
            await rt.wait_idle(timeout=20)
            return {"broker": broker, "good": first.id, "poison": second.id}

    return asyncio.run(run())


def test_trace_prints_the_causal_chain_with_outcomes(shop_broker: dict[str, str]) -> None:
    code, out, err = nerve("trace", shop_broker["good"], "--broker", shop_broker["broker"])
    assert code == 0, err
    assert f"flow {shop_broker['good']}" in out
    lines = out.splitlines()

    def line_of(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    # the chain, in causal order, each event indented under its cause
    chain = ["order.created", "stock.reserved", "payment.succeeded", "shipment.prepared"]
    rows = [line_of(t) for t in chain]
    assert rows == sorted(rows)
    indents = [len(lines[r]) - len(lines[r].lstrip(" │├└─")) for r in rows]
    assert indents == sorted(indents) and len(set(indents)) == 4
    for function in ("inventory", "payments", "shipping", "notifications", "orders"):
        assert re.search(rf"✓ {function}\s+processed after [\d.]+ (ms|s)", out), function


def test_trace_json_tree_and_the_poisoned_order(shop_broker: dict[str, str]) -> None:
    code, out, err = nerve(
        "trace", "--subject", "order/o-poison", "--broker", shop_broker["broker"], "--json"
    )
    assert code == 0, err
    (flow,) = orjson.loads(out)
    assert flow["id"] == shop_broker["poison"] and flow["children"] == []
    by_function = {o["function"]: o for o in flow["outcomes"]}
    assert by_function["inventory"]["state"] == "dead-lettered"
    assert by_function["inventory"]["reason"] == "dead-letter"
    assert "not in the warehouse" in by_function["inventory"]["error"]
    assert by_function["orders"]["state"] == "processed"

    code, out, _ = nerve(
        "trace", "--correlation", shop_broker["good"], "--broker", shop_broker["broker"], "--json"
    )
    assert code == 0
    (good,) = orjson.loads(out)
    types = []
    node = good
    while node["children"]:
        types.append(node["type"])
        node = next(c for c in node["children"] if c["type"] != "stock.released")
    types.append(node["type"])
    assert types == ["order.created", "stock.reserved", "payment.succeeded", "shipment.prepared"]


def test_trace_refuses_unclear_or_unknown_requests(shop_broker: dict[str, str]) -> None:
    code, _, err = nerve("trace", "--broker", shop_broker["broker"])
    assert code == 2 and "say which flow" in err
    code, _, err = nerve("trace", "x", "--subject", "y", "--broker", shop_broker["broker"])
    assert code == 2 and "say which flow" in err
    code, _, err = nerve("trace", "no-such-event", "--broker", shop_broker["broker"])
    assert code == 2 and "no event found for 'no-such-event'" in err


async def test_find_flow_on_a_broker_without_search_scans_its_log() -> None:
    async with Runtime(app, broker="memory://", tracing=False) as rt:
        await load.seed_stock(rt.store, {"sku-001": 5})
        order = await rt.client.publish(
            OrderCreated(
                order_id="o",
                customer_id="c",
                lines=[OrderLine(sku="sku-001", qty=1)],
                amount_cents=10,
            )
        )
        await rt.wait_idle(timeout=20)
        (root,) = await find_flow(rt.transport, rt.store, event_id=order.id)
    assert root.event.id == order.id
    assert [c.event.type for c in root.children] == ["stock.reserved"]
    assert {o.function for o in root.outcomes} == {"inventory", "orders"}


def test_tail_filters_and_compact_view(shop_broker: dict[str, str]) -> None:
    broker = shop_broker["broker"]
    code, out, err = nerve(
        "tail", "--from-start", "-n", "2", "--type", "order.*", "--broker", broker
    )
    assert code == 0, err
    assert out.count("order.created") == 2 and "stock.reserved" not in out
    code, out, _ = nerve(
        "tail", "--from-start", "-n", "1", "-s", "order/o-poison", "-c", "--broker", broker
    )
    assert code == 0
    assert out.strip().endswith(shop_broker["poison"][-8:]) and "order/o-poison" in out
    assert "{" not in out  # compact: no data
    code, out, _ = nerve(
        "tail",
        "--from-start",
        "-n",
        "1",
        "-f",
        "notifications",
        "--app",
        "examples.shop.app:app",
        "--json",
        "--broker",
        broker,
    )
    assert code == 0
    types = [orjson.loads(line)["type"] for line in out.splitlines()]
    assert types == ["shipment.prepared"]  # the only event notifications receives here
    code, _, err = nerve("tail", "-f", "notifications", "--broker", broker)
    assert code == 2 and "--app" in err
    code, _, err = nerve(
        "tail", "-f", "nobody", "--app", "examples.shop.app:app", "--broker", broker
    )
    assert code == 2 and "no function 'nobody'" in err


def test_tail_filter_predicate() -> None:
    event = Event(type="order.created", source="/t", subject="eu-1", data={})
    assert tail_filter() is None
    keep = tail_filter("order.*", "eu-*")
    assert keep is not None and keep(event)
    assert not keep(event.evolve(subject="us-1"))
    assert not keep(event.evolve(type="stock.reserved"))
    assert "order.created" in compact_line(event).plain
