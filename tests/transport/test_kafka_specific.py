"""Kafka-only behaviour: URL options, one key stays in one partition, and a CloudEvents
Kafka binary-mode record from a plain aiokafka producer reaches a group."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError
from nerve.event import Event
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
