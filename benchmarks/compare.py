"""``python -m benchmarks compare``: nerve side by side with the raw clients and the
frameworks users would pick instead (FastStream, Dramatiq, Celery, taskiq), same
workloads, same brokers, same run, regenerating ``benchmarks/RESULTS.md`` and charts.

Workloads (the ~520-byte ``order.placed`` CloudEvent of ``benchmarks/apps.py``):

- throughput: N events by a producer process, one durable handler in a consumer
  process; events/s from first publish to last handled event. nerve and raw on the
  network brokers are ``benchmarks/brokers.py``'s runs, on the embedded broker
  ``benchmarks/embedded.py``'s (vs the sqlite3 floor); the peers run through
  ``python -m benchmarks.peers`` with the same protocol;
- fanout: every event handled by 4 functions (nerve, raw, FastStream);
- latency: open-loop producer at fixed rates for a fixed time; p50/p99/p99.9 of handler
  start minus scheduled send time (nerve, raw, FastStream; embedded: nerve vs floor);
- pipeline: the shop example (``examples/shop``), orders/s to a terminal state;
- scale: nerve's embedded-broker throughput with 1 and 2 worker processes.

Runs alternate between the systems of a comparison (nerve, raw, peer, nerve, raw, peer,
...), each is bounded in count and time: a run that fails or overruns its deadline is
killed and recorded as failed, and the rest goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from benchmarks import brokers as broker_bench
from benchmarks import embedded
from benchmarks.embedded import (
    PYTHON,
    RESULTS_DIR,
    ROOT,
    RUNS_DIR,
    CpuSampler,
    _fail,
    machine,
    nerve_cli_available,
    nerve_consumer_cmd,
    percentiles,
    process,
    producer_result,
    throughput_result,
)
from benchmarks.peers import DISTRIBUTIONS, MODULES, PEERS
from benchmarks.peers.common import CONFIG_ENV, Config
from benchmarks.peers.kafka_server import kafka

WORKLOADS = ("throughput", "fanout", "latency", "pipeline", "scale")
NETWORK = ("nats", "rabbitmq", "redis", "postgres", "kafka")
BROKERS = (*NETWORK, "sqlite")
BROKERS_PY = ("nats", "rabbitmq", "redis", "postgres")
"""nerve and raw throughput on these are ``benchmarks/brokers.py``'s runs."""
FANOUT_BROKERS = ("nats", "rabbitmq", "redis")
SCALE_BROKERS = ("nats", "redis")
"""Scale (``nerve run --processes 1`` and ``2``) runs here and on the embedded broker."""
"""Fan-out and latency run here (PostgreSQL and Kafka: throughput only, to bound time)."""
FANOUT = 4
SHORT = {
    "nerve": "nb",
    "raw": "rw",
    "raw-typed": "rt",
    "faststream": "fs",
    "dramatiq": "dq",
    "celery": "ce",
    "taskiq": "tq",
}
COLORS = {
    "nerve": "#2f6db5",
    "raw": "#8c8c8c",
    "raw-typed": "#bdbdbd",
    "floor": "#8c8c8c",
    "faststream": "#e08a2c",
    "dramatiq": "#6aa84f",
    "celery": "#a64d79",
    "taskiq": "#c9b037",
}

# Rough events/s per system and broker on a quiet 2-core machine (the figures,
# earlier runs), only to print the expected duration; deadlines use MIN_RATE.
EXPECTED_RATE = {
    "nerve": {"nats": 5000.0, "rabbitmq": 1500.0, "redis": 5000.0, "postgres": 4000.0,
              "kafka": 3000.0, "sqlite": 10000.0},
    "raw": {"nats": 12000.0, "rabbitmq": 2500.0, "redis": 15000.0, "postgres": 30000.0,
            "kafka": 5000.0},
    "raw-typed": {"nats": 10000.0, "rabbitmq": 2500.0, "redis": 12000.0, "postgres": 20000.0},
    "floor": {"sqlite": 15000.0},
    "faststream": {"nats": 4000.0, "rabbitmq": 1000.0, "redis": 1500.0, "kafka": 2000.0},
    "dramatiq": {"redis": 1500.0, "rabbitmq": 700.0},
    "celery": {"redis": 700.0, "rabbitmq": 250.0},
    "taskiq": {"nats": 1000.0, "redis": 500.0, "rabbitmq": 1000.0},
}  # fmt: skip
STARTUP_S = {"celery": 6.0, "dramatiq": 5.0}
GOAL_RATE = 1000.0
"""The latency goals are at this rate: it gets ``--runs`` runs, other rates fewer."""
MIN_RATE = 40.0
"""A run slower than this (events/s) is stopped and recorded as failed."""


