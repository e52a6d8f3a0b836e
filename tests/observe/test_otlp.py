"""nerve's span pipeline (nerve.observe.otlp): the OTLP bytes it writes by hand are the
message OpenTelemetry's own encoder makes; sampling decides as the SDK's samplers do;
OTEL_* configuration exports through the OTLP/HTTP exporter's client."""

from __future__ import annotations

import http.server
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel

from nerve import App, Context, Runtime
from nerve.observe import otlp
from nerve.observe.tracing import tracing_from_env

from .conftest import require_speedups

RESOURCE = Resource.create({"service.name": "shop", "deployment.environment": "test"})


@pytest.fixture(params=["c", "python"])
def speedups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the C speedups (nerve/_speedups.c) and without them:
    both must give the same results. Without a built module the C run skips, and
    fails under CI, which builds it."""
    from nerve.observe import tracing

    if request.param == "python":
        monkeypatch.setattr(otlp, "_encode_spans", None)
        monkeypatch.setattr(tracing, "_parse_traceparent", tracing._parse_python)
    else:
        require_speedups()
    return str(request.param)


class Kept:
    """A pipeline's sink that keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list[otlp.Span] = []

    def __call__(self, batch: list[otlp.Span]) -> None:
        self.spans.extend(batch)


def recorder(sampler: sampling.Sampler = sampling.DEFAULT_ON) -> tuple[otlp.SpanRecorder, Kept]:
    kept = Kept()
    return otlp.SpanRecorder(otlp.Pipeline(kept), otlp.Sampling(sampler)), kept


def layout(name: str, kind: int, constant: dict[str, Any], *keys: str) -> otlp.Layout:
    return otlp.Layout(name, kind, constant, keys)


def varied_spans() -> list[otlp.Span]:
    rec, kept = recorder()
    remote: otlp.Parent = (0xAB << 120 | 7, 0xCD, 1, "vendor=x,other=y", True)
    publish = layout("publish order.created", otlp.PRODUCER, {"a": "b", "n": 3})
    root = rec.start(publish, None)
    root.end()
    process = layout(
        "process order.created",
        otlp.CONSUMER,
        {"messaging.system": "nerve", "flag": True, "ratio": 0.25},
        "messaging.message.id",
        "nerve.attempt",
        "messaging.message.conversation_id",
        "long",
    )
    child = rec.start(process, remote, ("01-id", 2, None, "x" * 300))
    child.set_attributes(
        {
            "negative": -5,
            "big": 2**62,
            "names": ["x", "y"],
            "numbers": [1, 2, 3],
            "empty": "",
            "unicode": "naïve ✓",
        }
    )
    try:
        raise ValueError("boom")
    except ValueError as exc:
        child.record_exception(exc)
    child.add_event("note", {"k": "v"})
    child.set_status(Status(StatusCode.ERROR, "ValueError: boom"))
    child.end()
    create = layout("create stock.reserved", otlp.PRODUCER, {}, "id")
    local = rec.start(create, child.as_parent(), ("e-2",))
    local.set_status(StatusCode.OK)
    local.end()
    links: list[otlp.LinkData] = [
        (*remote, None),
        (1, 2, 0, "", True, {"link.kind": "first", "n": 1}),
    ]
    receive = layout("receive orders", otlp.CONSUMER, {}, "count")
    rec.start(receive, None, (2,), links).end()
    changed = rec.start(process, remote, ("02-id", 1, "corr", "y"))
    changed.set_attribute("nerve.attempt", 9)  # an attribute of the layout changes
    changed.update_name("process order.changed")
    changed.end()
    dead = layout("dead_letter x", otlp.INTERNAL, {"reason": "invalid-data"})
    internal = rec.start(dead, remote)
    internal.set_status(Status(StatusCode.ERROR, "invalid-data"))
    internal.end()
    rec.pipeline.flush()
    return kept.spans


def test_the_hand_written_request_is_the_message_opentelemetry_encodes() -> None:
    spans = varied_spans()
    assert len(spans) == 6
    sdk = otlp.SdkSpans(RESOURCE, "1.2.3")
    expected = encode_spans([sdk.readable(s) for s in spans])
    encoder = otlp.OtlpEncoder(RESOURCE, "1.2.3")
    for _ in range(2):  # the second time from the encoder's caches
        got = ExportTraceServiceRequest.FromString(encoder.request(spans))
        assert got == expected, (got, expected)
    (resource_spans,) = got.resource_spans
    assert [s.name for s in resource_spans.scope_spans[0].spans] == [s.name for s in spans]


