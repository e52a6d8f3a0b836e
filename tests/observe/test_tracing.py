"""Tracing: one order through the shop is ONE trace across its services, retries
included; dead-letter replays join the trace; no configuration means no spans."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from examples.shop import load
from examples.shop.app import SHIPPED_PENDING, OrderCreated, OrderLine, app
from examples.shop.chaos import with_failures
from nerve import App, Context, DeadLetter, Runtime
from nerve.observe import tracing_configured
from nerve.observe.tracing import Tracing, traceparent_of


def traced() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


async def eventually(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def by_id(spans: Sequence[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def parent_of(span: ReadableSpan, index: dict[int, ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    return index[span.parent.span_id]


async def test_one_order_is_one_trace_across_every_service_including_retries() -> None:
    tracing, exporter = traced()
    # every function fails its first attempt: each service shows a retried attempt
    shop = with_failures(app, 1.0, seed=1)
    order = OrderCreated(
        order_id="o-1",
        customer_id="c-1",
        lines=[OrderLine(sku="sku-001", qty=1)],
        amount_cents=1000,
    )
    assert order.amount_cents % 7 != 0  # not declined: the order ships
    async with Runtime(shop, broker="memory://", tracing=tracing) as rt:
        await load.seed_stock(rt.store, {"sku-001": 10})
        published = await rt.client.publish(order)

        async def shipped() -> bool:
            rows = await rt.store.query("SELECT state FROM orders WHERE order_id = 'o-1'")
            return bool(rows) and rows[0]["state"] == SHIPPED_PENDING

        await eventually(shipped)
        await rt.wait_idle(timeout=20)

    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "publish order.created"]
    assert len(roots) == 1
    root = roots[0]
    assert root.kind is SpanKind.PRODUCER and root.parent is None
    # the published event carries the root's W3C context as a CloudEvents extension
    assert published.extensions["traceparent"] == traceparent_of(root.context)

    trace_id = root.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    index = by_id(in_trace)
    for span in in_trace:
        if span is not root:
            parent_of(span, index)  # every span but the root has its parent in the trace

    process = [s for s in in_trace if s.name.startswith("process ")]
    attempts = Counter(
        (s.attributes["messaging.consumer.group.name"], s.attributes["messaging.destination.name"])
        for s in process
    )
    # each service handled its event twice: the failed first attempt and the retry
    expected = {
        ("inventory", "order.created"),
        ("orders", "order.created"),
        ("payments", "stock.reserved"),
        ("shipping", "payment.succeeded"),
        ("notifications", "shipment.prepared"),
        ("orders", "shipment.prepared"),
        ("inventory", "shipment.prepared"),
    }
    assert set(attempts) == expected
    assert all(n == 2 for n in attempts.values()), attempts
    for span in process:
        assert span.kind is SpanKind.CONSUMER
        assert span.attributes["messaging.system"] == "nerve"
        if span.attributes["nerve.attempt"] == 1:
            assert span.attributes["nerve.outcome"] == "retried"
            assert span.status.status_code is StatusCode.ERROR
            assert any(e.name == "exception" for e in span.events)
        else:
            assert span.attributes["nerve.attempt"] == 2
            assert span.attributes["nerve.outcome"] == "processed"
            assert span.status.status_code is not StatusCode.ERROR
        # all events of the flow share the order's correlation id (the first event's id)
        if span.attributes["messaging.destination.name"] != "order.created":
            assert span.attributes["messaging.message.conversation_id"] == published.id

    def chain(function: str, type_name: str) -> list[str]:
        """Names from a successful process span up to the root."""
        span = next(
            s
            for s in process
            if s.attributes["messaging.consumer.group.name"] == function
            and s.attributes["messaging.destination.name"] == type_name
            and s.attributes["nerve.attempt"] == 2
        )
        names = []
        while span.parent is not None:
            names.append(
                f"{span.name} [{span.attributes.get('messaging.consumer.group.name', '')}]"
            )
            span = parent_of(span, index)
        return [*names, span.name]

    # notification's span descends from shipping, payments and inventory, in order
    assert chain("notifications", "shipment.prepared") == [
        "process shipment.prepared [notifications]",
        "create shipment.prepared []",
        "process payment.succeeded [shipping]",
        "create payment.succeeded []",
        "process stock.reserved [payments]",
        "create stock.reserved []",
        "process order.created [inventory]",
        "publish order.created",
    ]
    # both attempts of one event are children of the same context (the event's)
    first, second = (
        s for s in process if s.attributes["messaging.consumer.group.name"] == "payments"
    )
    assert first.parent is not None and second.parent is not None
    assert first.parent.span_id == second.parent.span_id

    # each fetched batch has a receive span, linked to the events it brought
    receives = [s for s in spans if s.name.startswith("receive ")]
    assert receives and all(s.kind is SpanKind.CONSUMER for s in receives)
    linked = {link.context.trace_id for s in receives for link in s.links}
    assert trace_id in linked


class Job(BaseModel):
    n: int


async def test_a_dead_letter_replay_joins_the_original_trace() -> None:
    tracing, exporter = traced()
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    fixed = asyncio.Event()

    @jobs.function(consumes=Job)
    async def work(job: Job, ctx: Context) -> None:
        if not fixed.is_set():
            raise DeadLetter("not yet")

    async with Runtime(jobs, broker="memory://", tracing=tracing) as rt:
        event = await rt.client.publish(Job(n=1))
        await rt.wait_idle(timeout=10)
        dead = await rt.transport.dead_letters()  # type: ignore[attr-defined]
        assert len(dead) == 1
        fixed.set()
        assert await rt.transport.replay([dead[0].id]) == 1  # type: ignore[attr-defined]
        await rt.wait_idle(timeout=10)

    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "publish job.queued")
    process = [s for s in spans if s.name == "process job.queued"]
    assert [s.attributes["nerve.outcome"] for s in process] == ["dead_lettered", "processed"]
    assert all(s.context.trace_id == root.context.trace_id for s in process)
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in process)
    assert event.extensions["traceparent"] == traceparent_of(root.context)


async def test_invalid_data_is_dead_lettered_with_a_span_in_its_trace() -> None:
    tracing, exporter = traced()
    jobs = App("jobs")
    jobs.event("job.queued")(Job)

    @jobs.function(consumes=Job)
    async def work(job: Job, ctx: Context) -> None:
        raise AssertionError("never called: the data is invalid")

    async with Runtime(jobs, broker="memory://", tracing=tracing) as rt:
        bad = jobs.make_event(Job(n=1)).evolve(data={"n": "not a number"})
        await rt.transport.publish(
            [bad.with_extensions(traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")]
        )
        await rt.wait_idle(timeout=10)
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("dead_letter")]
    assert span.name == "dead_letter job.queued"
    assert span.context.trace_id == int("ab" * 16, 16)
    assert span.attributes["nerve.dead_letter.reason"] == "invalid-data"
    assert span.status.status_code is StatusCode.ERROR


def test_tracing_is_configured_only_by_the_otel_variables() -> None:
    assert not tracing_configured({})
    assert not tracing_configured({"OTEL_SERVICE_NAME": "shop"})
    assert tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_configured({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_configured({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_configured(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    )


async def test_without_configuration_no_span_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    async with Runtime(app, broker="memory://") as rt:
        assert rt.tracing is None
        assert all(r._observer is None for r in rt.runners.values())
        event = await rt.client.publish(
            OrderCreated(
                order_id="o", customer_id="c", lines=[OrderLine(sku="x", qty=1)], amount_cents=1
            )
        )
        assert "traceparent" not in event.extensions


def test_otel_variables_build_an_exporting_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    from nerve.errors import ConfigError
    from nerve.observe.tracing import tracing_from_env

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracing = tracing_from_env("shop")
    assert tracing is not None
    assert tracing.provider.resource.attributes["service.name"] == "shop"  # type: ignore[attr-defined]
    tracing.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="zipkin"):
        tracing_from_env("shop")


class Pong(BaseModel):
    n: int


async def test_request_reply_is_one_trace() -> None:
    tracing, exporter = traced()
    pings = App("pings")
    pings.event("ping.sent")(Job)
    pings.event("pong.sent")(Pong)

    @pings.function(consumes=Job, emits=[Pong])
    async def answer(job: Job, ctx: Context) -> None:
        ctx.emit(Pong(n=job.n + 1))

    async with Runtime(pings, broker="memory://", tracing=tracing) as rt:
        reply = await rt.client.request(Job(n=1), replies=[Pong], timeout=10)
        await rt.wait_idle(timeout=10)
        await rt.client.close()
    assert reply.data == {"n": 2}
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "publish ping.sent")
    (process,) = [s for s in spans if s.name == "process ping.sent"]
    (create,) = [s for s in spans if s.name == "create pong.sent"]
    assert process.parent is not None and process.parent.span_id == root.context.span_id
    assert create.parent is not None and create.parent.span_id == process.context.span_id
    assert reply.extensions["traceparent"] == traceparent_of(create.context)


async def test_spans_a_handler_makes_are_children_of_its_process_span() -> None:
    tracing, exporter = traced()
    inner = tracing.provider.get_tracer("handler code")
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    seen: list[object] = []

    @jobs.function(consumes=Job)
    async def work(job: Job, ctx: Context) -> None:
        from opentelemetry import trace

        seen.append(trace.get_current_span())
        with inner.start_as_current_span("charge card"):
            await asyncio.sleep(0)

    async with Runtime(jobs, broker="memory://", tracing=tracing) as rt:
        await rt.client.publish(Job(n=1))
        await rt.wait_idle(timeout=10)
        from opentelemetry import trace

        assert not trace.get_current_span().get_span_context().is_valid
    spans = exporter.get_finished_spans()
    (process,) = [s for s in spans if s.name == "process job.queued"]
    (charge,) = [s for s in spans if s.name == "charge card"]
    assert charge.parent is not None and charge.parent.span_id == process.context.span_id
    assert charge.context.trace_id == process.context.trace_id
    assert seen[0].get_span_context().span_id == process.context.span_id  # type: ignore[attr-defined]
    # with this opentelemetry-api, the span is made current through its context variable
    from nerve.observe.tracing import _CONTEXT

    assert _CONTEXT is not None
