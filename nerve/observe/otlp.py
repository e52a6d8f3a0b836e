"""nerve's span pipeline: spans recorded as plain objects on the event loop, sampled as
the provider's sampler says, and exported in batches from one background thread.

Why not the OpenTelemetry SDK's own ``Span`` and ``BatchSpanProcessor``: the SDK spends
about 35 µs of CPU to start and end a span (locks, bounded attribute mappings, the
sampler called through contexts) and its OTLP encoder about 50 µs to encode it
(a protobuf message object per span, attribute and value), against about 60-80 µs for
nerve's whole per-event pipeline. Here a span is a small object filled in on the
event-loop thread (ids from :func:`random.getrandbits`, times from
:func:`time.time_ns`) and appended to a queue; the export thread turns a batch of them
into what its destination takes:

- the OTLP/HTTP protobuf exporter nerve built from the ``OTEL_*`` variables: a span is
  written by :class:`OtlpEncoder` (protobuf wire format by hand, the fields that repeat
  cached as bytes) as it ends, and the queue holds its bytes; the export thread joins a
  batch of them into the request body and posts it with the exporter's own HTTP
  client, so endpoint, headers, compression, TLS and timeouts are the exporter's;
- any other exporter (``console``, ``otlp`` over gRPC): SDK ``ReadableSpan`` objects,
  through the exporter's ``export``;
- a tracer provider installed by someone else (``opentelemetry-instrument``, a test's
  provider with an in-memory exporter): ``ReadableSpan`` objects handed to the
  provider's span processors as spans that ended (``on_end``; ``on_start`` is not
  called).

Sampling follows the provider's sampler: the samplers ``OTEL_TRACES_SAMPLER`` names
(``parentbased_*``, ``always_*``, ``traceidratio``) are decided in a few operations,
any other sampler is called as OpenTelemetry calls it.
"""

from __future__ import annotations

import collections
import http.client
import logging
import os
import random
import struct
import threading
import time
import traceback
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation import set_span_in_context

from nerve._native import speedups

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.util.types import Attributes, AttributeValue

__all__ = [
    "CONSUMER",
    "INTERNAL",
    "PRODUCER",
    "OtlpEncoder",
    "Parent",
    "Pipeline",
    "Sampling",
    "Span",
    "SpanRecorder",
]

log = logging.getLogger("nerve.observe")

Parent = tuple[int, int, int, str, bool]
"""A parent span context: (trace id, span id, trace flags, tracestate header, remote)."""

LinkData = tuple[int, int, int, str, bool, "Mapping[str, Any] | None"]
"""A link: (trace id, span id, trace flags, tracestate header, remote, attributes)."""

INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
"""Span kinds as OTLP numbers them (``opentelemetry.trace.SpanKind``'s value + 1)."""

_EMPTY = otel_context.Context()


_encode_spans: Callable[..., list[bytes]] | None = (
    None if speedups is None else speedups.encode_spans
)
"""Writes a batch of spans, those not detailed in C (None: the compiled Python
encoders)."""
_getrandbits = random.getrandbits
_time_ns = time.time_ns


