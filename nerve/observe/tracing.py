"""OpenTelemetry tracing: one trace per flow, across every function that touches it.

The W3C trace context travels *in the event*, as the CloudEvents distributed-tracing
extension attributes ``traceparent`` and ``tracestate``, so it survives any broker,
retries (a redelivery carries the same event) and dead-letter replays (the stored
event is re-delivered as it was).

Spans (OpenTelemetry messaging semantic conventions, ``messaging.system = "nerve"``):

==========================  ========  =====================================================
span                        kind      when, and its parent
==========================  ========  =====================================================
``publish {type}``          PRODUCER  ``Client.publish`` (parent: the caller's current span)
``create {type}``           PRODUCER  an event made by ``ctx.emit`` (parent: the handler's
                                      ``process`` span), or one event of a batch published
                                      with ``Client.publish_events``
``publish``                 PRODUCER  a batch ``Client.publish_events`` (links its events)
``receive {function}``      CONSUMER  one fetched batch of a function (links its events)
``process {type}``          CONSUMER  one handler attempt (parent: the event's context);
                                      each retry is one more ``process`` span of one trace
``dead_letter {type}``      INTERNAL  an event dead-lettered before its handler ran
==========================  ========  =====================================================

Configuration is the standard one: :func:`tracing_from_env` builds a tracer provider
from the ``OTEL_*`` environment variables (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``...), or uses a provider the process already installed
(``opentelemetry-instrument``). With none of them, tracing is off and the runtime creates
no span at all: the decision is made once, when the runtime is built.

With an SDK provider, spans are recorded and exported by nerve's own lean pipeline
(:mod:`nerve.observe.otlp`), not by the SDK's per-span machinery.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceState,
)
from opentelemetry.trace.propagation import set_span_in_context

from nerve import __version__
from nerve._native import speedups
from nerve.event import Event
from nerve.observe import otlp
from nerve.observe.otlp import Layout, Parent

__all__ = ["HandlerTrace", "Tracing", "tracing_from_env"]

SYSTEM = "nerve"
_EMPTY = otel_context.Context()
MAX_LINKS = 16
_INTERNAL, _PRODUCER, _CONSUMER = otlp.INTERNAL, otlp.PRODUCER, otlp.CONSUMER
_LeanSpan = otlp.Span
_attach, _detach = otel_context.attach, otel_context.detach
_time_ns = time.time_ns
_OUTCOME = "nerve.outcome"


def _context_var() -> tuple[contextvars.ContextVar[Any], object] | None:
    """OpenTelemetry's own context variable and the key of the current span in it,
    when the installed opentelemetry-api keeps its context as it does today (1.x:
    ``ContextVarsRuntimeContext``), to make a span current in two C calls rather
    than seven Python ones; None otherwise (then through ``attach``/``detach``)."""
    from opentelemetry.trace import propagation

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    key = getattr(propagation, "_SPAN_KEY", None)
    if not isinstance(var, contextvars.ContextVar) or not isinstance(key, str):
        return None
    if type(runtime).__name__ != "ContextVarsRuntimeContext":
        return None
    return var, key


_CONTEXT = _context_var()
_reset_current = None if _CONTEXT is None else _CONTEXT[0].reset


def _make_current(span: Span) -> Any:
    """Make ``span`` the current span; a token for :func:`_restore`."""
    if _CONTEXT is None:
        return _attach(set_span_in_context(span))
    var, key = _CONTEXT
    values = var.get().copy()
    values[key] = span
    return var.set(otel_context.Context(values))


def _restore(token: Any) -> None:
    """Undo :func:`_make_current`."""
    if _reset_current is None:
        _detach(token)
        return
    try:
        _reset_current(token)
    except ValueError:  # made in another context: as OpenTelemetry's detach does, log
        logging.getLogger("nerve.observe").exception("tracing: failed to detach context")


Handler = Callable[[Any, Any], Awaitable[None]]


def traceparent_of(context: SpanContext) -> str:
    """The W3C ``traceparent`` header value of a span context."""
    return otlp.traceparent(context.trace_id, context.span_id, int(context.trace_flags))


def _extensions_of(span: Span) -> dict[str, str]:
    if type(span) is _LeanSpan:
        exts = {"traceparent": span.traceparent}
        if span.state:
            exts["tracestate"] = span.state
        return exts
    context = span.get_span_context()
    exts = {"traceparent": traceparent_of(context)}
    state = context.trace_state.to_header() if context.trace_state else ""
    if state:
        exts["tracestate"] = state
    return exts


def parent_context(event: Event) -> otel_context.Context | None:
    """The OpenTelemetry context carried by ``event`` (None when it carries none or an
    invalid one)."""
    parent = _parent_of(event)
    if parent is None:
        return None
    return set_span_in_context(NonRecordingSpan(otlp.span_context(parent)), _EMPTY)


def _parent_of(event: Event) -> Parent | None:
    """The parent context ``event`` carries (W3C Trace Context level 1, version 00),
    parsed directly: this runs once per handled event. (``in`` and ``[]`` rather than
    ``get``: a mapping proxy's ``get`` is a method call, several times the cost.)

    Only lowercase hex digits make a valid id (``int(x, 16)`` alone would also take
    uppercase, a sign, underscores or spaces); version ``ff`` is invalid."""
    extensions = event.extensions
    if "traceparent" not in extensions:
        return None
    value = extensions["traceparent"]
    if type(value) is not str:
        return None
    parent = _parse_traceparent(value)
    if parent is None:
        return None
    state = extensions["tracestate"] if "tracestate" in extensions else None  # noqa: SIM401
    if state:
        header = TraceState.from_header([str(state)]).to_header()
        return (parent[0], parent[1], parent[2], header, True)
    return parent


def _parse_python(value: str) -> Parent | None:
    """A ``traceparent`` value as a remote parent without tracestate, None when it is
    not valid (the pure-Python twin of ``_speedups.parse_traceparent``)."""
    found = _TRACEPARENT(value)  # (55 characters: version 00 has no more fields)
    if found is None:
        return None
    trace_id = int(found[1], 16)
    span_id = int(found[2], 16)
    if not trace_id or not span_id:
        return None
    return (trace_id, span_id, _SAMPLED[found[3]], "", True)


_TRACEPARENT = re.compile(
    "(?!ff)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]([0-9a-f])", re.ASCII
).fullmatch
_SAMPLED = {c: int(c, 16) & 0x01 for c in "0123456789abcdef"}
"""The sampled flag by the last hex digit of the trace flags."""
_parse_traceparent: Callable[[str], Parent | None] = (
    _parse_python if speedups is None else speedups.parse_traceparent
)


def _parent_of_span(span: Span) -> Parent | None:
    """``span`` as a parent (None when it has no valid context)."""
    if type(span) is _LeanSpan:
        return span.as_parent()
    context = span.get_span_context()
    if not context.is_valid:
        return None
    state = context.trace_state.to_header() if context.trace_state else ""
    return (context.trace_id, context.span_id, int(context.trace_flags), state, context.is_remote)


def _current() -> Parent | None:
    """The caller's current span, as a parent."""
    return _parent_of_span(trace.get_current_span())


class _HandleFields:
    """The fields of a :class:`HandlerTrace`: the pure-Python stand-in of
    ``_speedups.HandleFields`` (the same in a C struct)."""

    __slots__ = ("_token", "_tracing", "span")

    span: Span
    _tracing: Tracing
    _token: Any


if TYPE_CHECKING:
    _HandleBase = _HandleFields
else:
    _HandleBase = _HandleFields if speedups is None else speedups.HandleFields


class HandlerTrace(_HandleBase):
    """The ``process`` span of one handler attempt, as ``ctx`` sees it: emitted events
    become its children, ``ctx.log`` records carry its trace id."""

    __slots__ = ()

    def __init__(self, tracing: Tracing, span: Span, current: bool = False) -> None:
        self._tracing = tracing
        self.span = span
        self._token: Any = _make_current(span) if current else None
        """Set when the span was made the current span (undone by ``end_process``)."""

    @property
    def trace_id(self) -> str:
        span = self.span
        if type(span) is _LeanSpan:
            return f"{span.trace_id:032x}"
        return f"{span.get_span_context().trace_id:032x}"

    def emitting(self, type_name: str) -> dict[str, str]:
        """A ``create`` span for an event this handler emits; its trace extensions."""
        return self._tracing.create(type_name, self.span)


class Tracing:
    """Creates nerve's spans for ``provider`` (default: the global tracer provider).

    With an OpenTelemetry SDK provider, spans are recorded by nerve's lean pipeline
    (:mod:`nerve.observe.otlp`): sampled by the provider's sampler, and handed, from
    a background thread, to ``exporters`` when given (a provider nerve built from the
    ``OTEL_*`` variables), else to the provider's span processors. With any other
    provider (another vendor's API implementation) spans are made through its tracer.

    ``owned`` providers (built by :func:`tracing_from_env`) are shut down by
    :meth:`shutdown` when the runtime stops; spans of other providers are flushed.
    """

    links = MAX_LINKS
    """How many of a batch's events its ``receive`` span links to (the first ones)."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        *,
        owned: bool = False,
        exporters: Sequence[Any] = (),
    ):
        self.provider = provider or trace.get_tracer_provider()
        self.tracer = self.provider.get_tracer("nerve", __version__)
        self._owned = owned
        self._layouts: dict[tuple[str, ...], Layout] = {}
        self._create_layouts: dict[str, Layout] = {}
        """Event type -> the layout of its ``create`` spans."""
        self._native: Any = None
        """``_speedups.ProcessSpans`` for the SDK's default ids and sampler."""
        self._process_layouts: dict[str, dict[str, Layout]] = {}
        """Function -> event type -> the layout of its ``process`` spans."""
        self._parsed: dict[str, Parent] = {}
        """Event id -> the parent context it carries, parsed for a receive span's links,
        taken by the event's first ``process`` span (a parse less for the first
        ``MAX_LINKS`` events of each batch)."""
        self._pipeline: otlp.Pipeline | None = None
        self._recorder: otlp.SpanRecorder | None = None
        self.process: Callable[[str, Event, int, bool], HandlerTrace] = self.start_process
        """:meth:`start_process`, or the same in C (``_speedups.ProcessSpans``) for the
        SDK's default ids and sampler: what the runtime calls for every attempt."""
        self.processed: Callable[[HandlerTrace, BaseException | None, str], None] = self.end_process
        """:meth:`end_process`, or its plainest case in C (then the rest in Python)."""
        sdk = _sdk_provider(self.provider)
        if sdk is None:
            return
        http = None
        if len(exporters) == 1:  # the OTLP/HTTP exporter alone: spans written as they end
            http = otlp.otlp_http_sink(exporters[0], sdk.resource, __version__)
        if http is not None:
            post, encoder = http
            pipeline = otlp.Pipeline(post, shutdown=exporters[0].shutdown, write=encoder.writer())
        elif exporters:
            sink = _to_each([otlp.exporter_sink(e, sdk.resource, __version__) for e in exporters])
            pipeline = otlp.Pipeline(sink, shutdown=_to_each([e.shutdown for e in exporters]))
        else:
            pipeline = otlp.Pipeline(otlp.processor_sink(sdk, __version__))
        self._pipeline = pipeline
        recorder = otlp.SpanRecorder(pipeline, otlp.Sampling(sdk.sampler), sdk.id_generator)
        self._recorder = recorder
        if recorder._native and _CONTEXT is not None and speedups is not None:
            native = speedups.ProcessSpans(
                self._process_layouts,
                self._process_layout,
                self._parsed,
                _parent_of,
                recorder,
                _LeanSpan,
                HandlerTrace,
                self,
                _CONTEXT[0],
                _CONTEXT[1],
                otel_context.Context,
                pipeline,
                self.end_process,
            )
            self.process, self.processed = native.start, native.end
            self._native = native

    def flush(self) -> None:
        """Hand every span ended so far to its exporter (or span processors)."""
        if self._pipeline is not None:
            self._pipeline.flush()

    def shutdown(self) -> None:
        if self._owned:
            if self._pipeline is not None:
                self._pipeline.shutdown()
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()
        else:
            self.flush()

    def _start(
        self,
        layout: Layout,
        parent: Parent | None,
        values: Sequence[Any] = (),
        links: list[otlp.LinkData] | None = None,
    ) -> Span:
        recorder = self._recorder
        if recorder is not None:
            return recorder.start(layout, parent, values, links)
        context = _EMPTY
        if parent is not None:
            context = set_span_in_context(NonRecordingSpan(otlp.span_context(parent)), _EMPTY)
        return self.tracer.start_span(
            layout.name,
            context=context,
            kind=SpanKind(layout.kind - 1),
            attributes=layout.attributes(values),
            links=[Link(otlp.span_context(link)) for link in links or ()],
        )

    def _layout(self, key: tuple[str, ...], make: Callable[[], Layout]) -> Layout:
        return _kept(self._layouts, key, make)

    # -- producing -----------------------------------------------------------------

    def create(self, type_name: str, parent: Span | None = None) -> dict[str, str]:
        """Start and end a ``create`` span for one new event (a child of ``parent``,
        default: the caller's current span); its trace extensions."""
        return self._created(type_name, _current() if parent is None else _parent_of_span(parent))[
            1
        ]

    def _created(self, type_name: str, parent: Parent | None) -> tuple[Span, dict[str, str]]:
        """A ``create`` span, started and ended, child of ``parent``; its trace
        extensions."""
        layout = self._create_layouts.get(type_name) or self._create_layout(type_name)
        native = self._native
        if native is not None:  # in C: start, end, traceparent
            span, traceparent = native.create(layout, parent)
            if span.state:
                return span, {"traceparent": traceparent, "tracestate": span.state}
            return span, {"traceparent": traceparent}
        span = self._start(layout, parent)
        span.end()
        return span, _extensions_of(span)

    def _create_layout(self, type_name: str) -> Layout:
        return _kept(
            self._create_layouts,
            type_name,
            lambda: Layout(
                f"create {type_name}",
                _PRODUCER,
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "create",
                    "messaging.operation.name": "create",
                    "messaging.destination.name": type_name,
                },
            ),
        )

    def start_publish(self, events: Sequence[Event]) -> tuple[list[Event], Span]:
        """For ``Client``: a ``publish`` span, and ``events`` carrying a trace context
        (an event that already carries one keeps it). End the span once published."""
        if len(events) == 1:
            (event,) = events
            parent = _parent_of(event)
            type_name = event.type
            layout = self._layout(
                ("publish", type_name),
                lambda: Layout(
                    f"publish {type_name}",
                    _PRODUCER,
                    {
                        "messaging.system": SYSTEM,
                        "messaging.operation.type": "send",
                        "messaging.operation.name": "publish",
                        "messaging.destination.name": type_name,
                    },
                    (
                        "messaging.message.id",
                        "messaging.message.conversation_id",
                        "cloudevents.event_subject",
                    ),
                ),
            )
            correlation = event.extensions.get("correlationid")
            span = self._start(
                layout,
                _current() if parent is None else parent,
                (event.id, None if correlation is None else str(correlation), event.subject),
            )
            if event.extensions.get("traceparent") is None:
                event = _with_trace(event, _extensions_of(span))
            return [event], span
        # a create span per event without one (as create(); the parent, the caller's
        # current span, is looked up once for the batch)
        traced: list[Event] = []
        links: list[otlp.LinkData] = []
        current: Parent | None = None
        looked_up = False
        for event in events:
            linked: Parent | None
            if event.extensions.get("traceparent") is None:
                if not looked_up:
                    current, looked_up = _current(), True
                span, extensions = self._created(event.type, current)
                event = _with_trace(event, extensions)
                linked = _parent_of_span(span) if len(links) < MAX_LINKS else None
            else:
                linked = _parent_of(event) if len(links) < MAX_LINKS else None
            traced.append(event)
            if linked is not None:
                links.append((*linked, None))
        layout = self._layout(
            ("publish",),
            lambda: Layout(
                "publish",
                _PRODUCER,
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "publish",
                },
                ("messaging.batch.message_count",),
            ),
        )
        return traced, self._start(layout, _current(), (len(events),), links)

    # -- consuming -----------------------------------------------------------------

    def received(self, function: str, events: Sequence[Event], count: int | None = None) -> None:
        """A ``receive`` span for one fetched batch of ``count`` events (default: as many
        as ``events``), linked to the contexts of the first ``MAX_LINKS`` of ``events``
        (a caller may pass only those)."""
        links: list[otlp.LinkData] = []
        parsed = self._parsed
        if len(parsed) > 4 * MAX_LINKS:  # those of events never handled (dead-lettered)
            parsed.clear()
        for event in events[:MAX_LINKS]:
            if "traceparent" in event.extensions:
                linked = _parent_of(event)
                if linked is not None:
                    links.append((*linked, None))
                    parsed[event.id] = linked
        layout = self._layout(
            ("receive", function),
            lambda: Layout(
                f"receive {function}",
                _CONSUMER,
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "receive",
                    "messaging.consumer.group.name": function,
                },
                ("messaging.batch.message_count",),
            ),
        )
        self._start(layout, None, (len(events) if count is None else count,), links).end()

    def start_process(
        self, function: str, event: Event, attempt: int, current: bool = False
    ) -> HandlerTrace:
        """The ``process`` span of one handler attempt (child of the event's context).
        With ``current``, the span is the current span until :meth:`end_process`, so
        spans the handler makes (HTTP clients, databases...) join the event's trace:
        call both in the task that runs the handler."""
        type_name = event.type
        of_function = self._process_layouts.get(function)
        layout = of_function.get(type_name) if of_function is not None else None
        if layout is None:
            layout = self._process_layout(function, type_name)
        # `in` first: a mapping proxy's get() is a method call, four times the cost
        extensions = event.extensions
        correlation = extensions["correlationid"] if "correlationid" in extensions else None  # noqa: SIM401
        if correlation is not None and type(correlation) is not str:
            correlation = str(correlation)
        values = [event.id, attempt, correlation, None]
        parent = None
        if "traceparent" in extensions:
            parsed = self._parsed  # parsed already for the batch's receive span's links?
            if not parsed or (parent := parsed.pop(event.id, None)) is None:
                parent = _parent_of(event)
        recorder = self._recorder
        if recorder is None:
            return HandlerTrace(self, self._start(layout, parent, values), current)
        # the lean path, written out: this runs for every handler attempt
        handle: HandlerTrace = _new_handle(HandlerTrace)
        handle._tracing = self
        handle.span = span = recorder.start(layout, parent, values)
        if not current:
            handle._token = None
        elif _CONTEXT is None:
            handle._token = _make_current(span)
        else:  # _make_current, written out
            var, key = _CONTEXT
            context = var.get().copy()
            context[key] = span
            handle._token = var.set(otel_context.Context(context))
        return handle

    def _process_layout(self, function: str, type_name: str) -> Layout:
        """The layout of ``function``'s ``process`` spans of ``type_name`` events."""
        return _kept(
            self._process_layouts.setdefault(function, {}),
            type_name,
            lambda: Layout(
                f"process {type_name}",
                _CONSUMER,
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "process",
                    "messaging.destination.name": type_name,
                    "messaging.consumer.group.name": function,
                },
                (
                    "messaging.message.id",
                    "nerve.attempt",
                    "messaging.message.conversation_id",
                    "nerve.outcome",  # set by end_process
                ),
            ),
        )

    def starter(self, function: str) -> Callable[[Any], None]:
        """What the runtime calls as each of ``function``'s handler attempts starts,
        with its ``ctx``: ``ctx.trace`` becomes the handle of the attempt's ``process``
        span, the current span until :meth:`end_process` (in C where it can be)."""
        if self._native is not None:
            from nerve.runtime.context import Context  # its slots are read directly

            starter: Callable[[Any], None] = self._native.starter(function, Context)
            return starter

        def start(ctx: Any) -> None:
            ctx.trace = self.process(function, ctx.event, ctx.attempt, True)

        return start

    def ender(
        self, count: Callable[..., None] | None, fallback: Callable[..., None]
    ) -> Callable[..., None]:
        """What the runtime calls as each handler attempt ends, with its ``ctx``, the
        seconds it ran, its outcome and error: ``count`` (an attempt's metrics, None
        without metrics), then :meth:`end_process` of ``ctx.trace``. In C where it can
        be; else ``fallback``, which does the same in Python."""
        if self._native is not None:
            from nerve.runtime.context import Context  # its trace slot is read directly

            ender: Callable[..., None] = self._native.ender(count, Context)
            return ender
        return fallback

    def end_process(
        self, handle: HandlerTrace, error: BaseException | None = None, outcome: str = "processed"
    ) -> None:
        """End a ``process`` span with its outcome: 'processed', 'retried',
        'dead_lettered' or 'released' (shutdown)."""
        token = handle._token
        if token is not None:
            handle._token = None
            if _reset_current is None:
                _detach(token)
            else:  # _restore, written out
                try:
                    _reset_current(token)
                except ValueError:  # made in another context: as detach does, log
                    logging.getLogger("nerve.observe").exception(
                        "tracing: failed to detach context"
                    )
        span = handle.span
        if type(span) is _LeanSpan:
            recorder = span.recorder
            if recorder is None or span.end_time:
                return
            if span.layout is not None:
                span.values[3] = outcome  # type: ignore[index]
            else:  # an attribute of the layout was set: they are all in extra
                span.extra[_OUTCOME] = outcome  # type: ignore[index]
            if error is None:  # Span.end and Pipeline.add, written out: for every attempt
                span.end_time = _time_ns()
                pipeline = self._pipeline
                if pipeline is None or pipeline._write is not None:
                    recorder.add(span)
                    return
                queue = pipeline._queue
                queue.append(span)
                if len(queue) >= pipeline._check:
                    pipeline._more()
                return
        elif span.is_recording():
            span.set_attribute("nerve.outcome", outcome)
        else:
            return
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))
        span.end()

    def dead_lettered(self, function: str, event: Event | None, reason: str) -> None:
        """A span for an event dead-lettered before its handler ran (bad data...)."""
        name = event.type if event is not None else "(undecodable)"
        constant: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "settle",
            "messaging.operation.name": "dead_letter",
            "messaging.consumer.group.name": function,
            "nerve.outcome": "dead_lettered",
            "nerve.dead_letter.reason": reason,
        }
        if event is not None:
            constant["messaging.destination.name"] = event.type
        layout = self._layout(
            ("dead_letter", function, name, reason),
            lambda: Layout(f"dead_letter {name}", _INTERNAL, constant, ("messaging.message.id",)),
        )
        span = self._start(
            layout,
            None if event is None else _parent_of(event),
            (None if event is None else event.id,),
        )
        span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` running with its ``process`` span as the current span, so spans
        the handler makes (HTTP clients, databases...) join the event's trace (for a
        ``process`` span not started with ``current=True``)."""
        attach, detach = _attach, _detach

        async def traced(payload: Any, ctx: Any) -> None:
            handle: HandlerTrace | None = ctx.trace
            if handle is None:
                await handler(payload, ctx)
                return
            token = attach(set_span_in_context(handle.span))
            try:
                await handler(payload, ctx)
            finally:
                detach(token)

        return traced


_new_handle = HandlerTrace.__new__


def _traced_copier() -> Callable[[Event, str, str], Event] | None:
    """``_speedups.traced_copy`` for :class:`Event` (what ``with_extensions(
    traceparent=..., tracestate=...)`` makes, copied in C), when the speedups are
    there and take Event's layout."""
    if speedups is None:
        return None
    try:
        speedups.register_event(Event)
    except TypeError:  # another layout than it knows: with_extensions
        return None
    copy: Callable[[Event, str, str], Event] = speedups.traced_copy
    return copy


_traced_copy = _traced_copier()


def _with_trace(event: Event, extensions: dict[str, str]) -> Event:
    """``event`` carrying the trace ``extensions`` (``traceparent``, and ``tracestate``
    when there is one): copied in C for a plain Event, else by ``with_extensions``."""
    if _traced_copy is not None and type(event) is Event:
        return _traced_copy(event, extensions["traceparent"], extensions.get("tracestate", ""))
    return event.with_extensions(**extensions)


def _kept(layouts: dict[Any, Layout], key: Any, make: Callable[[], Layout]) -> Layout:
    """``layouts[key]``, made by ``make`` when missing (the dict is emptied at 4,096:
    event types made up at run time stay bounded)."""
    found = layouts.get(key)
    if found is None:
        if len(layouts) >= 4096:
            layouts.clear()
        found = layouts[key] = make()
    return found


def _to_each(functions: Sequence[Callable[..., None]]) -> Callable[..., None]:
    if len(functions) == 1:
        return functions[0]

    def each(*args: Any) -> None:
        for function in functions:
            function(*args)

    return each


def _sdk_provider(provider: Any) -> Any:
    """``provider`` when it is an OpenTelemetry SDK tracer provider, else None."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    return provider if isinstance(provider, TracerProvider) else None


# ---------------------------------------------------------------------------------------
# Configuration from the environment

_FALSE = ("", "none")


def tracing_from_env(service_name: str) -> Tracing | None:
    """Tracing as the environment configures it, or None (no spans at all).

    A tracer provider installed globally beforehand (by ``opentelemetry-instrument`` or
    the application) is used as it is. Otherwise the ``OTEL_*`` variables decide: with
    ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``) or an ``OTEL_EXPORTER_OTLP_*ENDPOINT``
    set, nerve builds an SDK provider with a batching exporter.
    """
    from nerve.errors import ConfigError

    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return Tracing(current)
    from nerve.observe import tracing_configured

    if not tracing_configured():
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SpanExporter
    except ImportError:
        raise ConfigError(
            "OTEL_* variables ask for traces, but the OpenTelemetry SDK is not installed; "
            "install it with: pip install 'nerve[otel]'"
        ) from None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    names = [
        n.strip().lower()
        for n in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")
        if n.strip().lower() not in _FALSE
    ]
    exporters: list[SpanExporter] = []
    for name in names:
        exporter: SpanExporter
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            exporter = _otlp_exporter()
        else:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported by nerve; use otlp, console "
                "or none"
            )
        exporters.append(exporter)
    return Tracing(provider, owned=True, exporters=exporters)


def _otlp_exporter() -> Any:
    from nerve.errors import ConfigError

    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as GrpcExporter,
            )

            return GrpcExporter()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            return HttpExporter()
    except ImportError:
        raise ConfigError(
            f"OTLP over {protocol} needs the OTLP exporter; install it with: "
            "pip install 'nerve[otel]'"
        ) from None
    raise ConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use http/protobuf or grpc"
    )
