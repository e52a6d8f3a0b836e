"""PostgreSQL-specific behaviour of ``postgresql://`` beyond the conformance suite:
URL options, error translation, ordering and work sharing across connections, log
pruning, the shop example running on it, and the store in the same database, whose
commits ack the broker's deliveries in the same transaction."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from examples.shop import invariants, load
from examples.shop.app import TERMINAL_STATES, app
from examples.shop.chaos import with_failures
from nerve import App, Event, Runtime
from nerve.app import Subscription
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    LeaseLost,
    StoreError,
    TransportError,
)
from nerve.runtime.context import Context
from nerve.store import default_store_url, store_from_url
from nerve.store.postgres import PostgresStore
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


async def _generic_plan(conn: Any, sql: str, types: str, args: str) -> str:
    """The plan PostgreSQL keeps for a prepared statement run many times (asyncpg
    prepares every statement): parameters are not constants in it."""
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE probe({types}) AS {sql}")
    try:
        return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN (VERBOSE) EXECUTE probe({args})"))
    finally:
        await conn.execute("DEALLOCATE probe")
        await conn.execute("RESET plan_cache_mode")


async def test_pruning_reads_the_log_by_its_order_not_whole(tmp_path: Path) -> None:
    """Every 30 s each process prunes the log; it finds what it may delete through the
    primary keys (the first row within the retention, each group's oldest delivery),
    so its cost follows what it deletes, not how long the log is. It once read every
    pending delivery, and every logged row below the oldest of them (with consumers that
    keep up: the whole retained log), on every prune."""
    transport = from_url(make_url(tmp_path))
    assert isinstance(transport, PostgresTransport)
    await transport.start()
    try:
        await transport.declare([Subscription("g", ("order.created",))])
        assert transport._pool is not None
        s = transport.config.schema
        async with transport._pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {s}.log (event_id, type, published_at, body) "
                "SELECT 'e' || n, 't', extract(epoch FROM now()) - 99999.5 + n, '\\x00' "
                "FROM generate_series(1, 50000) AS n"
            )
            await conn.execute(f"ANALYZE {s}.log")
            plan = await _generic_plan(conn, transport._sql.prune, "float8", "86400")
        await transport.publish([make(0)])  # pending, after the old rows
        assert f"Seq Scan on {s}.log" not in plan, plan
        assert f"Seq Scan on {s}.deliveries" not in plan, plan
        assert f"Index Scan using log_pkey on {s}.log l" in plan, plan
        # what it deletes: the rows older than a day, n <= 13,599 (the event just
        # published is pending, and young)
        assert await transport.prune_log() == 13599
        assert await transport.prune_log() == 0
        assert len(await transport.read_log(0, 100000)) == 50000 - 13599 + 1
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


# -- the store in the broker's database: records and acks in one transaction ---------------


async def _pair(tmp_path: Path, query: str = "") -> tuple[PostgresTransport, PostgresStore]:
    """A started transport and, on the same database, the store a Runtime would use by
    default (``default_store_url``), with the ``t`` table for ctx.store writes."""
    url = make_url(tmp_path) + query
    transport = from_url(url)
    assert isinstance(transport, PostgresTransport)
    store = store_from_url(default_store_url(url))
    assert isinstance(store, PostgresStore)
    await transport.start()
    try:
        await store.start(["CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY)"])
    except BaseException:
        await transport.close()
        raise
    return transport, store


async def _pending(transport: PostgresTransport) -> list[int]:
    assert transport._pool is not None
    schema = transport.config.schema
    return [r[0] for r in await transport._pool.fetch(f"SELECT seq FROM {schema}.deliveries")]


async def _processed(store: PostgresStore) -> list[str]:
    return sorted(r[0] for r in await store.query("SELECT event_id FROM nerve_processed"))


async def test_records_and_acks_commit_together_in_one_statement(tmp_path: Path) -> None:
    transport, store = await _pair(tmp_path)
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        events = [make(n, key=f"k{n % 2}") for n in range(4)]
        await transport.publish(events)
        consumer = transport.consumer(sub)
        deliveries = list(await consumer.fetch(10, SOON))
        assert len(deliveries) == 2  # one per key: the keys' heads
        ids = await store.commit_records(
            [("g", d.event.id, [b"emitted"] if n == 0 else []) for n, d in enumerate(deliveries)]
        )
        assert ids[1] == [] and ids[0] is not None and len(ids[0]) == 1
        assert [d.acked_within for d in deliveries] == [True, True]
        # the records and the acks are there together, and the outbox row
        assert await _processed(store) == sorted(d.event.id for d in deliveries)
        assert sorted(await _pending(transport)) == sorted(
            set(range(1, 5)) - {d.seq for d in deliveries}
        )
        assert [i for i, _ in await store.outbox_pending(older_than=0)] == ids[0]
        # the runner's ack after the commit costs nothing and counts nothing twice
        assert await consumer.ack_many(deliveries) == []
        await deliveries[0].ack()
        (stats,) = await transport.stats()
        assert (stats.processed, stats.ready, stats.in_flight) == (2, 2, 0)
        # acked heads released their keys: the next of each key is claimable now
        rest = list(await consumer.fetch(10, SOON))
        assert sorted(d.event.data["n"] for d in rest) == [2, 3]
        assert await consumer.ack_many(rest) == []
        assert (await transport.stats())[0].processed == 4
    finally:
        await store.close()
        await transport.close()


async def test_an_event_held_twice_is_committed_with_its_latest_delivery(tmp_path: Path) -> None:
    """The same event published twice, both deliveries claimed by one process: the
    store's commit acks the one claimed last (whose lease is current); the next commit
    of it finds it recorded and acks the other; nothing stays held."""
    transport, store = await _pair(tmp_path)
    try:
        sub = Subscription("g", ("order.created",), ordered=False)
        await transport.declare([sub])
        event = make(1)
        await transport.publish([event, make(2)])
        await transport.publish([event])  # the same id again
        deliveries = list(await transport.consumer(sub).fetch(10, SOON))
        twice = [d for d in deliveries if d.event.id == event.id]
        assert len(deliveries) == 3 and len(twice) == 2
        assert transport.claimed("g", event.id) is twice[1]
        assert await store.commit_records([("g", event.id, [])]) == [[]]
        assert [d.acked_within for d in twice] == [None, True]
        assert transport.claimed("g", event.id) is twice[0]
        # recorded already (None), and its delivery acked by the same statement
        assert await store.commit_records([("g", event.id, [])]) == [None]
        assert [d.acked_within for d in twice] == [True, True]
        assert transport.claimed("g", event.id) is None
        assert await transport.consumer(sub).ack_many(twice) == []
        other = next(d for d in deliveries if d.event.id != event.id)
        assert await store.commit_records([("g", other.event.id, [])]) == [[]]
        assert transport._held == {}
        assert await _pending(transport) == []
    finally:
        await store.close()
        await transport.close()


async def test_claims_tell_the_store_what_it_has_processed(tmp_path: Path) -> None:
    """A claim looks up the store's records of the events it hands out, so the runtime's
    idempotency check after a fetch needs no query; the answer is used once."""
    transport, store = await _pair(tmp_path)
    try:
        sub = Subscription("g", ("order.created",), ordered=False)
        await transport.declare([sub])
        events = [make(n) for n in range(3)]
        await transport.publish(events)
        assert await store.commit_records([("g", events[1].id, [])]) == [[]]  # seen before
        assert await store.commit_records([("other", events[2].id, [])]) == [[]]
        deliveries = list(await transport.consumer(sub).fetch(10, SOON))
        assert [d.processed for d in deliveries] == [
            (store.schema, False),
            (store.schema, True),
            (store.schema, False),  # processed by another function only
        ]
        ids = [e.id for e in events]
        assert await store.processed_many("g", ids) == {events[1].id}
        assert [d.processed for d in deliveries] == [None, None, None]  # used once
        assert await store.commit_records([("g", events[0].id, [])]) == [[]]
        assert await store.processed_many("g", ids) == {events[0].id, events[1].id}
        await store.close()  # claims stop reading a store that is gone
        assert transport.processed_in is None
        await transport.publish([make(3)])
        (late,) = await transport.consumer(sub).fetch(10, SOON)
        assert late.processed is None
    finally:
        await store.close()
        await transport.close()


async def test_claims_and_acks_probe_per_row_whatever_the_tables_hold(tmp_path: Path) -> None:
    """A claim looks each claimed event up in the store's records by its primary key, and
    an ack deletes each delivery by its primary key, in the plan kept for a prepared
    statement and with statistics taken before the tables grew. Once, a claim read all of
    a group's records into a hash (1.4 ms a claim at 10,000 records, growing with them),
    and an ack parsed its array of sequence numbers again for every row it deleted
    (22 µs a row for 200 rows)."""
    transport, store = await _pair(tmp_path)
    try:
        sub = Subscription("g", ("order.created",), ordered=False)
        await transport.declare([sub])
        assert transport._pool is not None
        await transport.publish([make(n) for n in range(500)])
        async with transport._pool.acquire() as conn:
            # statistics as they were when the store held few records, the queue many
            await conn.execute(
                f'INSERT INTO "{store.schema}".nerve_processed '
                "SELECT 'g', 'e' || n, 0 FROM generate_series(1, 5) AS n"
            )
            await conn.execute(f'ANALYZE "{store.schema}".nerve_processed')
            await conn.execute(f"ANALYZE {transport.config.schema}.deliveries")
            await conn.execute(
                f'INSERT INTO "{store.schema}".nerve_processed '
                "SELECT 'g', 'e' || n, 0 FROM generate_series(6, 20000) AS n"
            )
            claim = await _generic_plan(
                conn,
                transport._sql.claim_noting(store.schema),
                "text, int, float8, bigint",
                "'g', 200, 30, 1",
            )
            ack = await _generic_plan(
                conn, transport._sql.ack_counted, "text[], text, text", "'{g}', '{1}', '{1}'"
            )
        lookups = [line for line in claim.splitlines() if "nerve_processed" in line]
        assert lookups and all("Index Only Scan" in line for line in lookups), claim
        assert "(p.event_id = l.event_id)" in claim, claim
        assert "hashed SubPlan" not in claim, claim
        filters = [line for line in ack.splitlines() if "Filter:" in line and "seq = ANY" in line]
        # an array computed once (an InitPlan's $n), not a parameter cast for every row
        assert filters and all(re.search(r"seq = ANY \(\$\d+\)", f) for f in filters), ack
        assert "Index Cond: ((d.grp = u.grp) AND (d.seq = u.seq))" in ack, ack
        assert f"Seq Scan on {transport.config.schema}.deliveries" not in ack, ack
    finally:
        await store.close()
        await transport.close()


async def test_a_failing_ack_rolls_the_records_back(tmp_path: Path) -> None:
    """The ack fails inside the store's statement (a trigger refuses the DELETE): the
    idempotency records of the batch are not committed either."""
    transport, store = await _pair(tmp_path)
    assert transport._pool is not None
    schema = transport.config.schema
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        await transport.publish([make(n) for n in range(3)])
        consumer = transport.consumer(sub)
        deliveries = list(await consumer.fetch(10, SOON))
        await transport._pool.execute(
            f"CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'acks refused'; END $$; "
            f"CREATE TRIGGER refuse BEFORE DELETE ON {schema}.deliveries "
            f"FOR EACH ROW EXECUTE FUNCTION {schema}.refuse()"
        )
        with pytest.raises(StoreError, match="acks refused"):
            await store.commit_records([("g", d.event.id, [b"x"]) for d in deliveries])
        assert await _processed(store) == []
        assert await store.outbox_pending(older_than=0) == []
        assert sorted(await _pending(transport)) == [1, 2, 3]
        assert [d.acked_within for d in deliveries] == [None, None, None]
        # a unit (ctx.store writes) fails the same way: its writes go too
        unit = store.unit("g", deliveries[0].event.id)
        await unit.execute("INSERT INTO t VALUES (?)", ("written",))
        with pytest.raises(StoreError, match="acks refused"):
            await unit.commit([])
        assert await store.query("SELECT k FROM t") == []
        await transport._pool.execute(f"DROP TRIGGER refuse ON {schema}.deliveries")
        # still held: the retry commits records and acks together
        assert await store.commit_records([("g", d.event.id, []) for d in deliveries]) == [
            [],
            [],
            [],
        ]
        assert len(await _processed(store)) == 3 and await _pending(transport) == []
        assert (await transport.stats())[0].processed == 3
    finally:
        await store.close()
        await transport.close()


async def test_a_store_connection_killed_during_the_ack_keeps_neither(tmp_path: Path) -> None:
    """The store's connection dies while its commit statement is acking (held in a
    trigger): a reader sees neither the unit's writes, its record nor the ack while it
    runs, and nothing of them after the kill; a second commit makes all of them
    visible at once."""
    name = f"nerve_victim_{abs(hash(str(tmp_path))) % 10**9}"
    transport, store = await _pair(tmp_path, f"&application_name={name}")
    assert transport._pool is not None
    pool = transport._pool
    schema = transport.config.schema
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        await transport.publish([make(1)])
        consumer = transport.consumer(sub)
        (delivery,) = await consumer.fetch(1, SOON)
        await pool.execute(
            f"CREATE FUNCTION {schema}.stall() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(30); RETURN OLD; END $$; "
            f"CREATE TRIGGER stall AFTER DELETE ON {schema}.deliveries "
            f"FOR EACH ROW EXECUTE FUNCTION {schema}.stall()"
        )

        async def state() -> tuple[list[str], list[int], list[str]]:
            written = [r[0] for r in await store.query("SELECT k FROM t")]
            return written, await _pending(transport), await _processed(store)

        unit = store.unit("g", delivery.event.id)
        await unit.execute("INSERT INTO t VALUES (?)", ("written",))
        committing = asyncio.create_task(unit.commit([b"emitted"]))
        deadline = time.monotonic() + SOON
        while True:  # the store's connection of this test, in the trigger's sleep
            stalled = await pool.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                "AND wait_event = 'PgSleep'",
                name,
            )
            if stalled:
                break
            assert time.monotonic() < deadline, "the commit never reached the ack"
            await asyncio.sleep(0.02)
        assert await state() == ([], [delivery.seq], [])  # nothing of it visible yet
        await pool.execute("SELECT pg_terminate_backend($1)", stalled[0][0])
        with pytest.raises(StoreError):
            await committing
        assert await state() == ([], [delivery.seq], [])  # nothing of it committed
        assert delivery.acked_within is None
        assert await store.outbox_pending(older_than=0) == []
        await pool.execute(f"DROP TRIGGER stall ON {schema}.deliveries")
        again = store.unit("g", delivery.event.id)
        await again.execute("INSERT INTO t VALUES (?)", ("written",))
        ids = await again.commit([b"emitted"])
        assert ids is not None and len(ids) == 1
        assert await state() == (["written"], [], [delivery.event.id])
        assert delivery.acked_within is True and await consumer.ack_many([delivery]) == []
    finally:
        await store.close()
        await transport.close()


async def test_a_lost_lease_records_nothing(tmp_path: Path) -> None:
    """A consumer whose lease was taken over (by another process) changes nothing, in the
    store either: its commit records nothing (None) and its ack reports the lost lease;
    a later owner's commit records and acks."""
    transport, store = await _pair(tmp_path, "&visibility_timeout=0.3")
    elsewhere = from_url(make_url(tmp_path) + "&visibility_timeout=0.3")
    await elsewhere.start()
    try:
        sub = Subscription("g", ("order.created",), ordered=False)
        await transport.declare([sub])
        await transport.publish([make(1), make(2)])
        late = transport.consumer(sub)
        stale = list(await late.fetch(10, SOON))
        assert len(stale) == 2
        await asyncio.sleep(0.5)
        taken = list(await elsewhere.consumer(sub).fetch(10, SOON))
        assert [d.attempt for d in taken] == [2, 2]
        await elsewhere.close()  # that process is gone; its leases run out
        # the first of the two goes through a unit (ctx.store), the second is light
        unit = store.unit("g", stale[0].event.id)
        await unit.execute("INSERT INTO t VALUES (?)", ("stale write",))
        assert await unit.commit([b"stale emit"]) is None
        assert await store.commit_records([("g", stale[1].event.id, [b"x"])]) == [None]
        assert [d.acked_within for d in stale] == [False, False]
        assert await store.query("SELECT k FROM t") == []
        assert await _processed(store) == [] and await store.outbox_pending(older_than=0) == []
        assert await late.ack_many(stale) == stale
        with pytest.raises(LeaseLost):
            await stale[0].ack()
        assert len(await _pending(transport)) == 2
        await asyncio.sleep(0.5)
        again = list(await transport.consumer(sub).fetch(10, SOON))
        assert [d.attempt for d in again] == [3, 3]
        assert await store.commit_records([("g", d.event.id, []) for d in again]) == [[], []]
        assert await late.ack_many(again) == []
        assert await _pending(transport) == [] and len(await _processed(store)) == 2
        assert (await transport.stats())[0].processed == 2
    finally:
        await elsewhere.close()
        await store.close()
        await transport.close()


