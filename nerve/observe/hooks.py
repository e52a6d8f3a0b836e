"""What the runtime calls to observe one function: spans and metrics, both optional.

A runner holds one :class:`FunctionObserver` when tracing or metrics are on, and
``None`` otherwise: with both off the pipeline makes no call at all. The calls are
per fetched batch where they can be (latency, receive span, emitted events) and per
handler attempt where they must be (duration, outcome, process span). With metrics
only (the default of ``nerve run``) a :class:`MetricsObserver` does the least work
it can: a bisect and two dictionary updates per attempt (the runner times the
handler, with the clock reads of its own statistics), and a batch's latencies (which
the runner has computed already) bucketed at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nerve._native import speedups
from nerve.event import Event
from nerve.observe.metrics import FunctionMetrics

if TYPE_CHECKING:
    from nerve.observe.tracing import Handler, Tracing
    from nerve.runtime.context import Context
    from nerve.transport.base import Delivery

__all__ = ["FunctionObserver", "MetricsObserver", "observer_for"]


class FunctionObserver:
    """Spans and (optionally) metrics of one function."""

    __slots__ = ("_count", "end", "metrics", "name", "tracing")

    def __init__(self, name: str, metrics: FunctionMetrics | None, tracing: Tracing | None):
        self.name = name
        self.metrics = metrics
        self.tracing = tracing
        self._count: Callable[..., None] | None = None
        """The metrics of an attempt that ended (None without metrics): :meth:`_counted`,
        or where the C speedups are built ``_speedups.MetricsEnd``, which counts an
        attempt that succeeded in C and hands any other outcome to :meth:`_counted`."""
        if metrics is not None:
            self._count = self._counted
            if speedups is not None:
                with contextlib.suppress(TypeError):  # a histogram it does not take
                    self._count = speedups.MetricsEnd(
                        metrics.duration, metrics.processed, self._counted
                    )
        self.end: Callable[..., None] = self._end
        """What the runner calls as a handler attempt ends (ctx, seconds, outcome and
        the error, if any): :meth:`_end`, or with tracing's C speedups its twin in C
        (``Tracing.ender``), one Python call less an attempt."""
        if tracing is not None:
            self.end = tracing.ender(self._count, self._end)

    def wrap(self, handler: Handler) -> Handler:
        """The handler as the runner calls it: unchanged (the ``process`` span is made
        the current span by :meth:`start` and restored by :meth:`end`, in the task that
        runs the handler, which costs less than a wrapping coroutine per event)."""
        return handler

    def dispatched(self, ready: Sequence[tuple[Any, Event, Any]], latencies: list[float]) -> None:
        """A fetched batch is about to be handled: its ``(delivery, event, payload)``
        triples, and the end-to-end latencies (seconds) of its events that have a time,
        which the runner computed for its own stats."""
        if self.metrics is not None and latencies:
            self.metrics.latencies(latencies)
        if self.tracing is not None and ready:
            tracing = self.tracing  # links the first few events; counts them all
            linked = [event for _, event, _ in ready[: tracing.links]]
            tracing.received(self.name, linked, len(ready))

    def starter(self) -> Callable[[Context], None]:
        """What the runner calls as a handler attempt starts, when tracing is on: sets
        ``ctx.trace`` (as :meth:`start`, without its call)."""
        assert self.tracing is not None
        return self.tracing.starter(self.name)

    def start(self, ctx: Context) -> None:
        """A handler attempt starts (called only when tracing is on: metrics need
        nothing here, the runner times the handler)."""
        tracing = self.tracing
        if tracing is not None:
            ctx.trace = tracing.process(self.name, ctx.event, ctx.attempt, True)

    def _end(
        self, ctx: Context, seconds: float, outcome: str, error: BaseException | None = None
    ) -> None:
        """A handler attempt ended after ``seconds``: 'processed', 'retried',
        'dead_lettered' or 'released' (cancelled by a shutdown: not counted)."""
        count = self._count
        if count is not None:
            count(ctx, seconds, outcome)
        handle = ctx.trace
        if handle is not None and self.tracing is not None:
            self.tracing.processed(handle, error, outcome)

    def _counted(
        self, ctx: Context, seconds: float, outcome: str, error: BaseException | None = None
    ) -> None:
        """The metrics of one attempt (the Python twin of ``_speedups.MetricsEnd``;
        ``error`` is not counted: it is there for :class:`MetricsObserver`, whose
        ``end`` this is)."""
        metrics = self.metrics
        assert metrics is not None
        if outcome != "released":
            metrics.handled(ctx.event.type, seconds, outcome)

    def dead(self, delivery: Delivery, reason: str, before_handler: bool) -> None:
        """A delivery is dead-lettered (``before_handler``: its handler never ran)."""
        try:
            event: Event | None = delivery.event
        except Exception:
            event = None
        if self.metrics is not None:
            self.metrics.dead(event.type if event is not None else "(undecodable)", reason)
        if self.tracing is not None and before_handler:
            self.tracing.dead_lettered(self.name, event, reason)

    def emitted(self, events: Sequence[Event]) -> None:
        if self.metrics is not None:
            self.metrics.emitted(events)


class MetricsObserver(FunctionObserver):
    """Metrics only, tracing off: the same calls, with the least work in each (its
    ``end`` is the count itself: no span to end)."""

    __slots__ = ()

    def __init__(self, name: str, metrics: FunctionMetrics) -> None:
        super().__init__(name, metrics, None)
        assert self._count is not None
        self.end = self._count

    def dispatched(self, ready: Sequence[tuple[Any, Event, Any]], latencies: list[float]) -> None:
        if latencies:
            self.metrics.latencies(latencies)  # type: ignore[union-attr]


def observer_for(runtime: Any, name: str) -> FunctionObserver | None:
    """The observer of function ``name`` in ``runtime``, or None when nothing observes."""
    metrics = runtime.metrics.function(name) if runtime.metrics is not None else None
    if runtime.tracing is None:
        return None if metrics is None else MetricsObserver(name, metrics)
    return FunctionObserver(name, metrics, runtime.tracing)