@dataclass
class Settings:
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    brokers: list[str] = field(default_factory=lambda: list(BROKERS))
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    runs: int = 3
    events: int = 5_000
    embedded_events: int = 20_000
    batch: int = 100
    fanout_events: int = 2_000
    rates: list[float] = field(default_factory=lambda: [500.0, 1000.0, 2000.0])
    seconds: float = 4.0
    other_rate_runs: int = 1
    pipeline_orders: int = 2_000
    scale_events: int = 20_000
    quick: bool = False
    out: str = ""  # where RESULTS.md and results/ go ("": benchmarks/)

    @classmethod
    def quick_mode(cls) -> Settings:
        return cls(
            runs=1,
            events=1_000,
            embedded_events=2_000,
            fanout_events=500,
            rates=[500.0, 1000.0],
            seconds=2.0,
            pipeline_orders=200,
            scale_events=2_000,
            quick=True,
        )

    def command(self) -> str:
        parts = ["python -m benchmarks compare"]
        if self.quick:
            parts.append("--quick")
        parts += [
            f"--workloads {','.join(self.workloads)}",
            f"--brokers {','.join(self.brokers)}",
            f"--peers {','.join(self.peers) or 'none'}",
            f"--runs {self.runs} --events {self.events} --embedded-events "
            f"{self.embedded_events} --fanout-events {self.fanout_events}",
            f"--rates {','.join(f'{r:g}' for r in self.rates)} --seconds {self.seconds:g}",
            f"--orders {self.pipeline_orders} --scale-events {self.scale_events}",
        ]
        return " ".join(parts)


@dataclass(frozen=True)
class Case:
    """One series: a system, on a broker, in a workload (at a rate / process count)."""

    workload: str
    broker: str
    system: str
    param: float = 0.0

    @property
    def key(self) -> str:
        tail = f"@{self.param:g}" if self.param else ""
        return f"{self.workload}/{self.broker}/{self.system}{tail}"

    @property
    def label(self) -> str:
        if self.workload == "latency":
            return f"{self.broker} {self.system} {self.param:g}/s"
        if self.workload == "scale":
            return f"{self.broker} {self.system} x{self.param:g}"
        return f"{self.broker} {self.system}"


@dataclass
class Series:
    case: Case
    runs: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float, float] | None:
        values = [run[key] for run in self.runs if key in run]
        if not values:
            return None
        return statistics.median(values), min(values), max(values)

    def median(self, key: str) -> float | None:
        got = self.stat(key)
        return None if got is None else got[0]


# ---------------------------------------------------------------------------------------
# The plan


def plan(s: Settings) -> list[list[Case]]:
    """Groups of cases; the runs of a group alternate (nerve, raw, peer, nerve, ...)."""
    groups: list[list[Case]] = []
    network = [b for b in s.brokers if b in NETWORK]
    if "throughput" in s.workloads:
        for broker in network:
            cases = [Case("throughput", broker, "nerve"), Case("throughput", broker, "raw")]
            if broker in BROKERS_PY:  # the raw client validating as nerve does
                cases.append(Case("throughput", broker, "raw-typed"))
            cases += [Case("throughput", broker, peer) for peer in s.peers if broker in PEERS[peer]]
            groups.append(cases)
        if "sqlite" in s.brokers:
            groups.append(
                [Case("throughput", "sqlite", "nerve"), Case("throughput", "sqlite", "floor")]
            )
    if "fanout" in s.workloads:
        for broker in network:
            if broker not in FANOUT_BROKERS:
                continue
            cases = [Case("fanout", broker, "nerve"), Case("fanout", broker, "raw")]
            if "faststream" in s.peers and broker in PEERS["faststream"]:
                cases.append(Case("fanout", broker, "faststream"))
            groups.append(cases)
    if "latency" in s.workloads:
        for rate in s.rates:
            for broker in network:
                if broker not in FANOUT_BROKERS:
                    continue
                cases = [
                    Case("latency", broker, "nerve", rate),
                    Case("latency", broker, "raw", rate),
                ]
                if "faststream" in s.peers and broker in PEERS["faststream"]:
                    cases.append(Case("latency", broker, "faststream", rate))
                groups.append(cases)
            if "sqlite" in s.brokers:
                groups.append(
                    [
                        Case("latency", "sqlite", "nerve", rate),
                        Case("latency", "sqlite", "floor", rate),
                    ]
                )
    if "pipeline" in s.workloads:
        groups.append(
            [Case("pipeline", "sqlite", "nerve", 1), Case("pipeline", "sqlite", "nerve", 2)]
        )
    if "scale" in s.workloads:
        for broker in [*SCALE_BROKERS, "sqlite"]:
            if broker in s.brokers:
                groups.append(
                    [Case("scale", broker, "nerve", 1), Case("scale", broker, "nerve", 2)]
                )
    return groups


