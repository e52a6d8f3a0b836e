"""``python -m benchmarks compare [--quick]`` (everything side by side, RESULTS.md),
``python -m benchmarks brokers [--brokers nats,...] [--events N] [--runs 3] [--profile]``,
``python -m benchmarks observe [--rounds 5] [--events N] [--sampled] [--callgrind]``
(what metrics and tracing cost, as ratios to neither),
``python -m benchmarks redis-server [--events N] [--workloads steady,bulk] [--keep]``
(the Redis server's instructions per event, under callgrind), or
``python -m benchmarks embedded [--runs 3] [--events N] [--rate R] [--seconds S]
[--quick] [--profile]``.

The last line printed is a one-line JSON summary (``events_per_s``, ``p50_ms``,
``p99_ms``, ``floor_events_per_s``, ``floor_p50_ms``, ``floor_p99_ms``, ``ratio``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from benchmarks.embedded import Settings, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="nerve's reproducible benchmarks"
    )
    sub = parser.add_subparsers(dest="suite", required=True)
    emb = sub.add_parser("embedded", help="the embedded SQLite broker vs the raw sqlite3 floor")
    emb.add_argument("--runs", type=int, default=3, help="runs per workload (default 3)")
    emb.add_argument("--events", type=int, help="throughput: events to publish (20000)")
    emb.add_argument("--batch", type=int, default=100, help="throughput: publish batch (100)")
    emb.add_argument("--rate", type=float, help="latency: events per second (1000)")
    emb.add_argument("--seconds", type=float, help="latency: seconds to publish for (10)")
    emb.add_argument(
        "--synchronous", default="FULL", choices=["FULL", "NORMAL", "OFF"], help="(FULL)"
    )
    emb.add_argument(
        "--floor-claim",
        default="lease",
        choices=["lease", "delete"],
        help="floor consumer: lease then delete (at-least-once, default) or delete on claim",
    )
    emb.add_argument(
        "--floor-busy",
        default="spin",
        choices=["spin", "sqlite"],
        help="floor: retry the write lock every 50 us (default) or use SQLite's busy handler",
    )
    emb.add_argument("--quick", action="store_true", help="smoke run: 2,000 events, 2 s latency")
    emb.add_argument(
        "--profile",
        action="store_true",
        help="instead: profile the nerve consumer under py-spy during the throughput workload",
    )
    emb.add_argument(
        "--native", action="store_true", help="with --profile: include C frames (py-spy --native)"
    )
    brk = sub.add_parser(
        "brokers", help="nerve vs the raw client on nats, rabbitmq, redis, postgres"
    )
    brk.add_argument("--brokers", default="nats,rabbitmq,redis,postgres", help="comma-separated")
    brk.add_argument("--events", type=int, default=10_000, help="events per run (10000)")
    brk.add_argument("--batch", type=int, default=100, help="publish batch (100)")
    brk.add_argument("--runs", type=int, default=3, help="runs per side and broker (3)")
    brk.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for brokers.json, .md, .png (benchmarks/results)",
    )
    brk.add_argument(
        "--sides",
        default="nerve,raw,raw-typed",
        help="comma-separated, alternating (nerve,raw,raw-typed); on postgres also sql and "
        "sql-norec: nerve's own statements without its runtime (benchmarks/pg_sql.py)",
    )
    brk.add_argument(
        "--ordered",
        action="store_true",
        help="nerve's function keeps per-key order (by default it does not, as the raw "
        "client does not)",
    )
    brk.add_argument(
        "--profile",
        action="store_true",
        help="instead: one nerve run per broker with py-spy on its consumer, one raw run "
        "beside it; writes results/profile-BROKER.md",
    )
    brk.add_argument(
        "--callgrind",
        action="store_true",
        help="instead: the instructions per event of nerve's consumer draining --events "
        "events, per broker (callgrind; --runs rounds)",
    )
    _add_compare(sub)
    obs = sub.add_parser(
        "observe", help="what metrics and tracing cost: throughput with and without, side by side"
    )
    from benchmarks.observe import add_arguments as add_observe_arguments

    add_observe_arguments(obs)
    rds = sub.add_parser(
        "redis-server",
        help="the Redis server's instructions per event for redis:// (callgrind), not timed",
    )
    from benchmarks.redis_server import add_arguments as add_redis_server_arguments

    add_redis_server_arguments(rds)
    args = parser.parse_args(argv)
    if args.suite == "redis-server":
        from benchmarks.redis_server import run as run_redis_server

        return run_redis_server(rds, args)
    if args.suite == "observe":
        from benchmarks.observe import run as run_observe

        return run_observe(args)
    if args.suite == "brokers":
        return _brokers(parser, args)
    if args.suite == "compare":
        from benchmarks.compare import main as compare

        return compare(parser, args)

    settings = Settings(
        runs=max(1, args.runs),
        batch=args.batch,
        synchronous=args.synchronous,
        floor_claim=args.floor_claim,
        floor_busy=args.floor_busy,
    )
    if args.quick:
        settings.events, settings.seconds = 2_000, 2.0
    if args.events is not None:
        settings.events = args.events
    if args.rate is not None:
        settings.rate = args.rate
    if args.seconds is not None:
        settings.seconds = args.seconds
    if settings.events < 1 or settings.rate <= 0 or settings.seconds <= 0:
        parser.error("--events, --rate and --seconds must be positive")

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    if args.profile:
        from benchmarks.profiling import run_profile

        run_profile(settings, console, native=args.native)
        return 0
    summary = run(settings, console)
    sys.stdout.flush()
    print(orjson.dumps(summary).decode(), flush=True)
    return 0


def _add_compare(sub: Any) -> None:
    from benchmarks.compare import add_arguments

    add_arguments(
        sub.add_parser(
            "compare",
            help="everything side by side: nerve, raw clients, FastStream, Dramatiq, Celery, "
            "taskiq; writes benchmarks/RESULTS.md",
        )
    )


def _brokers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from benchmarks.brokers import BROKERS, EXTRA_SIDES
    from benchmarks.brokers import SIDES as BROKER_SIDES
    from benchmarks.brokers import Settings as BrokerSettings
    from benchmarks.brokers import run as run_brokers

    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS]
    if unknown or not brokers:
        parser.error(f"--brokers: choose from {','.join(BROKERS)}")
    if args.events < 1 or args.batch < 1:
        parser.error("--events and --batch must be positive")
    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    known = [*BROKER_SIDES, *EXTRA_SIDES]
    if [side for side in sides if side not in known] or not {"nerve", "raw"} <= set(sides):
        parser.error(
            f"--sides: choose from {','.join(known)}, with nerve and raw (the ratio is theirs)"
        )
    settings = BrokerSettings(
        brokers=brokers, events=args.events, batch=args.batch, runs=max(1, args.runs), sides=sides
    )
    if args.out is not None:
        settings.out = args.out.resolve()
    if args.ordered:  # read by benchmarks.apps in the consumer and producer processes
        os.environ["NERVE_BENCH_ORDERED"] = "1"
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    if args.profile:
        from benchmarks.brokers import run_profiles

        run_profiles(settings, console)
        return 0
    if args.callgrind:
        from benchmarks.brokers import run_callgrind

        print(orjson.dumps(run_callgrind(settings, console)).decode(), flush=True)
        return 0
    summary = run_brokers(settings, console)
    sys.stdout.flush()
    print(orjson.dumps(summary).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
