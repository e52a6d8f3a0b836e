"""The MQTT source against the real Mosquitto on 127.0.0.1:1883, and the IoT example."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from examples.iot import app as iot
from examples.iot.sensors import publish_readings
from nerve import Runtime
from nerve.errors import ConfigError, InvalidEvent
from nerve.event import Event, encode
from nerve.sources.mqtt import MqttRoute, MqttSource, find_topics, to_event, topic_matches
from tests.transport.conftest import require_server

HOST, PORT = "127.0.0.1", 1883


def require_mosquitto() -> None:
    require_server("Mosquitto", HOST, PORT)


ROUTE = MqttRoute("sensors/+/reading", "sensor.reading", ("sensor.reading",))


def test_topic_filters() -> None:
    assert topic_matches("sensors/+/reading", "sensors/a/reading")
    assert not topic_matches("sensors/+/reading", "sensors/a/b/reading")
    assert topic_matches("sensors/#", "sensors/a/b")
    assert not topic_matches("sensors/+", "sensors")


def test_message_conversions() -> None:
    plain = to_event(ROUTE, "sensors/s1/reading", b'{"sensor_id": "s1", "temperature": 20}')
    assert (plain.type, plain.subject, plain.source) == (
        "sensor.reading",
        "sensors/s1/reading",
        "/mqtt/sensors/s1/reading",
    )
    structured = Event(type="sensor.reading", source="/dev/1", data={"x": 1})
    assert to_event(ROUTE, "sensors/s1/reading", encode(structured)).id == structured.id
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.UserProperty = [
        ("specversion", "1.0"),
        ("id", "b1"),
        ("source", "/d"),
        ("type", "sensor.reading"),
        ("site", "north"),
    ]
    binary = to_event(ROUTE, "sensors/s1/reading", b'{"t": 1}', props)
    assert (binary.id, binary.extensions["site"], binary.data) == ("b1", "north", {"t": 1})
    with pytest.raises(InvalidEvent, match="not JSON"):
        to_event(ROUTE, "sensors/s1/reading", b"\xff\x00")
    sneaky = Event(type="alert.raised", source="/d", data={})
    with pytest.raises(InvalidEvent, match="may not be sent"):
        to_event(ROUTE, "sensors/s1/reading", encode(sneaky))


def test_routes_are_declared_beside_the_app() -> None:
    assert find_topics(iot.app) == [ROUTE]
    with pytest.raises(ConfigError, match="mqtt://"):
        MqttSource(iot.app, None, [ROUTE], url="http://x")  # type: ignore[arg-type]


async def test_unreachable_broker_is_one_clear_error(tmp_path: Path) -> None:
    runtime = Runtime(iot.app, broker="memory://")
    source = MqttSource(iot.app, runtime.transport, [ROUTE], url="mqtt://127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"cannot use the MQTT broker at 127\.0\.0\.1:1"):
        await source.start()


@pytest.mark.slow
async def test_iot_pipeline_over_real_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    runtime = Runtime(iot.app, broker=f"sqlite:///{tmp_path}/nerve.db?poll_interval=0.01")
    await runtime.start()
    group = f"t{uuid.uuid4().hex[:8]}"
    source = MqttSource(
        iot.app, runtime.transport, find_topics(iot.app), url=f"mqtt://{HOST}:{PORT}?group={group}"
    )
    await source.start()
    run = uuid.uuid4().hex[:6]
    healthy, faulty = f"ok-{run}", f"bad-{run}"
    try:
        sent = await publish_readings(HOST, PORT, [healthy, faulty], 100, faulty={faulty})
        sent += await publish_readings(HOST, PORT, [f"ce-{run}"], 20, cloudevents=True)
        # garbage on the topic is dropped and counted, never published
        async with aiomqtt.Client(HOST, PORT, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.publish(f"sensors/{healthy}/reading", b"not json", qos=1)
            await client.publish(
                f"sensors/{healthy}/reading",
                orjson.dumps({"sensor_id": healthy, "temperature": "hot"}),
                qos=1,
            )
        deadline = time.monotonic() + 30
        while source.published < sent and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert source.published >= sent
        await runtime.wait_idle(timeout=60)
        mine = [
            r
            for r in await runtime.store.query("SELECT * FROM alerts_sent")
            if run in r["sensor_id"]
        ]
        assert source.rejected >= 2
        # the faulty sensor spiked twice (readings 50 and 100); the healthy one never did
        assert sorted(r["sensor_id"] for r in mine) == [faulty, faulty]
        assert all("standard deviations" in r["reason"] for r in mine)
        stats = {
            r["sensor_id"]: r["n"]
            for r in await runtime.store.query("SELECT * FROM sensor_stats")
            if run in r["sensor_id"]
        }
        assert stats == {healthy: 100, faulty: 98, f"ce-{run}": 20}
    finally:
        await source.stop()
        await runtime.stop()