def events_of(case: Case, s: Settings) -> int:
    if case.workload == "throughput":
        return s.embedded_events if case.broker == "sqlite" else s.events
    if case.workload == "fanout":
        return s.fanout_events
    if case.workload == "latency":
        return int(case.param * s.seconds)
    if case.workload == "pipeline":
        return s.pipeline_orders
    return s.scale_events


def expected_seconds(case: Case, s: Settings) -> float:
    """A rough guess of one run's wall time (process start, warm-up, work, teardown)."""
    overhead = STARTUP_S.get(case.system, 3.5)
    if case.workload == "latency":
        return overhead + s.seconds + 1.0
    if case.workload == "pipeline":
        return overhead + s.pipeline_orders / 400.0
    rate = EXPECTED_RATE[case.system][case.broker]
    work = events_of(case, s) * (FANOUT if case.workload == "fanout" else 1)
    return overhead + work / rate


def reps(case: Case, s: Settings) -> int:
    """Runs of a case: ``--runs``, except latency at rates other than GOAL_RATE."""
    if case.workload == "latency" and case.param != GOAL_RATE:
        return min(s.runs, s.other_rate_runs)
    return s.runs


def deadline_seconds(case: Case, s: Settings) -> float:
    if case.workload == "latency":
        return s.seconds + 60.0
    work = events_of(case, s) * (FANOUT if case.workload == "fanout" else 1)
    return min(300.0, 40.0 + work / MIN_RATE)


# ---------------------------------------------------------------------------------------
# Running one case


