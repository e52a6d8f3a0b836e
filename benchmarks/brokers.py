"""``python -m benchmarks brokers``: nerve against the raw client on each broker.

For each broker (nats, rabbitmq, redis, postgres) the throughput workload of
``benchmarks embedded``: N ~500-byte ``order.placed`` events published in batches by a
producer process, consumed durably by a separate consumer process; events/s = N /
(last ack - first publish).

- nerve: consumer ``python -m nerve run benchmarks.broker_apps:app --broker URL`` (one
  no-op function, concurrency 100), producer ``python -m benchmarks.broker_apps``
  (``client.publish_events`` per batch).
- raw: ``python -m benchmarks.raw_clients consume|produce`` (the broker's own client
  doing the same durable work; see that module); its consumer parses each event.
- raw-typed: the same, its consumer also validating each event's data with the pydantic
  model nerve's function receives (what validation costs, which nerve always does).

Every side: the producer first sends a warm-up message until the consumer has seen one
(so connection set-up and declarations are not timed), then starts the clock; the
consumer writes the wall time to a file when it has handled the N-th event (raw: after
its ack; nerve: when the handler of the N-th event runs, the ack follows it). Runs of
nerve, raw and raw-typed alternate; every run uses fresh streams/queues/keys/schemas,
deleted after the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import pg_sql, raw_clients
from benchmarks.embedded import (
    PYTHON,
    RESULTS_DIR,
    ROOT,
    RUNS_DIR,
    _env,
    _fail,
    cpu_by_name,
    cpu_seconds,
    cpu_since,
    machine,
    nerve_cli_available,
    nerve_consumer_cmd,
    process,
    producer_result,
    throughput_result,
)

BROKERS = ("nats", "rabbitmq", "redis", "postgres")
RUN_TIMEOUT = 180.0

NERVE_URLS = {
    "nats": "nats://127.0.0.1:4222?stream={name}",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/?prefix={name}",
    "redis": "redis://127.0.0.1:6379/0?prefix={name}",
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test?schema={name}",
}
NERVE_URLS["postgres"] = NERVE_URLS.pop("postgresql")


@dataclass
class Settings:
    brokers: list[str] = field(default_factory=lambda: list(BROKERS))
    events: int = 10_000
    batch: int = 100
    runs: int = 3
    consumer: str = ""
    sides: list[str] = field(default_factory=lambda: list(SIDES))
    out: Path = RESULTS_DIR


# ---------------------------------------------------------------------------------------
# Cleanup of what nerve created (raw_clients.teardown does the raw side)


async def nerve_teardown(broker: str, name: str) -> None:
    from benchmarks.broker_apps import app

    groups = [sub.group for sub in app.subscriptions()]
    if broker == "nats":
        import nats

        nc = await nats.connect(raw_clients.NATS_URL)
        try:
            js = nc.jetstream()
            for stream in (name, f"{name}_dlq"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
        finally:
            await nc.close()
    elif broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(raw_clients.AMQP_URL)
        async with conn:
            for group in groups:
                for queue in (f"{name}.g.{group}", f"{name}.g.{group}.dlq"):
                    channel = await conn.channel()
                    with contextlib.suppress(Exception):
                        await channel.queue_delete(queue)
            channel = await conn.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(f"{name}.events")
    elif broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(raw_clients.REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{name}:*", count=1000)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
        finally:
            await client.aclose()
    elif broker == "postgres":
        import asyncpg

        conn = await asyncpg.connect(raw_clients.PG_DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            await conn.execute(f"DROP SCHEMA IF EXISTS {name}_store CASCADE")
        finally:
            await conn.close()


async def server_version(broker: str) -> str:
    with contextlib.suppress(Exception):
        if broker == "nats":
            import nats

            nc = await nats.connect(raw_clients.NATS_URL)
            try:
                return f"nats-server {nc.connected_server_version}"
            finally:
                await nc.close()
        if broker == "rabbitmq":
            import aio_pika

            conn = await aio_pika.connect(raw_clients.AMQP_URL)
            async with conn:
                props = conn.transport.connection.server_properties  # type: ignore[union-attr]
                return f"RabbitMQ {props.get('version', '?')}"
        if broker == "redis":
            import redis.asyncio as aioredis

            client = aioredis.from_url(raw_clients.REDIS_URL)
            try:
                info = await client.info("server")
                persistence = await client.config_get("appendonly")
                fsync = await client.config_get("appendfsync")
                return (
                    f"Redis {info['redis_version']} (appendonly {persistence.get('appendonly')}, "
                    f"appendfsync {fsync.get('appendfsync')})"
                )
            finally:
                await client.aclose()
        if broker == "postgres":
            import asyncpg

            conn = await asyncpg.connect(raw_clients.PG_DSN)
            try:
                version = await conn.fetchval("SHOW server_version")
                sync = await conn.fetchval("SHOW synchronous_commit")
                return f"PostgreSQL {version} (synchronous_commit {sync})"
            finally:
                await conn.close()
    return "unknown"


CLIENTS = {"nats": "nats-py", "rabbitmq": "aio-pika", "redis": "redis", "postgres": "asyncpg"}
SERVER_PROCESSES = {
    "nats": ("nats-server",),
    "rabbitmq": ("beam.smp",),
    "redis": ("redis-server",),
    "postgres": ("postgres",),  # the postmaster, its workers and a backend per connection
}
"""The broker server's processes by command name: their CPU time from the warm-up
handled to the last event handled is ``server_cpu_us`` (the local server runs on the
same cores as the consumer and the producer)."""


SIDES = ("nerve", "raw", "raw-typed")
"""The sides of a run by default, alternating: nerve, the raw client parsing each event,
the raw client also validating each event's data (``$NERVE_BENCH_RAW_TYPED``)."""
EXTRA_SIDES = {"sql": ("postgres",), "sql-norec": ("postgres",)}
"""Sides to ask for (``--sides``), and the brokers that have them: nerve's own statements
without its runtime (:mod:`benchmarks.pg_sql`)."""
TAGS = {"nerve": "nb", "raw": "rb", "raw-typed": "rt", "sql": "sq", "sql-norec": "sn"}


