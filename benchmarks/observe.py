"""``python -m benchmarks observe``: what metrics and tracing cost, side by side.

The embedded benchmark's throughput workload (``nerve run benchmarks.apps:app`` on a
fresh ``sqlite://`` file with ``synchronous=FULL``, a no-op handler, a producer process
publishing ``--events`` events in batches of 100), in three configurations, their order
rotated each round so that drift hits all alike:

- ``off``: ``NERVE_METRICS=0``, no ``OTEL_*`` variable (the baseline);
- ``metrics``: metrics on, tracing off: no exporter configured (the default of
  ``nerve run``);
- ``metrics+otlp``: metrics on and every event traced, exported over OTLP/HTTP
  (``OTEL_TRACES_EXPORTER=otlp``, ``OTEL_EXPORTER_OTLP_ENDPOINT``) to a receiver in this
  process that accepts ``POST /v1/traces`` and discards the body; the producer has the
  same variables, so it traces what it publishes;
- with ``--sampled``, also ``metrics+otlp 10%``: as above with
  ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``.

Per run: events/s from the first publish to the last ack, and the consumer's CPU time
(user + system, read from ``/proc`` when it is ready and when the last event is acked:
start-up excluded) per event. The report gives medians over ``--rounds`` and the two
overheads the issue sets goals for, as ratios to ``off`` (medians of the per-round
ratios, with their range): no exporter configured
(``metrics``, goal <= 3%) and an exporter configured (``metrics+otlp``, goal <= 15%).

``--callgrind`` counts instructions instead (repeatable to about 1% on a shared
machine, where wall-clock figures swing by 20%): a consumer process drains
``--events`` events already in the broker (published as in the wall-clock runs: by a
producer with the configuration's ``OTEL_*`` variables, so traced events carry their
``traceparent``) under ``valgrind --tool=callgrind``, with
instrumentation switched on once its runtime has started and off once the last event
is handled and the span queue exported (callgrind's client requests, through a tiny C
helper compiled with ``cc`` on first use; every thread counts: the export thread's
encoding and HTTP requests too; the report splits the count into the event loop's
thread and the others: SQLite's workers and the span exporter). Where the helper
cannot be built, the count is the
slope between draining N and 2N events (noisier: it also counts polling that grows
with valgrind's slowness).
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmarks.embedded import (
    PYTHON,
    RESULTS_DIR,
    ROOT,
    RUNS_DIR,
    _env,
    _fail,
    cpu_seconds,
    nerve_cli_available,
    nerve_consumer_cmd,
    process,
    producer_result,
    read_only,
    wait_count,
    wait_ready,
)

GOALS = {"metrics": 0.03, "metrics+otlp": 0.15}
"""The issue's goals: overhead at most 3% without an exporter, 15% with one."""


def configurations(endpoint: str, sampled: bool) -> dict[str, dict[str, str]]:
    otlp = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    configs = {
        "off": {"NERVE_METRICS": "0"},
        "metrics": {"NERVE_METRICS": "1"},
        "metrics+otlp": {"NERVE_METRICS": "1", **otlp},
    }
    if sampled:
        configs["metrics+otlp 10%"] = {
            "NERVE_METRICS": "1",
            **otlp,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
    return configs


_OTEL_NAMES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
)


def _clean_env() -> None:
    """No ``OTEL_*`` variable of the caller's leaks into a configuration."""
    for name in _OTEL_NAMES:
        os.environ.pop(name, None)


# ---------------------------------------------------------------------------------------
# The OTLP receiver


