"""Restart the real local servers, for the conformance test of reconnecting mid-stream.

Each adapter file names its hook (``AdapterSpec.restart_server``). A hook stops the
server, starts it again with the commands of ``scripts/services`` and returns once it
accepts connections again; it ALWAYS tries to start the server, whatever failed, since
other test sessions share these servers. One restart runs at a time on this machine
(an exclusive lock file), and each is kept short.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from .ports import listening, wait_listening

LOCK = "/tmp/nerve-test-server-restart.lock"


def _run(*command: str, timeout: float = 60) -> None:
    subprocess.run(command, check=False, timeout=timeout, capture_output=True)


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _restart(
    name: str, port: int, tool: str, stop: Callable[[], None], start: Callable[[], None]
) -> None:
    if shutil.which(tool) is None and not os.path.exists(tool):
        pytest.skip(f"cannot restart {name} here: {tool} is not installed")
    with _exclusive():
        try:
            stop()
            assert wait_listening(port, 30, up=False), f"{name} did not stop"
        finally:
            if not listening(port):
                start()
            assert wait_listening(port, 60), f"{name} did not come back on port {port}"


def restart_redis() -> None:
    _restart(
        "Redis",
        6379,
        "redis-server",
        lambda: _run("redis-cli", "-p", "6379", "shutdown", "nosave"),
        lambda: _run(
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ),
    )


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0] if os.path.isdir("/etc/postgresql") else ""

    def stop() -> None:
        _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop", "-m", "fast")

    def start() -> None:
        _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")

    _restart("PostgreSQL", 5432, "pg_ctlcluster", stop, start)


def restart_rabbitmq() -> None:
    def start() -> None:
        _run("rabbitmqctl", "start_app", timeout=120)
        if not listening(5672):  # the whole node was down: start it as scripts/services does
            subprocess.run(
                "ulimit -n 65536 2>/dev/null; rabbitmq-server -detached", shell=True, check=False
            )

    _restart(
        "RabbitMQ", 5672, "rabbitmqctl", lambda: _run("rabbitmqctl", "stop_app", timeout=120), start
    )


def restart_nats() -> None:
    server = "/usr/sbin/nats-server"

    def stop() -> None:
        _run("start-stop-daemon", "--stop", "--oknodo", "--retry", "10", "--exec", server)

    def start() -> None:
        _run(
            "start-stop-daemon",
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            server,
            "--",
            "-a",
            "127.0.0.1",
            "-p",
            "4222",
            "-js",
            "-sd",
            "/var/lib/nats-server",
            "-l",
            "/var/log/nats-server.log",
        )

    _restart("NATS", 4222, server, stop, start)