shared_app = App("pgshared")
shared_app.store_tables("CREATE TABLE IF NOT EXISTS kept (n INTEGER PRIMARY KEY)")


@shared_app.event("order.created", key="key")
class Created(BaseModel):
    n: int
    key: str


@shared_app.function(consumes="order.created", concurrency=8)
async def keep(order: Created, ctx: Context) -> None:
    if order.n % 2:  # half through a unit of ctx.store, half light
        await ctx.store.execute("INSERT INTO kept VALUES (?)", (order.n,))


async def test_a_runtime_on_postgres_keeps_its_store_in_the_same_database(tmp_path: Path) -> None:
    """No store given: records, ctx.store writes and acks share the broker's database
    and transactions; every event is processed once and counted once."""
    url = make_url(tmp_path)
    count = 60
    async with Runtime(shared_app, broker=url) as rt:
        assert isinstance(rt.store, PostgresStore) and rt.store.schema.endswith("_store")
        await rt.client.publish_events(
            [shared_app.make_event(Created(n=n, key=f"k{n % 7}")) for n in range(count)]
        )
        await rt.wait_idle(timeout=30)
        runner = rt.runners["keep"]
        assert (runner.stats.processed, runner.stats.lease_lost) == (count, 0)
        assert len(await rt.store.query("SELECT event_id FROM nerve_processed")) == count
        kept = await rt.store.query("SELECT n FROM kept ORDER BY n")
        assert [r[0] for r in kept] == list(range(1, count, 2))
        assert isinstance(rt.transport, PostgresTransport)
        (stats,) = await rt.transport.stats()
        assert (stats.processed, stats.backlog, stats.in_flight) == (count, 0, 0)
        assert rt.transport._held == {}


