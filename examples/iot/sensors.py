"""Simulated sensors: publish temperature readings to MQTT (bounded in count).

``python -m examples.iot.sensors --count 200 --sensors 3 --faulty 1`` publishes 200
readings per sensor around 21 C; the faulty sensors spike every 50th reading.
Readings go as plain JSON; ``--cloudevents`` sends MQTT 5 binary-mode CloudEvents.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid
from datetime import UTC, datetime

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def binary_properties(sensor_id: str) -> Properties:
    """MQTT 5 binary-mode CloudEvent attributes as user properties."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.UserProperty = [
        ("specversion", "1.0"),
        ("id", str(uuid.uuid4())),
        ("source", f"/sensors/{sensor_id}"),
        ("type", "sensor.reading"),
        ("time", datetime.now(UTC).isoformat()),
    ]
    return props


async def publish_readings(
    host: str,
    port: int,
    sensor_ids: list[str],
    count: int,
    *,
    faulty: frozenset[str] | set[str] = frozenset(),
    cloudevents: bool = False,
    seed: int = 7,
) -> int:
    """Publish ``count`` readings per sensor (QoS 1); returns how many were sent."""
    rng = random.Random(seed)
    sent = 0
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for i in range(count):
            for sensor_id in sensor_ids:
                temperature = 21.0 + rng.gauss(0, 0.3)
                if sensor_id in faulty and i % 50 == 49:
                    temperature += 15.0
                body = orjson.dumps({"sensor_id": sensor_id, "temperature": temperature})
                await client.publish(
                    f"sensors/{sensor_id}/reading",
                    body,
                    qos=1,
                    properties=binary_properties(sensor_id) if cloudevents else None,
                )
                sent += 1
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--count", type=int, default=100, help="readings per sensor (max 100000)")
    parser.add_argument("--sensors", type=int, default=3)
    parser.add_argument("--faulty", type=int, default=1)
    parser.add_argument("--cloudevents", action="store_true")
    args = parser.parse_args()
    ids = [f"s{i}" for i in range(args.sensors)]
    sent = asyncio.run(
        publish_readings(
            args.host,
            args.port,
            ids,
            min(args.count, 100_000),
            faulty=set(ids[: args.faulty]),
            cloudevents=args.cloudevents,
        )
    )
    print(f"published {sent} readings")


if __name__ == "__main__":
    main()