class Runner:
    def __init__(self, s: Settings, progress: Progress, stamp: str) -> None:
        self.s = s
        self.progress = progress
        self.stamp = stamp
        self.tag = stamp[-6:]
        self.base = RUNS_DIR / f"compare-{stamp}"
        self.use_cli = nerve_cli_available()
        self._brokers: broker_bench.Bench | None = None
        self._embedded: dict[tuple[str, float], embedded.Bench] = {}

    # -- dispatch ---------------------------------------------------------------------

    def run(self, case: Case, rep: int) -> dict[str, float]:
        if case.workload != "scale":
            return self._run(case, rep)
        # what bounds scaling: how busy the machine's cores were from first publish to
        # last ack (the producer, the workers and the broker share them)
        with CpuSampler() as cpu:
            result = self._run(case, rep)
        busy = cpu.cores_busy(result["first_publish"], result["done_at"])
        if busy is not None:
            result["cores_busy"] = busy
        return result

    def _run(self, case: Case, rep: int) -> dict[str, float]:
        if case.workload == "throughput" and case.system in ("nerve", "raw", "raw-typed"):
            if case.broker == "kafka":
                return self.peer(case, rep)
            if case.broker == "sqlite":
                bench = self._embedded_bench("throughput", self.s.embedded_events)
                return bench.nerve_throughput(rep)
            return self._broker_bench().one(case.broker, case.system, rep)
        if case.system == "floor":
            bench = self._embedded_bench(case.workload, self.s.embedded_events)
            if case.workload == "latency":
                bench.s.rate = case.param
                bench.s.seconds = self.s.seconds
                return bench.floor_latency(rep)
            return bench.floor_throughput(rep)
        if case.workload == "latency" and case.broker == "sqlite":
            bench = self._embedded_bench("latency", self.s.embedded_events)
            bench.s.rate, bench.s.seconds = case.param, self.s.seconds
            return bench.nerve_latency(rep)
        if case.workload == "scale" and case.broker == "sqlite":
            bench = self._embedded_bench("scale", self.s.scale_events, int(case.param))
            result = bench.nerve_throughput(rep)
            # and the same workers on a backlog, with no producer competing for the cores
            result["drained_per_s"] = bench.nerve_drain(rep)["events_per_s"]
            return result
        if case.workload == "pipeline":
            return self.pipeline(case, rep)
        return self.peer(case, rep)

    def _broker_bench(self) -> broker_bench.Bench:
        if self._brokers is None:
            settings = broker_bench.Settings(
                brokers=[b for b in self.s.brokers if b in BROKERS_PY],
                events=self.s.events,
                batch=self.s.batch,
                runs=self.s.runs,
            )
            self._brokers = broker_bench.Bench(settings, self.use_cli, self.progress, self.stamp)
        return self._brokers

    def _embedded_bench(self, workload: str, events: int, processes: int = 1) -> embedded.Bench:
        key = (workload, float(processes))
        if key not in self._embedded:
            settings = embedded.Settings(events=events, runs=self.s.runs, processes=processes)
            stamp = f"compare-{self.stamp}/{workload}-x{processes}"
            self._embedded[key] = embedded.Bench(settings, self.use_cli, self.progress, stamp)
        return self._embedded[key]

    # -- peers, raw and nerve through benchmarks.peers -----------------------------------

    def peer(self, case: Case, rep: int) -> dict[str, float]:
        s = self.s
        fanout = FANOUT if case.workload == "fanout" else 1
        processes = int(case.param) if case.workload == "scale" else 1
        name = f"{SHORT[case.system]}_{case.workload[:2]}_{self.tag}_{rep}"
        if case.workload in ("latency", "scale"):
            name += f"_{int(case.param)}"
        if case.broker == "rabbitmq" and case.system == "nerve":
            name = name.replace("_", ".")
        logdir = self.base / f"{case.workload}-{case.broker}-{case.system}-{case.param:g}-{rep}"
        logdir.mkdir(parents=True, exist_ok=True)
        ready, done = logdir / "ready", logdir / "done"
        events = events_of(case, s)
        cfg = Config(
            role="consume",
            broker=case.broker,
            name=name,
            events=events,
            batch=s.batch,
            ready=str(ready),
            done=str(done),
            fanout=fanout,
            rate=case.param if case.workload == "latency" else 0.0,
            seconds=s.seconds if case.workload == "latency" else 0.0,
            processes=processes,
        )
        args = [
            "--broker",
            case.broker,
            "--name",
            name,
            "--events",
            str(events),
            "--batch",
            str(s.batch),
            "--ready",
            str(ready),
            "--done",
            str(done),
            "--fanout",
            str(fanout),
            "--processes",
            str(processes),
        ]
        if case.workload == "latency":
            args += ["--rate", f"{case.param:g}", "--seconds", f"{s.seconds:g}"]
        env = {
            CONFIG_ENV: orjson.dumps(asdict(cfg)).decode(),
            "NERVE_STORE": f"sqlite:///{logdir / 'store.db'}",
        }
        if case.system == "nerve":
            from benchmarks.peers.nerve_side import url

            target = "benchmarks.peers.nerve_side:" + ("fanout_app" if fanout > 1 else "app")
            consumer_cmd = nerve_consumer_cmd(target, url(case.broker, name), self.use_cli)
            if processes > 1:
                consumer_cmd += ["--processes", str(processes)]
        else:
            consumer_cmd = [PYTHON, "-m", "benchmarks.peers", case.system, "consume", *args]
        producer_cmd = [PYTHON, "-m", "benchmarks.peers", case.system, "produce", *args]
        expect = events * fanout
        task = self.progress.add_task(f"  {case.label} #{rep}", total=expect)
        module = importlib.import_module(MODULES[case.system])
        try:
            with (
                process(consumer_cmd, logdir, "consumer", **env) as consumer,
                process(producer_cmd, logdir, "producer", **env) as producer,
            ):
                show = lambda n: self.progress.update(task, completed=n)  # noqa: E731
                if case.workload == "scale":
                    raw = wait_for_counts(
                        done, expect, deadline_seconds(case, s), [consumer, producer], logdir, show
                    )
                else:
                    raw = wait_for_file(
                        done, deadline_seconds(case, s), [consumer, producer], logdir, show
                    )
                sent = producer_result(producer, logdir, "producer")
        finally:
            self.progress.remove_task(task)
            with contextlib.suppress(Exception):
                asyncio.run(asyncio.wait_for(module.teardown(case.broker, name, fanout), 30))
        if case.workload == "latency":
            result = percentiles(orjson.loads(raw))
            result["producer_max_behind_ms"] = sent.get("max_behind_s", 0.0) * 1000.0
            return result
        result = throughput_result(events, sent, float(raw))
        if fanout > 1:
            result["deliveries_per_s"] = expect / result["seconds"]
        return result

    # -- the shop ---------------------------------------------------------------------

    def pipeline(self, case: Case, rep: int) -> dict[str, float]:
        """``nerve demo --orders N`` on a fresh embedded broker, timed from inside."""
        processes = int(case.param)
        logdir = self.base / f"pipeline-x{processes}-{rep}"
        logdir.mkdir(parents=True, exist_ok=True)
        out = logdir / "pipeline.json"
        cmd = [
            PYTHON,
            "-m",
            "benchmarks.pipeline",
            "--orders",
            str(self.s.pipeline_orders),
            "--processes",
            str(processes),
            "--broker",
            f"sqlite:///{logdir / 'shop.db'}",
            "--out",
            str(out),
        ]
        task = self.progress.add_task(f"  shop x{processes} #{rep}", total=self.s.pipeline_orders)
        try:
            with process(cmd, logdir, "demo") as demo:
                try:
                    demo.wait(deadline_seconds(case, self.s))
                except subprocess.TimeoutExpired:
                    raise _fail("the shop did not finish in time", logdir) from None
                if demo.returncode != 0:
                    raise _fail(f"the shop exited with code {demo.returncode}", logdir)
        finally:
            self.progress.remove_task(task)
        result: dict[str, float] = orjson.loads(out.read_bytes())
        return result


