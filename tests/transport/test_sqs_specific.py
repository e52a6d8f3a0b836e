"""SQS-only behaviour: URL options, queue names, SNS filter policies, errors, and what
moto does with a stale receipt handle (why ``fenced_settlement`` is False)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError
from nerve.event import Event
from nerve.transport.base import Failure
from nerve.transport.sqs import (
    SqsConfig,
    SqsTransport,
    _filter_policy,
    _long_poll_seconds,
    _queue_name,
    _seconds,
)

from .adapter_sqs import _installed, start_moto

for _name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(_name, "testing")


def test_url_options_are_parsed_and_checked() -> None:
    config = SqsConfig.from_url(
        "sqs://127.0.0.1:4566?region=eu-west-1&prefix=shop&visibility_timeout=5"
        "&max_payload=65536&endpoint=http"
    )
    assert config.endpoint_url == "http://127.0.0.1:4566"
    assert (config.region, config.prefix, config.visibility_timeout) == ("eu-west-1", "shop", 5.0)
    assert config.max_payload == 65536
    aws = SqsConfig.from_url("sqs://?region=us-west-2")
    assert aws.endpoint_url is None and aws.region == "us-west-2"
    assert SqsConfig.from_url("sqs://sqs.example.com").endpoint_url == "https://sqs.example.com"
    for bad in (
        "sqs://h?nope=1",
        "sqs://h?prefix=a b",
        "sqs://h?visibility_timeout=0",
        "sqs://h?max_payload=262144",  # no room left for the message attributes
        "sqs://h?endpoint=ftp",
        "sqs://key:secret@h",  # credentials belong in the environment
        "redis://h",
    ):
        with pytest.raises(ConfigError):
            SqsConfig.from_url(bad)
    with pytest.raises(ConfigError) as caught:
        SqsConfig.from_url("sqs://key:secret@h")
    assert "secret" not in str(caught.value)


def test_queue_names_are_valid_and_unambiguous() -> None:
    assert _queue_name("nerve", "billing_v2") == "nerve-billing_v2"
    odd = _queue_name("nerve", "billing.v2")
    assert odd.startswith("nerve-billing_v2-") and odd != _queue_name("nerve", "billing_v2")
    # a group named like another group's dead-letter queue gets its own name
    assert _queue_name("nerve", "x-dlq") != _queue_name("nerve", "x") + "-dlq"
    assert len(_queue_name("nerve", "g" * 200) + "-dlq") <= 80
    assert [_seconds(v) for v in (0, 0.2, 1, 1.01, 10**9)] == [0, 1, 1, 2, 43200]


def test_filter_policies_let_through_at_least_what_matches() -> None:
    policy = _filter_policy(Subscription("g", ("order.created", "order.*", "pay.>")))
    assert policy is not None
    assert orjson.loads(policy) == {
        "type": ["order.created", {"prefix": "order."}, {"prefix": "pay."}]
    }
    assert _filter_policy(Subscription("g", ("*.created",))) is None  # no literal prefix


async def test_an_unreachable_endpoint_is_one_line_without_credentials() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = SqsTransport(f"sqs://127.0.0.1:{port}?endpoint=http")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        await transport.start()
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    assert "testing" not in message  # the dummy credentials of this test


# -- against moto (its own server, so this file does not depend on the suite's) -----------


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    # moto_server with its SQS backend made thread-safe (adapter_sqs.py says why)
    if not _installed():
        if os.environ.get("CI"):
            pytest.fail("moto_server is not installed")
        pytest.skip("moto_server is not installed")
    started = start_moto()
    if started is None:
        pytest.fail("moto_server did not start")
    server, port = started
    try:
        yield port
    finally:
        server.terminate()
        server.wait(10)


async def test_a_stale_receipt_handle_is_not_fenced(moto_port: int) -> None:
    """After a redelivery the first receipt handle still deletes the message (moto, and
    SQS does not promise otherwise): hence ``fenced_settlement=False``."""
    transport = SqsTransport(
        f"sqs://127.0.0.1:{moto_port}?prefix=stale&visibility_timeout=1&endpoint=http"
    )
    await transport.start()
    try:
        assert transport.features.fenced_settlement is False
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        consumer = transport.consumer(sub)
        await transport.publish([Event(type="order.created", source="/t", data={})])
        (stale,) = await consumer.fetch(1, 5)
        await asyncio.sleep(1.2)
        (fresh,) = await consumer.fetch(1, 5)
        assert fresh.attempt == 2 and fresh.event.id == stale.event.id
        await stale.ack()  # accepted: it removed the new owner's copy
        assert await consumer.fetch(1, 1.5) == []
    finally:
        await transport.close()


async def test_non_matching_events_never_reach_the_queue_or_are_dropped(moto_port: int) -> None:
    transport = SqsTransport(f"sqs://127.0.0.1:{moto_port}?prefix=filters&endpoint=http")
    await transport.start()
    try:
        star = Subscription("star", ("order.*",))
        await transport.declare([star])
        consumer = transport.consumer(star)
        await transport.publish(
            [
                Event(type="order.created", source="/t", data={"n": 1}),
                Event(type="order.line.added", source="/t", data={"n": 2}),  # prefix only
                Event(type="payment.done", source="/t", data={"n": 3}),  # filtered by SNS
            ]
        )
        (got,) = await consumer.fetch(10, 2)
        assert got.event.type == "order.created"
        await got.ack()
        assert await consumer.fetch(10, 0.3) == []
        (stats,) = await transport.stats()
        assert (stats.ready, stats.in_flight, stats.processed) == (0, 0, 1)
    finally:
        await transport.close()


async def test_a_large_fetch_receives_several_batches_of_ten_at_once(moto_port: int) -> None:
    """``fetch(limit > 10)`` is not capped at one ReceiveMessage (10 messages): a full
    receive is followed by concurrent ones; ``ack_many`` deletes in batches of 10."""
    transport = SqsTransport(f"sqs://127.0.0.1:{moto_port}?prefix=wide&endpoint=http")
    await transport.start()
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        consumer = transport.consumer(sub)
        await transport.publish(
            [Event(type="order.created", source="/t", data={"n": n}) for n in range(45)]
        )
        got: list[Any] = list(await consumer.fetch(45, 2.0))
        assert len(got) > 10, "one fetch made one ReceiveMessage call"
        deadline = time.monotonic() + 10
        while len(got) < 45 and time.monotonic() < deadline:
            got += await consumer.fetch(45 - len(got), 1.0)
        assert sorted(d.event.data["n"] for d in got) == list(range(45))
        assert len({d.event.id for d in got}) == 45
        assert await consumer.ack_many(got) == []
        assert await consumer.fetch(50, 0.3) == []
        (stats,) = await transport.stats()
        assert (stats.ready, stats.in_flight, stats.processed) == (0, 0, 45)
    finally:
        await transport.close()


async def test_a_message_dead_lettered_twice_is_one_dead_letter(moto_port: int) -> None:
    """The lease of a delivery runs out while it is being dead-lettered (a slow broker),
    and the next receiver dead-letters the same message again: SQS fences neither, so
    the DLQ gets two copies. They carry the same source message id; browsing lists one
    entry (the first) and deletes the copy, and replay and purge see one entry."""
    transport = SqsTransport(
        f"sqs://127.0.0.1:{moto_port}?prefix=twice&visibility_timeout=1&endpoint=http"
    )
    await transport.start()
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        consumer = transport.consumer(sub)
        once = Event(type="order.created", source="/t", data={"n": 1})
        other = Event(type="order.created", source="/t", data={"n": 2})
        await transport.publish([once])
        (slow,) = await consumer.fetch(1, 5)
        await asyncio.sleep(1.2)  # the lease runs out before slow settles
        (again,) = await consumer.fetch(1, 5)
        assert again.attempt == 2 and again.event.id == once.id
        failure = Failure(reason="invalid-data", error_type="E", message="bad", attempts=1)
        await slow.dead_letter(failure)
        await again.dead_letter(Failure(reason="invalid-data", error_type="E", message="bad"))
        # the same event published twice is two messages: two dead letters
        await transport.publish([other, other])
        twins = [*await consumer.fetch(2, 5)]
        while len(twins) < 2:
            twins += await consumer.fetch(2 - len(twins), 5)
        for twin in twins:
            await twin.dead_letter(failure)
        (stats,) = await transport.stats()
        assert stats.dead_letters == 4  # before a browse: the DLQ's depth, copies and all

        entries = await transport.dead_letters("g")
        assert sorted(e.event.id for e in entries if e.event) == sorted(
            [once.id, other.id, other.id]
        )
        (first,) = [e for e in entries if e.event and e.event.id == once.id]
        assert first.failure.attempts == 1  # the first dead-lettering is the one kept
        (stats,) = await transport.stats()
        assert stats.dead_letters == 3
        assert await transport.replay([first.id]) == 1
        (replayed,) = await consumer.fetch(1, 5)
        assert replayed.event.id == once.id
        await replayed.ack()
        assert sorted(e.event.id for e in await transport.dead_letters("g") if e.event) == [
            other.id,
            other.id,
        ]
    finally:
        await transport.close()


def test_a_fetch_under_a_second_long_polls_a_whole_second() -> None:
    """SQS long-polls in whole seconds: a wait of a quarter second or more rounds to the
    nearest second (at least one), instead of down to zero, which made the runtime's
    0.5 s fetches short-poll an empty queue 10-20 times a second."""
    assert [_long_poll_seconds(r) for r in (0.1, 0.24, 0.25, 0.49, 1.2, 1.6, 99)] == [
        0,
        0,
        1,
        1,
        1,
        2,
        20,
    ]


async def test_an_idle_short_fetch_waits_in_one_long_poll(moto_port: int) -> None:
    transport = SqsTransport(f"sqs://127.0.0.1:{moto_port}?prefix=idle&endpoint=http")
    await transport.start()
    try:
        sub = Subscription("g", ("order.created",))
        await transport.declare([sub])
        consumer = transport.consumer(sub)
        started = time.monotonic()
        assert await consumer.fetch(10, 0.5) == []
        assert 0.9 < time.monotonic() - started < 1.75  # one long poll of 1 s
        waiting = asyncio.create_task(consumer.fetch(10, 0.5))
        await asyncio.sleep(0.3)
        published_at = time.monotonic()
        await transport.publish([Event(type="order.created", source="/t", data={})])
        (got,) = await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - published_at < 1.0  # the long poll returned with it
        await got.ack()
    finally:
        await transport.close()
