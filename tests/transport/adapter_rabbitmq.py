"""RabbitMQ in the conformance suite: every test gets its own name prefix on the local
server, and its queues expire a minute after their last use (``queue_expires``), so
runs never see each other's exchanges and queues and the server does not fill up
(each quorum queue holds a few of the broker's file handles)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .conftest import AdapterSpec, require_server
from .restarts import restart_rabbitmq


def make_url(directory: Path) -> str:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    # the directory's creation time tells apart two sessions that reuse a tmp path
    try:
        stamp = str(directory.stat().st_ctime_ns)
    except OSError:
        stamp = ""
    digest = hashlib.sha256(f"{directory}\0{stamp}".encode()).hexdigest()[:12]
    return f"amqp://guest:guest@127.0.0.1:5672/?prefix=t{digest}&queue_expires=60"


SPEC = AdapterSpec("rabbitmq", make_url, restartable=True, restart_server=restart_rabbitmq)