def _counts(done: Path) -> list[tuple[int, float]]:
    """What each consumer process reported: (events handled, time of the latest)."""
    out = []
    for path in done.parent.glob(done.name + ".count.*"):
        if path.name.endswith(".tmp"):
            continue
        with contextlib.suppress(OSError, ValueError):
            seen, last = path.read_text().split()
            out.append((int(seen), float(last)))
    return out


def wait_for_counts(
    done: Path,
    expect: int,
    timeout: float,
    procs: list[Any],
    logdir: Path,
    progress: Callable[[int], None],
) -> bytes:
    """With several consumer processes: wait until their counts add up to ``expect``;
    the end is the latest of their last-event times (as bytes, like the done file)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = _counts(done)
        total = sum(seen for seen, _ in counts)
        progress(total)
        if total >= expect:
            return repr(max(last for _, last in counts)).encode()
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise _fail(f"a process exited with code {proc.returncode}", logdir)
        if time.monotonic() > deadline:
            raise _fail(f"only {total} of {expect} handled within {timeout:.0f} s", logdir)
        time.sleep(0.01)


def wait_for_file(
    path: Path,
    timeout: float,
    procs: list[Any],
    logdir: Path,
    progress: Callable[[int], None] | None = None,
) -> bytes:
    """The consumer's result file, or an error once a process failed or time is up.
    ``progress`` gets the consumer's count so far (``PATH.count``) every ~0.1 s."""
    deadline = time.monotonic() + timeout
    shown = 0.0
    while not path.exists():
        if progress is not None and time.monotonic() - shown > 0.1:
            shown = time.monotonic()
            progress(sum(seen for seen, _ in _counts(path)))
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise _fail(f"a process exited with code {proc.returncode}", logdir)
        if time.monotonic() > deadline:
            raise _fail(f"no result within {timeout:.0f} s (stopped)", logdir)
        time.sleep(0.005)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------
# The whole comparison