def plain_spans() -> list[otlp.Span]:
    """Spans with nothing but their layout's values and ids: the compiled encoders."""
    rec, kept = recorder()
    keys = ("messaging.message.id", "nerve.attempt", "messaging.message.conversation_id", "x")
    process = layout(
        "process order.created %s %%",  # '%' in the constant bytes of the template
        otlp.CONSUMER,
        {"messaging.system": "nerve", "n" * 37: "%" * 37, "ratio": 0.5, "flag": False},
        *keys,
    )
    remote: otlp.Parent = (0xAB << 120 | 7, 0xCD, 1, "", True)
    local: otlp.Parent = (3, 4, 1, "", False)
    values: list[tuple[Any, ...]] = [
        ("01-id", 1, None, "processed"),
        ("naïve ✓ ünïcode", 0, "corr", "retried"),  # non-ASCII
        ("x" * 95, 127, "y" * 200, "z" * 128),  # lengths that need two-byte varints
        ("e" * 5000, 128, "€" * 100, "dead_lettered"),  # and longer
        (None, None, None, None),
        ("id", -5, "c", 2**62),  # ints that are not one byte
        ("id", True, 3.5, ["a", "b"]),  # other types: bool, double, array
        ("id", 1, "c", "processed"),  # the cached fields, a second time
        ("id", "1", "c", 1),  # the same keys with values of other types than before
    ]
    for parent in (None, remote, local):
        for row in values:
            rec.start(process, parent, list(row)).end()
    empty = layout("create stock.reserved", otlp.PRODUCER, {})
    rec.start(empty, None).end()
    rec.start(empty, local).end()
    # links without attributes (a batch's receive span): written with the layout's values
    receive = layout("receive orders", otlp.CONSUMER, {"messaging.system": "nerve"}, "count")
    many: list[otlp.LinkData] = [
        (i << 64 | i, 2**64 - i, 1, "", i % 2 == 0, None) for i in range(1, 17)
    ]
    for links in ([(*remote, None)], [(*local, None), (5, 6, 0, "k=v", True, None)], many):
        rec.start(receive, None, (len(links),), links).end()
        rec.start(receive, remote, (len(links),), links).end()
    rec.pipeline.flush()
    return kept.spans


def test_the_compiled_encoders_write_what_opentelemetry_encodes(
    monkeypatch: pytest.MonkeyPatch, speedups: str
) -> None:
    monkeypatch.setattr(otlp, "_COMPILE_AFTER", 1)  # compiled after one span of a sort
    spans = plain_spans()
    assert not any(s.detailed for s in spans)
    sdk = otlp.SdkSpans(RESOURCE, "1.2.3")
    expected = encode_spans([sdk.readable(s) for s in spans])
    encoder = otlp.OtlpEncoder(RESOURCE, "1.2.3")
    for _ in range(2):  # the second time from the encoders' caches
        got = ExportTraceServiceRequest.FromString(encoder.request(spans))
        assert got == expected
    got_spans = got.resource_spans[0].scope_spans[0].spans
    for ours, want in zip(got_spans, expected.resource_spans[0].scope_spans[0].spans, strict=True):
        assert ours == want  # field by field, one span at a time, for a readable failure
    third = got_spans[2]
    assert [kv.value.string_value for kv in third.attributes if kv.key == "x"] == ["z" * 128]
    assert not got_spans[0].parent_span_id and got_spans[9].parent_span_id
    # every span, alone, is the bytes the encoder for any span writes
    if speedups == "python":  # (spans with links are written the general way)
        assert all(
            s.layout is not None and s.layout.encode is not None for s in spans if not s.links
        )
    for span in spans:
        assert encoder.span(span) == encoder._detailed(span)


def test_spans_as_sdk_spans() -> None:
    publish, process, create, receive, changed, dead = varied_spans()
    sdk = otlp.SdkSpans(RESOURCE, "1.2.3")
    assert [sdk.readable(s).kind for s in (publish, process, dead)] == [
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.INTERNAL,
    ]
    span = sdk.readable(process)
    assert span.parent is not None and span.parent.is_remote and span.parent.span_id == 0xCD
    assert span.context.trace_id == 0xAB << 120 | 7
    assert span.context.trace_state.to_header() == "vendor=x,other=y"
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception", "note"]
    assert span.events[0].attributes["exception.type"] == "ValueError"
    assert "boom" in span.events[0].attributes["exception.stacktrace"]
    child = sdk.readable(create)
    assert child.parent is not None and not child.parent.is_remote
    assert child.parent.span_id == process.span_id
    assert sdk.readable(publish).parent is None
    assert [link.context.span_id for link in sdk.readable(receive).links] == [0xCD, 2]
    assert span.attributes["nerve.attempt"] == 2 and span.attributes["negative"] == -5
    assert "messaging.message.conversation_id" not in span.attributes  # its value was None
    changed_span = sdk.readable(changed)
    assert changed_span.name == "process order.changed"
    assert changed_span.attributes["nerve.attempt"] == 9
    assert changed_span.attributes["messaging.message.id"] == "02-id"


PARENTS: list[otlp.Parent | None] = [
    None,
    (5, 6, 1, "", True),
    (5, 6, 0, "", True),
    (5, 6, 1, "", False),
    (5, 6, 0, "", False),
]


@pytest.mark.parametrize(
    "sampler",
    [
        sampling.ALWAYS_ON,
        sampling.ALWAYS_OFF,
        sampling.DEFAULT_ON,
        sampling.DEFAULT_OFF,
        sampling.TraceIdRatioBased(0.3),
        sampling.ParentBasedTraceIdRatio(0.3),
        sampling.ParentBased(
            sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON
        ),  # a non-default delegate
    ],
    ids=lambda s: s.get_description(),
)
def test_sampling_decides_as_the_sdk_sampler(sampler: sampling.Sampler) -> None:
    ours = otlp.Sampling(sampler)
    rng = random.Random(7)
    decisions = set()
    for parent in PARENTS:
        for _ in range(200):
            trace_id = rng.getrandbits(128) if parent is None else parent[0] | rng.getrandbits(128)
            if parent is not None:
                parent = (trace_id, *parent[1:])  # type: ignore[assignment]
            context = None if parent is None else otlp.span_context(parent)
            from opentelemetry.context import Context
            from opentelemetry.trace import NonRecordingSpan, set_span_in_context

            otel = Context() if context is None else set_span_in_context(NonRecordingSpan(context))
            expected = sampler.should_sample(otel, trace_id, "x").decision.is_sampled()
            got = ours.sampled(parent, trace_id, "x", otlp.INTERNAL, {}, None)
            assert got is expected, (parent, trace_id)
            decisions.add(got)
    if isinstance(sampler, sampling.TraceIdRatioBased | sampling.ParentBasedTraceIdRatio):
        assert decisions == {True, False}


