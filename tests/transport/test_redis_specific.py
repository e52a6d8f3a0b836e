"""What the conformance suite cannot check for ``redis://``: restarts on a server
without persistence, error translation, URL options, the ingest stream (events that
a plain Redis client XADDs) and that settled events leave no keys behind."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from nerve import event as codec
from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError, TransportError
from nerve.event import Event
from nerve.transport import from_url
from nerve.transport.redis import RedisConfig, RedisTransport, _resp

from .adapter_redis import make_url

SOON = 10.0


def make(n: int, **extensions: str) -> Event:
    return Event(type="order.created", source="/redis-test", data={"n": n}, extensions=extensions)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return make_url(tmp_path)


@pytest.fixture
async def raw(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=6379)
    yield client
    await client.aclose()


@pytest.fixture
async def transport(url: str) -> AsyncIterator[RedisTransport]:
    opened = RedisTransport(url + "&visibility_timeout=0.5")
    await opened.start()
    yield opened
    await opened.close()


def prefix_of(url: str) -> str:
    return RedisConfig.from_url(url).prefix


async def drain(consumer: object, count: int) -> list[object]:
    got: list[object] = []
    deadline = time.monotonic() + SOON
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count}"
        got.extend(await consumer.fetch(count - len(got), 1.0))  # type: ignore[attr-defined]
    return got


# -- restarts ---------------------------------------------------------------------------


async def test_a_new_transport_on_the_same_server_sees_the_events_and_leases(url: str) -> None:
    """The conformance durability test skips (this server has no persistence, so the
    adapter declares durable=False); a client restart must still lose nothing."""
    sub = Subscription("g", ("order.created",))
    first = RedisTransport(url + "&visibility_timeout=0.5")
    await first.start()
    await first.declare([sub])
    await first.publish([make(i) for i in range(4)])
    consumer = first.consumer(sub)
    for delivery in await drain(consumer, 1):
        await delivery.ack()  # type: ignore[attr-defined]
    (held,) = await drain(consumer, 1)  # in flight when the process goes away
    await first.close()

    second = RedisTransport(url + "&visibility_timeout=0.5")
    await second.start()
    try:
        rest = await drain(second.consumer(sub), 3)
        attempts = {d.event.data["n"]: d.attempt for d in rest}  # type: ignore[attr-defined]
        assert attempts.pop(held.event.data["n"]) == 2  # type: ignore[attr-defined]
        assert set(attempts.values()) == {1}
    finally:
        await second.close()


async def test_durable_follows_the_server_persistence_settings(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    settings = {**await raw.config_get("appendonly"), **await raw.config_get("appendfsync")}
    durable = settings == {"appendonly": "yes", "appendfsync": "always"}
    assert transport.features.durable == durable


# -- errors and options -----------------------------------------------------------------


async def test_an_absent_server_is_broker_unavailable_without_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = from_url(f"redis://user:s3cret@127.0.0.1:{port}/0?prefix=x")
    with pytest.raises(BrokerUnavailable) as caught:
        await transport.start()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "s3cret" not in message
    assert "\n" not in message
    await transport.close()


async def test_using_a_transport_before_start_says_so() -> None:
    transport = RedisTransport("redis://127.0.0.1:6379/0?prefix=x")
    with pytest.raises(TransportError, match="start"):
        await transport.publish([make(1)])


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://h:6379/0?colour=blue", "unknown option"),
        ("redis://h:6379/0?visibility_timeout=soon", "visibility_timeout|could not convert"),
        ("redis://h:6379/0?visibility_timeout=0", "must be > 0"),
        ("redis://h:6379/0?max_payload=10", "max_payload"),
        ("redis://h:6379/0?prefix=", "prefix"),
        ("redis://h:6379/zero", "database number"),
        ("redis://h:6379/0?ingest=maybe", "ingest"),
        ("redis://:pw@h:notaport/0", "port"),
    ],
)
def test_bad_urls_are_config_errors(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        RedisConfig.from_url(url)
    assert "pw@" not in str(caught.value)


def test_url_options_are_parsed() -> None:
    config = RedisConfig.from_url(
        "redis://:pw@example:6390/2?prefix=shop&visibility_timeout=12.5&max_payload=65536"
        "&poll_interval=0.2&log_max=0&ingest=true"
    )
    assert (config.host, config.port, config.prefix) == ("example", 6390, "shop")
    assert config.connection_url == "redis://:pw@example:6390/2"
    assert (config.visibility_timeout, config.max_payload) == (12.5, 65536)
    assert (config.poll_interval, config.log_max, config.ingest) == (0.2, 0, True)


# -- interop: a plain Redis client produces ---------------------------------------------


async def test_an_event_xadded_by_a_plain_client_reaches_the_matching_groups(
    url: str, raw: aioredis.Redis
) -> None:
    prefix = prefix_of(url)
    stream = f"{prefix}:ingest"
    event = make(1, partitionkey="A-1").evolve(time=None)
    early = Event(type="order.created", source="/other-app", data={"n": 0})
    transport = RedisTransport(url + "&ingest=true")
    await transport.start()
    try:
        subs = [
            Subscription("orders", ("order.*",)),
            Subscription("payments", ("payment.*",)),
        ]
        await transport.declare(subs)
        orders, payments = (transport.consumer(s) for s in subs)
        # what another program writes: a structured CloudEvents JSON document
        document = {
            "specversion": "1.0",
            "id": event.id,
            "type": "order.created",
            "source": "/redis-test",
            "datacontenttype": "application/json",
            "data": {"n": 1},
            "partitionkey": "A-1",
        }
        await raw.xadd(stream, {"event": orjson.dumps(document)})
        await raw.xadd(stream, {"event": b"not json at all"})
        (got,) = await drain(orders, 1)
        assert got.event == event  # type: ignore[attr-defined]
        assert got.event.partitionkey == "A-1"  # type: ignore[attr-defined]
        await got.ack()  # type: ignore[attr-defined]
        assert await payments.fetch(10, 0.2) == []
        # routed exactly once and removed; the undecodable entry is kept aside
        deadline = time.monotonic() + SOON
        while await raw.xlen(stream) > 0:
            assert time.monotonic() < deadline, "the ingest stream was not emptied"
            await asyncio.sleep(0.02)
        (rejected,) = await raw.xrange(f"{stream}:rejected")
        assert rejected[1][b"event"] == b"not json at all"
        assert b"JSON" in rejected[1][b"error"]
    finally:
        await transport.close()
    # written while no nerve process ran: routed when one starts
    await raw.xadd(stream, {"event": codec.encode(early)})
    again = RedisTransport(url + "&ingest=true")
    await again.start()
    try:
        (got,) = await drain(again.consumer(Subscription("orders", ("order.*",))), 1)
        assert got.event == early  # type: ignore[attr-defined]
        await got.ack()  # type: ignore[attr-defined]
    finally:
        await again.close()


# -- hygiene ----------------------------------------------------------------------------


async def test_settled_events_leave_no_keys_behind(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    sub = Subscription("g", ("order.created",))
    await transport.declare([sub])
    consumer = transport.consumer(sub)
    await transport.publish([make(i, partitionkey=f"k{i % 3}") for i in range(30)])
    left = 30
    while left:
        batch = await consumer.fetch(100, SOON)
        assert batch
        assert not await consumer.ack_many(batch)
        left -= len(batch)
    base = f"{prefix_of(url)}:g:1:g"
    assert await left_behind(raw, base) == {f"{base}:cnt"}


async def test_an_unordered_functions_events_pass_through_its_stream_and_leave_it_empty(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """An unordered function's entries are its stream's: read by its consumer group,
    all at once whatever their keys, acked inside their lease without a script (XACK +
    XDEL), and a closed consumer that holds nothing leaves the group."""
    sub = Subscription("g", ("order.created",), ordered=False)
    await transport.declare([sub])
    consumer = transport.consumer(sub)
    await transport.publish([make(i, partitionkey=f"k{i % 3}") for i in range(30)])
    base = f"{prefix_of(url)}:g:1:g"
    assert await raw.xlen(f"{base}:s") == 30
    batch = await consumer.fetch(100, SOON)
    assert sorted(d.event.data["n"] for d in batch) == list(range(30))
    assert (await raw.xpending(f"{base}:s", "n"))["pending"] == 30

    def no_script(*args: object, **kwargs: object) -> object:
        raise AssertionError("an ack inside its lease ran the settle script")

    transport._scripts["ssettle"] = no_script
    assert not await consumer.ack_many(batch)
    assert await raw.xlen(f"{base}:s") == 0
    assert (await raw.xpending(f"{base}:s", "n"))["pending"] == 0
    assert await left_behind(raw, base) == {f"{base}:cnt", f"{base}:s"}
    (stats,) = await transport.stats()
    assert (stats.ready, stats.in_flight, stats.processed) == (0, 0, 30)
    assert [c["name"] for c in await raw.xinfo_consumers(f"{base}:s", "n")] == [
        consumer._name.encode()
    ]
    await consumer.close()
    assert await raw.xinfo_consumers(f"{base}:s", "n") == []


def test_commands_sent_as_resp_count_utf8_bytes() -> None:
    assert _resp([["SET", "clé", "v"], ["XACK", "s", "n", "1-0"]]) == (
        b"*3\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n$1\r\nv\r\n"
        b"*4\r\n$4\r\nXACK\r\n$1\r\ns\r\n$1\r\nn\r\n$3\r\n1-0\r\n"
    )


async def test_a_stream_of_a_function_with_a_non_ascii_name_is_read_and_acked(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    sub = Subscription("grüße", ("order.created",), ordered=False)
    await transport.declare([sub])
    consumer = transport.consumer(sub)
    await transport.publish([make(i) for i in range(3)])
    batch = await drain(consumer, 3)
    assert not await consumer.ack_many(batch)  # type: ignore[arg-type]
    stream = f"{prefix_of(url)}:g:{len('grüße'.encode())}:grüße:s"
    assert (await raw.xlen(stream), (await raw.xpending(stream, "n"))["pending"]) == (0, 0)


async def left_behind(raw: aioredis.Redis, base: str) -> set[str]:
    """The keys of the group at ``base`` that hold more than their pin (the member that
    keeps Redis from storing a queue's sets and hashes as listpacks)."""
    found = set()
    async for key in raw.scan_iter(match=f"{base}:*"):
        kind = (await raw.type(key)).decode()
        if kind == "zset":
            members = await raw.zrange(key, 0, -1, withscores=True)
            if [(m.startswith(b"\tnerve keeps"), s) for m, s in members] == [(True, float("inf"))]:
                continue
        elif kind == "hash":
            fields = await raw.hkeys(key)
            if len(fields) == 1 and fields[0].startswith(b"\tnerve keeps"):
                continue
        found.add(key.decode())
    return found


async def test_a_queue_keeps_its_sets_and_hashes_out_of_listpacks_at_any_size(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """A small queue (the steady state of one its consumers keep up with) would be
    stored as listpacks, scanned whole by every operation: the pin prevents that."""
    sub = Subscription("g", ("order.created",))
    await transport.declare([sub])
    consumer = transport.consumer(sub)
    await transport.publish([make(i, partitionkey=f"k{i}") for i in range(3)])
    batch = await consumer.fetch(2, SOON)
    base = f"{prefix_of(url)}:g:1:g"
    encodings = {
        suffix: (await raw.object("encoding", f"{base}:{suffix}")).decode()
        for suffix in ("due", "lease", "meta", "kh", "body")
    }
    assert encodings == {
        "due": "skiplist",
        "lease": "skiplist",
        "meta": "hashtable",
        "kh": "hashtable",
        "body": "hashtable",
    }
    stats = await transport.stats()  # the pins are not counted
    assert [(s.group, s.ready, s.in_flight, s.delayed) for s in stats] == [("g", 1, 2, 0)]
    assert not await consumer.ack_many(batch)


# -- packed script arguments --------------------------------------------------------------


async def test_ordering_keys_with_tabs_newlines_and_percent_keep_their_own_order(
    transport: RedisTransport,
) -> None:
    """Publish and settle pack their arguments into TAB/newline-separated strings; keys
    holding those characters (or the % of the escape) must neither break the batch nor
    merge with another key: 'a\\tb' and 'a%09b' are two keys, each in order."""
    sub = Subscription("g", ("order.created",), ordered=True)
    await transport.declare([sub])
    keys = ["a\tb", "a%09b", "line\nbreak", "plain"]
    events = [make(i, partitionkey=keys[i % 4]) for i in range(12)]
    await transport.publish(events)
    consumer = transport.consumer(sub)
    seen: dict[str, list[int]] = {k: [] for k in keys}
    deadline = time.monotonic() + SOON
    while sum(map(len, seen.values())) < 12:
        assert time.monotonic() < deadline, seen
        batch = await consumer.fetch(12, 1.0)
        # one event per key at a time: a second event of a key is held until the first is acked
        assert len({d.event.partitionkey for d in batch}) == len(batch), batch
        for delivery in batch:
            seen[str(delivery.event.partitionkey)].append(delivery.event.data["n"])
        assert await consumer.ack_many(batch) == []
    assert seen == {k: [i for i in range(12) if i % 4 == j] for j, k in enumerate(keys)}


async def test_a_key_queued_in_the_earlier_layout_still_hands_its_events_out_in_order(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """Before ``:kh`` recorded whose turn a key is, the key's list held that entry too,
    at its head. Such a queue (left by an older nerve) goes on in order and leaves no
    keys behind."""
    sub = Subscription("g", ("order.created",), ordered=True)
    await transport.declare([sub])
    await transport.publish([make(i, partitionkey="k") for i in range(3)])
    base = f"{prefix_of(url)}:g:1:g"
    turn = (await raw.hget(f"{base}:kh", "k")).decode()
    assert turn.endswith("+")  # later entries wait
    await raw.hdel(f"{base}:kh", "k")  # the earlier layout: the turn is the list's head
    await raw.lpush(f"{base}:kq:k", turn[:-1])
    consumer = transport.consumer(sub)
    order = []
    for _ in range(3):
        batch = await consumer.fetch(10, SOON)
        assert len(batch) == 1, batch
        order.append(batch[0].event.data["n"])
        assert await consumer.ack_many(batch) == []
    assert order == [0, 1, 2]
    assert await left_behind(raw, base) == {f"{base}:cnt"}


# -- wake-ups ---------------------------------------------------------------------------
# A consumer with nothing to claim waits in Redis (BLPOP on wake lists, the claim behind
# it). These use poll_interval=30: a wake-up that did not arrive would show as a fetch
# that takes seconds, not milliseconds.


Pair = tuple[RedisTransport, RedisTransport, Subscription]


@pytest.fixture
async def pair(url: str) -> AsyncIterator[Pair]:
    """Two transports on one prefix, as two processes would have, and a declared group."""
    async with two_processes(url, ordered=True) as made:
        yield made


@pytest.fixture(params=["ordered", "unordered"])
async def pairs(url: str, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    """``pair``, once with an ordered group (claimed by script) and once with an
    unordered one (read from its stream)."""
    async with two_processes(url, ordered=request.param == "ordered") as made:
        yield made


@contextlib.asynccontextmanager
async def two_processes(url: str, *, ordered: bool) -> AsyncIterator[Pair]:
    one = RedisTransport(url + "&poll_interval=30")
    two = RedisTransport(url + "&poll_interval=30")
    await one.start()
    await two.start()
    sub = Subscription("g", ("order.created",), ordered=ordered)
    await one.declare([sub])
    try:
        yield one, two, sub
    finally:
        await one.close()
        await two.close()


async def waiting_fetch(consumer: object, timeout: float = 20.0) -> asyncio.Task[list[object]]:
    """A fetch that has claimed nothing and now waits in Redis."""
    task = asyncio.ensure_future(consumer.fetch(10, timeout))  # type: ignore[attr-defined]
    deadline = time.monotonic() + SOON
    while not consumer.waiting:  # type: ignore[attr-defined]
        assert not task.done(), task
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return task


async def test_a_waiting_fetch_gets_an_event_another_process_publishes_at_once(
    pairs: Pair,
) -> None:
    one, two, sub = pairs
    fetching = await waiting_fetch(one.consumer(sub))
    started = time.monotonic()
    await two.publish([make(1)])
    batch = await asyncio.wait_for(fetching, SOON)
    assert time.monotonic() - started < 1.0
    assert [d.event.data["n"] for d in batch] == [1]  # type: ignore[attr-defined]


async def test_a_retry_delay_wakes_a_consumer_waiting_in_another_process(
    pairs: Pair,
) -> None:
    one, two, sub = pairs
    await one.publish([make(1)])
    (delivery,) = await drain(two.consumer(sub), 1)
    waiting = await waiting_fetch(one.consumer(sub))
    nacked = time.monotonic()
    await delivery.nack(0.3)  # type: ignore[attr-defined]
    (again,) = await asyncio.wait_for(waiting, SOON)
    assert 0.25 < time.monotonic() - nacked < 2.0
    assert again.attempt == 2  # type: ignore[attr-defined]


async def test_a_retry_delay_sets_one_timer_in_each_process(pairs: Pair) -> None:
    """The nacking transport sets its timer when the settle returns; the wake-up its
    script sends every process over Pub/Sub reaches its own listener too, which skips
    it (it set a second timer, and a second wake-up, for every delayed nack)."""
    one, two, sub = pairs
    await one.publish([make(1)])
    (delivery,) = await drain(one.consumer(sub), 1)
    await delivery.nack(5.0)  # type: ignore[attr-defined]
    deadline = time.monotonic() + SOON
    while not two._timers:  # the other process hears it over Pub/Sub
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the nacking process's listener has heard it by now too
    assert (len(one._timers), len(two._timers)) == (1, 1)


async def test_closing_a_consumer_ends_its_waiting_fetch_at_once(
    pairs: Pair,
) -> None:
    one, _, sub = pairs
    closing = one.consumer(sub)
    waiting = await waiting_fetch(closing)
    closed = time.monotonic()
    await closing.close()
    assert await asyncio.wait_for(waiting, SOON) == []
    assert time.monotonic() - closed < 1.0


async def test_the_claim_behind_a_closed_consumers_wait_takes_nothing(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """close() sets the consumer's stop key before waking it: the claim pipelined
    behind its BLPOP then takes nothing (it would lease events to a consumer that is
    gone, for a visibility timeout, and count an attempt)."""
    sub = Subscription("g", ("order.created",))
    await transport.declare([sub])
    await transport.publish([make(1)])
    stop = f"{prefix_of(url)}:g:1:g:stop:test"
    await raw.set(stop, 1)
    assert await transport._run("claim", ["g", 10, 30_000, "token", stop]) == [[], -3]
    assert not await raw.exists(stop)
    (delivery,) = await drain(transport.consumer(sub), 1)
    assert delivery.attempt == 1  # type: ignore[attr-defined]


async def test_a_burst_of_concurrent_publishes_keeps_the_connections_bounded(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """redis-py opens a connection for every command in flight: without a bound, 3,000
    concurrent publishes opened connections until the server refused them."""
    sub = Subscription("g", ("order.created",))
    await transport.declare([sub])
    before = (await raw.info("clients"))["connected_clients"]
    await asyncio.gather(*(transport.publish([make(i)]) for i in range(3000)))
    opened = (await raw.info("clients"))["connected_clients"] - before
    assert opened <= 40, opened
    (stats,) = await transport.stats()
    assert stats.ready == 3000, stats


async def test_a_backlog_larger_than_a_fetch_is_claimed_without_waiting(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the last claim left entries due, the next fetch claims at once: it must
    not wait for a wake token (there is one per publish, not one per fetch)."""
    one, _, sub = pair
    await one.publish([make(i) for i in range(100)])
    waits = 0
    wait_and_claim = one._wait_and_claim

    async def counted(*args: object) -> tuple[list[object], int]:
        nonlocal waits
        waits += 1
        return await wait_and_claim(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(one, "_wait_and_claim", counted)
    consumer = one.consumer(sub)
    got = []
    for _ in range(10):
        got += await consumer.fetch(10, SOON)
    assert len(got) == 100
    assert waits == 0


async def test_the_log_reads_an_entry_per_publish_and_an_older_nerves_entry_per_event(
    url: str, transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """One stream entry per publish holds its events as position -> body; entries an
    older nerve wrote (one per event, field ``b``) read the same way, in order."""
    sub = Subscription("g", ("order.created",))
    await transport.declare([sub])
    start = (await transport.read_log(None, 0))[0][0]
    await transport.publish([make(i) for i in range(3)])
    log = f"{prefix_of(url)}:log"
    assert await raw.xlen(log) == 1
    body = codec.encode(make(99))
    await raw.xadd(log, {"b": body}, id=f"{start + 4}-1")  # an older nerve's entry
    await raw.set(f"{prefix_of(url)}:seq", start + 4)
    await transport.publish([make(i) for i in range(4, 6)])
    rows = await transport.read_log(start, 100)
    assert [p for p, _ in rows] == list(range(start + 1, start + 7))
    assert [codec.decode(b).data["n"] for _, b in rows] == [0, 1, 2, 99, 4, 5]
    assert await transport.read_log(start + 2, 2) == rows[2:4]  # inside an entry, limited
    assert await transport.read_log(start + 6, 100) == []
