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
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

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
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation import set_span_in_context

from nerve import __version__
from nerve.event import Event

__all__ = ["HandlerTrace", "Tracing", "tracing_from_env"]

SYSTEM = "nerve"
_EMPTY = otel_context.Context()
_MAX_LINKS = 16

Handler = Callable[[Any, Any], Awaitable[None]]


def traceparent_of(context: SpanContext) -> str:
    """The W3C ``traceparent`` header value of a span context."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _extensions_of(span: Span) -> dict[str, str]:
    context = span.get_span_context()
    exts = {"traceparent": traceparent_of(context)}
    state = context.trace_state.to_header() if context.trace_state else ""
    if state:
        exts["tracestate"] = state
    return exts


def parent_context(event: Event) -> otel_context.Context | None:
    """The OpenTelemetry context carried by ``event`` (None when it carries none or an
    invalid one: the span then starts a new trace). Parsed directly (W3C Trace Context
    level 1, version 00): this runs once per handled event."""
    span_context = _span_context(event)
    if span_context is None:
        return None
    return set_span_in_context(NonRecordingSpan(span_context), _EMPTY)


def _span_context(event: Event) -> SpanContext | None:
    value = event.extensions.get("traceparent")
    if type(value) is not str or len(value) != 55 or value[2] != "-" or value[:2] == "ff":
        return None
    try:
        trace_id = int(value[3:35], 16)
        span_id = int(value[36:52], 16)
        flags = int(value[53:55], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or value[35] != "-" or value[52] != "-":
        return None
    state = event.extensions.get("tracestate")
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(flags & 0x01),
        trace_state=TraceState.from_header([str(state)]) if state else None,
    )


class HandlerTrace:
    """The ``process`` span of one handler attempt, as ``ctx`` sees it: emitted events
    become its children, ``ctx.log`` records carry its trace id."""

    __slots__ = ("_tracing", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    def emitting(self, type_name: str) -> dict[str, str]:
        """A ``create`` span for an event this handler emits; its trace extensions."""
        return self._tracing.create(type_name, set_span_in_context(self.span))


class Tracing:
    """Creates nerve's spans on ``provider`` (default: the global tracer provider).

    ``owned`` providers (built by :func:`tracing_from_env`) are flushed and shut down by
    :meth:`shutdown` when the runtime stops.
    """

    def __init__(self, provider: trace.TracerProvider | None = None, *, owned: bool = False):
        self.provider = provider or trace.get_tracer_provider()
        self.tracer = self.provider.get_tracer("nerve", __version__)
        self._owned = owned

    def shutdown(self) -> None:
        if self._owned:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # -- producing -----------------------------------------------------------------

    def create(self, type_name: str, parent: otel_context.Context | None = None) -> dict[str, str]:
        """Start and end a ``create`` span for one new event; its trace extensions."""
        span = self.tracer.start_span(
            f"create {type_name}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "create",
                "messaging.operation.name": "create",
                "messaging.destination.name": type_name,
            },
        )
        span.end()
        return _extensions_of(span)

    def start_publish(self, events: Sequence[Event]) -> tuple[list[Event], Span]:
        """For ``Client``: a ``publish`` span, and ``events`` carrying a trace context
        (an event that already carries one keeps it). End the span once published."""
        if len(events) == 1:
            (event,) = events
            span = self.tracer.start_span(
                f"publish {event.type}",
                context=parent_context(event),
                kind=SpanKind.PRODUCER,
                attributes=_message_attributes(event, "publish", "send"),
            )
            if event.extensions.get("traceparent") is None:
                event = event.with_extensions(**_extensions_of(span))
            return [event], span
        traced: list[Event] = []
        links: list[Link] = []
        for event in events:
            if event.extensions.get("traceparent") is None:
                event = event.with_extensions(**self.create(event.type))
            traced.append(event)
            linked = _span_context(event)
            if linked is not None and len(links) < _MAX_LINKS:
                links.append(Link(linked))
        span = self.tracer.start_span(
            "publish",
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.batch.message_count": len(events),
            },
        )
        return traced, span

    # -- consuming -----------------------------------------------------------------

    def received(self, function: str, events: Sequence[Event]) -> None:
        """A ``receive`` span for one fetched batch, linked to (the first
        ``_MAX_LINKS`` of) its events' contexts."""
        links = []
        for event in events[:_MAX_LINKS]:
            linked = _span_context(event)
            if linked is not None:
                links.append(Link(linked))
        span = self.tracer.start_span(
            f"receive {function}",
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "receive",
                "messaging.consumer.group.name": function,
                "messaging.batch.message_count": len(events),
            },
        )
        span.end()

    def start_process(self, function: str, event: Event, attempt: int) -> HandlerTrace:
        """The ``process`` span of one handler attempt (child of the event's context)."""
        span = self.tracer.start_span(
            f"process {event.type}",
            context=parent_context(event),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": event.type,
                "messaging.message.id": event.id,
                "messaging.consumer.group.name": function,
                "nerve.attempt": attempt,
            },
        )
        if span.is_recording():
            correlation = event.extensions.get("correlationid")
            if correlation is not None:
                span.set_attribute("messaging.message.conversation_id", str(correlation))
        return HandlerTrace(self, span)

    def end_process(
        self, handle: HandlerTrace, error: BaseException | None = None, outcome: str = "processed"
    ) -> None:
        """End a ``process`` span with its outcome: 'processed', 'retried',
        'dead_lettered' or 'released' (shutdown)."""
        span = handle.span
        if not span.is_recording():
            return
        span.set_attribute("nerve.outcome", outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))
        span.end()

    def dead_lettered(self, function: str, event: Event | None, reason: str) -> None:
        """A span for an event dead-lettered before its handler ran (bad data...)."""
        name = event.type if event is not None else "(undecodable)"
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "settle",
            "messaging.operation.name": "dead_letter",
            "messaging.consumer.group.name": function,
            "nerve.outcome": "dead_lettered",
            "nerve.dead_letter.reason": reason,
        }
        if event is not None:
            attributes["messaging.message.id"] = event.id
            attributes["messaging.destination.name"] = event.type
        span = self.tracer.start_span(
            f"dead_letter {name}",
            context=None if event is None else parent_context(event),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        )
        span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` running with its ``process`` span as the current span, so spans
        the handler makes (HTTP clients, databases...) join the event's trace."""

        async def traced(payload: Any, ctx: Any) -> None:
            handle: HandlerTrace | None = ctx.trace
            if handle is None:
                await handler(payload, ctx)
                return
            token = otel_context.attach(set_span_in_context(handle.span))
            try:
                await handler(payload, ctx)
            finally:
                otel_context.detach(token)

        return traced


def _message_attributes(event: Event, operation: str, kind: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": kind,
        "messaging.operation.name": operation,
        "messaging.destination.name": event.type,
        "messaging.message.id": event.id,
    }
    correlation = event.extensions.get("correlationid")
    if correlation is not None:
        attributes["messaging.message.conversation_id"] = str(correlation)
    if event.subject is not None:
        attributes["cloudevents.event_subject"] = event.subject
    return attributes


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
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
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
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, owned=True)


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
