"""Sustained ingest over HTTP: POST /events (binary mode, durable 202) on the embedded broker.

::

    python -m benchmarks.http_ingest --events 20000 --seconds 30 --connections 16

What runs where:

- **server**: a real ``nerve run benchmarks.http_ingest:app`` process (the embedded
  SQLite broker in a temporary directory, its HTTP edge on 127.0.0.1, API keys
  required: the key check is part of every measured request), with one no-op
  function consuming the events (``--no-consumer``: none, to see ingest alone).
- **client**: this process. ``--connections`` keep-alive HTTP/1.1 connections, each
  with its own API key (so the per-key rate limit, 1,000 events/s by default, is not
  what is measured; 429s would show in ``statuses``), each sending one binary-mode
  CloudEvent at a time and waiting for the 202. The client is a minimal hand-written
  HTTP/1.1 writer/reader on asyncio streams, so that the client's own overhead stays
  small next to the server's.

It stops after ``--events`` accepted events or ``--seconds``, whichever comes first
(after a short warm-up), and reports the sustained rate (accepted events per second
of wall time) and the p50/p99/max latency of one request, as JSON on stdout. Every
202 means the event was durably in the broker (SQLite, synchronous=FULL, group
commit) when the response was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from nerve import App, Context

ROOT = Path(__file__).resolve().parents[1]

app = App("ingest")


@app.event("bench.ping")
class Ping(BaseModel):
    n: int
    note: str


@app.function(consumes=Ping, concurrency=64)
async def sink(ping: Ping, ctx: Context) -> None:
    """Consumes every event (so the broker's fan-out and acks are part of the load)."""


# --no-consumer: the same event type, but no function consumes it (ingest alone)
ingest_only = App("ingest")
ingest_only.event("bench.ping")(type("Ping", (Ping,), {}))


@ingest_only.event("bench.other")
class Other(BaseModel):
    n: int


@ingest_only.function(consumes=Other)
async def idle(other: Other, ctx: Context) -> None:
    """Never called: nothing publishes bench.other."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(port: int, key: str, n: int) -> bytes:
    body = orjson.dumps({"n": n, "note": "hello from the load generator"})
    head = (
        f"POST /events HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"authorization: Bearer {key}\r\n"
        "ce-specversion: 1.0\r\n"
        f"ce-id: {uuid.uuid4()}\r\n"
        "ce-source: /bench/http\r\n"
        "ce-type: bench.ping\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _load(
    port: int, keys: list[str], events: int, seconds: float, warmup: float
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted = 0
    counter = 0
    measuring = False
    stop_at = time.monotonic() + warmup + seconds
    started_at = 0.0

    async def worker(key: str) -> None:
        nonlocal accepted, counter
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop_at and accepted < events:
                counter += 1
                request = _request(port, key, counter)
                sent = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                took = time.perf_counter() - sent
                if measuring:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 202:
                        accepted += 1
                        latencies.append(took)
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker(k)) for k in keys]
    await asyncio.sleep(warmup)
    measuring = True
    started_at = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started_at
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "accepted": accepted,
        "seconds": round(elapsed, 2),
        "events_per_second": round(accepted / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(0.50), 2) if latencies else None,
        "p99_ms": round(pct(0.99), 2) if latencies else None,
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connections": len(keys),
    }


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nerve run exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server never became healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="stop after this many (max 1M)")
    parser.add_argument("--seconds", type=float, default=30.0, help="or after this long (max 600)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--no-consumer",
        action="store_true",
        help="no function consumes the events (measures ingest alone)",
    )
    args = parser.parse_args()
    events = min(args.events, 1_000_000)
    seconds = min(args.seconds, 600.0)
    connections = max(1, min(args.connections, 256))

    with tempfile.TemporaryDirectory(prefix="nerve-http-bench-") as tmp:
        broker = f"sqlite:///{tmp}/nerve.db"
        env = dict(os.environ, PYTHONPATH=str(ROOT), NERVE_BROKER=broker)
        keys = []
        for i in range(connections):
            made = subprocess.run(
                [sys.executable, "-m", "nerve", "keys", "create", f"load-{i}", "-s", "bench.*"],
                env=env,
                capture_output=True,
                check=True,
                cwd=ROOT,
            )
            keys.append(made.stdout.decode().strip())
        port = _free_port()
        log = Path(tmp, "server.log").open("wb")  # noqa: SIM115 (closed after the server)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nerve",
                "run",
                "benchmarks.http_ingest:" + ("ingest_only" if args.no_consumer else "app"),
                "--http",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        try:
            _wait_healthy(port, server)
            result = asyncio.run(_load(port, keys, events, seconds, args.warmup))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
        result["command"] = (
            f"python -m benchmarks.http_ingest --events {events} --seconds {seconds:g} "
            f"--connections {connections}" + (" --no-consumer" if args.no_consumer else "")
        )
        result["cpus"] = os.cpu_count()
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