def run(s: Settings, console: Console) -> dict[str, Any]:
    groups = plan(s)
    total_runs = sum(len(g) * reps(g[0], s) for g in groups)
    estimate = sum(expected_seconds(c, s) * reps(c, s) for g in groups for c in g)
    console.print(
        f"[bold]nerve side by side[/]: {total_runs} runs "
        f"({', '.join(s.workloads)}; brokers {', '.join(s.brokers)}; peers "
        f"{', '.join(s.peers) or 'none'}), expected duration ~{estimate / 60:.0f} min "
        f"({estimate:.0f} s)"
    )
    missing = missing_peers(s.peers)
    if missing:
        console.print(
            f"[yellow]not installed: {', '.join(missing)} (pip install -e '.[bench,peers]'); "
            "their runs will fail[/]"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    load_before = os.getloadavg()
    started = time.monotonic()
    results: dict[str, Series] = {c.key: Series(c) for g in groups for c in g}
    servers: dict[str, str] = {}
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TextColumn("{task.completed:>7,}/{task.total:,}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("[bold]all runs", total=total_runs)
        runner = Runner(s, progress, stamp)
        for group in groups:
            with contextlib.ExitStack() as stack:
                if group[0].broker == "kafka":
                    try:
                        servers["kafka"] = stack.enter_context(kafka(runner.base / "kafka"))
                    except RuntimeError as exc:
                        servers["kafka"] = f"not available: {exc}"
                        console.print(f"[red]x kafka: {exc}[/]")
                        for case in group:  # every run would only wait for its deadline
                            results[case.key].failures.append(f"no broker: {exc}")
                        progress.advance(overall, len(group) * reps(group[0], s))
                        continue
                for rep in range(1, reps(group[0], s) + 1):
                    for case in group:  # alternating, so drift hits every side alike
                        one(runner, results[case.key], rep, progress, overall, console)
    elapsed = time.monotonic() - started
    env = environment(s, load_before, elapsed, estimate)
    env["servers"].update(servers)
    doc = document(s, results, env)
    write(doc, results, s, env, console)
    return doc["summary"]


def one(
    runner: Runner, series: Series, rep: int, progress: Progress, overall: TaskID, console: Console
) -> None:
    case = series.case
    if len(series.failures) >= 2:  # bounded: a broken side costs two deadlines at most
        series.failures.append(f"run {rep}: skipped after earlier failures")
        progress.advance(overall)
        return
    progress.update(overall, description=f"[bold]all runs[/] ({case.workload})")
    shown = set(progress.task_ids)
    try:
        series.runs.append(runner.run(case, rep))
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        series.failures.append(f"run {rep}: {first_line}")
        console.print(f"[red]x {case.key} run {rep} failed: {first_line}[/]")
    for task in set(progress.task_ids) - shown:  # the run's own bars: only the current one
        progress.remove_task(task)
    progress.advance(overall)


def missing_peers(peers: list[str]) -> list[str]:
    missing = []
    for peer in peers:
        for dist in DISTRIBUTIONS[peer]:
            try:
                importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                missing.append(dist)
    return missing


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(s: Settings, load_before: Any, elapsed: float, estimate: float) -> dict[str, Any]:
    from benchmarks.apps import make_orders
    from nerve.event import encode

    network = [b for b in s.brokers if b in BROKERS_PY]
    sizes = [len(encode(e)) for e in make_orders(100)]
    versions = {d: version_of(d) for p in s.peers for d in DISTRIBUTIONS[p]}
    versions.update({d: version_of(d) for d in ("nats-py", "aio-pika", "redis", "asyncpg")})
    versions["nerve"] = version_of("nerve")
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "event_bytes": round(statistics.median(sizes)),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "servers": {b: asyncio.run(broker_bench.server_version(b)) for b in network},
        "versions": versions,
        "elapsed_s": round(elapsed, 1),
        "expected_s": round(estimate, 1),
    }


# ---------------------------------------------------------------------------------------
# Goals, summary, report


def _find(
    results: dict[str, Series], workload: str, broker: str, system: str, param: float = 0.0
) -> Series | None:
    return results.get(Case(workload, broker, system, param).key)


def _ratio(a: Series | None, b: Series | None, key: str = "events_per_s") -> float | None:
    if a is None or b is None:
        return None
    x, y = a.median(key), b.median(key)
    if x is None or y is None or y == 0:
        return None
    return x / y


@dataclass
class Goal:
    text: str
    value: str
    met: bool | None  # None: not measured in this run


def goals(results: dict[str, Series], s: Settings) -> list[Goal]:
    out: list[Goal] = []

    def ratio_goal(text: str, ratio: float | None, at_least: float) -> None:
        if ratio is None:
            out.append(Goal(text, "not measured", None))
        else:
            out.append(Goal(text, f"{ratio:.2f}x", ratio >= at_least))

    for broker in NETWORK:
        ratio_goal(
            f"throughput {broker}: nerve >= 0.6x raw",
            _ratio(
                _find(results, "throughput", broker, "nerve"),
                _find(results, "throughput", broker, "raw"),
            ),
            0.6,
        )
    for broker, target in (("nats", 1.5), ("redis", 1.5), ("rabbitmq", 1.1)):
        ratio_goal(
            f"throughput {broker}: nerve >= {target}x FastStream",
            _ratio(
                _find(results, "throughput", broker, "nerve"),
                _find(results, "throughput", broker, "faststream"),
            ),
            target,
        )
    for peer in ("dramatiq", "celery", "taskiq"):
        for broker in PEERS[peer]:
            ratio_goal(
                f"throughput {broker}: nerve ahead of {peer}",
                _ratio(
                    _find(results, "throughput", broker, "nerve"),
                    _find(results, "throughput", broker, peer),
                ),
                1.0,
            )
    for broker in ("nats", "redis", "rabbitmq"):
        nerve = _find(results, "latency", broker, "nerve", 1000.0)
        raw = _find(results, "latency", broker, "raw", 1000.0)
        p99 = _ratio(nerve, raw, "p99_ms")
        if p99 is None:
            out.append(Goal(f"latency {broker}: p99 at 1,000/s <= 2x raw", "not measured", None))
        else:
            value = f"{nerve.median('p99_ms'):.2f} ms vs {raw.median('p99_ms'):.2f} ms = {p99:.2f}x"  # type: ignore[union-attr]
            out.append(Goal(f"latency {broker}: p99 at 1,000/s <= 2x raw", value, p99 <= 2.0))
    tp = _find(results, "throughput", "sqlite", "nerve")
    eps = tp.median("events_per_s") if tp else None
    out.append(
        Goal("embedded: >= 15,000 events/s (synchronous=FULL)", "not measured", None)
        if eps is None
        else Goal("embedded: >= 15,000 events/s (synchronous=FULL)", f"{eps:,.0f}/s", eps >= 15_000)
    )
    lat = _find(results, "latency", "sqlite", "nerve", 1000.0)
    p99v = lat.median("p99_ms") if lat else None
    out.append(
        Goal("embedded: p99 <= 10 ms at 1,000 events/s", "not measured", None)
        if p99v is None
        else Goal("embedded: p99 <= 10 ms at 1,000 events/s", f"{p99v:.2f} ms", p99v <= 10.0)
    )
    ratio_goal(
        "embedded: 2 processes >= 1.6x one",
        _ratio(
            _find(results, "scale", "sqlite", "nerve", 2),
            _find(results, "scale", "sqlite", "nerve", 1),
        ),
        1.6,
    )
    return out


def summary(results: dict[str, Series]) -> dict[str, Any]:
    """Median events/s (throughput, fanout, scale, pipeline) or p99 ms (latency) per series."""
    out: dict[str, Any] = {}
    for key, series in results.items():
        metric = "p99_ms" if series.case.workload == "latency" else "events_per_s"
        value = series.median(metric)
        out[key] = None if value is None else round(value, 3 if metric == "p99_ms" else 1)
    return out


def document(s: Settings, results: dict[str, Series], env: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary(results),
        "goals": [asdict(g) for g in goals(results, s)],
        "settings": asdict(s),
        "environment": env,
        "series": {
            key: {"case": asdict(series.case), "runs": series.runs, "failures": series.failures}
            for key, series in results.items()
        },
    }


def write(
    doc: dict[str, Any],
    results: dict[str, Series],
    s: Settings,
    env: dict[str, Any],
    console: Console,
) -> None:
    from benchmarks import report

    out = Path(s.out) if s.out else ROOT / "benchmarks"
    results_dir = out / "results" if s.out else RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "compare.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    )
    charts = report.charts(results, results_dir)
    markdown = report.markdown(results, goals(results, s), s, env, charts)
    (out / "RESULTS.md").write_text(markdown)
    console.print(report.console_table(results))
    marks = {True: "[green]met[/]", False: "[red]missed[/]"}
    for goal in goals(results, s):
        if goal.met is not None:
            console.print(f"  {marks[goal.met]}  {goal.text}: {goal.value}")
    console.print(
        f"wrote {out / 'RESULTS.md'}, {results_dir / 'compare.json'}"
        + "".join(f", {p.name}" for p in charts)
        + f" in {env['elapsed_s']:.0f} s (expected {env['expected_s']:.0f} s)"
    )


# ---------------------------------------------------------------------------------------
# Command line


def _names(value: str, allowed: tuple[str, ...] | list[str], option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(unknown)}; choose from {','.join(allowed)}")
    return names


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small N, 1 run each, rates 500,1000 for 2 s",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, or none")
    parser.add_argument("--runs", type=int, help="runs per system (3; quick: 1)")
    parser.add_argument("--events", type=int, help="throughput: events per run (5000)")
    parser.add_argument(
        "--embedded-events", type=int, help="throughput on sqlite: events per run (20000)"
    )
    parser.add_argument("--fanout-events", type=int, help="fan-out: events per run (2000)")
    parser.add_argument("--rates", help="latency: events/s, comma-separated (500,1000,2000)")
    parser.add_argument("--seconds", type=float, help="latency: seconds per rate (4)")
    parser.add_argument("--orders", type=int, help="pipeline: shop orders (2000)")
    parser.add_argument("--scale-events", type=int, help="scale: events per run (20000)")
    parser.add_argument(
        "--out", default="", help="write RESULTS.md and results/ here (default: benchmarks/)"
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="no runs: rewrite RESULTS.md and the charts from a compare.json of an earlier run",
    )