def sides_of(broker: str, sides: list[str]) -> list[str]:
    """The sides of ``sides`` that ``broker`` has, in order."""
    return [side for side in sides if broker in EXTRA_SIDES.get(side, (broker,))]


def client_version(broker: str) -> str:
    dist = CLIENTS[broker]
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} ?"


# ---------------------------------------------------------------------------------------
# One run


class Profiler:
    """``py-spy record`` of one process (all its threads) for part of a run: from
    :meth:`attach` (the producer is held back until then) to :meth:`detach`; the folded
    stacks end up in ``folded``."""

    def __init__(self, spy: str, folded: Path, rate: int = 250) -> None:
        self.spy, self.folded, self.rate = spy, folded, rate
        self._recorder: Any = None

    def attach(self, stack: contextlib.ExitStack, pid: int, logdir: Path) -> None:
        cmd = [
            self.spy, "record", "--pid", str(pid), "--rate", str(self.rate),
            "--format", "raw", "--threads", "--output", str(self.folded),
        ]  # fmt: skip
        self._recorder = stack.enter_context(process(cmd, logdir, "py-spy"))
        time.sleep(1.0)  # py-spy attaches
        if self._recorder.poll() is not None:
            err = (logdir / "py-spy.err").read_text(errors="replace")
            raise SystemExit(f"py-spy could not attach: {err.strip()[-500:]}")

    def detach(self) -> None:
        self._recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        self._recorder.wait(30)


