"""Versioned event types, dataschema, validation at both ends and upcasting, on the
embedded broker (events written by an App that only knew v1, read by one that knows v2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from nerve import App, Client, Context, DefinitionError, InvalidEvent, Runtime
from nerve.event import Event
from nerve.schema.upcast import dataschema_uri, parse_dataschema
from nerve.transport import from_url
from nerve.transport.base import DeadLetterEntry, DeadLetterQueue


class OrderV1(BaseModel):
    order_id: str
    amount: int  # whole euros


class OrderV2(BaseModel):
    order_id: str
    amount_cents: int = Field(ge=0)
    currency: str


class OrderV3(BaseModel):
    order_id: str
    amount_cents: int = Field(ge=0)
    currency: str
    channel: str


def v1_app() -> App:
    app = App("shop")
    app.event("order.created", key="order_id")(OrderV1)
    return app


def to_v2(data: dict[str, Any]) -> dict[str, Any]:
    euros = data.pop("amount")
    return {**data, "amount_cents": euros * 100, "currency": "EUR"}


def to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "channel": "web"}


async def dead_letters(rt: Runtime, group: str) -> list[DeadLetterEntry]:
    assert isinstance(rt.transport, DeadLetterQueue)
    return await rt.transport.dead_letters(group)


# -- declarations --------------------------------------------------------------------------


def test_versions_coexist_and_the_latest_is_the_default() -> None:
    app = App("shop")
    app.event("order.created", version=2)(OrderV2)
    app.event("order.created")(OrderV1)
    assert sorted(app.versions["order.created"]) == [1, 2]
    assert app.events["order.created"].model is OrderV2
    assert app.event_type("order.created").version == 2
    assert app.event_type(OrderV1).version == 1
    assert app.event_version("order.created", 1).model is OrderV1
    assert app.event_type(OrderV2).dataschema == "nerve:schema/order.created/2"
    schema = app.event_type(OrderV2).json_schema()
    assert schema["required"] == ["order_id", "amount_cents", "currency"]
    assert app.event_type(OrderV2).json_schema() is schema  # generated once


def test_version_mistakes_are_refused() -> None:
    app = App("shop")
    app.event("order.created")(OrderV1)
    with pytest.raises(DefinitionError, match="declared twice; give a new schema a new version"):
        app.event("order.created")(OrderV2)
    with pytest.raises(DefinitionError, match="version must be an integer >= 1, got 0"):
        app.event("order.created", version=0)
    with pytest.raises(DefinitionError, match="has no version 7 \\(declared versions: 1\\)"):
        app.event_version("order.created", 7)
    with pytest.raises(DefinitionError, match="is not declared"):
        app.upcaster("order.cretaed", 1, 2)
    with pytest.raises(DefinitionError, match="from a version to a later one"):
        app.upcaster("order.created", 2, 1)(to_v2)
    app.upcaster("order.created", 1, 2)(to_v2)
    with pytest.raises(DefinitionError, match="already has an upcaster from version 1"):
        app.upcaster("order.created", 1, 3)(to_v3)

    async def not_plain(data: dict[str, Any]) -> dict[str, Any]:
        return data

    with pytest.raises(DefinitionError, match="plain 'def up"):
        app.upcaster("order.created", 2, 3)(not_plain)  # type: ignore[type-var]


def test_events_carry_their_dataschema() -> None:
    app = App("shop")
    app.event("order.created")(OrderV1)
    app.event("order.created", version=2)(OrderV2)
    old = app.make_event(OrderV1(order_id="o1", amount=3))
    new = app.make_event(
        {"order_id": "o1", "amount_cents": 300, "currency": "EUR"}, type="order.created"
    )
    pinned = app.make_event({"order_id": "o1", "amount": 3}, type="order.created", version=1)
    assert old.dataschema == pinned.dataschema == "nerve:schema/order.created/1"
    assert new.dataschema == "nerve:schema/order.created/2"
    assert parse_dataschema(new.dataschema) == ("order.created", 2)
    assert parse_dataschema("https://example.com/order.json") is None
    assert dataschema_uri("a.b", 3) == "nerve:schema/a.b/3"
    assert app.declared_for(old) is app.event_type(OrderV1)
    assert app.declared_for(new.evolve(dataschema=None)) is app.event_type(OrderV2)


def test_a_function_consuming_a_model_reads_that_version() -> None:
    app = App("shop")
    app.event("order.created")(OrderV1)
    app.event("order.created", version=2)(OrderV2)

    @app.function(OrderV1)
    async def legacy(order: OrderV1, ctx: Context) -> None:
        pass

    @app.function("order.created")
    async def current(order: OrderV2, ctx: Context) -> None:
        pass

    assert app.readers(app.functions["legacy"])["order.created"].version == 1
    assert app.readers(app.functions["current"])["order.created"].version == 2


# -- the producer end ------------------------------------------------------------------------


async def test_the_producer_refuses_invalid_data_and_sends_nothing() -> None:
    app = App("shop")
    app.event("order.created", version=2)(OrderV2)
    seen: list[OrderV2] = []

    @app.function("order.created")
    async def record(order: OrderV2, ctx: Context) -> None:
        seen.append(order)

    async with Runtime(app, "memory://") as rt:
        with pytest.raises(ValidationError, match="amount_cents"):
            await rt.client.publish(
                {"order_id": "o1", "amount_cents": -5, "currency": "EUR"}, type="order.created"
            )
        bad = Event(
            type="order.created",
            source="/test",
            data={"order_id": "o1"},
            dataschema="nerve:schema/order.created/2",
        )
        with pytest.raises(InvalidEvent, match=r"does not match 'order\.created'"):
            await rt.client.publish_events([bad])
        await rt.wait_idle(timeout=10)
    assert seen == []


# -- the consumer end and upcasting ---------------------------------------------------------


async def test_v2_reads_v1_events_written_before_the_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/n.db"
    # Before the upgrade: the billing function of the v1 App is declared on the
    # embedded broker, and a producer that only knows v1 writes three orders to it.
    old = v1_app()

    @old.function("order.created")
    async def billing(order: OrderV1, ctx: Context) -> None:
        raise AssertionError("the old deployment is not running")

    transport = from_url(url)
    await transport.start()
    await transport.declare(old.subscriptions())
    producer = Client(old, transport)
    for i in range(3):
        await producer.publish(OrderV1(order_id=f"r{i}", amount=i + 1))
    await transport.close()

    # After: the App knows v2 and v3, with upcasters; billing now reads v3.
    new = App("shop")
    new.event("order.created", key="order_id", version=2)(OrderV2)
    new.event("order.created", key="order_id", version=3)(OrderV3)
    new.upcaster("order.created", 1, 2)(to_v2)
    new.upcaster("order.created", 2, 3)(to_v3)
    seen: list[OrderV3] = []

    @new.function("order.created", name="billing")
    async def billing_v3(order: OrderV3, ctx: Context) -> None:
        seen.append(order)

    async with Runtime(new, url) as rt:
        await rt.client.publish(
            OrderV3(order_id="o9", amount_cents=5, currency="USD", channel="app")
        )
        await rt.client.publish(OrderV2(order_id="o8", amount_cents=7, currency="GBP"))
        await rt.wait_idle(timeout=10)
        assert await dead_letters(rt, "billing") == []
    by_id = {o.order_id: o for o in seen}
    assert by_id["o9"] == OrderV3(order_id="o9", amount_cents=5, currency="USD", channel="app")
    assert by_id["o8"] == OrderV3(order_id="o8", amount_cents=7, currency="GBP", channel="web")
    for i in range(3):
        assert by_id[f"r{i}"] == OrderV3(
            order_id=f"r{i}", amount_cents=(i + 1) * 100, currency="EUR", channel="web"
        )


async def test_invalid_data_and_failed_upcasts_are_dead_lettered_at_once(tmp_path: Path) -> None:
    app = App("shop")
    app.event("order.created", version=2)(OrderV2)

    @app.upcaster("order.created", 1, 2)
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("amount")

    calls = 0

    @app.function("order.created")
    async def record(order: OrderV2, ctx: Context) -> None:
        nonlocal calls
        calls += 1

    async with Runtime(app, f"sqlite:///{tmp_path}/n.db") as rt:
        invalid = Event(
            type="order.created", source="/legacy", data={"order_id": "o1", "amount_cents": -1}
        )
        old = Event(
            type="order.created",
            source="/legacy",
            data={"order_id": "o2", "amount": 1},
            dataschema="nerve:schema/order.created/1",
        )
        await rt.transport.publish([invalid, old])
        await rt.wait_idle(timeout=10)
        entries = {e.event.id: e for e in await dead_letters(rt, "record") if e.event}
    assert calls == 0
    bad = entries[invalid.id].failure
    assert (bad.reason, bad.attempts) == ("invalid-data", 1)
    assert "amount_cents" in bad.message and "currency" in bad.message  # both errors named
    up = entries[old.id].failure
    assert (up.reason, up.attempts, up.error_type) == ("upcast-failed", 1, "UpcastError")
    assert "upcasting 'order.created' from version 1 to 2 failed: KeyError" in up.message