class Layout:
    """What every span of one sort shares: its name and kind, its constant attributes,
    and the keys of the attributes each span gives a value of its own (a value None
    leaves the attribute out). Encoded to OTLP once; a span keeps only its values."""

    __slots__ = ("constant", "encode", "encoded", "head", "keys", "kind", "name", "prefixes")

    def __init__(
        self, name: str, kind: int, constant: Mapping[str, Any], keys: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.kind = kind
        self.constant = dict(constant)
        self.keys = tuple(keys)
        head = _field(b"\x2a", name.encode()) + _KIND[kind]
        for key, value in self.constant.items():
            encoded = _key_value(key, value)
            if encoded:
                head += _field(b"\x4a", encoded)
        self.head = head
        """Span fields name (5) and kind (6), and the constant attributes (9)."""
        self.prefixes = tuple(_field(b"\x0a", key.encode()) + b"\x12" for key in self.keys)
        """Per key: the start of its KeyValue, up to the value's length."""
        self.encode: Callable[[Span, Callable[[bytes], None]], None] | None = None
        """Appends this sort's spans as OTLP parts (when not ``detailed``): made by the
        encoder once ``encoded`` spans of it were written the general way."""
        self.encoded = 0

    def attributes(self, values: Sequence[Any]) -> dict[str, Any]:
        merged = dict(self.constant)
        for key, value in zip(self.keys, values, strict=True):
            if value is not None:
                merged[key] = value
        return merged


class _Fields:
    """The fields of one span, with their defaults: the pure-Python stand-in of
    ``_speedups.SpanFields`` (the same fields in a C struct), the base of :class:`Span`.
    Set for every span by :meth:`SpanRecorder.start`, but for the defaults of a span
    that has no parent, links or tracestate."""

    trace_id = 0
    span_id = 0
    flags = 0
    start_time = 0
    end_time = 0
    parent_id = 0
    remote = False
    """The parent's context came from another process."""
    recorder: SpanRecorder | None = None
    """Where the span goes when it ends; None: not sampled, nothing is recorded."""
    layout: Layout | None = None
    """None once an attribute of the layout was changed: all are then in extra."""
    values: Sequence[Any] = ()
    state = ""
    """The W3C tracestate header it carries ("" for none)."""
    detailed = False
    """It has more than its layout's values, ids and links: a tracestate, events, a
    status or attributes of its own (set by whatever adds them; the encoder writes a
    span that is not detailed from its layout's template, and in C the links it was
    started with, those without attributes)."""
    links: list[LinkData] | None = None


if TYPE_CHECKING:
    _SpanBase = _Fields
else:
    _SpanBase = _Fields if speedups is None else speedups.SpanFields


class Span(_SpanBase, trace.Span):
    """One of nerve's spans: plain fields, filled in on the event-loop thread.

    It is an OpenTelemetry ``Span`` (set it as the current span and the spans that
    instrumented libraries make in a handler join the trace; ``set_attribute``,
    ``add_event``, ``record_exception``, ``set_status`` work as usual), but it is only
    recorded: it becomes an SDK span or OTLP bytes in the export thread, after it ended.

    Its attributes are its ``layout``'s (constant ones, and ``values`` for the layout's
    keys) and then ``extra`` ones; :attr:`attributes` shows them all.
    """

    # Defaults for what most spans never set: only what differs is stored per span.
    _context: SpanContext | None = None
    _name = ""
    _kind = INTERNAL
    extra: dict[str, Any] | None = None
    """Attributes set on the span beyond its layout's."""
    events: list[tuple[str, int, Mapping[str, Any]]] | None = None
    status: Status | None = None

    @property
    def name(self) -> str:
        layout = self.layout
        return self._name if layout is None else layout.name

    @property
    def kind(self) -> int:
        """The OTLP ``SpanKind`` number: 1 internal, 2 server, 3 client, 4 producer,
        5 consumer (``opentelemetry.trace.SpanKind`` value + 1)."""
        layout = self.layout
        return self._kind if layout is None else layout.kind

    @property
    def attributes(self) -> dict[str, Any]:
        """All of the span's attributes (a copy: change them with set_attribute)."""
        layout = self.layout
        merged = {} if layout is None else layout.attributes(self.values)
        if self.extra:
            merged.update(self.extra)
        return merged

    @property
    def traceparent(self) -> str:
        """This span's W3C ``traceparent``."""
        if speedups is not None:
            return speedups.span_traceparent(self)  # type: ignore[no-any-return]
        return traceparent(self.trace_id, self.span_id, self.flags)

    def as_parent(self) -> Parent:
        return (self.trace_id, self.span_id, self.flags, self.state, False)

    def _unlay(self) -> None:
        """Move the layout's attributes into extra (before one of them changes)."""
        layout = self.layout
        if layout is not None:
            self.extra = self.attributes
            self.detailed = True
            self._name = layout.name
            self._kind = layout.kind
            self.layout = None

    # -- the OpenTelemetry Span API --------------------------------------------------

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self.trace_id,
                self.span_id,
                is_remote=False,
                trace_flags=TraceFlags(self.flags),
                trace_state=TraceState.from_header([self.state]) if self.state else None,
            )
        return context

    def is_recording(self) -> bool:
        return self.recorder is not None and not self.end_time

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.recorder is None or self.end_time:
            return
        layout = self.layout
        if layout is not None and (key in layout.constant or key in layout.keys):
            self._unlay()
        if self.extra is None:
            self.extra = {}
            self.detailed = True
        self.extra[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.recorder is None or self.end_time:
            return
        if self.events is None:
            self.events = []
            self.detailed = True
        self.events.append((name, timestamp or _time_ns(), dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self.recorder is None or self.end_time or not context.is_valid:
            return
        if self.links is None:
            self.links = []
        state = context.trace_state.to_header() if context.trace_state else ""
        link = (context.trace_id, context.span_id, int(context.trace_flags), state)
        self.links.append((*link, context.is_remote, dict(attributes) if attributes else None))

    def update_name(self, name: str) -> None:
        if self.recorder is not None and not self.end_time:
            self._unlay()
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.recorder is None or self.end_time:
            return
        if self.status is not None and self.status.status_code is StatusCode.OK:
            return  # OK is final, as in the SDK
        if isinstance(status, StatusCode):
            status = Status(status, description)
        self.status = status
        self.detailed = True

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An ``exception`` event, with the attributes the SDK gives it."""
        if self.recorder is None or self.end_time:
            return
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        values: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            values.update(attributes)
        self.add_event("exception", values, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time:
            return
        self.end_time = end_time or _time_ns()
        recorder = self.recorder
        if recorder is not None:
            recorder.add(self)


def traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The W3C ``traceparent`` of a span context (version 00). ``to_bytes().hex()``:
    half the cost of ``f"{trace_id:032x}"``, which parses its format spec every time;
    this runs for every event a traced producer publishes."""
    return "".join(
        (
            "00-",
            trace_id.to_bytes(16).hex(),
            "-",
            span_id.to_bytes(8).hex(),
            _FLAGS_HEX[flags & 0xFF],
        )
    )


_FLAGS_HEX = tuple(f"-{n:02x}" for n in range(256))


_new_span = Span.__new__
_start_span: Callable[..., Span] | None = None if speedups is None else speedups.start_span
"""Starts a span in :meth:`SpanRecorder.start`'s shortest way, in C (None: in Python)."""


# ---------------------------------------------------------------------------------------
# Sampling

_TRACE_ID_LIMIT = (1 << 64) - 1
_Rule = bool | int | None
"""True/False: always/never; an int: sampled when the trace id's low 64 bits are below
it (TraceIdRatioBased); None: ask the sampler."""


def _rule_of(sampler: Any) -> _Rule:
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        StaticSampler,
        TraceIdRatioBased,
    )

    decide = type(sampler).should_sample
    if isinstance(sampler, StaticSampler) and decide is StaticSampler.should_sample:
        return bool(sampler._decision is Decision.RECORD_AND_SAMPLE)
    if isinstance(sampler, TraceIdRatioBased) and decide is TraceIdRatioBased.should_sample:
        return int(sampler.bound)
    return None


class Sampling:
    """The decision of ``sampler`` for a new span, without building contexts for the
    samplers the SDK makes from ``OTEL_TRACES_SAMPLER``."""

    __slots__ = (
        "_local_not",
        "_local_sampled",
        "_remote_not",
        "_remote_sampled",
        "_root",
        "sampler",
    )

    def __init__(self, sampler: Sampler) -> None:
        from opentelemetry.sdk.trace.sampling import ParentBased

        self.sampler = sampler
        rule = _rule_of(sampler)
        self._root = self._remote_sampled = self._remote_not = rule
        self._local_sampled = self._local_not = rule
        if (
            isinstance(sampler, ParentBased)
            and type(sampler).should_sample is ParentBased.should_sample
        ):
            try:
                self._root = _rule_of(sampler._root)
                self._remote_sampled = _rule_of(sampler._remote_parent_sampled)
                self._remote_not = _rule_of(sampler._remote_parent_not_sampled)
                self._local_sampled = _rule_of(sampler._local_parent_sampled)
                self._local_not = _rule_of(sampler._local_parent_not_sampled)
            except AttributeError:  # another SDK version: ask the sampler every time
                self._root = self._remote_sampled = self._remote_not = None
                self._local_sampled = self._local_not = None

    def follows_parent(self) -> bool:
        """The sampler is ``parentbased_always_on`` (the SDK's default): a root span is
        sampled, a child exactly when its parent is."""
        return (
            self._root is True
            and self._remote_sampled is True
            and self._local_sampled is True
            and self._remote_not is False
            and self._local_not is False
        )

    def rule(self, parent: Parent | None) -> _Rule:
        if parent is None:
            return self._root
        if parent[4]:
            return self._remote_sampled if parent[2] & 1 else self._remote_not
        return self._local_sampled if parent[2] & 1 else self._local_not

    def sampled(
        self,
        parent: Parent | None,
        trace_id: int,
        name: str,
        kind: int,
        attributes: Mapping[str, Any],
        links: Sequence[LinkData] | None,
    ) -> bool:
        rule = self.rule(parent)
        if rule is True or rule is False:
            return rule
        if rule is not None:
            return trace_id & _TRACE_ID_LIMIT < rule
        return self.ask(parent, trace_id, name, kind, attributes, links)

    def ask(
        self,
        parent: Parent | None,
        trace_id: int,
        name: str,
        kind: int,
        attributes: Mapping[str, Any],
        links: Sequence[LinkData] | None,
    ) -> bool:
        """The sampler's own decision, asked as OpenTelemetry asks it."""
        context = (
            _EMPTY
            if parent is None
            else set_span_in_context(NonRecordingSpan(span_context(parent)), _EMPTY)
        )
        result = self.sampler.should_sample(
            context,
            trace_id,
            name,
            SpanKind(kind - 1),
            attributes,
            [Link(span_context(link), link[5]) for link in links or ()],
        )
        from opentelemetry.sdk.trace.sampling import Decision

        return result.decision is Decision.RECORD_AND_SAMPLE


def span_context(parent: Parent | LinkData) -> SpanContext:
    """The OpenTelemetry ``SpanContext`` of a parent (or link) tuple."""
    return SpanContext(
        parent[0],
        parent[1],
        is_remote=parent[4],
        trace_flags=TraceFlags(parent[2] & 0xFF),
        trace_state=TraceState.from_header([parent[3]]) if parent[3] else None,
    )


# ---------------------------------------------------------------------------------------
# Recording


class SpanRecorder:
    """Starts nerve's spans: ids, sampling, the clock; ended spans go to ``pipeline``."""

    __slots__ = (
        "_native",
        "_plain",
        "_random",
        "_span_id",
        "_trace_id",
        "add",
        "pipeline",
        "sampling",
    )

    def __init__(self, pipeline: Pipeline, sampling: Sampling, id_generator: Any = None) -> None:
        self.pipeline = pipeline
        self.add = pipeline.add
        self.sampling = sampling
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self._random = id_generator is None or type(id_generator) is RandomIdGenerator
        """The SDK's default ids: random.getrandbits, called here directly."""
        self._trace_id: Callable[[], int] = getattr(id_generator, "generate_trace_id", int)
        self._span_id: Callable[[], int] = getattr(id_generator, "generate_span_id", int)
        self._plain = self._random and sampling.follows_parent()
        """The SDK's defaults (random ids, ``parentbased_always_on``): a span is sampled
        when its parent is, and a root always; :meth:`start` takes a shorter way."""
        self._native = self._plain and _start_span is not None
        """That shorter way is ``_speedups.start_span``, in C."""

    def start(
        self,
        layout: Layout,
        parent: Parent | None,
        values: Sequence[Any] = (),
        links: list[LinkData] | None = None,
    ) -> Span:
        """A started span: a child of ``parent``, or the root of a new trace. (Written
        out in one function: it runs for every span.)"""
        if self._native:
            return _start_span(Span, self, layout, parent, values, links)  # type: ignore[misc]
        random_ids = self._random
        if self._plain:  # the defaults: sampled as the parent is, no rule to look up
            if parent is None:
                trace_id = _getrandbits(128) or 1
                sampled: bool | int = True
            else:
                trace_id = parent[0]
                sampled = parent[2] & 1
        else:
            sampling = self.sampling
            if parent is None:
                trace_id = (_getrandbits(128) or 1) if random_ids else self._trace_id()
                rule = sampling._root
            else:
                trace_id = parent[0]
                if parent[4]:
                    rule = sampling._remote_sampled if parent[2] & 1 else sampling._remote_not
                else:
                    rule = sampling._local_sampled if parent[2] & 1 else sampling._local_not
            if rule is True:
                sampled = True
            elif rule is False:
                sampled = False
            elif rule is None:
                attributes = layout.attributes(values)
                sampled = sampling.ask(
                    parent, trace_id, layout.name, layout.kind, attributes, links
                )
            else:
                sampled = trace_id & _TRACE_ID_LIMIT < rule
        span: Span = _new_span(Span)
        if sampled:
            span.recorder = self
            span.flags = 1
        else:
            span.recorder = None
            span.flags = 0
        span.layout = layout
        span.values = values
        span.trace_id = trace_id
        span.span_id = (_getrandbits(64) or 1) if random_ids else self._span_id()
        if parent is not None:
            span.parent_id = parent[1]
            if parent[3]:
                span.state = parent[3]
                span.detailed = True
            span.remote = parent[4]
        if links:
            span.links = links  # not detailed: the C encoder writes links without attributes
        span.start_time = _time_ns()
        return span


# ---------------------------------------------------------------------------------------
# Batching and the export thread


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


class Pipeline:
    """Ended spans wait in a queue; one daemon thread exports them in batches, every
    ``OTEL_BSP_SCHEDULE_DELAY`` ms or as soon as ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``
    wait. A full queue (``OTEL_BSP_MAX_QUEUE_SIZE``) drops new spans, and counts them.

    With ``write`` (the OTLP/HTTP exporter's: :meth:`OtlpEncoder.writer`), a span is
    written as it ends, by the thread that ends it, and the queue holds its bytes: the
    span object is gone at once instead of waiting for its batch, and the export thread
    touches no span (it joins bytes and posts them). ``export`` then takes bytes."""

    def __init__(
        self,
        export: Callable[[list[Any]], None],
        *,
        shutdown: Callable[[], None] | None = None,
        write: Callable[[Span], bytes] | None = None,
    ) -> None:
        self._export = export
        self._shutdown_export = shutdown
        self._write = write
        self.unwritten = 0
        """Spans ``write`` refused: dropped (the first one logged)."""
        self._queue: collections.deque[Any] = collections.deque()
        self.max_queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch = min(_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self.max_queue)
        self.delay = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.dropped = 0
        self._closed = False
        self._reset()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_fork() -> None:  # the thread did not survive the fork
                pipeline = ref()
                if pipeline is not None:
                    pipeline._reset()

            os.register_at_fork(after_in_child=after_fork)

    def _reset(self) -> None:
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._check = 1
        """Queue length at which :meth:`add` looks further: 1 until the thread runs."""

    def add(self, span: Span) -> None:
        queue = self._queue
        write = self._write
        if write is None:
            queue.append(span)
        else:
            try:
                queue.append(write(span))
            except Exception:  # one span lost, not the batch it would have joined
                if not self.unwritten:  # logged once, as a full queue is; all are counted
                    log.exception(
                        "tracing: span %r cannot be written as OTLP; dropped (so are later "
                        "ones that cannot: Pipeline.unwritten counts them)",
                        span.name,
                    )
                self.unwritten += 1
                return
        if len(queue) >= self._check:
            self._more()

    def _more(self) -> None:
        """The queue is long (or the thread not started): wake the thread, or drop."""
        if self._thread is None:
            self._start()
            self._check = self.batch
        queue = self._queue
        if len(queue) > self.max_queue:
            queue.pop()
            if not self.dropped:
                log.warning(
                    "tracing: the span queue is full (%d); dropping spans (raise "
                    "OTEL_BSP_MAX_QUEUE_SIZE, or sample with OTEL_TRACES_SAMPLER)",
                    self.max_queue,
                )
            self.dropped += 1
        if not self._wake.is_set():
            self._wake.set()
        # the thread is woken: look again a batch later, not at every span until it runs
        self._check = min(len(queue) + self.batch, self.max_queue + 1)

    def _start(self) -> None:
        if self._closed:
            self._thread = threading.current_thread()  # shut down: no thread any more
            return
        self._thread = threading.Thread(target=self._run, name="nerve-spans", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wake = self._wake
        while not self._closed:
            woken = wake.wait(self.delay)
            wake.clear()
            # woken: a full batch waits; export full batches only (the rest joins the
            # next one: one request per OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans, not one
            # more for the few that came meanwhile); the delay passed: export all
            self._send(whole=not woken)
            self._check = self.batch

    def flush(self) -> None:
        """Export every span queued so far (in the calling thread)."""
        self._send(whole=True)

    def _send(self, whole: bool) -> None:
        queue = self._queue
        size = self.batch
        popleft = queue.popleft
        with self._lock:
            while len(queue) >= (1 if whole else size):
                batch = [popleft() for _ in range(min(len(queue), size))]
                try:
                    self._export(batch)
                except Exception:
                    log.exception("tracing: exporting %d spans failed", len(batch))

    def shutdown(self) -> None:
        """Export what is queued, stop the thread, shut the exporter down."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)
        self.flush()
        if self._shutdown_export is not None:
            self._shutdown_export()
            self._shutdown_export = None


# ---------------------------------------------------------------------------------------
# Destinations: SDK spans for exporters and span processors


class SdkSpans:
    """Turns nerve's spans into SDK ``ReadableSpan`` objects."""

    def __init__(self, resource: Resource, version: str) -> None:
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.resource = resource
        self.scope = InstrumentationScope("nerve", version)

    def readable(self, span: Span) -> ReadableSpan:
        from opentelemetry.sdk.trace import Event as SdkEvent
        from opentelemetry.sdk.trace import ReadableSpan

        state = TraceState.from_header([span.state]) if span.state else None
        context = SpanContext(span.trace_id, span.span_id, False, TraceFlags(span.flags), state)
        parent = None
        if span.parent_id:
            parent = SpanContext(
                span.trace_id, span.parent_id, span.remote, TraceFlags(span.flags), state
            )
        return ReadableSpan(
            name=span.name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=span.attributes,
            events=[SdkEvent(n, a, t) for n, t, a in span.events or ()],
            links=[Link(span_context(link), link[5]) for link in span.links or ()],
            kind=SpanKind(span.kind - 1),
            status=span.status or Status(StatusCode.UNSET),
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=self.scope,
        )


def otlp_http_sink(
    exporter: SpanExporter, resource: Resource, version: str
) -> tuple[Callable[[list[bytes]], None], OtlpEncoder] | None:
    """For the OTLP/HTTP protobuf exporter: what posts spans already written (their
    ``ScopeSpans.spans`` fields, as :meth:`OtlpEncoder.spans` or its ``writer`` make
    them) through the exporter's own HTTP client, and the encoder that writes them.
    None for any other exporter."""
    client = getattr(exporter, "_client", None)
    if not _is_otlp_http(exporter) or not callable(getattr(client, "export", None)):
        return None
    encoder = OtlpEncoder(resource, version)
    assert client is not None
    _keep_alive(client)

    def post(parts: list[bytes]) -> None:
        result = client.export(encoder.request_of(parts))
        if not getattr(result, "success", True):
            log.warning(
                "tracing: the OTLP endpoint refused %d spans: %s",
                len(parts),
                getattr(result, "error", None) or getattr(result, "status_code", "?"),
            )

    return post, encoder


def exporter_sink(
    exporter: SpanExporter, resource: Resource, version: str
) -> Callable[[list[Span]], None]:
    """Where a batch of spans goes for ``exporter``: OTLP bytes posted by its own HTTP
    client when it is the OTLP/HTTP protobuf exporter, SDK spans through ``export``
    else."""
    http = otlp_http_sink(exporter, resource, version)
    if http is not None:
        post, encoder = http

        def post_spans(batch: list[Span]) -> None:
            post(encoder.spans(batch))

        return post_spans
    sdk = SdkSpans(resource, version)

    def export(batch: list[Span]) -> None:
        exporter.export([sdk.readable(s) for s in batch])

    return export


class _Response:
    """What the OTLP exporter's client reads of a response (``BaseHTTPResult``)."""

    __slots__ = ("_content", "_headers", "error", "reason", "status_code")

    def __init__(
        self,
        status_code: int | None,
        reason: str | None,
        error: Exception | None = None,
        content: bytes = b"",
        headers: Any = None,
    ) -> None:
        self.status_code = status_code
        self.reason = reason
        self.error = error
        self._content = content
        self._headers = headers or {}

    def content(self) -> bytes:
        return self._content

    def text(self) -> str:
        return self._content.decode("utf-8")

    def headers(self) -> Any:
        """The response headers (``http.client``'s message: ``get`` is case-insensitive)."""
        return self._headers


class KeptAliveHttp:
    """The OTLP/HTTP exporter's transport for a plain ``http://`` endpoint: one
    ``http.client`` connection, kept alive, instead of a ``requests`` session, which
    spends about five times the CPU per request (a third of it reading proxy settings
    from the environment). The exporter's client still does the rest: headers,
    compression, timeouts and retries (a request that fails on a connection a collector
    closed is retried once at once, on a new one, as with ``requests``).

    Used only where ``requests`` would have sent the request straight to the endpoint:
    no proxy for it in the environment, no ``.netrc`` entry, the exporter's own plain
    session (see :func:`_keep_alive`)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None
        self._url = ""
        self._path = "/"
        self._address: tuple[str, int] = ("", 80)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> _Response:
        if url != self._url:
            self.close()
            parts = urllib.parse.urlsplit(url)
            self._address = (parts.hostname or "localhost", parts.port or 80)
            self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self._url = url
        timeout = self._timeout if timeout is None else timeout
        connection = self._connection
        if connection is None:
            connection = self._connection = http.client.HTTPConnection(*self._address)
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        try:
            connection.request(method, self._path, body=data, headers=headers or {})
            response = connection.getresponse()
            content = response.read()
        except Exception as error:
            self.close()
            return _Response(None, None, error)
        if response.will_close:
            self.close()
        return _Response(response.status, response.reason, None, content, response.headers)

    def is_connection_error(self, error: Exception | None) -> bool:
        return isinstance(error, OSError | http.client.HTTPException)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _keep_alive(client: Any) -> bool:
    """Give the OTLP/HTTP exporter's ``client`` a :class:`KeptAliveHttp` transport when
    its requests would go straight to a plain ``http://`` endpoint; else (``https``,
    a proxy, credentials, a session of one's own, another exporter version) leave its
    transport as it is. True when it did."""
    endpoint = getattr(client, "_endpoint", None)
    transport = getattr(client, "_transport", None)
    session = getattr(transport, "_session", None)
    if (
        type(transport).__name__ != "RequestsHTTPTransport"
        or not isinstance(endpoint, str)
        or urllib.parse.urlsplit(endpoint).scheme != "http"
        or not isinstance(getattr(client, "_timeout", None), int | float)
    ):
        return False
    try:
        import requests
        import requests.utils
    except ImportError:
        return False
    if (
        type(session) is not requests.Session
        or session.auth is not None
        or session.proxies
        or session.cert
        or not session.trust_env  # a session set up by hand: its own way
        or requests.utils.get_environ_proxies(endpoint)
        or requests.utils.get_netrc_auth(endpoint)
    ):
        return False
    assert transport is not None
    client._transport = KeptAliveHttp(client._timeout)
    transport.close()
    return True


def _is_otlp_http(exporter: Any) -> bool:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        return False
    return type(exporter) is OTLPSpanExporter


def processor_sink(provider: Any, version: str) -> Callable[[list[Span]], None]:
    """Where a batch goes for an SDK tracer provider set up by someone else: its span
    processors, as ended spans."""
    sdk = SdkSpans(provider.resource, version)

    def to_processors(batch: list[Span]) -> None:
        processor = provider._active_span_processor
        for span in batch:
            processor.on_end(sdk.readable(span))

    return to_processors


# ---------------------------------------------------------------------------------------
# OTLP protobuf, written by hand
#
# ExportTraceServiceRequest{1: ResourceSpans{1: Resource, 2: ScopeSpans{1: scope,
# 2: Span...}}}; Span{1 trace_id, 2 span_id, 3 trace_state, 4 parent_span_id, 5 name,
# 6 kind, 7 start fixed64, 8 end fixed64, 9 attributes, 11 events, 13 links, 15 status,
# 16 flags fixed32}; KeyValue{1 key, 2 AnyValue{1 str, 2 bool, 3 int, 4 double,
# 5 ArrayValue{1 AnyValue...}}}; Event{1 time fixed64, 2 name, 3 attributes};
# Link{1 trace_id, 2 span_id, 3 trace_state, 4 attributes, 6 flags fixed32};
# Status{2 message, 3 code}.

_pack_times = struct.Struct("<BQBQ").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack
_pack_ids = struct.Struct(">HQQHQ").pack
_pack_ids_parent = struct.Struct(">HQQHQHQ").pack
_LOW64 = (1 << 64) - 1
_TRACE_TAG = 0x0A10 << 128
_SPAN_TAG = 0x1208 << 64
_PARENT_TAG = 0x2208 << 64
"""Tags and lengths of Span.trace_id, span_id and parent_span_id, placed so that
``((trace_id | _TRACE_TAG) << 80 | _SPAN_TAG | span_id).to_bytes(28)`` writes both."""
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_LOCAL_PARENT = b"\x7a\x00\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE)
"""An unset status, then ``Span.flags``: the parent (if any) is local."""
_REMOTE_PARENT = b"\x7a\x00\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
_KIND = [bytes((0x30, kind)) for kind in range(6)]
_UNCACHED = frozenset(
    {
        "messaging.message.id",
        "messaging.message.conversation_id",
        "exception.message",
        "exception.stacktrace",
    }
)
_CACHE_MAX = 4096


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes | None:
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if kind is float:
        return b"\x21" + _pack_double(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items = [_any_value(v) for v in value]
        if any(i is None for i in items):
            return None
        return _field(b"\x2a", b"".join(_field(b"\x0a", i) for i in items))  # type: ignore[arg-type]
    return None  # not an attribute value: dropped, as the SDK drops it


def _key_value(key: str, value: Any) -> bytes:
    encoded = _any_value(value)
    if encoded is None:
        return b""
    return _field(b"\x0a", key.encode()) + _field(b"\x12", encoded)


def _trace_state(header: str) -> str:
    """The tracestate as the SDK's encoder writes it (``key=value`` joined by ``,``)."""
    return ",".join(f"{k}={v}" for k, v in TraceState.from_header([header]).items())


class OtlpEncoder:
    """An OTLP ``ExportTraceServiceRequest`` (protobuf) for a batch of nerve's spans,
    the same message the OpenTelemetry exporter would send for them as SDK spans.

    It runs in the export thread, about 2-4 µs a span: what repeats (names, the
    attributes whose values repeat, tracestate) is cached as encoded bytes."""

    def __init__(self, resource: Resource, version: str) -> None:
        attributes = b"".join(
            _field(b"\x0a", kv)
            for kv in (_key_value(k, v) for k, v in resource.attributes.items())
            if kv
        )
        scope = _field(b"\x0a", b"nerve") + _field(b"\x12", version.encode())
        self._resource = _field(b"\x0a", attributes)
        self._scope = _field(b"\x0a", scope)
        self._resource_schema = (
            _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
        )
        self._attributes: dict[tuple[str, Any], bytes] = {}
        """(key, str value) -> the encoded ``Span.attributes`` field."""
        self._others: dict[tuple[str, Any], bytes] = {}
        """(key, int value) -> the same, for int values (kept apart: 1 == True)."""
        self._keys: dict[str, bytes] = {}
        self._names: dict[str, bytes] = {}
        self._states: dict[str, bytes] = {}

    def request(self, spans: Iterable[Span]) -> bytes:
        """The request body, joined once (a batch is 100 KB or more: no copies of it
        on the way, only the lengths of its enclosing messages worked out)."""
        return self.request_of(self.spans(spans))

    def request_of(self, parts: list[bytes]) -> bytes:
        """The request body around spans already written (``ScopeSpans.spans``
        fields, as :meth:`spans` or :meth:`writer` write them)."""
        scope_spans = len(self._scope) + sum(map(len, parts))
        scope_head = b"\x12" + _varint(scope_spans)
        resource_spans = (
            len(self._resource) + len(scope_head) + scope_spans + len(self._resource_schema)
        )
        head = b"\x0a" + _varint(resource_spans)
        return b"".join(
            (head, self._resource, scope_head, self._scope, *parts, self._resource_schema)
        )

    def _attribute(self, key: str, value: Any) -> bytes:
        """The ``Span.attributes`` field of one attribute (after a miss in the cache of
        string values)."""
        kind = type(value)
        if kind is str:
            prefix = self._keys.get(key)
            if prefix is None:
                if len(self._keys) >= _CACHE_MAX:
                    self._keys.clear()
                prefix = self._keys[key] = _field(b"\x0a", key.encode()) + b"\x12"
            data = value.encode()
            encoded: bytes = _string_head(prefix, len(data)) + data
            if key not in _UNCACHED:
                cache = self._attributes
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[(key, value)] = encoded
            return encoded
        if kind is int:
            others = self._others
            found = others.get((key, value))
            if found is None:
                if len(others) >= _CACHE_MAX:
                    others.clear()
                found = others[(key, value)] = _field(b"\x4a", _key_value(key, value))
            return found
        encoded = _key_value(key, value)
        return _field(b"\x4a", encoded) if encoded else b""

    def _state(self, header: str) -> bytes:
        found = self._states.get(header)
        if found is None:
            if len(self._states) >= _CACHE_MAX:
                self._states.clear()
            found = self._states[header] = _field(b"\x1a", _trace_state(header).encode())
        return found

    def span(self, s: Span) -> bytes:
        """One span, as a ``ScopeSpans.spans`` field."""
        return b"".join(self.spans([s]))

    def writer(self) -> Callable[[Span], bytes]:
        """What writes one span as it ends, as :meth:`span` does: in C
        (``_speedups.SpanWriter``) where the speedups are built."""
        if _encode_spans is None or speedups is None:
            return self.span
        write: Callable[[Span], bytes] = speedups.SpanWriter(self._detailed, _other_value)
        return write

    def spans(self, batch: Iterable[Span]) -> list[bytes]:
        """Spans as ``ScopeSpans.spans`` fields, in parts to be joined (a span may be
        more than one). A span that is not ``detailed`` is written by its layout's
        encoder (see :func:`_compile`): ids, times and values joined with the constant
        parts of its layout, and its field's tag and length as a part of its own."""
        if _encode_spans is not None:  # the same loop, in C
            return _encode_spans(batch, self._detailed, _other_value)
        out: list[bytes] = []
        append = out.append
        detailed = self._detailed
        for s in batch:
            layout = s.layout
            if layout is None or s.detailed or s.links:
                append(detailed(s))
                continue
            encode = layout.encode
            if encode is None:  # a sort seen a few times only is not worth compiling
                append(detailed(s))
                layout.encoded += 1
                if layout.encoded >= _COMPILE_AFTER:
                    layout.encode = _compile(layout)
                continue
            encode(s, append)
        return out

    def _detailed(self, s: Span) -> bytes:
        """One span, whatever it holds, as a ``ScopeSpans.spans`` field."""
        trace_id = s.trace_id
        times = _pack_times(0x39, s.start_time, 0x41, s.end_time)
        if s.parent_id:
            ids = _pack_ids_parent(
                0x0A10,
                trace_id >> 64,
                trace_id & _LOW64,
                0x1208,
                s.span_id,
                0x2208,
                s.parent_id,
            )
            flags = _REMOTE_PARENT if s.remote else _LOCAL_PARENT
        else:
            ids = _pack_ids(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, s.span_id)
            flags = _LOCAL_PARENT
        if s.layout is not None:
            parts = [ids, times]  # the layout's head has the name and kind
        else:
            head = self._names.get(s.name)
            if head is None:
                if len(self._names) >= _CACHE_MAX:
                    self._names.clear()
                head = self._names[s.name] = _field(b"\x2a", s.name.encode())
            parts = [ids, times, head, _KIND[s.kind]]
        if s.state:
            parts.append(self._state(s.state))
        layout = s.layout
        if layout is not None:
            parts.append(layout.head)
            for prefix, value in zip(layout.prefixes, s.values, strict=True):
                if type(value) is str:
                    data = value.encode()
                    parts += (_string_head(prefix, len(data)), data)
                elif value is not None:
                    parts.append(_other_value(prefix, value))
        if s.extra:
            cache = self._attributes
            attribute = self._attribute
            for item in s.extra.items():
                try:
                    found = cache.get(item)
                except TypeError:  # a list value
                    found = None
                parts.append(attribute(*item) if found is None else found)
        if s.events:
            for event_name, when, values in s.events:
                body = b"\x09" + _pack_fixed64(when) + _field(b"\x12", event_name.encode())
                body += b"".join(_field(b"\x1a", _key_value(k, v)) for k, v in values.items())
                parts.append(_field(b"\x5a", body))
        if s.links:
            for trace_id, span_id, _, _, remote, link_values in s.links:
                # no trace_state: OpenTelemetry's encoder leaves it out of links too
                body = _pack_ids(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span_id)
                if link_values:
                    body += b"".join(
                        _field(b"\x22", _key_value(k, v)) for k, v in link_values.items()
                    )
                body += b"\x35" + _pack_fixed32(_HAS_IS_REMOTE | (_IS_REMOTE if remote else 0))
                parts.append(_field(b"\x6a", body))
        status = s.status
        if status is None:
            parts.append(flags)  # unset: an empty Status, as OpenTelemetry writes it
        else:
            body = b""
            if status.description:
                body += _field(b"\x12", status.description.encode())
            if status.status_code.value:
                body += b"\x18" + _varint(status.status_code.value)
            parts += (_field(b"\x7a", body), flags[2:])
        body = b"".join(parts)
        return _field(b"\x12", body)


_FLAGS = {False: _LOCAL_PARENT, True: _REMOTE_PARENT}
_SPAN_HEADERS: dict[int, bytes] = {}
"""A span's length -> its ``ScopeSpans.spans`` tag and length (span sizes repeat)."""


def _string_head(prefix: bytes, n: int) -> bytes:
    """A ``Span.attributes`` field of a string value of ``n`` bytes, up to the value."""
    any_value = 1 + len(_varint(n)) + n
    size = len(prefix) + len(_varint(any_value)) + any_value
    return b"\x4a" + _varint(size) + prefix + _varint(any_value) + b"\x0a" + _varint(n)


def _other_value(prefix: bytes, value: Any) -> bytes:
    """A ``Span.attributes`` field of any value but a string (b"" for none)."""
    if type(value) is int and 0 <= value < 0x80 and len(prefix) < 124:
        return b"\x4a%c%b\x02\x18%c" % (len(prefix) + 3, prefix, value)
    encoded = _any_value(value)
    if encoded is None:
        return b""
    return _field(b"\x4a", prefix + _varint(len(encoded)) + encoded)


def _span_head(n: int) -> bytes:
    found = _SPAN_HEADERS.get(n)
    if found is None:
        if len(_SPAN_HEADERS) >= _CACHE_MAX:
            _SPAN_HEADERS.clear()
        found = _SPAN_HEADERS[n] = b"\x12" + _varint(n)
    return found


def _value_field(cache: dict[Any, bytes], prefix: bytes, value: Any) -> bytes:
    """The ``Span.attributes`` field of ``value`` (str, int or None: b""), kept in
    ``cache`` (a key's values that repeat: attempts, outcomes, counts)."""
    if type(value) is str:
        data = value.encode()
        found = _string_head(prefix, len(data)) + data
    else:
        found = _other_value(prefix, value)
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[value] = found
    return found


_CACHED_TYPES = frozenset({str, int, type(None)})
"""Values a key's cache holds: no two of these types have equal values (bool and
float, which do equal ints, are encoded each time)."""


def _compile(layout: Layout) -> Callable[[Span, Callable[[bytes], None]], None]:
    """The encoder of ``layout``'s spans that are not ``detailed``: a function with the
    layout's keys written out (no loop), joining the span's ids, times and values with
    the layout's constant bytes (name, kind, constant attributes, keys), a span in a
    few C calls. The generated source is the function's ``__doc__``.

    A string value of a key in ``_UNCACHED`` (ids) is the start of its field, looked
    up by the value's length (a table per key), then its UTF-8 bytes; any other value
    of such a key goes through :func:`_other_value` (None: b""). The fields of other
    keys' values (attempts, outcomes, counts) are kept in a table per key."""
    lines = ["def encode(s, append):"]
    if layout.keys:
        lines.append("    " + "".join(f"v{i}, " for i in range(len(layout.keys))) + "= s.values")
    namespace: dict[str, Any] = {
        "_pack_times": _pack_times,
        "_FLAGS": _FLAGS,
        "_SPAN_HEADERS": _SPAN_HEADERS,
        "_CACHED_TYPES": _CACHED_TYPES,
        "_span_head": _span_head,
        "_string_head": _string_head,
        "_other_value": _other_value,
        "_value_field": _value_field,
        "HEAD": layout.head,
    }
    shape = []
    parts = ""
    for i, (key, prefix) in enumerate(zip(layout.keys, layout.prefixes, strict=True)):
        namespace[f"P{i}"] = prefix
        if key in _UNCACHED:
            short = max(124 - len(prefix), 0)  # below it, every length fits in a byte
            namespace[f"N{i}"] = short
            size = len(prefix) + 3
            namespace[f"H{i}"] = tuple(
                b"\x4a%c%b%c\x0a%c" % (n + size, prefix, n + 2, n) for n in range(short)
            )
            lines += [
                f"    if type(v{i}) is str:",
                f"        d{i} = v{i}.encode()",
                f"        n = len(d{i})",
                f"        h{i} = H{i}[n] if n < N{i} else _string_head(P{i}, n)",
                f"    elif v{i} is None:",
                f"        h{i} = d{i} = b''",
                "    else:",
                f"        h{i}, d{i} = _other_value(P{i}, v{i}), b''",
            ]
            parts += f", h{i}, d{i}"
            shape.append(True)
        else:
            namespace[f"C{i}"] = {}
            lines += [
                f"    a{i} = C{i}.get(v{i}) if type(v{i}) in _CACHED_TYPES "
                f"else _other_value(P{i}, v{i})",
                f"    if a{i} is None:",
                f"        a{i} = _value_field(C{i}, P{i}, v{i})",
            ]
            parts += f", a{i}"
            shape.append(False)
    trace = "b'\\x0a\\x10', s.trace_id.to_bytes(16), b'\\x12\\x08', s.span_id.to_bytes(8)"
    times = "_pack_times(0x39, s.start_time, 0x41, s.end_time)"
    lines += [
        "    parent_id = s.parent_id",
        "    if parent_id:",
        f"        body = b''.join(({trace}, b'\\x22\\x08', parent_id.to_bytes(8), {times}, "
        f"HEAD{parts}, _FLAGS[s.remote]))",
        "    else:",
        f"        body = b''.join(({trace}, {times}, HEAD{parts}, _FLAGS[False]))",
        "    n = len(body)",
        "    append(_SPAN_HEADERS.get(n) or _span_head(n))",
        "    append(body)",
    ]
    source = "\n".join(lines)
    code = _CODES.get(source)
    if code is None:  # the source depends on the keys' kinds only: shared by layouts
        module = compile(source, "<nerve.observe.otlp encoder>", "exec")
        code = _CODES[source] = next(c for c in module.co_consts if isinstance(c, CodeType))
    encode: Callable[[Span, Callable[[bytes], None]], None] = FunctionType(
        code, namespace, "encode"
    )
    encode.__doc__ = source
    return encode


_CODES: dict[str, CodeType] = {}
_COMPILE_AFTER = 32
"""Spans of a layout written the general way before its encoder is compiled."""
