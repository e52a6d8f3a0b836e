"""``python -m benchmarks redis-server``: the Redis server's instructions per event.

What ``redis://`` costs the *server*, counted instead of timed: a ``redis-server`` of
its own (127.0.0.1, a free port, no persistence) runs under ``valgrind
--tool=callgrind`` while nerve's adapter publishes, claims and acks events of one
ordered function (the events of ``benchmarks/apps.py``, keyed, in batches of 100). Each
workload runs twice, with N and 4N events, on a fresh server each time; instructions
per event = the difference of the two totals / 3N, so start-up and the fixed costs of
a run cancel out. Instruction counts do not drift with the machine's load, so a change
of a few percent shows, where wall-clock throughput on a shared 2-core VM swings by
20-40% between runs.

Workloads:

- ``steady``: publish 100, claim them, ack them, again and again: the queue stays
  small, as in a run whose consumers keep up (what ``benchmarks brokers`` measures);
- ``bulk``: publish all, then claim all, then ack all: the queue holds every event.

``--keep`` keeps callgrind's files (``callgrind_annotate`` shows where the instructions
go; Lua's own functions have no symbols in Debian's build: the interpreter loop and the
string interning are the large unnamed ones). Needs ``valgrind`` and ``redis-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

WORKLOADS = ("steady", "bulk")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _total(path: Path) -> int:
    """The instructions a callgrind output file counted (its ``totals:`` line)."""
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"{path}: no totals line")


async def _workload(port: int, kind: str, events: int) -> None:
    from benchmarks.apps import make_orders
    from nerve.app import Subscription
    from nerve.transport.redis import RedisTransport

    transport = RedisTransport(f"redis://127.0.0.1:{port}/0?prefix=bench")
    await transport.start()
    try:
        sub = Subscription("sink", ("order.placed",), (), True)
        await transport.declare([sub])
        consumer = transport.consumer(sub)
        orders = make_orders(events)
        batches = [orders[i : i + 100] for i in range(0, events, 100)]
        if kind == "steady":
            for batch in batches:
                await transport.publish(batch)
                got: list[Any] = []
                while len(got) < len(batch):
                    got += await consumer.fetch(200, 5.0)
                await consumer.ack_many(got)
        else:
            for batch in batches:
                await transport.publish(batch)
            got = []
            while len(got) < events:
                got += await consumer.fetch(200, 5.0)
            for start in range(0, events, 100):
                await consumer.ack_many(got[start : start + 100])
        await consumer.close()
    finally:
        await transport.close()


def _one_run(kind: str, events: int, out: Path) -> int:
    """Instructions of a fresh server under callgrind for one workload of ``events``."""
    port = _free_port()
    server = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            shutil.which("redis-server") or "redis-server", "--port", str(port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("redis-server under valgrind did not start") from None
                time.sleep(0.2)
        asyncio.run(_workload(port, kind, events))
        subprocess.run(
            ["redis-cli", "-p", str(port), "shutdown", "nosave"],
            capture_output=True,
            timeout=60,
        )
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return _total(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", type=int, default=2000, help="N: the small run's events (2000; 4N too)"
    )
    parser.add_argument("--workloads", default="steady,bulk", help="comma-separated: steady, bulk")
    parser.add_argument("--keep", action="store_true", help="keep callgrind's output files")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Bad options end in ``parser.error`` (a message on stderr, exit 2), as the other
    suites' do."""
    console = Console()
    kinds = [k.strip() for k in args.workloads.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in WORKLOADS]
    if unknown or not kinds:
        parser.error(f"--workloads: {', '.join(unknown) or '(none)'}? use steady and/or bulk")
    if args.events < 100:
        parser.error("--events must be at least 100 (one publish batch)")
    missing = [tool for tool in ("valgrind", "redis-server", "redis-cli") if not shutil.which(tool)]
    if missing:
        parser.error(f"needs {', '.join(missing)} (Debian: apt-get install valgrind redis-server)")
    keep = Path(tempfile.mkdtemp(prefix="nerve-redis-server-"))
    results: dict[str, float] = {}
    small, large = args.events, 4 * args.events
    for kind in kinds:
        totals = []
        for n in (small, large):
            console.print(f"[dim]{kind}: {n:,} events on a redis-server under callgrind...[/]")
            totals.append(_one_run(kind, n, keep / f"callgrind.{kind}.{n}"))
        results[kind] = (totals[1] - totals[0]) / (large - small)
    table = Table(title="Redis server instructions per event (publish + claim + ack)")
    table.add_column("workload")
    table.add_column("instructions/event", justify="right")
    for kind, per_event in results.items():
        table.add_row(kind, f"{per_event:,.0f}")
    console.print(table)
    if args.keep:
        console.print(f"callgrind files: {keep}")
    else:
        shutil.rmtree(keep, ignore_errors=True)
    sys.stdout.flush()
    print(orjson.dumps({k: round(v) for k, v in results.items()}).decode(), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_server")
    add_arguments(parser)
    raise SystemExit(run(parser, parser.parse_args()))
