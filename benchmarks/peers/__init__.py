"""The other sides of ``python -m benchmarks compare``: nerve's Apps for fan-out and
latency, the raw clients for those workloads, and the peer frameworks (FastStream,
Dramatiq, Celery, taskiq), each as ``python -m benchmarks.peers SYSTEM produce|consume``.

The peer frameworks are the ``peers`` extra: ``pip install -e '.[bench,peers]'``.
"""

from __future__ import annotations

MODULES = {
    "nerve": "benchmarks.peers.nerve_side",
    "raw": "benchmarks.peers.raw_side",
    "faststream": "benchmarks.peers.faststream_app",
    "dramatiq": "benchmarks.peers.dramatiq_app",
    "celery": "benchmarks.peers.celery_app",
    "taskiq": "benchmarks.peers.taskiq_app",
}

PEERS: dict[str, tuple[str, ...]] = {
    "faststream": ("nats", "rabbitmq", "redis", "kafka"),
    "dramatiq": ("redis", "rabbitmq"),
    "celery": ("redis", "rabbitmq"),
    "taskiq": ("nats", "redis", "rabbitmq"),
}
"""Peer framework -> the brokers it runs on here."""

DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "faststream": ("faststream",),
    "dramatiq": ("dramatiq",),
    "celery": ("celery", "kombu"),
    "taskiq": ("taskiq", "taskiq-nats", "taskiq-redis", "taskiq-aio-pika"),
}
