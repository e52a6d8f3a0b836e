"""Sensors publish readings over MQTT; nerve turns them into events and reacts.

::

    MQTT sensors/<id>/reading --(nerve MQTT source)--> sensor.reading
    sensor.reading  -> detect     running mean/variance per sensor    alert.raised
    alert.raised    -> notify     records the notification we would send

Run it against Mosquitto on 127.0.0.1:1883::

    nerve run examples.iot.app:app --mqtt mqtt://127.0.0.1:1883
    python -m examples.iot.sensors --count 200        # a few simulated sensors

**The detector.** Per sensor, it keeps the count, mean and sum of squared deviations
of the readings (Welford's online algorithm) in ``ctx.store``, so the statistics are
updated exactly once per reading even when a reading is delivered twice. A reading
is an anomaly when it is outside the hard limits, or when the sensor has at least
``WARMUP`` readings and the reading is more than ``SIGMAS`` standard deviations from
its mean. Anomalies do not update the statistics (a stuck sensor would otherwise
teach the detector that its fault is normal).
"""

from __future__ import annotations

import math
import time

from pydantic import BaseModel, Field

from nerve import App, Context
from nerve.sources.mqtt import MqttTopics

app = App("iot")

WARMUP = 10
SIGMAS = 4.0
LIMITS = (-40.0, 85.0)
"""The sensor's rated range (degrees Celsius): a reading outside it is always an alert."""


@app.event("sensor.reading", key="sensor_id")
class SensorReading(BaseModel):
    """One temperature reading of one sensor."""

    sensor_id: str = Field(min_length=1, max_length=64)
    temperature: float = Field(allow_inf_nan=False)


@app.event("alert.raised", key="sensor_id")
class AlertRaised(BaseModel):
    """A reading looked wrong."""

    sensor_id: str
    temperature: float
    reason: str


topics = MqttTopics(app)
topics.route("sensors/+/reading", type=SensorReading)

app.store_tables(
    """
    CREATE TABLE IF NOT EXISTS sensor_stats (
        sensor_id TEXT PRIMARY KEY,
        n         INTEGER NOT NULL,
        mean      REAL NOT NULL,
        m2        REAL NOT NULL    -- sum of squared deviations from the mean
    );
    CREATE TABLE IF NOT EXISTS alerts_sent (
        sensor_id   TEXT NOT NULL,
        temperature REAL NOT NULL,
        reason      TEXT NOT NULL,
        sent_at     REAL NOT NULL
    );
    """
)


def anomaly(temperature: float, n: int, mean: float, m2: float) -> str | None:
    """Why ``temperature`` is an anomaly for a sensor with these statistics, or None."""
    low, high = LIMITS
    if not low <= temperature <= high:
        return f"outside the rated range {low:g}..{high:g} C"
    if n >= WARMUP:
        std = math.sqrt(m2 / (n - 1))
        if std > 0 and abs(temperature - mean) > SIGMAS * std:
            sigmas = abs(temperature - mean) / std
            return f"{sigmas:.1f} standard deviations from the mean {mean:.2f} C"
    return None


@app.function(consumes=SensorReading, emits=[AlertRaised])
async def detect(reading: SensorReading, ctx: Context) -> None:
    """Raise an alert for readings far from the sensor's history."""
    row = await ctx.store.fetchone(
        "SELECT n, mean, m2 FROM sensor_stats WHERE sensor_id = ?", (reading.sensor_id,)
    )
    n, mean, m2 = (row["n"], row["mean"], row["m2"]) if row else (0, 0.0, 0.0)
    reason = anomaly(reading.temperature, n, mean, m2)
    if reason is not None:
        ctx.emit(
            AlertRaised(sensor_id=reading.sensor_id, temperature=reading.temperature, reason=reason)
        )
        return
    n += 1
    delta = reading.temperature - mean
    mean += delta / n
    m2 += delta * (reading.temperature - mean)
    await ctx.store.execute(
        "INSERT INTO sensor_stats (sensor_id, n, mean, m2) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (sensor_id) DO UPDATE SET n = excluded.n, mean = excluded.mean, "
        "m2 = excluded.m2",
        (reading.sensor_id, n, mean, m2),
    )


@app.function(consumes=AlertRaised)
async def notify(alert: AlertRaised, ctx: Context) -> None:
    """Tell the on-call engineer (here: record the message we would send)."""
    ctx.log.warning("sensor %s: %.2f C, %s", alert.sensor_id, alert.temperature, alert.reason)
    await ctx.store.execute(
        "INSERT INTO alerts_sent (sensor_id, temperature, reason, sent_at) VALUES (?, ?, ?, ?)",
        (alert.sensor_id, alert.temperature, alert.reason, time.time()),
    )
