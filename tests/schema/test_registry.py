"""The schema registry on SQLite (a file, as beside the embedded broker) and PostgreSQL,
and the Runtime registering its App's schemas at start."""

from __future__ import annotations

import asyncio
import getpass
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from nerve import App, ConfigError, Context, Runtime, StoreError
from nerve.schema import Compatibility, IncompatibleSchema
from nerve.schema.registry import (
    SchemaRegistry,
    default_registry_url,
    registry_from_url,
)
from tests.transport.conftest import require_server

PG_HOST = os.environ.get("NERVE_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("NERVE_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("NERVE_TEST_PGUSER", "postgres" if getpass.getuser() == "root" else "")


def obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


V1 = obj({"order_id": {"type": "string"}, "amount": {"type": "integer"}}, ("order_id", "amount"))
V2 = obj(
    {
        "order_id": {"type": "string"},
        "amount": {"type": "integer"},
        "note": {"type": "string"},
    },
    ("order_id", "amount"),
)
BROKEN = obj({"order_id": {"type": "string"}, "amount": {"type": "string"}}, ("order_id", "amount"))


def pg_url(query: str = "") -> str:
    require_server("PostgreSQL", PG_HOST, PG_PORT)
    user = f"{PG_USER}@" if PG_USER else ""
    return f"postgresql://{user}{PG_HOST}:{PG_PORT}/test" + (f"?{query}" if query else "")


async def _pg(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(pg_url())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres", "postgres-schema"])
async def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/schema.db"
        return
    name = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "postgres":  # tables nerve-style prefixed in the search path
        yield pg_url(f"prefix={name}_")
        await _pg(f"DROP TABLE IF EXISTS {name}_schemas, {name}_schema_modes")
    else:  # in a schema of their own, as beside the PostgreSQL broker
        yield pg_url(f"schema={name}&visibility_timeout=5")
        await _pg(f"DROP SCHEMA IF EXISTS {name} CASCADE")


async def test_register_lookup_list_and_refuse(registry_url: str) -> None:
    async with registry_from_url(registry_url) as registry:
        first = await registry.register("order.created", 1, V1)
        assert first.created and first.entry.version == 1 and first.entry.revision == 1
        again = await registry.register("order.created", 1, V1)
        assert not again.created and again.entry == first.entry
        second = await registry.register("order.created", 2, V2)
        assert second.created and second.entry.seq == 2
        with pytest.raises(IncompatibleSchema) as caught:
            await registry.register("order.created", 3, BROKEN)
        error = caught.value
        assert (error.subject, error.version, error.mode) == ("order.created", 3, "BACKWARD")
        assert [(f.path, f.rule, f.version) for f in error.findings] == [
            ("/amount", "type-narrowed", 2)
        ]
        assert "/amount  [type-narrowed, backward, conflicts with version 2]" in error.diff()
        assert await registry.subjects() == ["order.created"]
        assert [v.version for v in await registry.versions("order.created")] == [1, 2]
        latest = await registry.lookup("order.created")
        assert latest is not None and latest.schema == V2
        assert (await registry.lookup("order.created", 1)).schema == V1  # type: ignore[union-attr]
        assert await registry.lookup("order.created", 9) is None
        assert await registry.lookup("nothing.here") is None

    # durable: a new registry on the same storage sees it all
    async with registry_from_url(registry_url) as reopened:
        assert [v.version for v in await reopened.versions("order.created")] == [1, 2]


async def test_modes_per_subject_and_forcing(registry_url: str) -> None:
    async with registry_from_url(registry_url) as registry:
        await registry.register("a", 1, V1)
        await registry.set_mode("a", "NONE")
        assert await registry.mode("a") is Compatibility.NONE
        assert (await registry.register("a", 2, BROKEN)).created  # NONE checks nothing
        await registry.register("b", 1, V1)
        assert await registry.mode("b") is Compatibility.BACKWARD  # the default
        forced = await registry.register("b", 2, BROKEN, allow_incompatible=True)
        assert forced.created and forced.entry.forced
        assert [f.rule for f in forced.findings] == ["type-narrowed"]
        await registry.set_mode("b", Compatibility.FULL)
        with pytest.raises(IncompatibleSchema, match="breaks FULL"):
            await registry.register("b", 3, V2)  # v2 (BROKEN) cannot read v3's integer amount


async def test_revisions_of_one_version(registry_url: str) -> None:
    async with registry_from_url(registry_url) as registry:
        await registry.register("order.created", 1, V1)
        revised = await registry.register("order.created", 1, V2)  # a compatible edit
        assert (revised.entry.version, revised.entry.revision) == (1, 2)
        with pytest.raises(IncompatibleSchema, match="/amount: type-narrowed"):
            await registry.register("order.created", 1, BROKEN)
        history = await registry.history("order.created")
        assert [(e.version, e.revision) for e in history] == [(1, 1), (1, 2)]
        assert (await registry.lookup("order.created", 1)).schema == V2  # type: ignore[union-attr]


async def test_transitive_mode_refuses_what_the_latest_hides(registry_url: str) -> None:
    v1 = obj({"a": {"type": "integer"}}, ("a",))
    v2 = obj({})
    v3 = obj({"a": {"type": "string"}})
    async with registry_from_url(registry_url) as registry:
        await registry.set_mode("t", "BACKWARD_TRANSITIVE")
        await registry.register("t", 1, v1)
        await registry.register("t", 2, v2)
        with pytest.raises(IncompatibleSchema) as caught:
            await registry.register("t", 3, v3)
        assert [(f.path, f.version) for f in caught.value.findings] == [("/a", 1)]
        await registry.set_mode("t", "BACKWARD")
        assert (await registry.register("t", 3, v3)).created


async def test_concurrent_writers_each_get_their_own_entry(registry_url: str) -> None:
    registries = [registry_from_url(registry_url) for _ in range(4)]
    for registry in registries:
        await registry.storage.start()
    try:
        results = await asyncio.gather(
            *(r.register("c", 1 + i, V1 if i == 0 else V2) for i, r in enumerate(registries))
        )
        assert sum(r.created for r in results) == 4
        history = await registries[0].history("c")
        assert sorted(e.seq for e in history) == [1, 2, 3, 4]
    finally:
        for registry in registries:
            await registry.storage.close()


def test_registry_urls() -> None:
    assert default_registry_url("sqlite:///.nerve/store.db") == "sqlite:///.nerve/schema.db"
    beside = default_registry_url(
        "sqlite:///.nerve/store.db", "postgresql://u@db/x?schema=shop&a=1"
    )
    assert beside == "postgresql://u@db/x?schema=shop"
    assert (
        default_registry_url("memory://", "postgresql://u@db/x")
        == "postgresql://u@db/x?schema=nerve"
    )
    assert default_registry_url("memory://", "nats://127.0.0.1:4222") == "memory://"
    with pytest.raises(ConfigError, match="registry schema 'Bad-Name'"):
        registry_from_url("postgresql://u@db/x?schema=Bad-Name")
    assert default_registry_url("memory://") == "memory://"
    with pytest.raises(ConfigError, match="registry URL 'redis://x'"):
        registry_from_url("redis://x")
    with pytest.raises(ConfigError, match="use sqlite:///relative"):
        registry_from_url("sqlite://host/x.db")
    assert isinstance(registry_from_url("memory://"), SchemaRegistry)


async def test_an_unusable_registry_path_is_a_store_error() -> None:
    with pytest.raises(StoreError, match=r"schema registry \(/dev/null/schema\.db\)"):
        async with registry_from_url("sqlite:////dev/null/schema.db"):
            pass


# -- the Runtime registers its App at start --------------------------------------------


class OrderV1(BaseModel):
    order_id: str
    amount: int


class OrderV2(BaseModel):
    order_id: str
    amount: str  # a breaking change


def _app(model: type[BaseModel], version: int = 1, upcast: bool = False) -> App:
    app = App("shop")
    app.event("order.created", version=version)(model)
    if upcast:
        app.upcaster("order.created", 1, version)(lambda d: {**d, "amount": str(d["amount"])})

    @app.function("order.created")
    async def record(order: Any, ctx: Context) -> None:
        pass

    return app


async def test_runtime_refuses_to_start_on_an_incompatible_change(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/n.db"
    async with Runtime(_app(OrderV1), url):
        pass
    assert (tmp_path / "schema.db").exists()  # beside the broker and the store
    with pytest.raises(IncompatibleSchema, match=r"version 1 of 'order.created' breaks BACKWARD"):
        async with Runtime(_app(OrderV2), url):
            raise AssertionError("must not start")
    # a new version with an upcaster from v1 takes care of old events: it may break
    async with Runtime(_app(OrderV2, version=2, upcast=True), url):
        pass
    # told to: it starts, and the forced entry is on record
    async with Runtime(_app(OrderV1, version=3), url, allow_incompatible=True):
        pass
    async with registry_from_url(f"sqlite:///{tmp_path}/schema.db") as registry:
        latest = await registry.lookup("order.created")
    assert latest is not None and latest.version == 3 and latest.forced


async def test_on_the_postgresql_broker_the_registry_lives_beside_it() -> None:
    schema = f"t{uuid.uuid4().hex[:10]}"
    broker = pg_url(f"schema={schema}")
    try:
        async with Runtime(_app(OrderV1), broker=broker, store="memory://"):
            pass
        async with registry_from_url(pg_url(f"schema={schema}")) as registry:
            assert [v.version for v in await registry.versions("order.created")] == [1]
        with pytest.raises(IncompatibleSchema, match="breaks BACKWARD"):
            async with Runtime(_app(OrderV2), broker=broker, store="memory://"):
                raise AssertionError("must not start")
    finally:
        await _pg(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def test_registries_starting_at_once_on_new_postgresql_tables_all_start(
    registry_url: str,
) -> None:
    """Worker processes of one app open the registry together: creating its tables must
    not race (``CREATE TABLE IF NOT EXISTS`` in concurrent sessions can fail on the
    type's unique index)."""
    registries = [registry_from_url(registry_url) for _ in range(6)]
    await asyncio.gather(*(r.__aenter__() for r in registries))
    try:
        registered = await registries[0].register("order.created", 1, V1)
        assert registered.created
        for other in registries[1:]:
            found = await other.lookup("order.created", 1)
            assert found is not None and found.schema == V1
    finally:
        for registry in registries:
            await registry.__aexit__(None, None, None)
