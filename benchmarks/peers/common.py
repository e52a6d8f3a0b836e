"""What every side of ``python -m benchmarks compare`` shares: the command line of a
producer or consumer process, the events, the warm-up hand-shake, and the tracker that
writes the consumer's result.

A run is two processes started by the harness (``benchmarks/compare.py``):

- the consumer subscribes (``--fanout K`` handlers, each with its own durable
  queue/group/consumer, so every event is handled K times), then handles events;
- the producer publishes a warm-up order (customer ``cus_warmup``) every second until
  every handler of the consumer has seen one (the consumer touches ``--ready``), so
  connections and declarations are never timed; then it publishes ``--events`` orders
  (throughput: as fast as the framework's own publish allows, ``--batch`` in flight;
  latency: open loop, one event every ``1/--rate`` s for ``--seconds``, each carrying
  its *scheduled* send time), and prints ``{"first_publish": t, ...}`` as JSON.
- throughput: the consumer writes ``time.time()`` to ``--done`` in the handler of the
  last of the N x K events; latency: it writes the list of (handler start - scheduled
  send time) in seconds, as JSON.

Every event is the structured CloudEvent nerve sends (~520 bytes of JSON: an
``order.placed`` with a customer, two lines and amounts); every handler validates it
with the same pydantic models nerve's function gets, and does nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from benchmarks.apps import OrderPlaced

WARMUP_CUSTOMER = "cus_warmup"
WARM_CONNECTIONS = 16
"""Warm-up sends made at once after the consumer is ready (see :func:`warm_up`)."""
MAX_IN_FLIGHT = 64
"""Open loop: publishes awaiting their ack at once, at most (more wait, and it counts)."""
MAX_SECONDS = 300.0
"""No producer or consumer of the comparison lives longer than this."""

HOST = "127.0.0.1"
URLS = {
    "nats": f"nats://{HOST}:4222",
    "rabbitmq": f"amqp://guest:guest@{HOST}:5672/",
    "redis": f"redis://{HOST}:6379/0",
    "kafka": f"{HOST}:9092",  # benchmarks/peers/kafka_server.py starts Tansu there
}


class OrderEvent(BaseModel):
    """The CloudEvent envelope around an order, as a peer framework's handler sees it."""

    specversion: str
    id: str
    source: str
    type: str
    time: str
    data: OrderPlaced


@dataclass
class Config:
    role: str  # "produce" or "consume"
    broker: str
    name: str  # a fresh stream/queue/key prefix per run
    events: int
    batch: int
    ready: str
    done: str
    fanout: int = 1
    rate: float = 0.0  # > 0: the latency workload (open loop)
    seconds: float = 0.0
    processes: int = 1  # consumer processes sharing the work (nerve run --processes)

    @property
    def latency(self) -> bool:
        return self.rate > 0

    @property
    def expect(self) -> int:
        return self.events * self.fanout


def parse(argv: Sequence[str], prog: str) -> Config:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("role", choices=["produce", "consume"])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--done", required=True)
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(list(argv))
    cfg = Config(**vars(args))
    if cfg.latency:
        cfg.events = int(cfg.rate * cfg.seconds)
    if cfg.events < 1 or cfg.batch < 1 or cfg.fanout < 1 or cfg.processes < 1:
        parser.error(
            "--events (or --rate x --seconds), --batch, --fanout and --processes must be positive"
        )
    return cfg


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ---------------------------------------------------------------------------------------
# Events


def event_dicts(count: int) -> list[dict[str, Any]]:
    """``count`` orders as structured CloudEvent dicts (the bytes nerve would send)."""
    from benchmarks.apps import make_orders
    from nerve.event import encode

    return [orjson.loads(encode(e)) for e in make_orders(count)]


def warmup_dict() -> dict[str, Any]:
    body = event_dicts(1)[0]
    body["data"]["customer"]["id"] = WARMUP_CUSTOMER
    return body


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat()


# ---------------------------------------------------------------------------------------
# Producer side


def exists(path: str) -> bool:
    return os.path.exists(path)


async def warm_up(
    send_one: Callable[[dict[str, Any]], Awaitable[Any]], ready: str, processes: int = 1
) -> None:
    """Send a warm-up order every second until the consumer says every handler saw one
    (with several consumer processes: a burst each time, until every process saw one)."""
    body = warmup_dict()
    deadline = time.monotonic() + 60
    try:
        await _until_ready(send_one, body, ready, deadline, 1 if processes == 1 else 4 * processes)
        # a burst of concurrent sends: the client opens the connections (a pool grows
        # one per send in flight) now, not for the first events of the open loop
        await asyncio.gather(*(send_one(body) for _ in range(WARM_CONNECTIONS)))
    finally:
        settle_gc()


def settle_gc() -> None:
    """Before the timed part, in every producer and consumer process of every system:
    collect what setting up left, and keep it out of later collections, so a full
    collection of start-up's objects (20-80 ms measured here) does not land in the
    measurement as a stall of whichever process it hits."""
    gc.collect()
    gc.freeze()


async def _until_ready(
    send_one: Callable[[dict[str, Any]], Awaitable[Any]],
    body: dict[str, Any],
    ready: str,
    deadline: float,
    burst: int,
) -> None:
    while not exists(ready):
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer never saw a warm-up event (is it running?)")
        try:
            for _ in range(burst):
                await send_one(body)
        except Exception:  # the consumer has not declared its stream/queue yet
            await asyncio.sleep(0.2)
            continue
        for _ in range(100):
            if exists(ready):
                return
            await asyncio.sleep(0.01)