def test_ids_are_what_the_sdks_generator_draws_from_random_in_the_same_state(
    speedups: str,
) -> None:
    """A span's ids (made in C or in Python) are the numbers OpenTelemetry's
    ``RandomIdGenerator`` draws from :mod:`random` in the same state: a seeded run
    makes the ids it would make with the SDK."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    rec, _ = recorder()
    if speedups == "python":
        rec._native = False  # SpanRecorder.start's own code, not _speedups.start_span
    sort = layout("x", otlp.INTERNAL, {})
    generator = RandomIdGenerator()
    state = random.getstate()
    try:
        for seed in range(50):
            random.seed(seed)
            root = rec.start(sort, None)
            child = rec.start(sort, root.as_parent())
            random.seed(seed)
            trace_id, span_id = generator.generate_trace_id(), generator.generate_span_id()
            assert (root.trace_id, root.span_id) == (trace_id, span_id)
            assert (child.trace_id, child.span_id) == (trace_id, generator.generate_span_id())
    finally:
        random.setstate(state)


@pytest.mark.parametrize(
    "sampler",
    [
        sampling.DEFAULT_ON,  # the SDK's default: the recorder's shorter way
        sampling.ALWAYS_ON,
        sampling.DEFAULT_OFF,
        sampling.ParentBasedTraceIdRatio(0.3),
    ],
    ids=lambda s: s.get_description(),
)
def test_a_started_span_is_sampled_as_the_sampler_decides_and_keeps_its_parent(
    sampler: sampling.Sampler,
) -> None:
    rec, _ = recorder(sampler)
    assert rec._plain is (sampler is sampling.DEFAULT_ON)
    decisions = set()
    for parent in [*PARENTS, (5, 6, 1, "vendor=x", True)]:
        for _ in range(50):
            span = rec.start(layout("process x", otlp.CONSUMER, {}), parent, ["id"])
            expected = rec.sampling.sampled(parent, span.trace_id, "x", otlp.CONSUMER, {}, None)
            assert (span.recorder is rec) is expected and span.flags == int(expected)
            assert span.values == ["id"] and span.start_time > 0 and span.span_id > 0
            if parent is None:
                assert span.trace_id > 0 and span.parent_id == 0 and not span.remote
            else:
                assert (span.trace_id, span.parent_id, span.remote) == (
                    parent[0],
                    parent[1],
                    parent[4],
                )
                assert span.state == parent[3] and span.detailed is bool(parent[3])
            decisions.add(expected)
    assert decisions == ({True} if sampler is sampling.ALWAYS_ON else {True, False})


def test_an_unsampled_span_carries_its_context_and_records_nothing() -> None:
    rec, kept = recorder(sampling.ALWAYS_OFF)
    span = rec.start(layout("process x", otlp.CONSUMER, {}), None)
    assert not span.is_recording()
    assert span.traceparent.endswith("-00")
    span.set_attribute("a", 1)
    span.end()
    rec.pipeline.flush()
    assert kept.spans == [] and span.attributes == {}


def test_a_full_queue_drops_spans_and_counts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    kept = Kept()
    pipeline = otlp.Pipeline(kept)
    pipeline._thread = threading.current_thread()  # no export thread: nothing is taken
    rec = otlp.SpanRecorder(pipeline, otlp.Sampling(sampling.ALWAYS_ON))
    for _ in range(6):
        rec.start(layout("x", otlp.INTERNAL, {}), None).end()
    assert pipeline.dropped == 2
    pipeline.flush()
    assert len(kept.spans) == 4


def test_the_export_thread_sends_full_batches_and_the_rest_after_the_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    batches: list[int] = []
    done = threading.Event()

    def export(batch: list[otlp.Span]) -> None:
        batches.append(len(batch))
        if sum(batches) == 10:
            done.set()

    pipeline = otlp.Pipeline(export)
    rec = otlp.SpanRecorder(pipeline, otlp.Sampling(sampling.ALWAYS_ON))
    with pipeline._lock:  # the thread waits until all ten are queued
        for _ in range(10):
            rec.start(layout("x", otlp.INTERNAL, {}), None).end()
    assert done.wait(5)
    pipeline.shutdown()
    assert batches == [4, 4, 2]  # full batches when woken; the rest once the delay passed


def test_spans_written_as_they_end_make_the_request_of_the_batch(
    monkeypatch: pytest.MonkeyPatch, speedups: str
) -> None:
    """The OTLP/HTTP pipeline writes each span as it ends (``OtlpEncoder.writer``):
    the request around those bytes is the request of the spans written as a batch,
    which the tests above compare with OpenTelemetry's own encoder."""
    monkeypatch.setattr(otlp, "_COMPILE_AFTER", 1)
    spans = varied_spans() + plain_spans()
    encoder = otlp.OtlpEncoder(RESOURCE, "1.2.3")
    write = encoder.writer()
    if speedups == "c":
        assert otlp.speedups is not None and type(write) is otlp.speedups.SpanWriter
    parts = [write(s) for s in spans]
    assert all(type(p) is bytes for p in parts)
    assert encoder.request_of(parts) == encoder.request(spans)
    request = ExportTraceServiceRequest.FromString(encoder.request_of([write(s) for s in spans]))
    assert [s.name for s in request.resource_spans[0].scope_spans[0].spans] == [
        s.name for s in spans
    ]


