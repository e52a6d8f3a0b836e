"""nerve's span pipeline (nerve.observe.otlp): the OTLP bytes it writes by hand are the
message OpenTelemetry's own encoder makes; sampling decides as the SDK's samplers do;
OTEL_* configuration exports through the OTLP/HTTP exporter's client."""

from __future__ import annotations

import http.server
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel

from nerve import App, Context, Runtime
from nerve.observe import otlp
from nerve.observe.tracing import tracing_from_env

RESOURCE = Resource.create({"service.name": "shop", "deployment.environment": "test"})


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
        ("", None),
    ],
)
def test_the_traceparent_an_event_carries(traceparent: str, expected: otlp.Parent | None) -> None:
    from nerve.observe.tracing import _parent_of

    jobs = App("jobs")
    jobs.event("job.queued")(Job)
    event = jobs.make_event(Job(n=1), extensions={"traceparent": traceparent})
    assert _parent_of(event) == expected
    with_state = event.with_extensions(tracestate="b=2, a=1")
    if expected is not None:
        assert _parent_of(with_state) == (*expected[:3], "b=2,a=1", True)
