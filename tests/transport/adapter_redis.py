"""The conformance suite's entry for ``redis://`` (a Redis server on 127.0.0.1:6379).

Each broker the suite makes is a fresh key prefix derived from its directory, so
tests never see each other's data on the one shared server.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .conftest import AdapterSpec, require_server


def make_url(directory: Path) -> str:
    require_server("Redis", "127.0.0.1", 6379)
    tag = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return f"redis://127.0.0.1:6379/0?prefix=nerve-test-{tag}"


SPEC = AdapterSpec("redis", make_url, restartable=True)