async def publish_all(
    cfg: Config,
    send_one: Callable[[dict[str, Any]], Awaitable[Any]],
    send_batch: Callable[[list[dict[str, Any]]], Awaitable[Any]] | None = None,
) -> dict[str, float]:
    """Warm up, then the workload: throughput (batches) or latency (open loop)."""
    bodies = event_dicts(cfg.events)
    await warm_up(send_one, cfg.ready, cfg.processes)
    if cfg.latency:
        return await open_loop(cfg, bodies, send_one)

    async def batch_of(chunk: list[dict[str, Any]]) -> None:
        await asyncio.gather(*(send_one(body) for body in chunk))

    send = send_batch or batch_of
    first = time.time()
    for start in range(0, len(bodies), cfg.batch):
        await send(bodies[start : start + cfg.batch])
    return {"first_publish": first, "last_publish": time.time(), "published": len(bodies)}


async def open_loop(
    cfg: Config, bodies: list[dict[str, Any]], send_one: Callable[[dict[str, Any]], Awaitable[Any]]
) -> dict[str, float]:
    """Send times fixed in advance; a late producer shows up as latency (no coordinated
    omission): each event's ``time`` is its scheduled send time."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[Any]] = set()
    t0 = time.time() + 0.1
    behind = 0.0
    for i, body in enumerate(bodies):
        due = t0 + i / cfg.rate
        wait = due - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            behind = max(behind, -wait)
        if len(pending) >= MAX_IN_FLIGHT:  # a client pool has limits: queue here (it counts)
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        body["time"] = iso(due)
        task = loop.create_task(send_one(body))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait_for(asyncio.gather(*pending), 60)
    return {
        "first_publish": t0,
        "last_publish": time.time(),
        "published": len(bodies),
        "max_behind_s": behind,
    }


def print_result(result: dict[str, float]) -> None:
    print(orjson.dumps(result).decode(), flush=True)


# ---------------------------------------------------------------------------------------
# Consumer side


class Tracker:
    """Counts what the consumer's handlers saw and writes the result once.

    Thread-safe enough for Dramatiq's and Celery's worker threads: the GIL makes
    ``list.append`` atomic and the count is only used to trigger the write once.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.expect = cfg.expect
        self.seen = 0
        self.warm: set[int] = set()
        self.latencies: list[float] | None = [] if cfg.latency else None
        self.last = 0.0  # when the latest counted event was handled
        self.finished = False
        self.deadline = time.monotonic() + MAX_SECONDS
        threading.Thread(target=self._report, name="bench-progress", daemon=True).start()

    def _report(self) -> None:
        """The count so far and the time of the latest event, to ``DONE.count.PID``: four
        times a second for the progress bar; with several consumer processes every 10 ms,
        since then the harness sees the end there (the sum of the counts reaches N, the
        end is the latest of the processes' last times)."""
        path = f"{self.cfg.done}.count.{os.getpid()}"
        every = 0.25 if self.cfg.processes == 1 else 0.01
        written = (-1, 0.0)
        while True:
            finished = self.finished or self.expired()
            now = (self.seen, self.last)
            if now != written:
                with contextlib.suppress(OSError):
                    write_atomic(path, f"{now[0]} {now[1]!r}".encode())
                written = now
            if finished:
                return  # after one last write
            time.sleep(every)

    def handle(self, event: OrderEvent, handler: int = 0) -> None:
        """A peer framework's handler: the validated event."""
        started = time.time()
        sent = None if self.latencies is None else datetime.fromisoformat(event.time).timestamp()
        self.saw(event.data.customer.id, sent, handler, started)

    def handle_raw(self, body: bytes | str, handler: int = 0) -> None:
        """A raw client's handler: parse the JSON (orjson), nothing else."""
        started = time.time()
        data = orjson.loads(body)
        sent = None if self.latencies is None else datetime.fromisoformat(data["time"]).timestamp()
        self.saw(data["data"]["customer"]["id"], sent, handler, started)

    def saw(self, customer: str, sent: float | None, handler: int, started: float) -> None:
        """One event handled by handler ``handler``, which started at ``started``."""
        if customer == WARMUP_CUSTOMER:
            self.warm.add(handler)
            if len(self.warm) >= self.cfg.fanout and not os.path.exists(self.cfg.ready):
                self._warmed_up()
            return
        if self.latencies is not None and sent is not None:
            self.latencies.append(started - sent)
        self.seen += 1
        self.last = started
        if self.seen >= self.expect and not self.finished:
            self.finished = True
            if self.latencies is not None:
                write_atomic(self.cfg.done, orjson.dumps(self.latencies))
            else:
                write_atomic(self.cfg.done, repr(time.time()).encode())

    def _warmed_up(self) -> None:
        settle_gc()
        if self.cfg.processes == 1:
            Path(self.cfg.ready).touch()
            return
        ready = Path(self.cfg.ready)
        Path(f"{ready}.{os.getpid()}").touch()
        if len(list(ready.parent.glob(ready.name + ".*"))) >= self.cfg.processes:
            ready.touch()  # every process has joined

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


def write_atomic(path: str, data: bytes) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


async def serve_until(tracker: Tracker, linger: float = 0.5) -> None:
    """Wait until the tracker wrote its result (then ``linger`` so the last acks go
    out), or until the process's time is up."""
    while not tracker.finished and not tracker.expired():  # noqa: ASYNC110 (threads set it)
        await asyncio.sleep(0.02)
    await asyncio.sleep(linger)


CONFIG_ENV = "NERVE_BENCH_CONFIG"
"""How the harness hands a run's Config to a consumer it does not start itself
(``nerve run`` imports the App; the App reads this)."""


def config_from_env() -> Config | None:
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return None
    return Config(**orjson.loads(raw))