def test_a_writing_pipeline_queues_bytes_and_drops_only_a_span_it_cannot_write(
    caplog: pytest.LogCaptureFixture, speedups: str
) -> None:
    encoder = otlp.OtlpEncoder(RESOURCE, "1.2.3")
    posted: list[list[bytes]] = []
    pipeline = otlp.Pipeline(posted.append, write=encoder.writer())
    pipeline._thread = threading.current_thread()  # no export thread: flush() sends
    rec = otlp.SpanRecorder(pipeline, otlp.Sampling(sampling.ALWAYS_ON))
    sort = layout("process x", otlp.CONSUMER, {}, "messaging.message.id")
    ended = []
    for value in ("a", "\ud800", "c"):  # a lone surrogate has no UTF-8
        span = rec.start(sort, None, [value])
        span.end()
        ended.append(span)
    assert [type(item) for item in pipeline._queue] == [bytes, bytes]  # no span kept
    assert pipeline.unwritten == 1
    assert "span 'process x' cannot be written as OTLP; dropped" in caplog.text
    pipeline.flush()
    (parts,) = posted
    request = ExportTraceServiceRequest.FromString(encoder.request_of(parts))
    got = request.resource_spans[0].scope_spans[0].spans
    assert [int.from_bytes(s.span_id) for s in got] == [ended[0].span_id, ended[2].span_id]


