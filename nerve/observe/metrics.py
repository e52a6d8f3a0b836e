"""Prometheus metrics of a running App, one registry per :class:`~nerve.Runtime`.

The hot path only bumps plain integers and histogram buckets kept per function
(:class:`FunctionMetrics`); ``prometheus_client`` renders them when ``/metrics`` is
scraped, through a custom collector, so no global registry is involved and nothing
is locked per event. Gauges (backlog, in flight, concurrency) are read at scrape time
from the runners and, for the backlog, from the broker.

==============================================  =========  ==========================
metric                                          type       labels
==============================================  =========  ==========================
``nerve_events_published_total``               counter    function (or ``""``), type
``nerve_events_processed_total``               counter    function, type
``nerve_events_failed_total``                   counter    function, type
``nerve_events_retried_total``                  counter    function, type
``nerve_events_dead_lettered_total``            counter    function, type, reason
``nerve_events_received_total``                 counter    function
``nerve_events_duplicate_total``                counter    function
``nerve_handler_duration_seconds``              histogram  function
``nerve_event_latency_seconds``                 histogram  function
``nerve_function_backlog_events``               gauge      function
``nerve_function_in_flight_events``             gauge      function
``nerve_function_concurrency``                  gauge      function
``nerve_function_concurrency_limit``            gauge      function
``nerve_function_cold_starts_total``            counter    function
==============================================  =========  ==========================
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from nerve.event import Event

if TYPE_CHECKING:
    from nerve.runtime.runtime import Runtime

__all__ = [
    "BACKLOG_EVERY",
    "DURATION_BUCKETS",
    "LATENCY_BUCKETS",
    "Buckets",
    "FunctionMetrics",
    "Metrics",
    "parse_listen",
    "serve_metrics",
]

BACKLOG_EVERY = 2.0
"""Seconds between two reads of the backlog when /metrics has its own listener."""

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Buckets:
    """A cheap histogram: ``observe`` is one bisect and one addition; ``add`` takes
    many values at once (a sort and a bisect per bound)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, values: list[float]) -> None:
        """Observe every one of ``values`` (sorted in place)."""
        if not values:
            return
        values.sort()
        counts = self.counts
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect.bisect_right(values, bound)  # how many are <= bound
            counts[i] += upto - below
            below = upto
        counts[-1] += len(values) - below
        self.sum += sum(values)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, ending with ``+Inf``."""
        out = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((_float(bound), float(total)))
        out.append(("+Inf", float(self.count)))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of quantile ``q`` (0..1) by linear interpolation in its bucket."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        lower = 0.0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            if seen + n >= rank and n:
                return lower + (bound - lower) * ((rank - seen) / n)
            seen += n
            lower = bound
        return self.bounds[-1]


def _float(value: float) -> str:
    return repr(float(value))


class FunctionMetrics:
    """The counters and histograms of one function, updated by its runner."""

    __slots__ = (
        "dead_lettered",
        "duration",
        "failed",
        "latency",
        "name",
        "processed",
        "published",
        "retried",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.processed: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.retried: dict[str, int] = {}
        self.dead_lettered: dict[tuple[str, str], int] = {}
        self.published: dict[str, int] = {}
        self.duration = Buckets(DURATION_BUCKETS)
        self.latency = Buckets(LATENCY_BUCKETS)

    def latencies(self, values: Sequence[float]) -> None:
        """End-to-end latencies (seconds; a negative one, from a clock ahead of this
        one, counts as 0)."""
        batch = list(values)
        if batch and min(batch) < 0.0:
            batch = [v if v > 0.0 else 0.0 for v in batch]
        self.latency.add(batch)

    def handled(self, type_name: str, seconds: float, outcome: str) -> None:
        """One handler attempt ended: 'processed', 'retried' or 'dead_lettered'
        (a dead letter's reason is counted by :meth:`dead`)."""
        self.duration.observe(seconds)
        if outcome == "processed":
            self.processed[type_name] = self.processed.get(type_name, 0) + 1
            return
        self.failed[type_name] = self.failed.get(type_name, 0) + 1
        if outcome == "retried":
            self.retried[type_name] = self.retried.get(type_name, 0) + 1

    def dead(self, type_name: str, reason: str) -> None:
        key = (type_name, reason)
        self.dead_lettered[key] = self.dead_lettered.get(key, 0) + 1

    def emitted(self, events: Sequence[Event]) -> None:
        published = self.published
        for event in events:
            published[event.type] = published.get(event.type, 0) + 1


class Metrics:
    """The metrics of one runtime: its functions' :class:`FunctionMetrics`, events
    published by its client, and a ``prometheus_client`` registry to render them."""

    def __init__(self) -> None:
        self.functions: dict[str, FunctionMetrics] = {}
        self.client = FunctionMetrics("")
        self.runtime: Runtime | None = None
        self.backlog: dict[str, int] = {}
        self.backlog_at = 0.0
        self._registry: Any = None

    def function(self, name: str) -> FunctionMetrics:
        found = self.functions.get(name)
        if found is None:
            found = self.functions[name] = FunctionMetrics(name)
        return found

    async def refresh_backlog(self, max_age: float = 1.0) -> None:
        """Read the backlog per function from the broker (at most every ``max_age`` s)."""
        from nerve.transport.base import Inspectable

        runtime = self.runtime
        if runtime is None or time.monotonic() - self.backlog_at < max_age:
            return
        self.backlog_at = time.monotonic()
        if isinstance(runtime.transport, Inspectable):
            stats = await runtime.transport.stats()
            self.backlog = {s.group: s.backlog for s in stats}

    @property
    def registry(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` holding only this runtime's metrics."""
        if self._registry is None:
            try:
                from prometheus_client import CollectorRegistry
            except ImportError:
                from nerve.errors import ConfigError

                raise ConfigError(
                    "serving /metrics needs prometheus-client; install it with: "
                    "pip install 'nerve[observe]'"
                ) from None
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))
            self._registry = registry
        return self._registry

    def render(self) -> bytes:
        """The Prometheus text exposition of this runtime's metrics."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.metrics
        runtime = m.runtime
        functions = list(m.functions.values())
        runners = runtime.runners if runtime is not None else {}

        def counter(name: str, doc: str, labels: list[str]) -> Any:
            return CounterMetricFamily(name, doc, labels=labels)

        published = counter(
            "nerve_events_published",
            "Events published, by emitting function and type.",
            ["function", "type"],
        )
        for fm in [m.client, *functions]:
            for type_name, n in sorted(fm.published.items()):
                published.add_metric([fm.name, type_name], n)
        yield published
        for attr, name, doc in (
            ("processed", "nerve_events_processed", "Events handled successfully."),
            ("failed", "nerve_events_failed", "Handler attempts that failed."),
            ("retried", "nerve_events_retried", "Failed attempts that will be retried."),
        ):
            family = counter(name, doc, ["function", "type"])
            for fm in functions:
                for type_name, n in sorted(getattr(fm, attr).items()):
                    family.add_metric([fm.name, type_name], n)
            yield family
        dead = counter(
            "nerve_events_dead_lettered",
            "Events moved to a dead-letter queue.",
            ["function", "type", "reason"],
        )
        for fm in functions:
            for (type_name, reason), n in sorted(fm.dead_lettered.items()):
                dead.add_metric([fm.name, type_name, reason], n)
        yield dead
        received = counter(
            "nerve_events_received", "Deliveries fetched from the broker.", ["function"]
        )
        duplicates = counter(
            "nerve_events_duplicate",
            "Deliveries of events already processed (acked, handler not called).",
            ["function"],
        )
        cold = counter(
            "nerve_function_cold_starts",
            "Times a function idle for over 60 s received work.",
            ["function"],
        )
        in_flight = GaugeMetricFamily(
            "nerve_function_in_flight_events",
            "Deliveries fetched and not yet settled.",
            labels=["function"],
        )
        active = GaugeMetricFamily(
            "nerve_function_concurrency", "Handlers running right now.", labels=["function"]
        )
        limit = GaugeMetricFamily(
            "nerve_function_concurrency_limit",
            "Most handlers allowed at once.",
            labels=["function"],
        )
        backlog = GaugeMetricFamily(
            "nerve_function_backlog_events",
            "Events waiting in the broker (ready or delayed).",
            labels=["function"],
        )
        for name, runner in sorted(runners.items()):
            received.add_metric([name], runner.stats.received)
            duplicates.add_metric([name], runner.stats.duplicates)
            cold.add_metric([name], runner.stats.cold_starts)
            in_flight.add_metric([name], runner.in_flight)
            active.add_metric([name], runner._gate.active)
            limit.add_metric([name], runner.limit)
            if name in m.backlog:
                backlog.add_metric([name], m.backlog[name])
        yield from (received, duplicates, cold, in_flight, active, limit, backlog)
        for attr, name, doc in (
            ("duration", "nerve_handler_duration_seconds", "Handler run time per attempt."),
            (
                "latency",
                "nerve_event_latency_seconds",
                "From the event's time to its handler's start.",
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["function"])
            for fm in functions:
                buckets: Buckets = getattr(fm, attr)
                family.add_metric([fm.name], buckets.cumulative(), buckets.sum)
            yield family


async def serve_metrics(runtime: Runtime, host: str, port: int) -> Callable[[], None]:
    """Serve ``runtime``'s ``/metrics`` on its own listener ``host:port`` (a thread of
    ``prometheus_client``), for one scrape target per process under ``--processes``.
    The backlog is refreshed from the broker every ``BACKLOG_EVERY`` seconds. Returns
    a function that stops both."""
    import asyncio
    import contextlib

    from prometheus_client import start_http_server

    from nerve.errors import ConfigError, NerveError

    metrics = runtime.metrics
    if metrics is None:
        raise ConfigError("--metrics-listen needs metrics: do not pass --no-metrics")
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; pick a free port "
            "with --metrics-listen HOST:PORT"
        ) from None

    async def refresh() -> None:
        while True:
            with contextlib.suppress(NerveError):
                await metrics.refresh_backlog(max_age=0.0)
            await asyncio.sleep(BACKLOG_EVERY)

    task = asyncio.create_task(refresh(), name="nerve:metrics-backlog")

    def stop() -> None:
        task.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1) -> (host, port)."""
    from nerve.errors import ConfigError

    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"--metrics-listen {text!r}: give HOST:PORT or PORT with a port from 1 to 65535, "
            "like 127.0.0.1:9464"
        )
    return host, int(port_text)
