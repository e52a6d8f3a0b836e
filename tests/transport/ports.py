"""Local ports of the servers the tests start, stop and restart: a free one, whether
something listens on one, and waiting until it does (or stops)."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening(port: int, host: str = HOST) -> bool:
    """Whether a server accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(
    port: int,
    seconds: float,
    *,
    up: bool = True,
    process: subprocess.Popen[Any] | None = None,
    host: str = HOST,
) -> bool:
    """True once ``host:port`` listens (``up``) or no longer does (``up=False``), within
    ``seconds``; False when they pass first, or when ``process`` (the server being
    started) exits first."""
    deadline = time.monotonic() + seconds
    while True:
        if listening(port, host) == up:
            return True
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            return False
        time.sleep(0.1)
