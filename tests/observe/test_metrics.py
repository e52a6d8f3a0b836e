"""Metrics: one registry per runtime, the numbers match what happened, and promtool
accepts the exposition as it is served."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from examples.shop import load
from examples.shop.app import TERMINAL_STATES, app
from examples.shop.chaos import with_failures
from nerve import Runtime
from nerve.http.server import build_app
from nerve.observe import http_routes
from nerve.observe.metrics import Buckets

from .conftest import eventually, require_speedups, require_tool

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        v
        for (n, ls), v in values.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


async def test_metrics_count_what_happened_and_promtool_accepts_them(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    orders = list(load.generate(seed=3, count=40))
    shop = with_failures(app, 0.3, seed=2)
    broker = f"sqlite:///{tmp_path}/nerve.db?synchronous=OFF"
    async with Runtime(shop, broker=broker, metrics=True, tracing=False) as rt:
        await load.seed_stock(rt.store, load.initial_stock(40))
        await load.place_orders(rt.client, orders)

        async def all_terminal() -> bool:
            rows = await rt.store.query("SELECT state, count(*) AS n FROM orders GROUP BY state")
            return sum(r["n"] for r in rows if r["state"] in TERMINAL_STATES) == 40

        await eventually(all_terminal, 60, "40 terminal orders")
        await rt.wait_idle(timeout=30)
        asgi = build_app(rt, extra_routes=http_routes(rt))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://nerve"
        ) as http:
            response = await http.get("/metrics")
        runners = rt.runners

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""  # no lint problems

    values = samples(text)
    # the client published the 40 orders; functions published what they emitted
    assert total(values, "nerve_events_published_total", function="", type="order.created") == 40
    assert total(values, "nerve_events_published_total", function="inventory") > 0
    for name, runner in runners.items():
        processed = total(values, "nerve_events_processed_total", function=name)
        retried = total(values, "nerve_events_retried_total", function=name)
        failed = total(values, "nerve_events_failed_total", function=name)
        assert processed == runner.stats.processed, name  # no duplicates in this run
        assert retried == runner.stats.retried == failed, name  # every failure was retried
        assert total(values, "nerve_handler_duration_seconds_count", function=name) == (
            processed + failed
        )
        assert total(values, "nerve_event_latency_seconds_count", function=name) == (
            runner.stats.received
        )
        assert total(values, "nerve_function_backlog_events", function=name) == 0
        assert total(values, "nerve_function_in_flight_events", function=name) == 0
        assert total(values, "nerve_function_concurrency_limit", function=name) == runner.limit
    # 30% of first attempts fail: some retries happened, by type
    assert total(values, "nerve_events_retried_total") > 0
    assert (
        total(values, "nerve_events_processed_total", function="inventory", type="order.created")
        == 40
    )
    # nothing was registered in prometheus_client's global default registry
    assert not any(n.startswith("nerve_") for n in REGISTRY._names_to_collectors)


async def test_each_runtime_has_its_own_registry() -> None:
    async with (
        Runtime(app, broker="memory://", metrics=True, tracing=False) as one,
        Runtime(app, broker="memory://", metrics=True, tracing=False) as two,
    ):
        await one.client.publish(
            app.make_event(
                {
                    "order_id": "o",
                    "customer_id": "c",
                    "lines": [{"sku": "x", "qty": 1}],
                    "amount_cents": 3,
                },
                type="order.created",
            ).data,
            type="order.created",
        )
        assert one.metrics is not None and two.metrics is not None
        assert one.metrics.registry is not two.metrics.registry
        first = samples(one.metrics.render().decode())
        second = samples(two.metrics.render().decode())
    assert total(first, "nerve_events_published_total") == 1
    assert total(second, "nerve_events_published_total") == 0


async def test_without_metrics_nothing_is_counted_and_metrics_is_404() -> None:
    async with Runtime(app, broker="memory://", tracing=False) as rt:
        assert rt.metrics is None
        assert all(r._observer is None for r in rt.runners.values())
        asgi = build_app(rt, extra_routes=http_routes(rt))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://nerve"
        ) as http:
            response = await http.get("/metrics")
    assert response.status_code == 404


def test_bucket_quantiles_interpolate() -> None:
    buckets = Buckets([0.1, 0.2, 0.4])
    assert buckets.quantile(0.5) is None
    for value in [0.05] * 50 + [0.15] * 40 + [0.3] * 10:
        buckets.observe(value)
    assert buckets.count == 100
    assert buckets.cumulative() == [("0.1", 50.0), ("0.2", 90.0), ("0.4", 100.0), ("+Inf", 100.0)]
    assert buckets.quantile(0.5) == 0.1
    p90 = buckets.quantile(0.9)
    assert p90 is not None and abs(p90 - 0.2) < 1e-9
    p95 = buckets.quantile(0.95)
    assert p95 is not None and 0.2 < p95 < 0.4


def _two_free_ports() -> int:
    """A port free on 127.0.0.1 whose successor is free too (worker k listens on
    PORT+k: a random free port's successor was once taken, and worker 2 exited)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports on 127.0.0.1")


@pytest.mark.slow
async def test_each_worker_process_serves_its_own_metrics(tmp_path: Path) -> None:
    """``nerve run --processes 2 --metrics-listen PORT``: worker k on PORT+k, and
    together they count every order exactly once."""
    import sys

    from nerve.runtime import Client
    from nerve.transport.sqlite import SqliteTransport

    port = _two_free_ports()
    broker = f"sqlite:///{tmp_path}/nerve.db"
    log = (tmp_path / "nerve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nerve",
        "run",
        "examples.shop.app:app",
        "--broker",
        broker,
        "--processes",
        "2",
        "--metrics-listen",
        f"127.0.0.1:{port}",
        "--no-http",
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    try:
        async with httpx.AsyncClient() as http:

            async def scrape(target: int) -> str | None:
                try:
                    response = await http.get(f"http://127.0.0.1:{target}/metrics")
                except httpx.HTTPError:
                    return None
                return response.text if response.status_code == 200 else None

            async def both_up() -> bool:
                return all([await scrape(port), await scrape(port + 1)])

            await eventually(both_up, 30, "both workers serving /metrics")
            transport = SqliteTransport(broker)
            await transport.start()
            try:
                client = Client(app, transport)
                from nerve.store.sqlite import SqliteStore

                store = SqliteStore(f"sqlite:///{tmp_path}/store.db")
                await store.start(app.store_schema)
                await load.seed_stock(store, load.initial_stock(30))
                await store.close()
                await load.place_orders(client, list(load.generate(seed=9, count=30)))
            finally:
                await transport.close()

            async def counted() -> bool:
                texts = [await scrape(port), await scrape(port + 1)]
                return (
                    sum(
                        total(
                            samples(t or ""),
                            "nerve_events_processed_total",
                            function="inventory",
                            type="order.created",
                        )
                        for t in texts
                    )
                    == 30
                )

            await eventually(counted, 60, "30 orders counted across the two workers")
            promtool = require_tool("promtool", "prometheus")
            for text in [await scrape(port), await scrape(port + 1)]:
                assert text is not None
                checked = await asyncio.to_thread(
                    subprocess.run,
                    [promtool, "check", "metrics"],
                    input=text,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert checked.returncode == 0, checked.stdout + checked.stderr
                assert 'nerve_function_backlog_events{function="inventory"} 0.0' in text
    finally:
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it may have just exited
                    proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            log.close()


async def test_latency_is_the_events_age_when_its_handler_starts() -> None:
    from datetime import UTC, datetime, timedelta

    from pydantic import BaseModel

    from nerve import App, Context, Runtime

    class Tick(BaseModel):
        n: int

    ticks = App("ticks")
    ticks.event("tick")(Tick)

    @ticks.function(consumes=Tick)
    async def tock(tick: Tick, ctx: Context) -> None:
        pass

    async with Runtime(ticks, broker="memory://", metrics=True) as rt:
        old = ticks.make_event(Tick(n=1)).evolve(time=datetime.now(UTC) - timedelta(seconds=5))
        untimed = ticks.make_event(Tick(n=2)).evolve(time=None)
        await rt.transport.publish([old, untimed, ticks.make_event(Tick(n=3))])
        await rt.wait_idle(timeout=10)
        assert rt.metrics is not None
        latency = rt.metrics.function("tock").latency
    assert latency.count == 2  # the event without a time has no latency
    assert 5.0 <= latency.sum < 7.0
    assert sum(latency.counts) == 2
    assert latency.counts[latency.bounds.index(5.0) + 1] == 1  # in the (5, 10] bucket


def test_buckets_take_many_values_as_they_take_one() -> None:
    import math
    import random

    from nerve.observe.metrics import LATENCY_BUCKETS, Buckets

    rng = random.Random(3)
    values = [rng.choice([0.0, *LATENCY_BUCKETS, 1e9]) for _ in range(200)]
    values += [rng.uniform(0, 400) for _ in range(300)]
    one, many = Buckets(LATENCY_BUCKETS), Buckets(LATENCY_BUCKETS)
    for value in values:
        one.observe(value)
    many.add(values[:123])
    many.add(values[123:])
    many.add([])
    assert many.counts == one.counts
    assert many.count == one.count == 500
    assert math.isclose(many.sum, one.sum, rel_tol=1e-12)


def test_the_c_end_of_an_attempt_counts_what_the_python_end_counts() -> None:
    """An attempt's metrics in C (``_speedups.MetricsEnd``, the ``end`` of a
    ``MetricsObserver``: a processed attempt with a float duration) against its Python
    twin ``_counted``, call by call: durations on, between and beyond the bucket bounds,
    every outcome, an int duration, NaN."""
    from types import SimpleNamespace

    from nerve._native import speedups
    from nerve.observe.hooks import MetricsObserver
    from nerve.observe.metrics import DURATION_BUCKETS, FunctionMetrics

    require_speedups()
    assert speedups is not None
    c_metrics, py_metrics = FunctionMetrics("f"), FunctionMetrics("f")
    c_side, py_side = MetricsObserver("f", c_metrics), MetricsObserver("f", py_metrics)
    assert type(c_side.end) is speedups.MetricsEnd
    py_side.end = py_side._counted
    error = ValueError("boom")
    calls: list[tuple[str, float, str]] = [
        ("a", bound, "processed") for bound in DURATION_BUCKETS
    ]  # on each bound: bisect_left puts it in that bound's bucket
    calls += [("b", bound * 1.01, "processed") for bound in DURATION_BUCKETS]
    calls += [
        ("a", 0.0, "processed"),
        ("a", -1.0, "processed"),
        ("c", 1e9, "processed"),
        ("b", 0.2, "retried"),
        ("b", 0.3, "dead_lettered"),
        ("a", 0.4, "released"),
        ("a", 2, "processed"),  # an int: the Python end
    ]
    for type_name, seconds, outcome in calls:
        ctx = SimpleNamespace(event=SimpleNamespace(type=type_name))
        for side in (c_side, py_side):
            if outcome == "processed":
                side.end(ctx, seconds, outcome)
            else:
                side.end(ctx, seconds, outcome, error)
    got, want = c_metrics, py_metrics
    assert got.duration.counts == want.duration.counts
    assert got.duration.sum == want.duration.sum  # the same additions in the same order
    nan = SimpleNamespace(event=SimpleNamespace(type="a"))
    c_side.end(nan, float("nan"), "processed")
    py_side.end(nan, float("nan"), "processed")
    assert got.duration.counts == want.duration.counts
    assert got.processed == want.processed == {"a": 19, "b": 15, "c": 1}
    assert got.failed == want.failed == {"b": 2} and got.retried == want.retried == {"b": 1}
    assert sum(got.duration.counts) == len(calls)  # all but the released one, and nan
