"""NATS JetStream (nats-server -js on 127.0.0.1:4222) in the conformance suite.

Each broker of a test is its own pair of streams, named after a hash of the test's
directory, so tests never see each other's data. Test streams keep events for an hour
(``max_age``); streams of earlier sessions older than that are deleted once per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from pathlib import Path

from .conftest import AdapterSpec, require_server
from .restarts import restart_nats

HOST, PORT = "127.0.0.1", 4222
PREFIX = "nervetest_"
_cleaned = False


async def _delete_old_test_streams(older_than: float = 3600.0) -> None:
    import nats

    nc = await nats.connect(f"nats://{HOST}:{PORT}", connect_timeout=2, allow_reconnect=False)
    try:
        jsm = nc.jetstream()
        for info in await jsm.streams_info():
            name = info.config.name or ""
            created = info.created
            old = created is not None and time.time() - created.timestamp() > older_than
            if name.startswith(PREFIX) and old:
                await jsm.delete_stream(name)
    finally:
        await nc.close()


def _clean_once() -> None:
    global _cleaned
    if _cleaned:
        return
    _cleaned = True

    def run() -> None:
        # best effort: leftovers are emptied by their max_age anyway
        with contextlib.suppress(Exception):
            asyncio.run(_delete_old_test_streams())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)


def make_url(directory: Path) -> str:
    require_server("NATS", HOST, PORT)
    _clean_once()
    stream = PREFIX + hashlib.sha1(str(directory).encode()).hexdigest()[:12]
    return f"nats://{HOST}:{PORT}?stream={stream}&max_age=3600&dlq_max_age=3600"


SPEC = AdapterSpec(
    "nats", make_url, restartable=True, shared_instance=False, restart_server=restart_nats
)