def render(path: Path, out: str, console: Console) -> dict[str, Any]:
    """Rewrite RESULTS.md and the charts from the ``compare.json`` of an earlier run."""
    doc = orjson.loads(path.read_bytes())
    s = Settings(**{**doc["settings"], "out": out})
    results: dict[str, Series] = {}
    for key, raw in doc["series"].items():
        results[key] = Series(Case(**raw["case"]), raw["runs"], raw["failures"])
    env = doc["environment"]
    doc = document(s, results, env)
    write(doc, results, s, env, console)
    return dict(doc["summary"])


def main(parser: Any, args: Any) -> int:
    s = Settings.quick_mode() if args.quick else Settings()
    try:
        s.workloads = _names(args.workloads, WORKLOADS, "--workloads")
        s.brokers = _names(args.brokers, BROKERS, "--brokers")
        s.peers = _names(args.peers, list(PEERS), "--peers")
        if args.rates:
            try:
                s.rates = [float(r) for r in args.rates.split(",") if r.strip()]
            except ValueError:
                raise ValueError(
                    f"--rates: events per second, comma-separated (500,1000), got {args.rates!r}"
                ) from None
    except ValueError as exc:
        parser.error(str(exc))
    for option, attr in (
        ("runs", "runs"),
        ("events", "events"),
        ("embedded_events", "embedded_events"),
        ("fanout_events", "fanout_events"),
        ("seconds", "seconds"),
        ("orders", "pipeline_orders"),
        ("scale_events", "scale_events"),
    ):
        value = getattr(args, option)
        if value is not None:
            if value <= 0:
                parser.error(f"--{option.replace('_', '-')} must be positive")
            setattr(s, attr, value)
    s.out = str(Path(args.out).resolve()) if args.out else ""
    if not s.workloads or not s.brokers or any(r <= 0 for r in s.rates):
        parser.error("choose at least one workload and broker; --rates must be positive")
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)
    if args.render:
        if not Path(args.render).is_file():
            parser.error(f"--render: {args.render} is not a file (a results/compare.json)")
        result = render(Path(args.render), s.out, console)
        print(orjson.dumps(result).decode(), flush=True)
        return 0
    result = run(s, console)
    print(orjson.dumps(result).decode(), flush=True)
    return 0
