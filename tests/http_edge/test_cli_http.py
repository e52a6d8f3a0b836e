"""`nerve run` serving HTTP and MQTT as real processes; `nerve keys`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from nerve.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    started: list[tuple[subprocess.Popen[bytes], object]] = []

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"run{len(started)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "nerve", "run", *args],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
            stdout=log,
            stderr=log,
        )
        started.append((proc, log))
        return proc

    yield run
    for proc, log in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()  # type: ignore[attr-defined]


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "nerve run exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the HTTP edge never became healthy")


def test_keys_commands(tmp_path: Path) -> None:
    broker = f"sqlite:///{tmp_path}/nerve.db"
    code, out, err = invoke(
        "keys", "create", "ci", "--scope", "order.*", "-s", "admin", "-b", broker
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("nrv_") and "printed below ONCE" in err
    code, out, _ = invoke("keys", "list", "--json", "-b", broker)
    assert code == 0
    # never the secret (nrv_<id>_<secret>; the secret itself may hold "_")
    assert '"scopes"' in out and secret.split("_", 2)[2] not in out
    key_id = secret.split("_")[1]
    assert invoke("keys", "revoke", key_id, "-b", broker)[0] == 0
    code, _, err = invoke("keys", "revoke", key_id, "-b", broker)
    assert code == 2 and "no active key" in err
    code, _, err = invoke("keys", "create", "bad", "--scope", "order.>.x", "-b", broker)
    assert code == 2 and "is not valid" in err


def test_open_server_refuses_a_public_address(tmp_path: Path) -> None:
    broker = f"sqlite:///{tmp_path}/nerve.db"
    code, _, err = invoke(
        "run", "examples.shop.app:app", "-b", broker, "--http", f"0.0.0.0:{free_port()}"
    )
    assert code == 2
    assert "refusing to serve HTTP on 0.0.0.0: no API key is configured" in " ".join(err.split())


def test_busy_explicit_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = invoke(
            "run",
            "examples.shop.app:app",
            "-b",
            f"sqlite:///{tmp_path}/n.db",
            "--http",
            f"127.0.0.1:{port}",
        )
    assert code == 2
    assert "cannot listen on 127.0.0.1" in err and "--no-http" in err


@pytest.mark.slow
def test_processes_share_one_port_and_answer_orders(tmp_path: Path, spawn: object) -> None:
    port = free_port()
    broker = f"sqlite:///{tmp_path}/nerve.db"
    code, out, err = invoke("keys", "create", "shop-frontend", "-s", "order.created", "-b", broker)
    assert code == 0, err
    key = out.strip()
    proc = spawn(  # type: ignore[operator]
        "examples.shop.app:app", "-b", broker, "--processes", "2", "--http", f"127.0.0.1:{port}"
    )
    wait_healthy(port, proc)
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        order = {
            "order_id": "o-1",
            "customer_id": "c",
            "lines": [{"sku": "widget", "qty": 1}],
            "amount_cents": 7,
        }
        assert client.post("/orders", json=order).status_code == 401
        # no stock seeded: inventory dead-letters the unknown sku -> no outcome -> 504 later;
        # an order that runs out of stock has an outcome
        with_stock = subprocess.run(  # seed one SKU with 0 units through the store
            [sys.executable, "-c", SEED.format(db=str(tmp_path / "store.db"))], check=True
        )
        assert with_stock.returncode == 0
        answers = [
            client.post(
                "/orders",
                json=order | {"order_id": f"o-{i}", "lines": [{"sku": "empty", "qty": 1}]},
                headers=headers,
            )
            for i in range(6)
        ]
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert {a.json()["state"] for a in answers} == {"cancelled: out of stock"}
        assert client.get("/openapi.json").json()["paths"]["/orders"]["post"]
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    assert len(workers.stdout.split()) == 2


SEED = """
import sqlite3
conn = sqlite3.connect({db!r}, timeout=30)
conn.execute("INSERT INTO stock (sku, received, available, reserved) VALUES ('empty', 0, 0, 0)")
conn.commit()
"""


@pytest.mark.slow
def test_nerve_run_bridges_mqtt(tmp_path: Path, spawn: object) -> None:
    from tests.sources.test_mqtt import require_mosquitto

    require_mosquitto()
    import asyncio
    import sqlite3
    import uuid

    from examples.iot.sensors import publish_readings

    port = free_port()
    broker = f"sqlite:///{tmp_path}/nerve.db"
    group = uuid.uuid4().hex[:8]
    proc = spawn(  # type: ignore[operator]
        "examples.iot.app:app",
        "-b",
        broker,
        "--http",
        f"127.0.0.1:{port}",
        "--mqtt",
        f"mqtt://127.0.0.1:1883?group={group}",
    )
    wait_healthy(port, proc)
    sensor = f"cli-{group}"
    asyncio.run(publish_readings("127.0.0.1", 1883, [sensor], 50, faulty={sensor}))
    deadline = time.monotonic() + 30
    alerts: list[tuple[str]] = []
    while time.monotonic() < deadline and not alerts:
        time.sleep(0.2)
        with sqlite3.connect(tmp_path / "store.db", timeout=30) as conn:
            alerts = conn.execute(
                "SELECT sensor_id FROM alerts_sent WHERE sensor_id = ?", (sensor,)
            ).fetchall()
    assert alerts == [(sensor,)]


@pytest.mark.slow
def test_nerve_run_webhook_option(tmp_path: Path, spawn: object) -> None:
    from nerve.http.webhooks import sign

    from .conftest import WEBHOOK_SECRET

    port = free_port()
    broker = f"sqlite:///{tmp_path}/nerve.db"
    proc = spawn(  # type: ignore[operator]
        "examples.shop.app:app",
        "-b",
        broker,
        "--http",
        f"127.0.0.1:{port}",
        "--webhook",
        "storefront=order.created",
        env={"NERVE_WEBHOOK_SECRET_STOREFRONT": f"whsec_{'A' * 32} {WEBHOOK_SECRET}"},
    )
    wait_healthy(port, proc)
    body = (
        b'{"order_id": "w-1", "customer_id": "c", "lines": [{"sku": "x", "qty": 1}], '
        b'"amount_cents": 5}'
    )
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_cli_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(WEBHOOK_SECRET, "msg_cli_1", stamp, body),  # the second secret
    }
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.post("/webhooks/storefront", headers=headers, content=body).status_code == 202
        assert client.post("/webhooks/storefront", headers=headers, content=body).status_code == 200
        bad = dict(
            headers, **{"webhook-signature": sign(f"whsec_{'B' * 32}", "msg_cli_2", stamp, body)}
        )
        assert client.post("/webhooks/storefront", headers=bad, content=body).status_code == 401
        assert client.get("/metrics").status_code == 200  # observability's routes are mounted


def test_webhook_without_its_secret_is_one_line(tmp_path: Path) -> None:
    code, _, err = invoke(
        "run",
        "examples.shop.app:app",
        "-b",
        f"sqlite:///{tmp_path}/n.db",
        "--http",
        f"127.0.0.1:{free_port()}",
        "--webhook",
        "nosecret=order.created",
    )
    assert code == 2
    assert "NERVE_WEBHOOK_SECRET_NOSECRET" in err


def test_busy_default_port_means_no_http_in_this_process(tmp_path: Path) -> None:
    from nerve.errors import ConfigError
    from nerve.http.running import prepare

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        store = f"sqlite:///{tmp_path}/store.db"
        assert prepare(listen, store, [], explicit=False).bind() is False
        with pytest.raises(ConfigError, match="cannot listen"):
            prepare(listen, store, [], explicit=True).bind()


def test_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from nerve.errors import ConfigError
    from nerve.http.running import limits_from_env

    monkeypatch.setenv("NERVE_HTTP_RATE", "0")
    monkeypatch.setenv("NERVE_HTTP_MAX_BODY", "2048")
    assert limits_from_env() == {"rate": None, "max_body": 2048}
    monkeypatch.setenv("NERVE_HTTP_BURST", "lots")
    with pytest.raises(ConfigError, match="NERVE_HTTP_BURST"):
        limits_from_env()
