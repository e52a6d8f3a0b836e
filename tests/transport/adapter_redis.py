"""The conformance suite's entry for ``redis://`` (a Redis server on 127.0.0.1:6379).

Each broker the suite makes is a fresh key prefix derived from its directory and a
per-session salt, so tests never see each other's (or an earlier run's) data on the
one shared server; the session's keys are deleted when the test process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
from pathlib import Path

from .conftest import AdapterSpec, require_server
from .restarts import restart_redis

SESSION = os.urandom(3).hex()
"""Salt of this test process's prefixes."""


def make_url(directory: Path) -> str:
    require_server("Redis", "127.0.0.1", 6379)
    tag = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return f"redis://127.0.0.1:6379/0?prefix=nerve-test-{SESSION}-{tag}"


@atexit.register
def _forget_this_session() -> None:
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
        keys = list(client.scan_iter(match=f"nerve-test-{SESSION}-*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()


SPEC = AdapterSpec("redis", make_url, restartable=True, restart_server=restart_redis)
