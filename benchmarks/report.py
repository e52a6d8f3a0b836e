"""The output of ``python -m benchmarks compare``: ``benchmarks/RESULTS.md``, the charts
(``results/compare-*.png``) and the console table."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from benchmarks import raw_clients
from benchmarks.apps import BENCH_ORDERED
from benchmarks.peers import MODULES, PEERS

if TYPE_CHECKING:
    from benchmarks.compare import Goal, Series, Settings

SYSTEM_ORDER = (
    "nerve", "raw", "raw-typed", "floor", "faststream", "dramatiq", "celery", "taskiq"
)  # fmt: skip
BROKER_ORDER = ("nats", "rabbitmq", "redis", "postgres", "kafka", "sqlite")
BROKER_NAMES = {
    "nats": "NATS JetStream",
    "rabbitmq": "RabbitMQ",
    "redis": "Redis Streams",
    "kafka": "Kafka (Tansu)",
    "postgres": "PostgreSQL",
    "sqlite": "embedded (SQLite)",
}


def _by(results: dict[str, Series], workload: str) -> list[Series]:
    chosen = [s for s in results.values() if s.case.workload == workload]
    return sorted(
        chosen,
        key=lambda s: (
            s.case.param if workload == "latency" else 0,
            BROKER_ORDER.index(s.case.broker),
            SYSTEM_ORDER.index(s.case.system),
            s.case.param,
        ),
    )


def _cell(series: Series, key: str, unit: str = "") -> str:
    got = series.stat(key)
    if got is None:
        return "failed" if series.failures else "-"
    med, lo, hi = got
    if unit == "ms":
        return f"{med:.2f}" if lo == hi else f"{med:.2f} [{lo:.2f}-{hi:.2f}]"
    return f"{med:,.0f}" if lo == hi else f"{med:,.0f} [{lo:,.0f}-{hi:,.0f}]"


def _nerve_over(results: dict[str, Series], series: Series, key: str) -> str:
    if series.case.system == "nerve":
        return ""
    from benchmarks.compare import Case

    nerve = results.get(
        Case(series.case.workload, series.case.broker, "nerve", series.case.param).key
    )
    a = nerve.median(key) if nerve else None
    b = series.median(key)
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def console_table(results: dict[str, Series]) -> Table:
    table = Table(title="nerve side by side (median \\[min-max])")
    for col in ("workload", "broker", "system", "result", "nerve/system", "runs"):
        table.add_column(col, justify="right" if col in ("result", "nerve/system") else "left")
    for workload in ("throughput", "fanout", "latency", "pipeline", "scale"):
        for series in _by(results, workload):
            c = series.case
            latency = workload == "latency"
            key = "p99_ms" if latency else "events_per_s"
            result = f"p99 {_cell(series, key, 'ms')} ms" if latency else f"{_cell(series, key)}/s"
            name = c.system
            if latency:
                name += f" @{c.param:g}/s"
            elif workload in ("scale", "pipeline"):
                name += f" x{c.param:g}"
            runs = f"{len(series.runs)} ok" + (
                f", {len(series.failures)} failed" if series.failures else ""
            )
            table.add_row(workload, c.broker, name, result, _nerve_over(results, series, key), runs)
    return table


# ---------------------------------------------------------------------------------------
# Charts


def charts(results: dict[str, Series], directory: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from benchmarks.compare import COLORS

    written: list[Path] = []
    for workload, key, title, ylabel in (
        ("throughput", "events_per_s", "Throughput, end to end (durable, one handler)", "events/s"),
        ("fanout", "events_per_s", "Fan-out: every event handled by 4 functions", "events/s"),
    ):
        chosen = _by(results, workload)
        if not chosen:
            continue
        brokers = [b for b in BROKER_ORDER if any(s.case.broker == b for s in chosen)]
        fig, ax = plt.subplots(figsize=(max(7.0, 1.9 * len(brokers) + 2), 4.5))
        labelled: set[str] = set()
        for j, broker in enumerate(brokers):
            here = [x for x in chosen if x.case.broker == broker and x.stat(key) is not None]
            here.sort(key=lambda x: SYSTEM_ORDER.index(x.case.system))
            width = 0.8 / max(1, len(here))
            for i, series in enumerate(here):
                med, lo, hi = series.stat(key) or (0.0, 0.0, 0.0)
                system = series.case.system
                label = "sqlite3 floor" if system == "floor" else system
                ax.bar(
                    j + (i - (len(here) - 1) / 2) * width,
                    med,
                    width,
                    yerr=[[med - lo], [hi - med]],
                    color=COLORS[system],
                    capsize=3,
                    label=None if label in labelled else label,
                )
                labelled.add(label)
        ax.set_xticks(range(len(brokers)), [BROKER_NAMES[b] for b in brokers])
        ax.set_ylabel(f"{ylabel} (median, min-max)")
        ax.set_yscale("log")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = directory / f"compare-{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    latency = _by(results, "latency")
    if latency:
        rate = 1000.0 if any(s.case.param == 1000.0 for s in latency) else latency[0].case.param
        chosen = [s for s in latency if s.case.param == rate]
        brokers = [b for b in BROKER_ORDER if any(s.case.broker == b for s in chosen)]
        fig, axes = plt.subplots(
            1, len(brokers), figsize=(3.2 * len(brokers) + 1, 4), squeeze=False
        )
        for ax, broker in zip(axes[0], brokers, strict=True):
            here = [s for s in chosen if s.case.broker == broker]
            keys = ("p50_ms", "p99_ms", "p999_ms")
            width = 0.8 / max(1, len(here))
            for i, series in enumerate(here):
                stats = [series.stat(k) for k in keys]
                if any(st is None for st in stats):
                    continue
                xs = [j + (i - (len(here) - 1) / 2) * width for j in range(len(keys))]
                ax.bar(
                    xs,
                    [st[0] for st in stats if st],
                    width,
                    color=COLORS[series.case.system],
                    label=series.case.system,
                )
            ax.set_xticks(range(len(keys)), ["p50", "p99", "p99.9"])
            ax.set_yscale("log")
            ax.set_title(BROKER_NAMES[broker], fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel("ms, event time to handler start (median run)")
        fig.suptitle(f"Latency at {rate:g} events/s, open loop")
        fig.tight_layout()
        path = directory / "compare-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------
# RESULTS.md


def settings_text(system: str, broker: str, workload: str, s: Settings) -> str:
    batch = str(s.batch)
    if system == "nerve":
        if broker == "sqlite":
            producer = (
                "one `client.publish_events([event])` per event at its scheduled time"
                if workload == "latency"
                else f"`client.publish_events`, batches of {batch}"
            )
            return (
                "`nerve run benchmarks.apps:app --broker sqlite:///...?synchronous=FULL` "
                "(WAL, synchronous=FULL for broker and store; leases and acks are not "
                "fsynced on their own, docs/embedded-broker.md; `--processes P` in scale), one "
                f"no-op function, concurrency 100, the default 30 s timeout; producer {producer}"
            )
        from benchmarks.peers.nerve_side import NERVE_URLS

        producer = (
            "one `client.publish_events([event])` per event at its scheduled time"
            if workload == "latency"
            else f"`client.publish_events`, batches of {batch}"
        )
        return (
            f"`nerve run ... --broker {NERVE_URLS[broker]}` (adapter defaults, `--no-http`), "
            "one no-op function per handler (`benchmarks/peers/nerve_side.py`, "
            "`benchmarks/broker_apps.py`), "
            + (
                "ordered"
                if BENCH_ORDERED
                else "unordered (`ordered=False`: the raw clients and the peers keep no "
                "per-key order)"
            )
            + ", concurrency 100, the default 30 s timeout, ack after the handler; producer "
            + producer
        )
    if system == "floor":
        if workload == "latency":
            return (
                "raw `sqlite3` (`benchmarks/floor.py`): WAL, synchronous=FULL (the consumer's "
                "leases and acks NORMAL, as nerve's); the producer "
                "inserts the rows that are due, one transaction each; the consumer leases up "
                f"to {batch} rows (UPDATE ... RETURNING), then deletes them (= ack)"
            )
        return (
            "raw `sqlite3` (`benchmarks/floor.py`): WAL, synchronous=FULL (the consumer's "
            "leases and acks NORMAL, as nerve's), insert batches of "
            f"{batch}; the consumer leases up to {batch} rows (UPDATE ... RETURNING), then "
            "deletes them and bumps a counter (= ack)"
        )
    if system == "raw-typed":
        return raw_clients.TYPED_SETTING
    if system == "raw":
        if workload == "throughput" and broker in raw_clients.SETTINGS:
            return raw_clients.SETTINGS[broker].replace("BATCH", batch)
        module = importlib.import_module(MODULES["raw"])
        return str(module.SETTINGS.get(broker, "-")).replace("BATCH", batch)
    module = importlib.import_module(MODULES[system])
    return str(module.SETTINGS.get(broker, "-")).replace("BATCH", batch)


def markdown(
    results: dict[str, Series],
    goal_list: list[Goal],
    s: Settings,
    env: dict[str, Any],
    chart_paths: list[Path],
) -> str:
    m = env["machine"]
    lines = [
        "# nerve side by side: raw clients and peer frameworks",
        "",
        "Regenerated by `python -m benchmarks compare` (`make bench-all`); this run:",
        "",
        f"`{s.command()}`, {env['when']}, took {env['elapsed_s'] / 60:.1f} min.",
        "",
    ]
    if s.quick:
        lines += [
            "> **Quick mode** (small N, one run): a smoke test of the harness, not a result.",
            "",
        ]
    load = env["load_average_1_5_15"]["before"][0]  # after: the benchmark's own load
    if load > 0.5 * (m["cores"] or 1):
        lines += [
            f"> **The machine was busy** (1-minute load average {load:.1f} on {m['cores']} "
            "cores before the run): other work competed with the runs, so the figures are "
            "lower and noisier than on a quiet machine.",
            "",
        ]
    lines += [
        f"Every event is the same ~{env['event_bytes']}-byte JSON `order.placed` CloudEvent "
        "(a customer, two lines, amounts). A producer process and a consumer process per "
        "run, every handler validates the event and does nothing else, every system acks "
        "after its handler (durable settings, below). Throughput = N / (last handled event "
        "- first publish), both `time.time()` on this machine; the consumer writes its time "
        "when it handled the last event, the producer its first publish after a warm-up "
        "hand-shake (connections and declarations are not timed). Runs alternate between "
        f"systems (nerve, raw, peer, nerve, ...); median [min-max] of {s.runs} run(s).",
        "",
        "## Goals (issue 6)",
        "",
        "| goal | measured | |",
        "|---|---:|---|",
    ]
    for goal in goal_list:
        mark = {True: "met", False: "**missed**", None: "not measured"}[goal.met]
        lines.append(f"| {goal.text} | {goal.value} | {mark} |")
    if any(goal.met is False for goal in goal_list):
        lines += ["", *_why_missed()]
    lines += [
        "",
        "## Throughput",
        "",
        f"{s.events:,} events per run ({s.embedded_events:,} on the embedded broker), one "
        "durable handler.",
        "",
    ]
    lines += _rate_table(results, "throughput")
    lines += _overhead(results)
    if _by(results, "fanout"):
        lines += [
            "",
            "## Fan-out",
            "",
            f"{s.fanout_events:,} events per run, each handled by 4 functions (4 durable "
            "consumers/groups/queues); events/s counts an event once all 4 handled it.",
            "",
        ]
        lines += _rate_table(results, "fanout", deliveries=True)
    if _by(results, "latency"):
        lines += [
            "",
            "## Latency",
            "",
            f"Open loop, each rate for {s.seconds:g} s; event time is the *scheduled* send "
            "time, so a late producer or a stalled broker counts (no coordinated "
            "omission). Handler start minus event time, ms, median [min-max] over runs "
            f"({s.runs} at 1,000/s, {min(s.runs, s.other_rate_runs)} at other rates).",
            "",
            "| broker | rate/s | system | p50 | p99 | p99.9 | max | p99 nerve/system |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for series in _by(results, "latency"):
            c = series.case
            lines.append(
                f"| {c.broker} | {c.param:,.0f} | {c.system} | {_cell(series, 'p50_ms', 'ms')} | "
                f"{_cell(series, 'p99_ms', 'ms')} | {_cell(series, 'p999_ms', 'ms')} | "
                f"{_cell(series, 'max_ms', 'ms')} | {_nerve_over(results, series, 'p99_ms')} |"
            )
    if _by(results, "pipeline"):
        lines += [
            "",
            "## Pipeline (the shop example)",
            "",
            f"`nerve demo --orders {s.pipeline_orders}` on a fresh embedded broker "
            "(`benchmarks/pipeline.py`): orders that reached a terminal state per second, "
            "first order placed to last order ended (seen every 0.25 s).",
            "",
            "| worker processes | orders/s |",
            "|---:|---:|",
        ]
        for series in _by(results, "pipeline"):
            lines.append(f"| {series.case.param:g} | {_cell(series, 'events_per_s')} |")
    if _by(results, "scale"):
        lines += [
            "",
            "## Scale",
            "",
            f"nerve, {s.scale_events:,} events per run, one no-op function, `nerve run "
            "--processes P` (the worker processes share the consumer groups). Embedded: the "
            "last ack is seen in the broker file; network brokers: each worker reports its "
            "count and the time of its latest event every 10 ms, the end is the latest of "
            "them once the counts add up to N.",
            "",
            "What bounds it: the producer (one process, publishing in batches of "
            f"{s.batch}) and the workers share this machine's {m['cores']} cores with the "
            "broker. *Published/s* is the producer's own rate (N / first to last publish): "
            "where the workers handle events as fast as it publishes them, the producer is "
            "the limit. *Cores busy* is the whole machine's CPU time from the first publish "
            "to the last handled event (`/proc/stat`), in cores: near the core count, the "
            "machine is. *Backlog drained/s* (embedded broker): the same workers, started "
            "on N events published beforehand, so that no producer competes for the cores; "
            "from the first ack seen to the last (start-up not timed). It is not the "
            "goal's figure (that is *events/s*, producer running), but says what the "
            "workers themselves scale to.",
            "",
            "| broker | processes | events/s | vs 1 process | published/s | cores busy "
            "| backlog drained/s | vs 1 process |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for series in _by(results, "scale"):
            one = results.get(f"scale/{series.case.broker}/nerve@1")
            base = one.median("events_per_s") if one else None
            med = series.median("events_per_s")
            vs = f"{med / base:.2f}x" if med and base else "-"
            publish = series.median("publish_seconds")
            rate = f"{s.scale_events / publish:,.0f}" if publish else "-"
            busy = series.median("cores_busy")
            cores = f"{busy:.2f} of {m['cores']}" if busy is not None else "-"
            drained = series.median("drained_per_s")
            base_drained = one.median("drained_per_s") if one else None
            drain = f"{drained:,.0f}" if drained else "-"
            drain_vs = f"{drained / base_drained:.2f}x" if drained and base_drained else "-"
            lines.append(
                f"| {series.case.broker} | {series.case.param:g} | "
                f"{_cell(series, 'events_per_s')} | {vs} | {rate} | {cores} "
                f"| {drain} | {drain_vs} |"
            )
    if chart_paths:
        lines += ["", "## Charts", ""]
        lines += [f"![{p.stem}](results/{p.name})" for p in chart_paths]
    failed = [x for x in results.values() if x.failures]
    if failed:
        lines += ["", "## Failed or skipped runs", ""]
        for series in failed:
            lines += [f"- `{series.case.key}`: {f}" for f in series.failures]
        lines += ["", "Logs of every process: `benchmarks/.runs/compare-*/`."]
    lines += [
        "",
        "## Machine and versions",
        "",
        f"- {m['cores']} cores, {m['cpu']}, {m['platform']}",
        f"- Python {m['python']}, SQLite {m['sqlite']}, uvloop {'yes' if m['uvloop'] else 'no'} "
        "(asyncio sides)",
        "- load average (1, 5, 15 min) before: "
        + ", ".join(f"{x:.2f}" for x in env["load_average_1_5_15"]["before"])
        + "; after: "
        + ", ".join(f"{x:.2f}" for x in env["load_average_1_5_15"]["after"]),
    ]
    for broker, server in env["servers"].items():
        lines.append(f"- {broker}: {server}, local on 127.0.0.1, single node")
    lines.append("- " + ", ".join(f"{d} {v}" for d, v in sorted(env["versions"].items())))
    lines += ["", "## Exact settings", ""]
    texts: dict[tuple[str, str], dict[str, list[str]]] = {}
    for series in sorted(
        results.values(),
        key=lambda x: (BROKER_ORDER.index(x.case.broker), SYSTEM_ORDER.index(x.case.system)),
    ):
        c = series.case
        if c.workload in ("pipeline", "scale"):
            continue
        by_text = texts.setdefault((c.broker, c.system), {})
        workloads = by_text.setdefault(settings_text(c.system, c.broker, c.workload, s), [])
        if c.workload not in workloads:
            workloads.append(c.workload)
    for (broker, system), by_text in texts.items():
        for text, workloads in by_text.items():
            lines.append(f"- **{broker}, {system}** ({', '.join(workloads)}): {text}")
    where = "; ".join(f"{peer}: {', '.join(on)}" for peer, on in PEERS.items())
    lines += [
        "",
        f"Peers not run on a broker have no adapter for it here ({where}). Kafka runs "
        "the throughput workload only, on the broker described above (Tansu's in-memory "
        "storage is not durable).",
        "",
    ]
    return "\n".join(lines)


def _why_missed() -> list[str]:
    """Where the results say what bounds a missed goal."""
    profiles = sorted(p.name for p in (Path(__file__).parent / "results").glob("*profile*.md"))
    lines = [
        "What bounds a missed goal: the per-event table under *Throughput* gives each "
        "side's consumer, producer and broker-server CPU time per event (the local "
        "server shares the cores with both); the *Scale* section says what "
        "bounds the 2-process figure (the producer and the workers share the cores)."
    ]
    if profiles:
        lines[0] += (
            " Profiles of nerve's consumer, split by stage, beside the raw client's and "
            "the broker server's CPU time (`python -m benchmarks brokers --profile`, "
            "`python -m benchmarks "
            "embedded --profile`; each file names its machine): "
            + ", ".join(f"[{name}](results/{name})" for name in profiles)
            + "."
        )
    return lines


def _overhead(results: dict[str, Series]) -> list[str]:
    """nerve's cost per event over the raw client's: wall time from the median
    throughputs, and CPU time of the consumer and the producer where the runs measured
    it (``benchmarks brokers``: the consumer's from ``/proc``, the producer's its own)."""
    rows = []
    measured = False
    for broker in BROKER_ORDER:
        nerve = results.get(f"throughput/{broker}/nerve")
        floor = results.get(f"throughput/{broker}/raw") or results.get(f"throughput/{broker}/floor")
        a = nerve.median("events_per_s") if nerve else None
        b = floor.median("events_per_s") if floor else None
        if a and b:
            us = (1 / a - 1 / b) * 1e6
            row = [f"| {broker} | {1e6 / a:,.0f} | {1e6 / b:,.0f} | {us:+,.0f} |"]
            for key in ("consumer_cpu_us", "producer_cpu_us", "server_cpu_us"):
                x = nerve.median(key) if nerve else None
                y = floor.median(key) if floor else None
                measured = measured or bool(x and y)
                row.append(f" {x:,.1f} / {y:,.1f} = {x / y:.1f}x |" if x and y else " - |")
            rows.append(row)
    if not rows:
        return []
    head = [
        "",
        "Per event, end to end (1 / throughput; two processes on two cores, so this is "
        "wall time per event, not CPU time):",
        "",
        "| broker | nerve µs/event | raw (floor) µs/event | nerve - raw |",
        "|---|---:|---:|---:|",
    ]
    if not measured:  # results of a harness that did not measure CPU time
        return head + [row[0] for row in rows]
    head[1] = head[1][:-1] + (
        ", and the CPU time each side's consumer, producer and broker server spent per "
        "event (median; "
        "consumer: its process's user + system time, all threads, from the warm-up "
        "handled to the last event handled; producer: from its first publish to its "
        "last; broker server: its processes' time over the consumer's window; measured "
        "on NATS, RabbitMQ, Redis and PostgreSQL):"
    )
    head[3] += (
        " consumer CPU µs/event, nerve / raw | producer CPU µs/event, nerve / raw |"
        " broker server CPU µs/event, nerve / raw |"
    )
    head[4] += "---:|---:|---:|"
    return head + ["".join(row) for row in rows]


def _rate_table(results: dict[str, Series], workload: str, deliveries: bool = False) -> list[str]:
    head = "| broker | system | events/s | nerve/system |"
    rule = "|---|---|---:|---:|"
    if deliveries:
        head, rule = head + " deliveries/s |", rule + "---:|"
    lines = [head, rule]
    for series in _by(results, workload):
        c = series.case
        row = (
            f"| {c.broker} | {c.system} | {_cell(series, 'events_per_s')} | "
            f"{_nerve_over(results, series, 'events_per_s')} |"
        )
        if deliveries:
            row += f" {_cell(series, 'deliveries_per_s')} |"
        lines.append(row)
    return lines