async def test_a_group_declared_elsewhere_is_routed_to_by_a_publisher_with_old_routes(
    tmp_path: Path,
) -> None:
    """A publish is one statement that checks the routing version: a group declared by
    another process after this one loaded its routes still receives the event."""
    url = make_url(tmp_path)
    one, two = from_url(url), from_url(url)
    await one.start()
    await two.start()
    try:
        first = Subscription("first", ("order.created",))
        await one.declare([first])
        await one.publish([make(0)])  # routes loaded: only `first`
        late = Subscription("late", ("order.created",))
        await two.declare([late])
        await one.publish([make(1)])
        await one.publish([make(2)], to_group="late")
        got = await two.consumer(late).fetch(10, SOON)
        assert [d.event.data["n"] for d in got] == [1, 2]
        firsts = await one.consumer(first).fetch(10, SOON)
        assert [d.event.data["n"] for d in firsts] == [0, 1]
        with pytest.raises(TransportError, match="no consumer group named 'nobody'"):
            await one.publish([make(3)], to_group="nobody")
    finally:
        await one.close()
        await two.close()


async def test_publishing_before_any_group_is_declared(tmp_path: Path) -> None:
    """With no group declared yet, a publish reaches nobody (and does not fail); a group
    declared afterwards, elsewhere, receives the next one."""
    url = make_url(tmp_path)
    producer, consumer = from_url(url), from_url(url)
    await producer.start()
    await consumer.start()
    try:
        for n in range(3):  # each publish checks the (unchanged) routing version
            await producer.publish([make(n)])
        sub = Subscription("g", ("order.created",))
        await consumer.declare([sub])
        await producer.publish([make(3)])
        got = await consumer.consumer(sub).fetch(10, SOON)
        assert [d.event.data["n"] for d in got] == [3]
    finally:
        await producer.close()
        await consumer.close()


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["order.created", "order.created"],
        ["", "NULL", None, "null", " spaced ", "a,b", "{braced}", "x=1"],
        ['say "hi"', "back\\slash", "\\", '"', "end\\"],
        ["tab\there", "new\nline", "\x01\x1f", "mixed \\n \n"],
        ["ünïcödé", "日本", "emoji 🎉"],
    ],
)
async def test_text_array_literals_read_back_as_the_strings_they_were_made_of(
    values: list[str | None],
) -> None:
    """``text_array`` (what the statements pass instead of a list: asyncpg checks each
    element of a list against two ABCs) against the server's own reading of it."""
    import asyncpg  # type: ignore[import-untyped]

    from nerve._postgres import text_array

    from .adapter_postgres import HOST, PORT, server_url
    from .conftest import require_server

    require_server("PostgreSQL", HOST, PORT)
    conn = await asyncpg.connect(server_url(), timeout=10)
    try:
        got = await conn.fetchval("SELECT $1::text::text[]", text_array(values))
    finally:
        await conn.close()
    assert got == values