class _Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector would
    received = 0
    requests = 0

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length", 0))
        self.rfile.read(size)
        _Sink.received += size
        _Sink.requests += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def start_sink() -> tuple[str, Callable[[], None]]:
    """An OTLP/HTTP receiver on 127.0.0.1 that discards what it is sent."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


# ---------------------------------------------------------------------------------------
# Wall clock: throughput and consumer CPU


def throughput_run(
    logdir: Path, events: int, env: dict[str, str], show: Callable[[int], None]
) -> dict[str, float]:
    """One run: events/s from the first publish to the last ack, consumer CPU/event."""
    db = logdir / "nerve.db"
    url = f"sqlite:///{db}?synchronous=FULL"
    consumer_cmd = nerve_consumer_cmd("benchmarks.apps:app", url, True)
    with process(consumer_cmd, logdir, "consumer", **env) as consumer:
        conn = read_only(db, time.monotonic() + 30)
        try:
            wait_ready(conn, "SELECT count(*) FROM counters", consumer, logdir)
            cpu_ready = cpu_seconds(consumer.pid)
            producer_cmd = [
                PYTHON, "-m", "benchmarks._producer", "throughput", url, str(events), "100",
            ]  # fmt: skip
            with process(producer_cmd, logdir, "producer", **env) as producer:
                done_at = wait_count(
                    conn,
                    "SELECT processed FROM counters WHERE grp = ?",
                    ("sink",),
                    events,
                    180,
                    [consumer, producer],
                    logdir,
                    show,
                )
                cpu_done = cpu_seconds(consumer.pid)
                sent = producer_result(producer, logdir, "producer")
        finally:
            conn.close()
    elapsed = done_at - sent["first_publish"]
    if cpu_ready is None or cpu_done is None:
        raise _fail("the consumer's CPU time cannot be read from /proc", logdir)
    return {
        "events_per_s": events / elapsed,
        "consumer_cpu_us": (cpu_done - cpu_ready) / events * 1e6,
    }


def drain_run(
    logdir: Path, events: int, env: dict[str, str], show: Callable[[int], None]
) -> dict[str, float]:
    """One ``--drain`` run: ``events`` published first (by a producer with the
    configuration's ``OTEL_*`` variables), then drained by a consumer process; events/s
    and CPU (all its threads) from its first event handled to its last. The producer's
    and the OTLP receiver's CPU are not in it: the consumer's throughput alone."""
    url = _prepare(logdir, events, env)
    show(0)
    times = logdir / "times.json"
    cmd = [PYTHON, "-m", "benchmarks.observe", "drain", url, str(events)]
    done = subprocess.run(
        cmd, cwd=ROOT, env=_env(**env, NERVE_BENCH_TIMES=str(times)), capture_output=True,
        timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not times.exists():
        raise _fail(done.stderr.decode(errors="replace")[-2000:], logdir)
    show(events)
    measured = orjson.loads(times.read_bytes())
    return {
        "events_per_s": measured["events"] / measured["seconds"],
        "consumer_cpu_us": measured["cpu"] / measured["events"] * 1e6,
        "dropped_spans": measured["dropped_spans"],
    }


def wall_clock(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    if not nerve_cli_available():
        raise SystemExit("python -m nerve run is not available")
    endpoint, stop_sink = start_sink()
    configs = configurations(endpoint, args.sampled)
    names = list(configs)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    base = RUNS_DIR / time.strftime("observe-%Y%m%dT%H%M%S")
    try:
        with Progress(console=console, transient=True) as progress:
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    _clean_env()
                    logdir = base / f"{name.replace(' ', '_').replace('%', 'pct')}-{r + 1}"
                    logdir.mkdir(parents=True, exist_ok=True)
                    task = progress.add_task(f"round {r + 1} {name}", total=args.events)
                    result = (drain_run if args.drain else throughput_run)(
                        logdir,
                        args.events,
                        configs[name],
                        lambda done, task=task: progress.update(task, completed=done),
                    )
                    progress.remove_task(task)
                    runs[name].append(result)
                    dropped = result.get("dropped_spans", 0)
                    console.print(
                        f"round {r + 1} {name:<18} {result['events_per_s']:>8,.0f} events/s  "
                        f"{result['consumer_cpu_us']:>6.1f} us consumer CPU/event"
                        + (
                            f"  ({dropped:,.0f} spans dropped: the queue was full)"
                            if dropped
                            else ""
                        )
                    )
    finally:
        stop_sink()
    shutil.rmtree(base, ignore_errors=True)
    rates = {n: [r["events_per_s"] for r in runs[n]] for n in names}
    cpu = {n: [r["consumer_cpu_us"] for r in runs[n]] for n in names}
    caption = (
        f"{args.events:,} events a run{' drained (--drain)' if args.drain else ''}, "
        f"{args.rounds} rounds, medians; load average "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    summary, verdicts = _report(console, names, rates, cpu, caption)
    name = "observe-drain" if args.drain else "observe"
    _save(console, name, summary, verdicts, caption, {"events_per_s": rates, "cpu_us": cpu})
    _plot(RESULTS_DIR / f"{name}.png", names, rates, cpu, caption)
    return summary


def _paired(values: list[float], base: list[float]) -> list[float]:
    """Per-round ratios: each round runs every configuration back to back (its order
    rotated), so a round's ratio cancels the drift that medians of each column keep."""
    return [v / b for v, b in zip(values, base, strict=True)]


def _ratio(median: float, ratios: list[float]) -> str:
    return f"{median:.3f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def _report(
    console: Console,
    names: list[str],
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
    caption: str,
) -> tuple[dict[str, Any], list[str]]:
    """The table and the verdicts. Ratios to ``off`` are medians of the per-round
    ratios (with their range), not ratios of medians: on a noisy machine the latter
    said "met" for a run whose paired ratios said 17% slower."""
    table = Table(title="What metrics and tracing cost", caption=caption)
    for column in ("configuration", "events/s", "throughput vs off", "consumer CPU us/event"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    table.add_column("CPU vs off", justify="right")
    summary: dict[str, Any] = {}
    for name in names:
        rate, used = statistics.median(rates[name]), statistics.median(cpu[name])
        rate_ratios = _paired(rates[name], rates["off"])
        cpu_ratios = _paired(cpu[name], cpu["off"])
        rate_ratio, cpu_ratio = statistics.median(rate_ratios), statistics.median(cpu_ratios)
        table.add_row(
            name,
            f"{rate:,.0f} [{min(rates[name]):,.0f}-{max(rates[name]):,.0f}]",
            "" if name == "off" else _ratio(rate_ratio, rate_ratios),
            f"{used:.1f} [{min(cpu[name]):.1f}-{max(cpu[name]):.1f}]",
            "" if name == "off" else _ratio(cpu_ratio, cpu_ratios),
        )
        summary[name] = {
            "events_per_s": rate,
            "consumer_cpu_us": used,
            "throughput_ratio": rate_ratio,
            "throughput_ratio_range": [min(rate_ratios), max(rate_ratios)],
            "cpu_ratio": cpu_ratio,
            "cpu_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
        }
    console.print(table)
    verdicts = []
    for name, what in (("metrics", "no exporter configured"), ("metrics+otlp", "OTLP exporter")):
        goal = GOALS[name]
        row = summary[name]
        slower, more_cpu = 1 - row["throughput_ratio"], row["cpu_ratio"] - 1
        verdict = "met" if max(slower, more_cpu) <= goal else "NOT met"
        low, high = row["throughput_ratio_range"]
        cpu_low, cpu_high = row["cpu_ratio_range"]
        across = [
            f"{measure} {a:.2f}x-{b:.2f}x"
            for measure, a, b, crosses in (
                ("throughput", low, high, low < 1 - goal <= high),
                ("CPU", cpu_low, cpu_high, cpu_low <= 1 + goal < cpu_high),
            )
            if crosses
        ]
        if across:  # the rounds disagree about the goal: say so
            ranges = ", ".join(across)
            verdict += f" (rounds range {ranges}: across the goal; more --rounds, or --callgrind)"
        verdicts.append(
            f"{what}: throughput {row['throughput_ratio']:.3f}x ({-slower:+.1%}), "
            f"consumer CPU per event {row['cpu_ratio']:.3f}x ({more_cpu:+.1%}); "
            f"goal <= {goal:.0%}: {verdict}"
        )
        console.print(verdicts[-1])
    return summary, verdicts


def _save(
    console: Console,
    name: str,
    summary: dict[str, Any],
    verdicts: list[str],
    caption: str,
    rounds: dict[str, Any],
) -> None:
    """``benchmarks/results/<name>.json`` (the summary and every round's figures) and
    ``<name>.md`` (the table, the verdicts, the command), beside the plot."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks observe " + " ".join(sys.argv[2:])
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    document = {"command": command, "date": when, "caption": caption, "summary": summary}
    (RESULTS_DIR / f"{name}.json").write_bytes(
        orjson.dumps({**document, "rounds": rounds}, option=orjson.OPT_INDENT_2)
    )
    lines = [f"# What metrics and tracing cost (`{name}`)", "", f"`{command}`, {when}.", ""]
    first = next(iter(summary.values()))
    if "instructions_per_event" in first:
        cache = "loop_l1i_misses" in first
        lines += [
            "| configuration | instructions/event | vs off | event loop | other threads |"
            + (" event loop's L1i misses | L1d misses |" if cache else ""),
            "|---|---:|---:|---:|---:|" + ("---:|---:|" if cache else ""),
        ]
        for config, row in summary.items():
            ratio = "" if config == "off" else f"{row['ratio']:.3f}x"
            lines.append(
                f"| {config} | {row['instructions_per_event']:,.0f} | {ratio} "
                f"| {row['event_loop_thread']:,.0f} | {row['other_threads']:,.0f} |"
                + (
                    f" {row['loop_l1i_misses']:,.0f} | {row['loop_l1d_misses']:,.0f} |"
                    if cache
                    else ""
                )
            )
    else:
        lines += [
            "| configuration | events/s | throughput vs off [rounds] "
            "| consumer CPU µs/event | CPU vs off [rounds] |",
            "|---|---:|---:|---:|---:|",
        ]
        for config, row in summary.items():
            vs = (
                ("", "")
                if config == "off"
                else (
                    _ratio(row["throughput_ratio"], row["throughput_ratio_range"]),
                    _ratio(row["cpu_ratio"], row["cpu_ratio_range"]),
                )
            )
            lines.append(
                f"| {config} | {row['events_per_s']:,.0f} | {vs[0]} "
                f"| {row['consumer_cpu_us']:.1f} | {vs[1]} |"
            )
        lines += ["", f"![every round's ratios to off]({name}.png)"]
    lines += ["", caption + ".", "", *(f"- {v}" for v in verdicts), ""]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines))
    console.print(f"wrote benchmarks/results/{name}.json, {name}.md")


def _plot(
    path: Path,
    names: list[str],
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
    caption: str,
) -> None:
    """Every round's throughput and CPU ratio to ``off``, per configuration, with their
    median and the goal: how far apart the rounds of one run are, at a glance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shown = [n for n in names if n != "off"]
    fig, panels = plt.subplots(1, 2, figsize=(10, 4))
    for panel, values, title, sign in (
        (panels[0], rates, "throughput / off's, per round", -1),
        (panels[1], cpu, "consumer CPU per event / off's, per round", 1),
    ):
        for i, config in enumerate(shown):
            ratios = _paired(values[config], values["off"])
            xs = [i + (j / max(len(ratios) - 1, 1) - 0.5) * 0.3 for j in range(len(ratios))]
            panel.scatter(xs, ratios, s=14, color="#3b6ea8", alpha=0.7)
            median = statistics.median(ratios)
            panel.hlines(median, i - 0.25, i + 0.25, color="#1d3c63", linewidth=2)
            goal = GOALS.get(config.split(" ")[0])
            if goal is not None:
                panel.hlines(1 + sign * goal, i - 0.35, i + 0.35, color="#c0392b", linestyles="--")
        panel.axhline(1.0, color="#9a9a9a", linewidth=0.8)
        panel.set_xticks(range(len(shown)), shown)
        panel.set_title(title)
    panels[0].set_ylabel("ratio to off")
    fig.suptitle(f"{caption}\ndots: rounds; bar: their median; dashed: the goal", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Instructions (callgrind)

_HELPER_C = """#include <valgrind/callgrind.h>
void nerve_bench_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void nerve_bench_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _instrument_helper() -> Path | None:
    """A shared library whose functions start and stop callgrind's instrumentation (of
    all threads), or None when it cannot be built here (no C compiler or no valgrind
    headers)."""
    target = RUNS_DIR / "callgrind-instrument.so"
    if target.exists():
        return target
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        return None
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    source = RUNS_DIR / "callgrind-instrument.c"
    source.write_text(_HELPER_C)
    done = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(target), str(source)],
        capture_output=True,
        check=False,
    )
    return target if done.returncode == 0 else None


def drain_main(argv: list[str]) -> None:
    """``python -m benchmarks.observe drain URL N [HELPER]``: start a runtime of
    ``benchmarks.apps:app`` (metrics as ``NERVE_METRICS`` says, tracing as the OTEL_*
    variables say, the store ``NERVE_STORE`` or the broker's default), handle N events,
    export the queued spans, stop. With HELPER (the callgrind library), count only from
    start to the last export."""
    import asyncio
    import ctypes

    from benchmarks.apps import app
    from nerve import Runtime

    url, count = argv[0], int(argv[1])
    helper = ctypes.CDLL(argv[2]) if len(argv) > 2 else None

    times = os.environ.get("NERVE_BENCH_TIMES", "")

    async def drain() -> None:
        metrics = os.environ.get("NERVE_METRICS") == "1"
        store = os.environ.get("NERVE_STORE") or None  # None: the default beside the broker
        async with Runtime(app, broker=url, store=store, metrics=metrics) as rt:
            runner = rt.runners["sink"]
            if helper is not None:
                helper.nerve_bench_start()
            if times:  # --drain: from the first event handled to the last, finely polled
                while runner.stats.processed < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                first, cpu = time.perf_counter(), time.process_time()
                while runner.stats.processed < count:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                last, cpu = time.perf_counter(), time.process_time() - cpu
                pipeline = getattr(rt.tracing, "_pipeline", None)
                dropped = getattr(pipeline, "dropped", 0)  # spans a full queue dropped
                measured = {"seconds": last - first, "cpu": cpu, "events": count - 1}
                _write(times, {**measured, "dropped_spans": dropped})
            while runner.stats.processed < count:  # noqa: ASYNC110 (a counter, not an event)
                await asyncio.sleep(0.02)
            if rt.tracing is not None:  # export what is queued (older nerve: the provider)
                flush = getattr(rt.tracing, "flush", None)
                flush() if flush is not None else rt.tracing.provider.force_flush()
            if helper is not None:
                helper.nerve_bench_stop()

    from nerve.cli import _run_async

    _run_async(drain(), fast=True)  # as `nerve run` runs: uvloop, its GC settings


def _write(path: str, data: dict[str, float]) -> None:
    Path(path).write_bytes(orjson.dumps(data))


def _prepare(logdir: Path, events: int, config: dict[str, str]) -> str:
    """A broker file holding ``events`` events for the benchmark's ``sink`` group,
    published by a producer with the configuration's ``OTEL_*`` variables, as in the
    wall-clock runs: with tracing on, every event carries its ``traceparent`` and the
    consumer's ``process`` spans are its children (parsing it is part of the cost)."""
    url = f"sqlite:///{logdir / 'nerve.db'}?synchronous=FULL"
    env = _env(NERVE_METRICS="0")
    for name in _OTEL_NAMES:
        env.pop(name, None)
    traced = env | {k: v for k, v in config.items() if k.startswith("OTEL_")}
    publish_backlog(url, events, 100, env, traced)
    return url


def publish_backlog(
    url: str,
    events: int,
    batch: int,
    declare_env: dict[str, str],
    produce_env: dict[str, str],
    timeout: float | None = None,
) -> None:
    """``benchmarks.apps``' group declared on ``url`` (a drain of no events, with
    ``declare_env``) and ``events`` events published to it (the throughput producer,
    batches of ``batch``, with ``produce_env``): the backlog a counted drain takes.
    Raises :class:`subprocess.CalledProcessError` (its output captured) if either fails."""
    steps = (
        ([PYTHON, "-m", "benchmarks.observe", "drain", url, "0"], declare_env),
        ([PYTHON, "-m", "benchmarks._producer", "throughput", url, str(events), str(batch)],
         produce_env),
    )  # fmt: skip
    for cmd, env in steps:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=timeout)


def _instructions(
    logdir: Path, events: int, env: dict[str, str], helper: Path | None, cache: bool = False
) -> tuple[int, int]:
    """Instructions counted in the draining process: (all threads, its main thread,
    where the event loop runs; the rest are SQLite workers and the span exporter)."""
    return count_drain(logdir, _prepare(logdir, events, env), events, env, helper, cache)


def count_drain(
    logdir: Path,
    url: str,
    events: int,
    env: dict[str, str],
    helper: Path | None,
    cache: bool = False,
) -> tuple[int, int]:
    """Run :func:`drain_main` on ``url`` (``events`` events waiting there) under
    callgrind, with ``env`` added to the environment: (instructions of all threads,
    of the main thread). With ``helper``, counted from the runtime's start to the last
    event handled; without, the whole process. With ``cache``, callgrind also
    simulates the caches (:func:`main_thread_misses` reads what it counted)."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        *(["--cache-sim=yes"] if cache else []),
        "--separate-threads=yes",
        f"--callgrind-out-file={logdir / 'callgrind.out'}",
        *(["--instr-atstart=no"] if helper else []),
        PYTHON, "-m", "benchmarks.observe", "drain", url, str(events),
        *([str(helper)] if helper else []),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, check=False)
    found = re.search(rb"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(done.stderr.decode(errors="replace")[-3000:])
    main = re.search(r"^totals: (\d+)", (logdir / "callgrind.out-01").read_text(), re.M)
    if main is None:
        raise RuntimeError(f"no totals for the main thread in {logdir / 'callgrind.out-01'}")
    return int(found.group(1)), int(main.group(1))


def main_thread_misses(logdir: Path) -> dict[str, int]:
    """The main thread's (the event loop's) simulated first-level cache misses, of a
    run of :func:`count_drain` with ``cache``: ``I1mr`` (instruction reads), ``D1mr``
    and ``D1mw`` (data reads and writes)."""
    text = (logdir / "callgrind.out-01").read_text()
    names = re.search(r"^events: (.*)$", text, re.M)
    totals = re.search(r"^totals: (.*)$", text, re.M)
    if names is None or totals is None:
        raise RuntimeError(f"no cache counts in {logdir / 'callgrind.out-01'}")
    counted = dict(zip(names.group(1).split(), map(int, totals.group(1).split()), strict=True))
    return {name: counted[name] for name in ("I1mr", "D1mr", "D1mw")}


def callgrind(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise SystemExit("--callgrind needs valgrind (Debian package 'valgrind')")
    helper = _instrument_helper()
    endpoint, stop_sink = start_sink()
    configs = configurations(endpoint, args.sampled)
    names = list(configs)
    per_event: dict[str, list[float]] = {name: [] for name in names}
    on_loop: dict[str, list[float]] = {name: [] for name in names}
    misses: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    if args.cache and not helper:
        raise SystemExit("--cache needs callgrind's headers (valgrind's) and a C compiler")
    base = RUNS_DIR / time.strftime("observe-callgrind-%Y%m%dT%H%M%S")
    method = "counted from start to last export" if helper else "slope between N and 2N events"
    try:
        for r in range(args.rounds):
            for name in names:
                _clean_env()
                logdir = base / f"{name.replace(' ', '_').replace('%', 'pct')}-{r + 1}"
                logdir.mkdir(parents=True, exist_ok=True)
                if helper:
                    total, main = _instructions(
                        logdir, args.events, configs[name], helper, args.cache
                    )
                    value, loop = total / args.events, main / args.events
                    if args.cache:
                        counted = main_thread_misses(logdir)
                        data = counted["D1mr"] + counted["D1mw"]
                        misses[name].append((counted["I1mr"] / args.events, data / args.events))
                else:
                    small = _instructions(logdir / "n", args.events, configs[name], None)
                    large = _instructions(logdir / "2n", 2 * args.events, configs[name], None)
                    value = (large[0] - small[0]) / args.events
                    loop = (large[1] - small[1]) / args.events
                per_event[name].append(value)
                on_loop[name].append(loop)
                console.print(
                    f"round {r + 1} {name:<18} {value:>10,.0f} instructions/event "
                    f"({loop:,.0f} on the event loop's thread)"
                )
    finally:
        stop_sink()
    if args.keep:
        console.print(
            f"callgrind's files are kept in {base} (one per thread: callgrind_annotate "
            "FILE-01 shows the event loop's functions)"
        )
    else:
        shutil.rmtree(base, ignore_errors=True)
    base_value = statistics.median(per_event["off"])
    table = Table(
        title="Instructions per event (callgrind)",
        caption=f"{args.events:,} events drained, {method}; medians of {args.rounds}",
    )
    columns = ["configuration", "instructions/event", "vs off", "event loop", "other threads"]
    if args.cache:
        columns += ["loop L1i misses", "loop L1d misses"]
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    summary: dict[str, Any] = {}
    for name in names:
        value = statistics.median(per_event[name])
        loop = statistics.median(on_loop[name])
        ratio = value / base_value
        row = [
            name,
            f"{value:,.0f}",
            "" if name == "off" else f"{ratio:.3f}x ({ratio - 1:+.1%})",
            f"{loop:,.0f}",
            f"{value - loop:,.0f}",
        ]
        summary[name] = {
            "instructions_per_event": value,
            "ratio": ratio,
            "event_loop_thread": loop,
            "other_threads": value - loop,
        }
        if args.cache:
            i1 = statistics.median(m[0] for m in misses[name])
            d1 = statistics.median(m[1] for m in misses[name])
            row += [f"{i1:,.0f}", f"{d1:,.0f}"]
            summary[name] |= {"loop_l1i_misses": i1, "loop_l1d_misses": d1}
        table.add_row(*row)
    console.print(table)
    verdicts = []
    for name, what in (("metrics", "no exporter configured"), ("metrics+otlp", "OTLP exporter")):
        ratio = summary[name]["ratio"]
        verdict = "met" if ratio - 1 <= GOALS[name] else "NOT met"
        verdicts.append(
            f"{what}: {ratio:.3f}x instructions per event; goal <= {GOALS[name]:.0%}: {verdict}"
        )
        console.print(verdicts[-1])
    caption = table.caption if isinstance(table.caption, str) else ""
    rounds: dict[str, Any] = {"instructions_per_event": per_event, "event_loop_thread": on_loop}
    if args.cache:
        rounds["loop_l1i_l1d_misses"] = misses
    _save(console, "observe-callgrind", summary, verdicts, caption, rounds)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every configuration (5)")
    parser.add_argument("--events", type=int, help="events a run (20000; 3000 with --callgrind)")
    parser.add_argument(
        "--sampled", action="store_true", help="also: traced with 10%% of traces sampled"
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="count instructions under valgrind instead"
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="wall clock of a consumer draining events published beforehand (no producer "
        "or receiver sharing the cores while it is timed)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="with --callgrind: also simulate the caches and report the event loop's "
        "first-level instruction and data cache misses per event",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="with --callgrind: keep callgrind's output files, to see where the instructions go",
    )


def run(args: argparse.Namespace) -> int:
    if args.events is None:
        args.events = 3_000 if args.callgrind else 20_000
    if args.rounds < 1 or args.events < 1:
        raise SystemExit("--rounds and --events must be positive")
    if (args.cache or args.keep) and not args.callgrind:
        raise SystemExit("--cache and --keep go with --callgrind (they read callgrind's files)")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    summary = callgrind(args, console) if args.callgrind else wall_clock(args, console)
    sys.stdout.flush()
    print(orjson.dumps(summary).decode(), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["drain"]:
        drain_main(sys.argv[2:])
    else:
        main_parser = argparse.ArgumentParser(prog="python -m benchmarks.observe")
        add_arguments(main_parser)
        sys.exit(run(main_parser.parse_args()))
