"""The conformance suite's entry for ``sqs://``: SQS + SNS emulated by moto in server
mode, started by this module on 127.0.0.1 (a free port) on first use and stopped when
the test process exits. Each broker the suite makes is its own name prefix (topic and
queues), derived from its directory and a per-session salt. Credentials are dummies.

moto keeps everything in memory: data survives reconnecting transports (the durability
test's "restart"), not a restart of moto itself.

Two things about moto 5.x that this file works around, both the emulator's, not SQS's:

- moto's SQS backend is not thread-safe, and ``moto_server`` handles each request in a
  thread: two concurrent ``ReceiveMessage`` calls on one queue can both hand out the
  same message, and two concurrent deletes can resurrect a deleted one. The server is
  therefore started through :data:`_LAUNCHER`, which is ``moto_server`` with every SQS
  backend operation under one lock (released while a long poll waits), as SQS itself
  behaves. Nothing else of moto is changed.
- moto does work proportional to a queue's length for every message it sends or
  receives (it recomputes all queue attributes), so bulk tests are quadratic on it:
  the spec declares ``scale=0.25`` (the suite's bulk tests use a quarter of their
  events; printed in the features table). Real SQS has no such cost.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import AdapterSpec
from .ports import free_port, wait_listening

SESSION = os.urandom(2).hex()
_server: subprocess.Popen[bytes] | None = None
_port: int | None = None

for _name, _value in (
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_SECURITY_TOKEN", "testing"),
    ("AWS_SESSION_TOKEN", "testing"),
):
    os.environ.setdefault(_name, _value)


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


_LAUNCHER = Path(__file__).resolve().parents[2] / "scripts" / "moto_server.py"
"""``moto_server`` with its SQS backend made thread-safe (see its docstring); shared
with ``scripts/services``, which starts one on port 5000 for interactive use."""


def _installed() -> bool:
    """moto's server can run in this interpreter (``moto[server]``: moto, flask)."""
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask"))


def start_moto() -> tuple[subprocess.Popen[bytes], int] | None:
    """A moto_server of this interpreter (through ``_LAUNCHER``) on a free port on
    127.0.0.1, once it listens; None (the process gone) if it did not within 20 s."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(_LAUNCHER), "--watch-parent", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if wait_listening(port, 20, process=server):
        return server, port
    server.kill()
    server.wait()
    return None


def _ensure_server() -> int:
    global _server, _port
    if _server is not None and _server.poll() is None and _port is not None:
        return _port
    if not _installed():
        _unavailable("moto_server is not installed (pip install 'moto[server]')")
    started = start_moto()
    if started is None:
        _unavailable("moto_server did not listen on 127.0.0.1 within 20 s")
        raise AssertionError("unreachable")
    _server, _port = started
    return _port


@atexit.register
def _stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.terminate()
        try:
            _server.wait(5)
        except subprocess.TimeoutExpired:
            _server.kill()


def make_url(directory: Path) -> str:
    port = _ensure_server()
    tag = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return (
        f"sqs://127.0.0.1:{port}?region=us-east-1&prefix=t{SESSION}{tag}"
        "&visibility_timeout=30&max_payload=260096&endpoint=http"
    )


SPEC = AdapterSpec("sqs", make_url, restartable=True, scale=0.25)