def test_process_spans_ended_in_c_are_written_as_they_end(
    collector: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Tracing`` with the OTLP/HTTP exporter alone: the C end of a process span hands
    the pipeline its bytes; one the writer refuses goes through ``Pipeline.add``, which
    logs and drops it."""
    from opentelemetry.sdk.trace import TracerProvider

    from nerve.event import Event
    from nerve.observe.tracing import Tracing

    require_speedups()
    exporter = exporter_for(f"{collector}/v1/traces", monkeypatch)
    tracing = Tracing(TracerProvider(resource=RESOURCE), owned=True, exporters=[exporter])
    assert tracing._native is not None and tracing._pipeline is not None
    pipeline = tracing._pipeline
    pipeline._thread = threading.current_thread()  # no export thread: flush() sends
    for event_id in ("e-1", "\ud800", "e-3"):
        event = Event(type="job.queued", source="/t", id=event_id, data={})
        tracing.processed(tracing.process("work", event, 1, False), None, "processed")
    assert [type(item) for item in pipeline._queue] == [bytes, bytes]
    assert pipeline.unwritten == 1 and "cannot be written as OTLP" in caplog.text
    tracing.shutdown()
    ids = []
    for _, _, body in Collector.requests:
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            for span in resource_spans.scope_spans[0].spans:
                assert span.name == "process job.queued"
                ids += [kv.value.string_value for kv in span.attributes if kv.key.endswith(".id")]
    assert ids == ["e-1", "e-3"]


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that keeps the requests it is sent."""

    requests: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Collector.requests.append((self.path, dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    Collector.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Job(BaseModel):
    n: int


async def test_otel_variables_export_otlp_http_written_by_nerve(
    collector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    def sdk_encoding(*args: Any) -> Any:
        raise AssertionError("the exporter's SDK encoding path was used")

    monkeypatch.setattr(OTLPSpanExporter, "export", sdk_encoding)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    tracing = tracing_from_env("jobs")
    assert tracing is not None
    jobs = App("jobs")
    jobs.event("job.queued")(Job)

    @jobs.function(consumes=Job)
    async def work(job: Job, ctx: Context) -> None:
        pass

    async with Runtime(jobs, broker="memory://", tracing=tracing) as rt:
        for n in range(3):
            await rt.client.publish(Job(n=n))
        await rt.wait_idle(timeout=10)
    assert Collector.requests, "nothing was exported"
    spans = []
    for path, headers, body in Collector.requests:
        assert path == "/v1/traces"
        assert headers.get("x-tenant") == "acme"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}[
                "service.name"
            ]
            assert service == "jobs"
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "nerve"
                spans.extend(scope_spans.spans)
    publish = [s for s in spans if s.name == "publish job.queued"]
    process = [s for s in spans if s.name == "process job.queued"]
    assert len(publish) == 3 and len(process) == 3
    by_id = {s.span_id: s for s in publish}
    for span in process:
        assert by_id[span.parent_span_id].trace_id == span.trace_id


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", (int(TRACE, 16), int(SPAN, 16), 1, "", True)),
        (f"00-{TRACE}-{SPAN}-00", (int(TRACE, 16), int(SPAN, 16), 0, "", True)),
        (f"00-{TRACE}-{SPAN}-03", (int(TRACE, 16), int(SPAN, 16), 1, "", True)),
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero span id
        (f"00-{TRACE}-{SPAN}-0g", None),
        (f"00-{TRACE}-{SPAN}-1", None),
        (f"00-{TRACE[:-1]}x-{SPAN}-01", None),
        (f"00_{TRACE}-{SPAN}-01", None),
        # only lowercase hex digits (int(x, 16) takes each of these)
        (f"00-{TRACE.upper()}-{SPAN}-01", None),
        (f"00-+{TRACE[1:]}-{SPAN}-01", None),
        (f"00-{TRACE}- {SPAN[1:]}-01", None),
        (f"00-{TRACE[:16]}_{TRACE[17:]}-{SPAN}-01", None),
        (f"0A-{TRACE}-{SPAN}-01", None),
        (f"00-{TRACE}-{SPAN}-0B", None),
        (f"01-{TRACE}-{SPAN}-01", (int(TRACE, 16), int(SPAN, 16), 1, "", True)),
        ("", None),
    ],
)
def test_the_traceparent_an_event_carries(
    traceparent: str, expected: otlp.Parent | None, speedups: str
) -> None:
    from nerve.observe.tracing import _parent_of

    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    event = jobs.make_event(Job(n=1), extensions={"traceparent": traceparent})
    assert _parent_of(event) == expected
    with_state = event.with_extensions(tracestate="b=2, a=1")
    if expected is not None:
        assert _parent_of(with_state) == (*expected[:3], "b=2,a=1", True)


def test_a_receive_span_hands_its_parsed_links_to_the_process_spans() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from nerve.observe.tracing import Tracing

    tracing = Tracing(TracerProvider())
    assert tracing._recorder is not None
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    parents = [(random.getrandbits(128) or 1, random.getrandbits(64) or 1) for _ in range(20)]
    events = [
        jobs.make_event(Job(n=i), extensions={"traceparent": f"00-{t:032x}-{s:016x}-01"})
        for i, (t, s) in enumerate(parents)
    ]
    tracing.received("jobs", events)  # links the first 16, parsed once
    assert set(tracing._parsed) == {e.id for e in events[:16]}
    for event, (trace_id, span_id) in zip(events, parents, strict=True):
        span = tracing.start_process("jobs", event, 1).span
        assert isinstance(span, otlp.Span)
        assert (span.trace_id, span.parent_id, span.remote) == (trace_id, span_id, True)
    assert tracing._parsed == {}  # each taken by its event's first process span
    # a retry parses again; parsed links of events never handled do not pile up
    span = tracing.start_process("jobs", events[0], 2).span
    assert isinstance(span, otlp.Span) and span.parent_id == parents[0][1]
    for _ in range(6):
        batch = [
            jobs.make_event(Job(n=1), extensions={"traceparent": f"00-{t:032x}-{s:016x}-01"})
            for t, s in parents[:16]
        ]
        tracing.received("jobs", batch)
        assert 16 <= len(tracing._parsed) <= 5 * 16
    tracing.shutdown()


def test_the_receive_span_of_a_batch_counts_all_its_events_and_links_the_first() -> None:
    """``FunctionObserver.dispatched`` hands tracing only the events it links (the first
    ``Tracing.links``) and the batch's size, which the span counts."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from nerve.observe.hooks import FunctionObserver
    from nerve.observe.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    parent = f"00-{TRACE}-{SPAN}-01"
    ready = [
        (None, jobs.make_event(Job(n=i), extensions={"traceparent": parent}), None)
        for i in range(40)
    ]
    FunctionObserver("jobs", None, tracing).dispatched(ready, [])
    tracing.flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "receive jobs"
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 40
    assert len(span.links) == tracing.links == 16
    tracing.shutdown()


class Flaky(http.server.BaseHTTPRequestHandler):
    """A collector that answers the first request 503 (retry at once), and closes the
    connection after every response (HTTP/1.0): the client must reconnect."""

    requests: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Flaky.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
        if len(Flaky.requests) == 1:
            self.send_response(503)
            self.send_header("Retry-After", "0")
        else:
            self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def exporter_for(endpoint: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    return OTLPSpanExporter()


def test_a_plain_http_endpoint_is_posted_to_over_a_kept_alive_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gzip

    Flaky.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        exporter = exporter_for(
            f"http://127.0.0.1:{server.server_address[1]}/custom/path",
            monkeypatch,
            OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-tenant=acme",
            OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="gzip",
        )
        sink = otlp.exporter_sink(exporter, RESOURCE, "1.2.3")
        assert isinstance(exporter._client._transport, otlp.KeptAliveHttp)
        spans = plain_spans()
        sink(spans[:5])  # 503, retried at once: two requests
        sink(spans[5:])  # on a new connection: the collector closed the last one
        exporter.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert len(Flaky.requests) == 3
    got = []
    for headers, body in Flaky.requests:
        assert headers["x-tenant"] == "acme"
        assert headers["content-encoding"] == "gzip"
        assert headers["content-type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(gzip.decompress(body))
        got.append(request.resource_spans[0].scope_spans[0].spans)
    assert got[0] == got[1] and len(got[0]) == 5 and len(got[2]) == len(spans) - 5


@pytest.mark.parametrize(
    ("endpoint", "env"),
    [
        ("https://collector.example:4318/v1/traces", {}),  # TLS: the exporter's own client
        ("http://collector.example:4318/v1/traces", {"HTTP_PROXY": "http://proxy:3128"}),
        ("http://collector.example:4318/v1/traces", {"ALL_PROXY": "http://proxy:3128"}),
    ],
)
def test_other_endpoints_keep_the_exporters_transport(
    endpoint: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = exporter_for(endpoint, monkeypatch, **env)
    otlp.exporter_sink(exporter, RESOURCE, "1.2.3")
    assert not isinstance(exporter._client._transport, otlp.KeptAliveHttp)


def test_a_proxy_the_endpoint_bypasses_still_allows_the_kept_alive_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = exporter_for(
        "http://127.0.0.1:4318/v1/traces",
        monkeypatch,
        HTTP_PROXY="http://proxy:3128",
        NO_PROXY="127.0.0.1,localhost",
    )
    otlp.exporter_sink(exporter, RESOURCE, "1.2.3")
    assert isinstance(exporter._client._transport, otlp.KeptAliveHttp)


@given(st.integers(1, (1 << 128) - 1), st.integers(1, (1 << 64) - 1), st.integers(0, 255))
def test_traceparent_is_the_w3c_format_of_the_ids(trace_id: int, span_id: int, flags: int) -> None:
    value = otlp.traceparent(trace_id, span_id, flags)
    assert value == f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
    from nerve.event import Event
    from nerve.observe.tracing import _parent_of

    event = Event(type="t.x", source="/s", extensions={"traceparent": value})
    assert _parent_of(event) == (trace_id, span_id, flags & 1, "", True)


_HEX = "0123456789abcdef"


@given(
    st.one_of(
        st.text(max_size=60),
        # near misses of a valid value: one character of it replaced
        st.builds(
            lambda trace_id, span_id, flags, at, char: (
                (value := f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}")[:at]
                + char
                + value[at + 1 :]
            ),
            st.integers(0, (1 << 128) - 1),
            st.integers(0, (1 << 64) - 1),
            st.integers(0, 255),
            st.integers(0, 54),
            st.sampled_from([*_HEX, "A", "F", "-", "_", " ", "+", "é", "0"]),
        ),
    )
)
def test_the_c_traceparent_parser_agrees_with_the_python_one(value: str) -> None:
    from nerve.observe import tracing

    require_speedups()
    assert otlp.speedups is not None
    assert otlp.speedups.parse_traceparent(value) == tracing._parse_python(value)


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.text(max_size=300),
            st.integers(-(1 << 70), 1 << 70),
            st.booleans(),
            st.floats(allow_nan=False),
            st.lists(st.text(max_size=5), max_size=3),
        ),
        min_size=3,
        max_size=3,
    ),
    st.integers(1, (1 << 128) - 1),
    st.integers(0, (1 << 64) - 1),
    st.booleans(),
)
def test_the_c_encoder_writes_what_the_python_one_writes(
    values: list[Any], trace_id: int, parent_id: int, remote: bool
) -> None:
    require_speedups()
    assert otlp.speedups is not None
    rec, _ = recorder()
    sort = layout("process x", otlp.CONSUMER, {"a": "b"}, "messaging.message.id", "n", "other")
    parent: otlp.Parent | None = (trace_id, parent_id, 1, "", remote) if parent_id else None
    span = rec.start(sort, parent, values)
    span.end()
    encoder = otlp.OtlpEncoder(RESOURCE, "1.2.3")
    assert not span.detailed
    assert otlp.speedups.encode_span(
        span, sort.head, sort.prefixes, otlp._other_value
    ) == encoder._detailed(span)


def test_the_c_encoder_refuses_what_it_cannot_write() -> None:
    require_speedups()
    assert otlp.speedups is not None
    rec, _ = recorder()
    sort = layout("process x", otlp.CONSUMER, {}, "k")
    span = rec.start(sort, None, ["v"])
    span.end()
    encode = otlp.speedups.encode_span
    with pytest.raises(ValueError, match="1 values for 2 keys"):
        encode(span, sort.head, (b"a", b"b"), otlp._other_value)
    for trace_id, span_id in ((1 << 128, 1), (-1, 1), (5, 1 << 64), (5, -(1 << 40))):
        span.trace_id, span.span_id = trace_id, span_id
        with pytest.raises(OverflowError):
            encode(span, sort.head, sort.prefixes, otlp._other_value)
    span.trace_id, span.span_id = 5, 1
    span.values = ["\ud800"]  # a lone surrogate has no UTF-8
    with pytest.raises(UnicodeEncodeError):
        encode(span, sort.head, sort.prefixes, otlp._other_value)
    span.values = [object()]  # not an attribute value: left out, as the Python one does
    written = encode(span, sort.head, sort.prefixes, otlp._other_value)
    assert written == otlp.OtlpEncoder(RESOURCE, "1")._detailed(span)


def test_the_c_process_spans_are_what_start_and_end_process_make() -> None:
    """``Tracing.process``/``processed`` (C, for the SDK's default ids and sampler)
    against ``start_process``/``end_process`` (Python), event by event."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from nerve.observe.tracing import Tracing

    require_speedups()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    assert type(tracing.process).__name__ == "builtin_function_or_method"
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    parent = f"00-{TRACE}-{SPAN}-01"
    events = [
        jobs.make_event(Job(n=1)),  # no context: a root
        jobs.make_event(Job(n=2), extensions={"traceparent": parent, "correlationid": "c-2"}),
        jobs.make_event(Job(n=3), extensions={"traceparent": parent, "tracestate": "b=2, a=1"}),
        jobs.make_event(Job(n=4), extensions={"traceparent": parent, "correlationid": 7}),
        jobs.make_event(Job(n=5), extensions={"traceparent": f"00-{TRACE}-{SPAN}-00"}),
        jobs.make_event(Job(n=6), extensions={"traceparent": "not one"}),
    ]
    tracing.received("jobs", events[2:4])  # these two parents come parsed already
    before = otel_trace.get_current_span()
    pairs = []
    for event in events:
        native = tracing.process("jobs", event, 2, True)
        assert otel_trace.get_current_span() is native.span
        tracing.processed(native, None, "processed")
        assert otel_trace.get_current_span() is before
        python = tracing.start_process("jobs", event, 2, True)
        assert otel_trace.get_current_span() is python.span
        tracing.end_process(python, None, "processed")
        assert otel_trace.get_current_span() is before
        pairs.append((native, python))
    assert not tracing._parsed
    for native, python in pairs:
        a, b = native.span, python.span
        assert type(a) is type(b) is otlp.Span
        assert a.layout is b.layout and a.values == b.values
        assert (a.parent_id, a.remote, a.state, a.flags, a.detailed) == (
            b.parent_id,
            b.remote,
            b.state,
            b.flags,
            b.detailed,
        )
        assert (a.recorder is None) == (b.recorder is None)
        assert a.span_id != b.span_id and a.start_time > 0
        assert (a.end_time >= a.start_time) if a.recorder else a.end_time == b.end_time == 0
        if a.parent_id:
            assert a.trace_id == b.trace_id == int(TRACE, 16)
        assert native.trace_id == f"{a.trace_id:032x}" and native._token is None
    assert pairs[1][0].span.values == [events[1].id, 2, "c-2", "processed"]
    assert pairs[2][0].span.state == "b=2,a=1"
    assert pairs[3][0].span.values[2] == "7"  # a correlation id that is not a string
    assert pairs[4][0].span.recorder is None  # the parent is not sampled
    assert pairs[5][0].span.parent_id == 0  # an invalid context: a root
    # what the runner calls with each attempt's ctx
    from types import SimpleNamespace

    from nerve.runtime.context import Context as RunContext

    starter = tracing.starter("jobs")
    assert type(starter).__name__ == "Starter"
    run_ctx = RunContext.__new__(RunContext)  # its slots are read and set directly
    run_ctx.event, run_ctx.attempt, run_ctx.trace = events[1], 3, None
    for ctx in (SimpleNamespace(event=events[1], attempt=3, trace=None), run_ctx):
        starter(ctx)
        assert ctx.trace is not None
        assert otel_trace.get_current_span() is ctx.trace.span
        assert ctx.trace.span.values == [events[1].id, 3, "c-2", None]
        tracing.processed(ctx.trace, None, "processed")
        assert otel_trace.get_current_span() is before
    with pytest.raises(TypeError):
        starter()
    # an error, and a span whose layout attribute changed, end the Python way
    failed = tracing.process("jobs", events[1], 3, True)
    tracing.processed(failed, ValueError("boom"), "retried")
    changed = tracing.process("jobs", events[1], 4, False)
    changed.span.set_attribute("nerve.attempt", 40)
    tracing.processed(changed, None, "processed")
    tracing.processed(changed, None, "processed")  # a second end changes nothing
    tracing.flush()
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("process")]
    assert len(spans) == 2 * 5 + 4  # the unsampled pair is not recorded
    retried = spans[-2]
    assert retried.status.status_code is StatusCode.ERROR
    assert retried.attributes["nerve.outcome"] == "retried"
    assert [e.name for e in retried.events] == ["exception"]
    assert spans[-1].attributes["nerve.attempt"] == 40
    assert spans[-1].attributes["nerve.outcome"] == "processed"


@pytest.mark.slow
def test_the_pure_python_code_passes_the_same_tests() -> None:
    """Without the C speedups (``NERVE_SPEEDUPS=0``: a machine without a compiler),
    the span pipeline's, tracing's and events' tests pass with the pure-Python code."""
    import subprocess
    import sys

    if otlp.speedups is None:
        pytest.skip("this run is the pure-Python one already")
    here = Path(__file__)
    tests = [
        str(here),
        str(here.with_name("test_tracing.py")),
        str(here.parents[1] / "test_event.py"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        env={**os.environ, "NERVE_SPEEDUPS": "0"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_a_function_named_like_a_span_sort_gets_process_spans() -> None:
    """Process layouts are kept by function and type apart from the others: a function
    named ``create`` or ``publish`` once got the ``create``/``publish`` layout of its
    event type for its process spans."""
    from opentelemetry.sdk.trace import TracerProvider

    from nerve.observe.tracing import Tracing

    tracing = Tracing(TracerProvider())
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    event = jobs.make_event(Job(n=1))
    tracing.create("job.queued")
    tracing.start_publish([event])
    for function in ("create", "publish"):
        for start in (tracing.process, tracing.start_process):
            span = start(function, event, 1, False).span
            assert isinstance(span, otlp.Span)
            assert span.name == "process job.queued"
            assert span.attributes["messaging.consumer.group.name"] == function


def test_the_c_end_of_an_attempt_is_what_the_python_end_does() -> None:
    """``FunctionObserver.end`` with tracing's C speedups (``Tracing.ender``: the
    attempt's metrics, then its process span ended) against its Python twin ``_end``,
    outcome by outcome, for the runtime's ``Context`` (slots read directly) and another
    ctx: the same spans (values, status, error), the same metrics, the current span
    restored, and nothing to end when ``ctx.trace`` is None."""
    from types import SimpleNamespace

    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from nerve.observe.hooks import FunctionObserver
    from nerve.observe.metrics import FunctionMetrics
    from nerve.observe.tracing import Tracing
    from nerve.runtime.context import Context as RunContext

    require_speedups()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    c_metrics, py_metrics = FunctionMetrics("jobs"), FunctionMetrics("jobs")
    c_side = FunctionObserver("jobs", c_metrics, tracing)
    py_side = FunctionObserver("jobs", py_metrics, tracing)
    assert type(c_side.end).__name__ == "Ender"
    py_side.end = py_side._end
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    event = jobs.make_event(
        Job(n=1), extensions={"traceparent": f"00-{TRACE}-{SPAN}-01", "correlationid": "c"}
    )
    before = otel_trace.get_current_span()

    def ctx_of(kind: str) -> Any:
        if kind == "namespace":
            return SimpleNamespace(event=event, attempt=2, trace=None)
        ctx = RunContext.__new__(RunContext)
        ctx.event, ctx.attempt, ctx.trace = event, 2, None
        return ctx

    boom = ValueError("boom")
    ended: list[tuple[Any, Any]] = []
    for kind in ("context", "namespace"):
        for outcome, error in (
            ("processed", None),
            ("retried", boom),
            ("dead_lettered", boom),
            ("released", None),
        ):
            pair = []
            for side in (c_side, py_side):
                ctx = ctx_of(kind)
                ctx.trace = tracing.process("jobs", event, 2, True)
                if error is None:
                    side.end(ctx, 0.25, outcome)
                else:
                    side.end(ctx, 0.25, outcome, error)
                assert otel_trace.get_current_span() is before
                pair.append(ctx.trace.span)
            ended.append((pair[0], pair[1]))
        for side in (c_side, py_side):  # no span: only the metrics
            side.end(ctx_of(kind), 0.5, "processed")
    for a, b in ended:
        assert a.values == b.values and a.layout is b.layout
        assert (a.detailed, a.end_time >= a.start_time) == (b.detailed, True)
    assert [s.values[3] for s, _ in ended[:4]] == [
        "processed",
        "retried",
        "dead_lettered",
        "released",
    ]
    tracing.flush()
    spans = exporter.get_finished_spans()
    assert len(spans) == 16
    assert [s.status.status_code for s in spans[0::2]] == [
        s.status.status_code for s in spans[1::2]
    ]
    assert [len(s.events) for s in spans[0::2]] == [len(s.events) for s in spans[1::2]]
    assert c_metrics.processed == py_metrics.processed == {"job.queued": 4}
    assert c_metrics.failed == py_metrics.failed and c_metrics.retried == py_metrics.retried
    assert c_metrics.duration.counts == py_metrics.duration.counts
    with pytest.raises(TypeError):
        c_side.end(ctx_of("context"))


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9]{0,19}", fullmatch=True).filter(
            lambda name: name not in {"id", "source", "type", "time", "subject", "data"}
        ),
        st.one_of(st.text(max_size=10), st.integers(-5, 5), st.booleans()),
        max_size=4,
    ),
    st.sampled_from(["", "vendor=x", "a=1,b=2"]),
    st.integers(1, (1 << 128) - 1),
    st.integers(1, (1 << 64) - 1),
)
def test_the_c_traced_copy_is_what_with_extensions_makes(
    extensions: dict[str, Any], tracestate: str, trace_id: int, span_id: int
) -> None:
    from nerve.event import Event
    from nerve.observe import tracing

    require_speedups()
    assert otlp.speedups is not None and tracing._traced_copy is not None
    event = Event(
        type="job.queued", source="/jobs", subject="s", data={"n": 1}, extensions=extensions
    )
    traceparent = otlp.traceparent(trace_id, span_id, 1)
    copy = tracing._traced_copy(event, traceparent, tracestate)
    expected = event.with_extensions(traceparent=traceparent, tracestate=tracestate or None)
    if not tracestate and "tracestate" in extensions:
        expected = event.with_extensions(traceparent=traceparent)
    assert type(copy) is Event
    assert copy == expected
    assert list(copy.extensions.items()) == list(expected.extensions.items())
    assert event.extensions == extensions  # the original is untouched
    with pytest.raises(AttributeError):
        copy.id = "x"  # type: ignore[misc]
    span = otlp.Span()
    span.trace_id, span.span_id, span.flags = trace_id, span_id, 1
    assert otlp.speedups.span_traceparent(span) == traceparent