def wait_exists(path: Path, procs: list[Any], logdir: Path) -> None:
    """Wait for ``path`` to appear, while none of ``procs`` has failed."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not path.exists():
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise _fail(f"a process exited with code {proc.returncode}", logdir)
        if time.monotonic() > deadline:
            raise _fail(f"{path.name} did not appear within {RUN_TIMEOUT:.0f} s", logdir)
        time.sleep(0.005)


def wait_done(path: Path, procs: list[Any], logdir: Path) -> float:
    """Wait for ``path`` to appear; the wall time written in it."""
    wait_exists(path, procs, logdir)
    return float(path.read_text())


class Bench:
    def __init__(self, settings: Settings, use_cli: bool, progress: Progress, stamp: str) -> None:
        self.s = settings
        self.use_cli = use_cli
        self.progress = progress
        self.base = RUNS_DIR / f"brokers-{stamp}"
        self.tag = stamp[-6:]

    def one(
        self, broker: str, side: str, run: int, profile: Profiler | None = None
    ) -> dict[str, float]:
        """One run; with ``profile`` (nerve only), the producer waits until the
        profiler is attached to the consumer."""
        s = self.s
        logdir = self.base / f"{broker}-{side}-{run}"
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"{TAGS[side]}_{self.tag}_{run}"
        if broker == "rabbitmq":
            name = name.replace("_", ".")
        ready, done = logdir / "ready", logdir / "done"
        task = self.progress.add_task(f"{broker} {side} #{run}", total=s.events)
        env = {
            "NERVE_BENCH_READY": str(ready),
            "NERVE_BENCH_DONE": str(done),
            "NERVE_BENCH_EXPECT": str(s.events),
        }
        if profile is not None:
            env["NERVE_BENCH_GO"] = str(logdir / "go")
        if side == "raw-typed":
            env["NERVE_BENCH_RAW_TYPED"] = "1"
        if broker != "postgres":
            env["NERVE_STORE"] = f"sqlite:///{logdir / 'store.db'}"  # a fresh store per run
        # on PostgreSQL the default store: the same database (schema NAME_store, fresh per
        # run), where the idempotency records and the acks commit in one statement
        if side == "nerve":
            url = NERVE_URLS[broker].format(name=name)
            consumer_cmd = nerve_consumer_cmd("benchmarks.broker_apps:app", url, self.use_cli)
            producer_cmd = [
                PYTHON, "-m", "benchmarks.broker_apps", url, str(s.events), str(s.batch),
                str(ready),
            ]  # fmt: skip
        elif side in pg_sql.SIDES:
            args = [side, name, str(s.events), str(s.batch), str(ready)]
            consumer_cmd = [PYTHON, "-m", "benchmarks.pg_sql", "consume", *args, str(done)]
            producer_cmd = [PYTHON, "-m", "benchmarks.pg_sql", "produce", *args]
        else:
            asyncio.run(raw_clients.setup(broker, name))
            args = [broker, name, str(s.events), str(s.batch), str(ready)]
            consumer_cmd = [PYTHON, "-m", "benchmarks.raw_clients", "consume", *args, str(done)]
            producer_cmd = [PYTHON, "-m", "benchmarks.raw_clients", "produce", *args]
        try:
            with (
                process(consumer_cmd, logdir, "consumer", **env) as consumer,
                process(producer_cmd, logdir, "producer", **env) as producer,
                contextlib.ExitStack() as attached,
            ):
                wait_exists(ready, [consumer, producer], logdir)
                if profile is not None:
                    profile.attach(attached, consumer.pid, logdir)
                    (logdir / "go").touch()
                server = SERVER_PROCESSES.get(broker, ())
                cpu_ready = cpu_seconds(consumer.pid)  # the warm-up is handled
                server_ready = cpu_by_name(server)
                done_at = wait_done(done, [consumer, producer], logdir)
                cpu_done = cpu_seconds(consumer.pid)
                server_done = cpu_by_name(server)
                if profile is not None:
                    profile.detach()
                sent = producer_result(producer, logdir, "producer")
        finally:
            if side == "nerve":
                asyncio.run(nerve_teardown(broker, name))
            elif side in pg_sql.SIDES:
                asyncio.run(pg_sql.teardown(name))
            else:
                asyncio.run(raw_clients.teardown(broker, name))
        self.progress.update(task, completed=s.events)
        result = throughput_result(s.events, sent, done_at)
        if cpu_ready is not None and cpu_done is not None:
            result["consumer_cpu_us"] = (cpu_done - cpu_ready) / s.events * 1e6
        if "publish_cpu" in sent:
            result["producer_cpu_us"] = sent["publish_cpu"] / s.events * 1e6
        if server_done:
            result["server_cpu_us"] = cpu_since(server_ready, server_done) / s.events * 1e6
        return result


# ---------------------------------------------------------------------------------------
# Report


CPU_KEYS = ("consumer_cpu_us", "producer_cpu_us", "server_cpu_us")


def cpu_totals(runs: list[dict[str, float]]) -> tuple[float, ...] | None:
    """Medians of a side's CPU time per event, µs: consumer, producer, broker server, and
    their sum (None if a run did not measure one of them, or none was counted)."""
    if not runs or any(r.get(key) is None for r in runs for key in CPU_KEYS):
        return None
    parts = [statistics.median(r[key] for r in runs) for key in CPU_KEYS]
    total = sum(parts)
    return (*parts, total) if total > 0 else None  # a run too short for the clock's ticks


def stat(runs: list[dict[str, float]], key: str = "events_per_s") -> tuple[float, float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values), max(values)


def fmt(runs: list[dict[str, float]]) -> str:
    return _spread([r["events_per_s"] for r in runs])


def results_table(results: dict[str, dict[str, list[dict[str, float]]]], s: Settings) -> Table:
    table = Table(title=f"nerve vs raw client, {s.events:,} events, median \\[min-max] of {s.runs}")
    columns = ("broker", "nerve events/s", "raw events/s", "nerve/raw")
    for col in (*columns, "raw-typed events/s", "nerve/raw-typed"):
        table.add_column(col, justify="left" if col == "broker" else "right")
    summary = summary_line(results)
    for broker, sides in results.items():
        ratios = summary[broker]
        row = [broker, fmt(sides["nerve"]), fmt(sides["raw"]), f"{ratios['ratio']:.2f}x"]
        typed = sides.get("raw-typed")
        row += [fmt(typed), f"{ratios['ratio_typed']:.2f}x"] if typed else ["-", "-"]
        table.add_row(*row)
    return table


def summary_line(results: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for broker, sides in results.items():
        nerve, raw = stat(sides["nerve"])[0], stat(sides["raw"])[0]
        out[broker] = {"nerve": round(nerve), "raw": round(raw), "ratio": round(nerve / raw, 3)}
        cpu, raw_cpu = cpu_totals(sides["nerve"]), cpu_totals(sides["raw"])
        if cpu and raw_cpu:  # µs of CPU time per event, all processes (cpu_section)
            out[broker] |= {
                "nerve_cpu_us": round(cpu[3], 1),
                "raw_cpu_us": round(raw_cpu[3], 1),
                "cpu_ratio": round(raw_cpu[3] / cpu[3], 3),
            }
        if sides.get("raw-typed"):
            typed = stat(sides["raw-typed"])[0]
            out[broker] |= {"raw_typed": round(typed), "ratio_typed": round(nerve / typed, 3)}
        for side in EXTRA_SIDES:
            if sides.get(side):
                rate = stat(sides[side])[0]
                key = side.replace("-", "_")
                out[broker] |= {key: round(rate), f"{key}_ratio": round(rate / raw, 3)}
    return out


def cpu_section(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """The page's table of CPU time per event, per side, with the ratio that CPU time
    alone would give next to the ratio measured."""
    rows = []
    for broker, sides in results.items():
        raw = cpu_totals(sides.get("raw", []))
        raw_rate = stat(sides["raw"])[0] if sides.get("raw") else None
        for side, runs in sides.items():
            cpu = cpu_totals(runs)
            if cpu is None:
                continue
            cells = [f"{x:,.1f}" for x in cpu]
            if raw is not None and side != "raw":
                cells.append(f"{raw[3] / cpu[3]:.2f}x")
                cells.append(f"{stat(runs)[0] / raw_rate:.2f}x" if raw_rate else "-")
            else:
                cells += ["-", "-"]
            rows.append(f"| {broker} | {side} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "## CPU time per event",
        "",
        "Medians, µs of CPU time per event: the consumer process's (all threads, from the "
        "warm-up handled to the last event handled), the producer's (over its publishing) "
        "and the broker server's (all its processes, over the consumer's window). The "
        "three share this machine's cores, so when they keep the cores busy the "
        "throughput ratio follows the ratio of the totals: raw total / side total is the "
        "ratio CPU time alone would give, next to the one measured.",
        "",
        "| broker | side | consumer | producer | server | total | raw/side CPU | side/raw "
        "events/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def markdown(
    results: dict[str, dict[str, list[dict[str, float]]]],
    s: Settings,
    env: dict[str, Any],
    summary: dict[str, Any],
) -> str:
    m = env["machine"]
    lines = [
        "# nerve vs the raw client, per broker",
        "",
        f"`python -m benchmarks brokers --events {s.events} --runs {s.runs} --batch {s.batch}"
        f" --brokers {','.join(s.brokers)}"
        + ("" if s.sides == list(SIDES) else f" --sides {','.join(s.sides)}")
        + f"`, {env['when']}.",
        "",
        f"Throughput, end to end (first publish to last ack), {s.events:,} events of "
        f"~{env['event_bytes']} bytes, published in batches of {s.batch}; median [min-max] "
        f"of {s.runs} runs, the sides ({', '.join(s.sides)}) alternating.",
        "",
        "| broker | nerve events/s | raw events/s | nerve/raw | raw-typed events/s "
        "| nerve/raw-typed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for broker, sides in results.items():
        typed = sides.get("raw-typed")
        lines.append(
            f"| {broker} | {fmt(sides['nerve'])} | {fmt(sides['raw'])} | "
            f"{summary[broker]['ratio']:.2f}x | {fmt(typed) if typed else '-'} | "
            + (f"{summary[broker]['ratio_typed']:.2f}x |" if typed else "- |")
        )
    extra = [side for side in EXTRA_SIDES if any(sides.get(side) for sides in results.values())]
    if extra:
        lines += [
            "",
            "Further sides (see below): events/s, and as a ratio to raw.",
            "",
            "| broker | " + " | ".join(f"{side} events/s | {side}/raw" for side in extra) + " |",
            "|---|" + "---:|---:|" * len(extra),
        ]
        for broker, sides in results.items():
            cells = []
            for side in extra:
                key = side.replace("-", "_")
                if sides.get(side):
                    cells += [fmt(sides[side]), f"{summary[broker][f'{key}_ratio']:.2f}x"]
                else:
                    cells += ["-", "-"]
            lines.append(f"| {broker} | " + " | ".join(cells) + " |")
        lines += [""]
        lines += [
            f"- {side}: {pg_sql.SETTINGS[side].replace('BATCH', str(s.batch))}" for side in extra
        ]
    lines += [
        "",
        "Goal: nerve >= 0.6x the raw client on every broker (nerve/raw).",
        "",
        "raw: the raw client's consumer parses each event (orjson) and acks it. raw-typed: "
        "it also validates the event's data with the pydantic model nerve's function "
        "receives (`OrderPlaced.model_validate`), as a typed handler written against the "
        "raw client would; nerve always validates (the event's contract). The difference "
        "between the two raw columns is what that validation costs the raw client.",
        "",
        *cpu_section(results),
        "",
        "## Machine",
        "",
        f"- {m['cores']} cores, {m['cpu']}, {m['platform']}",
        f"- Python {m['python']}, uvloop {'yes' if m['uvloop'] else 'no'} (both sides)",
        f"- load average before/after: {env['load_average_1_5_15']}",
        "- all servers local on 127.0.0.1, single node",
        "",
        "## Settings, per broker",
        "",
    ]
    for broker in results:
        lines += [
            f"### {broker}",
            "",
            f"- server: {env['servers'][broker]}; client: {env['clients'][broker]}",
            f"- nerve: consumer `{s.consumer.replace('URL', NERVE_URLS[broker])}` "
            "(`benchmarks.broker_apps:app`, one no-op function, "
            + ("ordered" if os.environ.get("NERVE_BENCH_ORDERED") == "1" else "unordered")
            + ", concurrency 100, default timeout, adapter defaults); producer "
            "`python -m benchmarks.broker_apps` "
            f"(`client.publish_events`, batches of {s.batch}); store (idempotency records): "
            + (
                "the default beside a PostgreSQL broker, the same database (records and acks "
                "commit in one statement)"
                if broker == "postgres"
                else "a SQLite file, synchronous=FULL"
            ),
            f"- raw: {raw_clients.SETTINGS[broker].replace('BATCH', str(s.batch))}",
            "",
        ]
    lines += [
        "## How the last ack is seen",
        "",
        "The consumer writes `time.time()` to a file when it has handled the N-th event: "
        "raw, after that event's ack; nerve, when the handler of the N-th event runs "
        "(nerve acks right after it returns, so nerve's number is optimistic by the cost "
        "of one ack). Before the clock starts the producer sends warm-up messages until "
        "the consumer has seen one, so connections and declarations are not timed.",
        "",
        "## Summary line",
        "",
        "```json",
        orjson.dumps(summary).decode(),
        "```",
        "",
    ]
    return "\n".join(lines)


PLOT_SIDES = (
    ("nerve", "#3b6ea8"),
    ("sql", "#7fa7d6"),
    ("sql-norec", "#b9d0ea"),
    ("raw", "#9a9a9a"),
    ("raw-typed", "#c8c8c8"),
)
PLOT_LABELS = {
    "nerve": "nerve",
    "sql": "nerve's SQL, no runtime",
    "sql-norec": "nerve's SQL, no runtime, no records",
    "raw": "raw client",
    "raw-typed": "raw client + validation",
}


def plot(results: dict[str, dict[str, list[dict[str, float]]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    brokers = list(results)
    colors = dict(PLOT_SIDES)
    shown = {b: [side for side in colors if results[b].get(side)] for b in brokers}
    width = 0.8 / max(len(sides) for sides in shown.values())
    labelled: set[str] = set()
    for j, b in enumerate(brokers):  # each broker's bars centred on it, its sides only
        for i, side in enumerate(shown[b]):
            med, lo, hi = stat(results[b][side])
            ax.bar(
                j + (i - (len(shown[b]) - 1) / 2) * width,
                med,
                width,
                yerr=[[med - lo], [hi - med]],
                color=colors[side],
                capsize=4,
                label=None if side in labelled else PLOT_LABELS[side],
            )
            labelled.add(side)
    summary = summary_line(results)
    for j, b in enumerate(brokers):
        label = f"{summary[b]['ratio']:.2f}x raw"
        if "ratio_typed" in summary[b]:
            label += f"\n{summary[b]['ratio_typed']:.2f}x typed"
        top = max(stat(results[b][side])[2] for side in shown[b])
        ax.annotate(label, (j, top), ha="center", va="bottom", fontsize=8)
    highest = max(stat(results[b][side])[2] for b in brokers for side in shown[b])
    ax.set_ylim(0, highest * 1.2)  # room for the ratios above the bars
    ax.set_xticks(range(len(brokers)), brokers)
    ax.set_ylabel("events/s (median, min-max)")
    ax.set_title("Throughput, end to end: nerve vs raw client (nerve/raw above the bars)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    """A progress display with a bar per run."""
    return Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        TextColumn("{task.completed:>7,}/{task.total:,}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run(settings: Settings, console: Console) -> dict[str, Any]:
    use_cli = nerve_cli_available()
    settings.consumer = " ".join(
        ["python", *nerve_consumer_cmd("benchmarks.broker_apps:app", "URL", use_cli)[1:]]
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        b: {side: [] for side in sides_of(b, settings.sides)} for b in settings.brokers
    }
    with _progress(console) as progress:
        bench = Bench(settings, use_cli, progress, stamp)
        for broker in settings.brokers:
            for i in range(1, settings.runs + 1):  # alternating, so drift hits both alike
                for side in results[broker]:
                    results[broker][side].append(bench.one(broker, side, i))
    summary = summary_line(results)
    console.print(results_table(results, settings))

    from benchmarks.apps import make_orders
    from nerve.event import encode

    sizes = [len(encode(e)) for e in make_orders(100)]
    env = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "event_bytes": round(statistics.median(sizes)),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "servers": {b: asyncio.run(server_version(b)) for b in settings.brokers},
        "clients": {b: client_version(b) for b in settings.brokers},
        "nerve": importlib.metadata.version("nerve") if _has_dist("nerve") else "editable",
    }
    doc = {
        "summary": summary,
        "settings": asdict(settings) | {"out": str(settings.out)},
        "sides": {
            b: {
                "nerve": {
                    "url": NERVE_URLS[b],
                    "consumer": settings.consumer,
                    "producer": "python -m benchmarks.broker_apps URL N BATCH READY",
                    "function": "sink, concurrency 100, default 30 s timeout, no-op",
                },
                "raw": raw_clients.SETTINGS[b].replace("BATCH", str(settings.batch)),
                "raw-typed": raw_clients.TYPED_SETTING,
            }
            | {
                side: pg_sql.SETTINGS[side].replace("BATCH", str(settings.batch))
                for side in sides_of(b, settings.sides)
                if side in pg_sql.SETTINGS
            }
            for b in settings.brokers
        },
        "environment": env,
        "results": {
            b: {
                side: {
                    "runs": runs,
                    "median": stat(runs)[0],
                    "min": stat(runs)[1],
                    "max": stat(runs)[2],
                }
                for side, runs in sides.items()
            }
            for b, sides in results.items()
        },
        "goal": {"ratio_at_least": 0.6},
    }
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "brokers.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    (out / "brokers.md").write_text(markdown(results, settings, env, summary))
    plotted = plot(results, out / "brokers.png")
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    console.print(
        f"wrote {shown}/brokers.json, brokers.md"
        + (", brokers.png" if plotted else " (no plot: matplotlib is not installed)")
    )
    return summary


def run_profiles(settings: Settings, console: Console) -> list[Path]:
    """``benchmarks brokers --profile``: per broker, one nerve run with ``py-spy``
    attached to the consumer and one raw run beside it; writes
    ``results/profile-BROKER.md`` (CPU time per event of both consumers, nerve's split
    into stages, its top lines and functions)."""
    from benchmarks import profiling

    spy = profiling._py_spy()
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    use_cli = nerve_cli_available()
    settings.consumer = " ".join(
        ["python", *nerve_consumer_cmd("benchmarks.broker_apps:app", "URL", use_cli)[1:]]
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    written = []
    with _progress(console) as progress:
        bench = Bench(settings, use_cli, progress, stamp)
        for broker in settings.brokers:
            folded = bench.base / f"{broker}-consumer.folded"
            bench.base.mkdir(parents=True, exist_ok=True)
            profiler = Profiler(spy, folded)
            nerve = bench.one(broker, "nerve", 1, profiler)
            raw = bench.one(broker, "raw", 1)
            total, own, cumulative, threads, stages = profiling.summarise(folded)
            cpu = nerve.get("consumer_cpu_us")
            raw_cpu = raw.get("consumer_cpu_us")
            lines = [
                f"# {broker}: where the nerve consumer's time goes",
                "",
                f"`python -m benchmarks brokers --profile --brokers {broker} "
                f"--events {settings.events}`, {datetime.now(UTC).isoformat(timespec='seconds')}"
                f"; {machine()['cpu']}, {os.cpu_count()} cores.",
                "",
                f"The throughput workload of `benchmarks brokers` ({settings.events:,} "
                f"events, batches of {settings.batch}), once for nerve with `py-spy record "
                f"--rate {profiler.rate} --threads` attached to its consumer (`"
                f"{settings.consumer.replace('URL', NERVE_URLS[broker])}`, attached before "
                "the producer starts), once for the raw client, unprofiled. CPU time: the "
                "consumer process's user + system time, all threads, from the warm-up "
                "handled to the last event handled, per event (py-spy's own sampling "
                "slows the profiled process a little); the producer's over its publishing; "
                "the broker server's (all its processes) over the consumer's window.",
                "",
                "| | events/s | consumer CPU µs/event | producer CPU µs/event "
                "| broker server CPU µs/event |",
                "|---|---:|---:|---:|---:|",
            ]
            for side, result in (("nerve (profiled)", nerve), ("raw client", raw)):
                cells = [
                    "-" if result.get(key) is None else f"{result[key]:,.1f}" for key in CPU_KEYS
                ]
                lines.append(f"| {side} | {result['events_per_s']:,.0f} | {' | '.join(cells)} |")
            if cpu and raw_cpu:
                lines += [
                    "",
                    f"nerve's consumer spends {cpu / raw_cpu:.1f}x the raw client's CPU "
                    f"time per event ({cpu - raw_cpu:+,.1f} µs).",
                ]
            server, raw_server = nerve.get("server_cpu_us"), raw.get("server_cpu_us")
            if server and raw_server:
                lines += [
                    "",
                    f"The broker server spends {server / raw_server:.1f}x as much CPU time "
                    f"on nerve's events as on the raw client's ({server - raw_server:+,.1f} "
                    "µs an event), on the same cores.",
                ]
            lines += [
                "",
                *profiling.stage_section("nerve's consumer by stage", stages, cpu),
                *profiling.sections(total, own, cumulative, threads),
            ]
            path = RESULTS_DIR / f"profile-{broker}.md"
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines))
            written.append(path)
            console.print(f"wrote {path.relative_to(ROOT)}; folded stacks in {folded}")
    return written


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Instructions per event of nerve's consumer (callgrind)


def run_callgrind(settings: Settings, console: Console) -> dict[str, Any]:
    """``benchmarks brokers --callgrind``: per broker, the instructions nerve's consumer
    spends per event, counted instead of timed (repeatable to about 0.5% where the
    end-to-end figures of this machine swing by 20-30% between runs).

    Each round: a fresh stream/queue/prefix/schema; the group declared and ``--events``
    events published first (``python -m benchmarks._producer throughput``, batches of
    ``--batch``); then a consumer (``python -m benchmarks.observe drain``: a runtime of
    ``benchmarks.apps:app``, one no-op function, metrics on, no tracing, run as
    ``nerve run`` runs it: uvloop and its GC settings; a fresh SQLite store, or on
    PostgreSQL the default store in the same database) drains them under ``valgrind
    --tool=callgrind``, counted from its start to the last event handled, its main
    thread (the event loop) apart from the others (the store's SQLite threads, the
    client libraries' own). The broker server is not counted (``benchmarks
    redis-server`` counts Redis's). Median [min-max] of ``--runs`` rounds.
    """
    from benchmarks.observe import _instrument_helper, count_drain

    if not shutil.which("valgrind"):
        raise SystemExit("--callgrind needs valgrind (Debian package 'valgrind')")
    helper = _instrument_helper()
    if helper is None:
        raise SystemExit("--callgrind needs a C compiler and valgrind's headers (valgrind-dev)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = RUNS_DIR / f"brokers-callgrind-{stamp}"
    counts: dict[str, list[tuple[float, float]]] = {b: [] for b in settings.brokers}
    with _progress(console) as progress:
        task = progress.add_task("drains counted", total=len(settings.brokers) * settings.runs)
        for broker in settings.brokers:
            for r in range(1, settings.runs + 1):
                logdir = base / f"{broker}-{r}"
                logdir.mkdir(parents=True, exist_ok=True)
                name = f"cg_{stamp[-6:]}_{r}"
                if broker == "rabbitmq":
                    name = name.replace("_", ".")
                url = NERVE_URLS[broker].format(name=name)
                env = {"NERVE_METRICS": "1"}
                if broker != "postgres":
                    env["NERVE_STORE"] = f"sqlite:///{logdir / 'store.db'}"
                try:
                    _published(url, settings, logdir, env)
                    total, main = count_drain(logdir, url, settings.events, env, helper)
                finally:
                    asyncio.run(nerve_teardown(broker, name))
                counts[broker].append((total / settings.events, main / settings.events))
                progress.advance(task)
    table = Table(
        title="nerve's consumer: instructions per event (callgrind)",
        caption=f"{settings.events:,} events drained; median \\[min-max] of {settings.runs}",
    )
    for column in ("broker", "all threads", "event loop (main thread)", "other threads"):
        table.add_column(column, justify="left" if column == "broker" else "right")
    summary: dict[str, Any] = {}
    for broker, rounds in counts.items():
        totals, mains = [t for t, _ in rounds], [m for _, m in rounds]
        others = [t - m for t, m in rounds]
        table.add_row(broker, *(_spread(values) for values in (totals, mains, others)))
        summary[broker] = {
            "instructions_per_event": round(statistics.median(totals)),
            "event_loop_thread": round(statistics.median(mains)),
            "other_threads": round(statistics.median(others)),
        }
    console.print(table)
    return summary


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def _published(url: str, settings: Settings, logdir: Path, env: dict[str, str]) -> None:
    """The drain's group declared and ``settings.events`` events published to it, before
    the counted consumer starts (a failure's output goes to ``prepare.log``)."""
    from benchmarks.observe import publish_backlog

    full = _env(**env)
    try:
        publish_backlog(url, settings.events, settings.batch, full, full, timeout=RUN_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        (logdir / "prepare.log").write_bytes((exc.stdout or b"") + (exc.stderr or b""))
        raise _fail(f"{' '.join(exc.cmd[1:4])} exited with code {exc.returncode}", logdir) from None
