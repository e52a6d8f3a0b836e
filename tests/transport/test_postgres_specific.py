"""PostgreSQL-specific behaviour of ``postgresql://`` beyond the conformance suite:
URL options, error translation, ordering and work sharing across connections, log
pruning, and the shop example running on it."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from examples.shop import invariants, load
from examples.shop.app import TERMINAL_STATES, app
from examples.shop.chaos import with_failures
from nerve import Event, Runtime
from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError, TransportError
from nerve.transport import from_url
from nerve.transport.postgres import PostgresConfig, PostgresTransport

from .adapter_postgres import make_url

SOON = 10.0


def make(n: int, key: str | None = None) -> Event:
    extensions = {"partitionkey": key} if key else {}
    return Event(type="order.created", source="/pg", data={"n": n}, extensions=extensions)


# -- configuration and errors (no server needed) ----------------------------------------


def test_url_options_are_parsed_into_one_config() -> None:
    config = PostgresConfig.from_url(
        "postgresql://u:secret@db.example:6543/shop?schema=orders&visibility_timeout=5"
        "&max_payload=2048&poll_interval=0.5&pool_size=3&sslmode=require"
    )
    assert (config.host, config.port, config.schema) == ("db.example", 6543, "orders")
    assert (config.visibility_timeout, config.max_payload) == (5.0, 2048)
    assert (config.poll_interval, config.pool_size) == (0.5, 3)
    assert config.dsn == "postgresql://u:secret@db.example:6543/shop?sslmode=require"
    transport = from_url("postgresql://u@h/db")
    assert isinstance(transport, PostgresTransport)
    assert transport.config.schema == "nerve" and transport.features.max_payload == 1 << 20


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("visiblity_timeout=3", "unknown option(s) visiblity_timeout; known: application_name"),
        ("schema=Bad-Name", "schema must be a lower-case SQL name"),
        ("pool_size=many", "option pool_size must be a number"),
        ("visibility_timeout=0", "option visibility_timeout must be positive"),
    ],
)
def test_bad_options_are_refused_naming_them(query: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PostgresConfig.from_url(f"postgresql://u:hunter2@h/db?{query}")
    assert says in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_an_unreachable_server_is_broker_unavailable_without_the_password() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = from_url(f"postgresql://u:hunter2@127.0.0.1:{port}/db")
    assert "hunter2" not in repr(transport)
    with pytest.raises(BrokerUnavailable) as caught:
        await transport.start()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "hunter2" not in message
    assert "\n" not in message
    with pytest.raises(TransportError, match="not started"):
        await transport.publish([make(1)])


# -- against the server -------------------------------------------------------------------


async def test_a_key_waits_for_its_head_across_connections(tmp_path: Path) -> None:
    url = make_url(tmp_path)
    one, two = from_url(url), from_url(url)
    await one.start()
    await two.start()
    try:
        sub = Subscription("g", ("order.created",))
        await one.declare([sub])
        await one.publish([make(0, "k"), make(1, "k"), make(2, "other")])
        (head, other) = await one.consumer(sub).fetch(10, SOON)
        assert [head.event.data["n"], other.event.data["n"]] == [0, 2]
        elsewhere = two.consumer(sub)
        assert list(await elsewhere.fetch(10, 0.3)) == []  # 1 waits for 0, held by `one`
        await head.nack(0)
        (again,) = await elsewhere.fetch(10, SOON)  # the retry goes first, anywhere
        assert again.event.data["n"] == 0 and again.attempt == 2
        await again.ack()
        (following,) = await elsewhere.fetch(10, SOON)
        assert following.event.data["n"] == 1
        await following.ack()
        await other.ack()
    finally:
        await one.close()
        await two.close()


async def test_concurrent_consumers_on_several_connections_get_each_event_once(
    tmp_path: Path,
) -> None:
    url = make_url(tmp_path)
    transports = [from_url(url) for _ in range(3)]
    for transport in transports:
        await transport.start()
    try:
        sub = Subscription("g", ("order.created",), ordered=False)
        await transports[0].declare([sub])
        sent = [make(i) for i in range(600)]
        seen: list[int] = []
        deadline = time.monotonic() + 30

        async def work(consumer_of: int) -> None:
            consumer = transports[consumer_of % 3].consumer(sub)
            while len(seen) < len(sent) and time.monotonic() < deadline:
                batch = await consumer.fetch(25, 0.2)
                seen.extend(d.event.data["n"] for d in batch)
                assert await consumer.ack_many(batch) == []

        workers = [asyncio.create_task(work(i)) for i in range(6)]
        for start in range(0, len(sent), 100):
            await transports[start // 100 % 3].publish(sent[start : start + 100])
        await asyncio.gather(*workers)
        assert sorted(seen) == list(range(600))
    finally:
        for transport in transports:
            await transport.close()


async def test_prune_log_keeps_what_a_delivery_still_needs(tmp_path: Path) -> None:
    transport = from_url(make_url(tmp_path))
    assert isinstance(transport, PostgresTransport)
    await transport.start()
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        await transport.publish([make(0), make(1), make(2)])
        consumer = transport.consumer(sub)
        first = (await consumer.fetch(1, SOON))[0]
        await first.ack()
        head, *_ = await transport.read_log(None, 0)
        assert head[0] >= 3
        assert await transport.prune_log(older_than=0) == 1  # the acked one only
        rest = await consumer.fetch(10, SOON)
        assert [d.event.data["n"] for d in rest] == [1, 2]
        assert await consumer.ack_many(rest) == []
        assert await transport.prune_log(older_than=0) == 2
        assert await transport.read_log(0, 10) == []
    finally:
        await transport.close()


@pytest.mark.slow
async def test_hundred_shop_orders_with_failures_on_postgres(tmp_path: Path) -> None:
    orders = list(load.generate(seed=11, count=100))
    shop = with_failures(app, 0.3, seed=5)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    async with Runtime(shop, broker=make_url(tmp_path), store=store) as rt:
        await load.seed_stock(rt.store, load.initial_stock(100))
        assert await load.place_orders(rt.client, orders) == 100
        deadline = time.monotonic() + 60
        while True:
            rows = await rt.store.query("SELECT state, count(*) AS n FROM orders GROUP BY state")
            if sum(r["n"] for r in rows if r["state"] in TERMINAL_STATES) == 100:
                break
            assert time.monotonic() < deadline, f"orders not terminal in 60 s: {rows}"
            await asyncio.sleep(0.05)
        await rt.wait_idle(timeout=30)
        assert await invariants.check(rt.store) == []
        assert await rt.transport.dead_letters() == []  # type: ignore[attr-defined]
        assert sum(r.stats.retried for r in rt.runners.values()) > 0


async def test_connections_killed_by_the_server_are_replaced(tmp_path: Path) -> None:
    """The server ends every connection of one transport (failover, idle killer): the
    pool reconnects, and the LISTEN connection is re-opened, so publishes from
    elsewhere wake its consumers again without waiting for the (long) poll."""
    base = make_url(tmp_path)
    name = "nerve_" + base.rpartition("schema=")[2]
    victim = from_url(f"{base}&poll_interval=30&application_name={name}")
    publisher = from_url(base)
    await victim.start()
    await publisher.start()
    try:
        sub = Subscription("g", ("order.created",))
        await publisher.declare([sub])
        consumer = victim.consumer(sub)
        assert isinstance(publisher, PostgresTransport)
        assert publisher._pool is not None
        killed = await publisher._pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            name,
        )
        assert killed >= 2  # the pool's connection and the LISTEN connection
        deadline = time.monotonic() + 20
        n = 0
        while True:
            assert time.monotonic() < deadline, "no wake-up after the connections were killed"
            n += 1
            try:  # settle what earlier rounds left, so only a wake-up can deliver event n
                await consumer.ack_many(await consumer.fetch(100, 0))
                waiting = asyncio.create_task(consumer.fetch(10, 3.0))
                await asyncio.sleep(0.1)
                published_at = time.monotonic()
                await publisher.publish([make(n)])
                got = await waiting
                woken = time.monotonic() - published_at < 1.0
            except BrokerUnavailable:
                continue  # a pooled connection that died under a query: the next is fresh
            assert await consumer.ack_many(got) == []
            if woken and [d.event.data["n"] for d in got] == [n]:
                break  # woken by NOTIFY (the poll is 30 s, the fetch 3 s)
    finally:
        await victim.close()
        await publisher.close()
