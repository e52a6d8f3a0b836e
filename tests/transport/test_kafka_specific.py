"""Kafka-only behaviour: URL options, one key stays in one partition, and a CloudEvents
Kafka binary-mode record from a plain aiokafka producer reaches a group."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError
from nerve.event import Event
from nerve.transport.base import Failure
from nerve.transport.kafka import KafkaConfig, KafkaTransport

from .adapter_kafka import make_url


def test_url_options_are_parsed_and_checked() -> None:
    config = KafkaConfig.from_url(
        "kafka://k1:9093,k2?prefix=shop&partitions=3&visibility_timeout=5&max_payload=70000"
    )
    assert config.bootstrap == ("k1:9093", "k2:9092")
    assert (config.prefix, config.partitions, config.visibility_timeout) == ("shop", 3, 5.0)
    assert config.max_payload == 70000
    for bad in (
        "kafka://h?nope=1",
        "kafka://h?prefix=a b",
        "kafka://h?partitions=0",
        "kafka://h?visibility_timeout=x",
        "redis://h",
    ):
        with pytest.raises(ConfigError):
            KafkaConfig.from_url(bad)
    with pytest.raises(ConfigError) as caught:
        KafkaConfig.from_url("kafka://u:secret@h:9092")
    assert "secret" not in str(caught.value)


async def test_unreachable_broker_is_one_line_without_credentials() -> None:
    transport = KafkaTransport("kafka://127.0.0.1:9?prefix=x")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        await transport.start()
    assert time.monotonic() - started < 30
    assert "127.0.0.1:9" in str(caught.value) and "\n" not in str(caught.value)
    await transport.close()


async def test_one_key_lands_in_one_partition_in_order(tmp_path: Path) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

    transport = KafkaTransport(make_url(tmp_path))
    await transport.start()
    try:
        await transport.declare([Subscription("g", ("order.*",))])
        sent = [
            Event(type="order.created", source="/t", data={"n": i}, extensions={"partitionkey": k})
            for i in range(12)
            for k in ("a", "b")
        ]
        await transport.publish(sent)
        config = transport.config
        reader = AIOKafkaConsumer(bootstrap_servers=list(config.bootstrap), group_id=None)
        await reader.start()
        try:
            tps = [TopicPartition(transport.events_topic, p) for p in range(config.partitions)]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            seen: dict[str, set[int]] = {}
            order: dict[str, list[int]] = {}
            deadline = time.monotonic() + 10
            while sum(len(v) for v in order.values()) < len(sent):
                assert time.monotonic() < deadline
                for tp, records in (await reader.getmany(timeout_ms=200)).items():
                    for record in records:
                        key = record.key.decode()
                        seen.setdefault(key, set()).add(tp.partition)
                        order.setdefault(key, []).append(json.loads(record.value)["data"]["n"])
        finally:
            await reader.stop()
        assert all(len(partitions) == 1 for partitions in seen.values())
        assert order == {"a": list(range(12)), "b": list(range(12))}
    finally:
        await transport.close()


async def test_a_binary_mode_record_from_a_plain_producer_is_delivered(tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer

    transport = KafkaTransport(make_url(tmp_path))
    await transport.start()
    producer = AIOKafkaProducer(bootstrap_servers=list(transport.config.bootstrap))
    await producer.start()
    try:
        await transport.declare([Subscription("g", ("order.created",))])
        consumer = transport.consumer(Subscription("g", ("order.created",)))
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"ext-1"),
            ("ce_source", b"/legacy"),
            ("ce_type", b"order.created"),
            ("ce_partitionkey", b"A-1"),
            ("content-type", b"application/json"),
        ]
        await producer.send_and_wait(
            transport.events_topic, b'{"order_id": "A-1"}', key=b"A-1", headers=headers
        )
        got = []
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            got = list(await consumer.fetch(10, 1.0))
        (delivery,) = got
        event = delivery.event
        assert (event.id, event.type, event.source) == ("ext-1", "order.created", "/legacy")
        assert event.data == {"order_id": "A-1"} and event.partitionkey == "A-1"
        await delivery.ack()
        assert list(await consumer.fetch(10, 0.2)) == []
    finally:
        await producer.stop()
        await transport.close()
        await asyncio.sleep(0)


async def test_stats_count_every_record_of_a_batch(tmp_path: Path) -> None:
    """Tansu answers ListOffsets(latest) with the base offset of a partition's last
    record batch plus one, so ``end_offsets`` lags behind acknowledged publishes by the
    size of that batch minus one. stats() checks a listed end by fetching the last
    batch: a group's backlog counts every record, seen from a process that owns none of
    the group's partitions too."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    url = make_url(tmp_path)
    owner, onlooker = KafkaTransport(url), KafkaTransport(url)
    await owner.start()
    await onlooker.start()
    try:
        sub = Subscription("g", ("order.created",))
        await owner.declare([sub])
        await owner.publish(
            [Event(type="order.created", source="/t", data={"n": n}) for n in range(50)]
        )
        config = owner.config
        reader = AIOKafkaConsumer(bootstrap_servers=list(config.bootstrap), group_id=None)
        await reader.start()
        try:
            tps = [TopicPartition(owner.events_topic, p) for p in range(config.partitions)]
            listed = sum((await reader.end_offsets(tps)).values())
        finally:
            await reader.stop()
        assert listed <= 50  # 50 is right; Tansu lists fewer (one per batch)
        for transport in (owner, onlooker):  # its member owns the partitions; the other none
            (stats,) = [s for s in await transport.stats() if s.group == "g"]
            assert (stats.ready, stats.in_flight, stats.delayed) == (50, 0, 0), stats
            assert stats.extra == {"counted_by": "this process"}
    finally:
        await onlooker.close()
        await owner.close()


