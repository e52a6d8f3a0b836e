"""The cost of metrics and tracing, on the embedded benchmark's throughput workload.

``python -m tests.observe.overhead [ROUNDS] [EVENTS]`` (from the repository root) runs
``benchmarks.embedded.Bench.nerve_throughput`` (``nerve run benchmarks.apps:app``
consuming EVENTS events from a producer process) in four configurations, rotating
their order each round so drift hits all alike, and prints the median throughput and
CPU per event of each:

- A: ``NERVE_METRICS=0``, tracing off (the baseline)
- B: metrics on, tracing off (the default of ``nerve run``)
- C: metrics on, every event traced, OTLP/HTTP export to a sink in this process
- D: as C with 10% of traces sampled

Not a test (pytest does not collect it); see docs/observability.md for results.
"""

from __future__ import annotations

import http.server
import os
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.embedded import Bench, Settings, nerve_cli_available  # noqa: E402


class Sink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and throws them away."""

    received = 0

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length", 0))
        self.rfile.read(size)
        Sink.received += size
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main(rounds: int, events: int) -> None:
    from rich.console import Console
    from rich.progress import Progress

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    otlp = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    sampled = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    configs = {
        "A no metrics, no tracing": {"NERVE_METRICS": "0"},
        "B metrics, tracing off": {"NERVE_METRICS": "1"},
        "C metrics + tracing, OTLP": {"NERVE_METRICS": "1", **otlp},
        "D as C, 10% sampled": {"NERVE_METRICS": "1", **otlp, **sampled},
    }
    touched = {k for config in configs.values() for k in config}
    if not nerve_cli_available():
        raise SystemExit("python -m nerve run is not available")
    names = list(configs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    settings = Settings(events=events, runs=1)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        bench = Bench(settings, True, progress, time.strftime("overhead-%Y%m%dT%H%M%S"))
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for key in touched:
                    os.environ.pop(key, None)
                os.environ.update(configs[name])
                os.environ["NERVE_HTTP"] = f"127.0.0.1:{free_port()}"
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                run = r * len(names) + names.index(name) + 1
                rate = bench.nerve_throughput(run)["events_per_s"]
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                rates[name].append(rate)
                cpu[name].append(used / events * 1e6)
                print(f"round {r + 1} {name}: {rate:,.0f} ev/s, {cpu[name][-1]:.1f} us CPU/event")
    base_rate, base_cpu = statistics.median(rates[names[0]]), statistics.median(cpu[names[0]])
    print(f"\n{events:,} events a run, {rounds} rounds, load average {os.getloadavg()}")
    for name in names:
        rate, used = statistics.median(rates[name]), statistics.median(cpu[name])
        print(
            f"{name:<28} {rate:>8,.0f} ev/s ({100 * (rate / base_rate - 1):+.1f}%)  "
            f"{used:>7.1f} us CPU/event ({100 * (used / base_cpu - 1):+.1f}%)"
        )
    print(f"the OTLP sink received {Sink.received:,} bytes")


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 6,
        int(sys.argv[2]) if len(sys.argv) > 2 else 20_000,
    )