def test_the_c_traced_copy_takes_only_the_event_class() -> None:
    from dataclasses import dataclass

    from nerve.event import Event
    from nerve.observe import tracing

    require_speedups()
    assert otlp.speedups is not None and tracing._traced_copy is not None

    @dataclass(frozen=True, slots=True, kw_only=True, init=False)
    class Tagged(Event):
        pass

    tagged = Tagged(type="job.queued", source="/jobs")
    with pytest.raises(TypeError):
        tracing._traced_copy(tagged, "x", "")  # a subclass: with_extensions copies it

    class Unslotted:
        __slots__ = ("a",)

    with pytest.raises(TypeError, match="slots"):
        otlp.speedups.register_event(Unslotted)


def test_c_create_spans_are_what_python_makes_and_join_the_trace() -> None:
    """``Tracing.create`` and a traced batch publish (C: start, end and traceparent of
    the create span, the event copied with it) against the Python way."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from nerve.observe.tracing import Tracing, _parent_of

    require_speedups()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    assert tracing._native is not None
    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    handle = tracing.start_process(
        "jobs",
        jobs.make_event(
            Job(n=0), extensions={"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "k=v"}
        ),
        1,
    )
    native = handle.emitting("job.queued")
    assert set(native) == {"traceparent", "tracestate"} and native["tracestate"] == "k=v"
    native_parent = _parent_of(jobs.make_event(Job(n=1), extensions=native))
    assert native_parent is not None
    assert native_parent[0] == int(TRACE, 16)  # the handler's trace
    events = [jobs.make_event(Job(n=i), extensions={"correlationid": f"c{i}"}) for i in range(3)]
    traced, publish = tracing.start_publish(events)
    publish.end()
    for before, after in zip(events, traced, strict=True):
        assert after.id == before.id and after.data == before.data
        assert after.extensions["correlationid"] == before.extensions["correlationid"]
        assert _parent_of(after) is not None
    tracing.flush()
    spans = exporter.get_finished_spans()
    creates = [s for s in spans if s.name == "create job.queued"]
    assert len(creates) == 4
    assert creates[0].parent is not None and creates[0].parent.span_id == handle.span.span_id
    by_span = {s.context.span_id: s for s in creates}
    for event in traced:
        parent = _parent_of(event)
        assert parent is not None and parent[1] in by_span  # its create span was exported
        span = by_span[parent[1]]
        assert span.end_time is not None and span.end_time >= span.start_time
    (batch,) = [s for s in spans if s.name == "publish"]
    assert [link.context.span_id for link in batch.links] == [_parent_of(e)[1] for e in traced]  # type: ignore[index]