async def test_the_backlog_seen_elsewhere_empties_when_the_last_records_are_skipped(
    tmp_path: Path,
) -> None:
    """A member commits how far it read also when the last records it read were all
    skipped (its subscription does not want them), so another process's stats (end
    minus committed offsets) reach zero once the group is idle."""
    url = make_url(tmp_path)
    worker, onlooker = KafkaTransport(url), KafkaTransport(url)
    await worker.start()
    await onlooker.start()
    try:
        sub = Subscription("g", ("order.created",))
        await worker.declare([sub])
        consumer = worker.consumer(sub)
        await worker.publish(
            [Event(type="order.created", source="/t", data={"n": n}) for n in range(10)]
        )
        got: list[Any] = []
        deadline = time.monotonic() + 10
        while len(got) < 10:
            assert time.monotonic() < deadline
            got += await consumer.fetch(10 - len(got), 1.0)
        assert await consumer.ack_many(got) == []
        # right after the ack's commit: records the group does not want, read and skipped
        await worker.publish([Event(type="payment.done", source="/t", data={}) for _ in range(5)])
        deadline = time.monotonic() + 8
        while True:
            (stats,) = [s for s in await onlooker.stats() if s.group == "g"]
            if stats.backlog == 0:
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.2)
        assert stats.processed == 0 and stats.in_flight == 0  # the onlooker's own counters
        assert [s.processed for s in await worker.stats() if s.group == "g"] == [10]
    finally:
        await onlooker.close()
        await worker.close()


_DEAD_LETTER_AND_DIE = """
import asyncio, os, signal, sys
from nerve.app import Subscription
from nerve.transport import from_url
from nerve.transport.base import Failure

async def main():
    transport = from_url(sys.argv[1])
    await transport.start()
    consumer = transport.consumer(Subscription("g", ("order.created",)))
    got = await consumer.fetch(1, 0.1)
    print("READY", flush=True)
    for _ in range(200):
        got = got or await consumer.fetch(1, 0.1)
    (delivery,) = got
    await delivery.dead_letter(Failure("dead-letter", "ValueError", "first", attempts=1))
    # killed at once: no await in between, so the member never commits past the record
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_record_dead_lettered_again_after_a_kill_is_one_dead_letter(
    tmp_path: Path,
) -> None:
    """A member produces a record's dead letter, then dies before its committed offset
    passes the record: the partition's next owner reads it again (attempt 2) and
    dead-letters it again. Both DLQ records name the same source record; the DLQ shows
    the first one only, and stats count one."""
    url = make_url(tmp_path)
    survivor = KafkaTransport(url)
    await survivor.start()
    victim = None
    try:
        sub = Subscription("g", ("order.created",))
        await survivor.declare([sub])
        victim = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DEAD_LETTER_AND_DIE, url, stdout=asyncio.subprocess.PIPE
        )
        assert victim.stdout is not None
        line = await asyncio.wait_for(victim.stdout.readline(), 30)
        assert line.strip() == b"READY"
        event = Event(type="order.created", source="/t", data={"n": 1})
        await survivor.publish([event])
        assert await asyncio.wait_for(victim.wait(), 30) == -signal.SIGKILL
        consumer = survivor.consumer(sub)
        got: list[Any] = []
        deadline = time.monotonic() + 30  # the victim's session timeout (3 s), a rebalance
        while not got:
            assert time.monotonic() < deadline
            got = list(await consumer.fetch(1, 1.0))
        (again,) = got
        assert again.event.id == event.id and again.attempt >= 2
        await again.dead_letter(Failure("dead-letter", "ValueError", "second", attempts=2))

        (entry,) = await survivor.dead_letters("g")
        assert entry.event is not None and entry.event.id == event.id
        assert entry.failure.message == "first"
        (stats,) = [s for s in await survivor.stats() if s.group == "g"]
        assert stats.dead_letters == 1 and stats.backlog == 0
        assert await survivor.replay([entry.id]) == 1
        (replayed,) = await consumer.fetch(1, 10.0)
        assert replayed.event.id == event.id
        await replayed.ack()
        assert await survivor.dead_letters("g") == []
    finally:
        if victim is not None and victim.returncode is None:
            victim.kill()
            await victim.wait()
        await survivor.close()
