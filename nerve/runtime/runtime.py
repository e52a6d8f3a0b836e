"""The Runtime: runs an App's functions against a transport and a store."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ValidationError

from nerve import event as codec
from nerve.app import App
from nerve.errors import ConfigError, InvalidEvent, NerveError
from nerve.event import Event
from nerve.runtime.replies import ReplyWaiters
from nerve.runtime.runner import FunctionRunner
from nerve.schema.registry import (
    SchemaRegistry,
    default_registry_url,
    register_app,
    registry_from_url,
)
from nerve.schema.upcast import validator_for
from nerve.store import store_from_url
from nerve.store.sqlite import SqliteStore, default_store_url
from nerve.transport import DEFAULT_BROKER, Transport, from_url
from nerve.transport.base import Inspectable

if TYPE_CHECKING:
    from nerve.observe.metrics import Metrics
    from nerve.observe.tracing import Tracing
    from nerve.store.postgres import PostgresStore

log = logging.getLogger("nerve.runtime")

OUTBOX_RELAY_EVERY = 5.0
OUTBOX_STALE_AFTER = 15.0


class Client:
    """Publishes events of an App's declared types (validated before anything is sent)."""

    def __init__(self, app: App, transport: Transport) -> None:
        self.app = app
        self.transport = transport
        self.tracing: Tracing | None = None
        self.metrics: Metrics | None = None
        self._replies: ReplyWaiters | None = None
        self._validators: dict[tuple[str, str | None], tuple[int, Callable[[Any], Any]]] = {}

    @property
    def replies(self) -> ReplyWaiters:
        """The requests waiting for replies (see :mod:`nerve.runtime.replies`)."""
        if self._replies is None:
            self._replies = ReplyWaiters(self.transport)
        return self._replies

    async def request(
        self,
        payload: BaseModel | Mapping[str, Any] | Event,
        *,
        replies: Sequence[str | type[BaseModel]],
        timeout: float = 10.0,
        type: str | None = None,
        subject: str | None = None,
        key: str | None = None,
        extensions: Mapping[str, str | int | bool] | None = None,
    ) -> Event:
        """Publish an event and wait for the first event answering it: one of the
        ``replies`` types (names, patterns or models) carrying its ``correlationid``.
        Raises :class:`TimeoutError` after ``timeout`` seconds (the request stays
        published). See :mod:`nerve.runtime.replies`."""
        if isinstance(payload, Event):
            event = payload
        else:
            event = self.app.make_event(
                payload, type=type, subject=subject, key=key, extensions=extensions
            )
        patterns = [r if isinstance(r, str) else self.app.event_type(r).name for r in replies]
        return await self.replies.request(event, patterns, timeout, self._publish_one)

    async def _publish_one(self, event: Event) -> None:
        await self._send([event])  # traced and counted like any publish

    async def close(self) -> None:
        if self._replies is not None:
            await self._replies.close()

    async def _send(self, events: Sequence[Event]) -> Sequence[Event]:
        tracing = self.tracing
        if tracing is None:
            await self.transport.publish(events)
        else:
            events, span = tracing.start_publish(events)
            try:
                await self.transport.publish(events)
            except BaseException as exc:
                span.record_exception(exc)
                raise
            finally:
                span.end()
        if self.metrics is not None:
            self.metrics.client.emitted(events)
        return events

    async def publish(
        self,
        payload: BaseModel | Mapping[str, Any],
        *,
        type: str | None = None,
        subject: str | None = None,
        key: str | None = None,
        source: str | None = None,
        extensions: Mapping[str, str | int | bool] | None = None,
        version: int | None = None,
    ) -> Event:
        """Publish one event; returns it once the broker holds it durably. The data is
        validated against the type's model (at ``version``, default: the model's or
        the latest) first: invalid data raises and nothing is sent."""
        event = self.app.make_event(
            payload,
            type=type,
            subject=subject,
            key=key,
            source=source,
            extensions=extensions,
            version=version,
        )
        if self.tracing is None and self.metrics is None:
            await self.transport.publish([event])
            return event
        return (await self._send([event]))[0]

    async def publish_events(self, events: Sequence[Event]) -> None:
        """Publish ready-made events (batch fast path); declared types are validated
        (at the version their ``dataschema`` names, else the latest)."""
        for event in events:
            validate = self._validator_of(event)
            if validate is not None:
                try:
                    validate(event.data)
                except ValidationError as exc:
                    raise InvalidEvent("data", f"does not match {event.type!r}: {exc}") from None
        await self._send(events)

    def _validator_of(self, event: Event) -> Callable[[Any], Any] | None:
        """How the data of events like ``event`` (its type and ``dataschema``) is
        validated, worked out once (again when the type gains a version); None for an
        undeclared type."""
        key = (event.type, event.dataschema)
        versions = self.app.versions.get(event.type)
        count = len(versions) if versions else 0
        known = self._validators.get(key)
        if known is not None and known[0] == count:
            return known[1]
        declared = self.app.declared_for(event)
        if declared is None:
            return None
        if len(self._validators) >= 1024:  # dataschema values are the publisher's to choose
            self._validators.clear()
        validate = validator_for(declared.model)
        self._validators[key] = (count, validate)
        return validate


YOUNG_THRESHOLD = 10_000
"""Allocations between two collections of young objects after :func:`tune_gc` (700 by
default)."""


def tune_gc() -> None:
    """Set Python's garbage collector up for a long-running consumer, as ``nerve run``
    does: what exists now (modules, the App, what starting a :class:`Runtime` created)
    is collected once and moved out of the cyclic collector's sight (:func:`gc.freeze`),
    and young objects are collected every :data:`YOUNG_THRESHOLD` allocations instead
    of 700.

    Per event the runtime allocates dozens of short-lived containers, which reference
    counting frees; with the default thresholds the collector ran every few events and
    its older generations walked every module's objects again and again: 9% more
    instructions per event on ``redis://`` and 16% on the embedded broker (callgrind,
    3,000-event drains), and more in time, as those walks miss the caches.

    Call it once your process has started its runtime (a web app that also consumes,
    say), and again after starting more if you like: it is cheap. It is process-wide,
    and frozen objects are never collected: not for a test suite that makes and drops
    many runtimes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)


class Runtime:
    """Runs ``app``'s functions (all, or ``only`` some) until stopped.

    ``broker`` is a URL or a transport (default: the embedded broker,
    ``sqlite:///.nerve/nerve.db``); ``store`` a URL or store (default: beside it).
    At start the App's schemas are registered in ``registry`` (a URL or registry;
    default: ``schema.db`` beside the store); an incompatible change refuses to start
    (:class:`~nerve.schema.IncompatibleSchema`) unless ``allow_incompatible``.
    Use as ``async with Runtime(app) as rt: ...`` or ``await Runtime(app).serve()``; in
    a long-running process of your own, call :func:`tune_gc` once it has started.
    """

    def __init__(
        self,
        app: App,
        broker: str | Transport | None = None,
        store: str | SqliteStore | PostgresStore | None = None,
        *,
        only: Sequence[str] | None = None,
        shutdown_timeout: float = 10.0,
        tracing: Tracing | bool | None = None,
        metrics: Metrics | bool = False,
        registry: str | SchemaRegistry | None = None,
        allow_incompatible: bool = False,
    ) -> None:
        self.app = app
        if broker is None or isinstance(broker, str):
            url = broker or DEFAULT_BROKER
            self.transport: Transport = from_url(url)
            broker_url = url
        else:
            self.transport = broker
            broker_url = str(getattr(broker, "url", DEFAULT_BROKER))
        chosen = (
            store_from_url(store or default_store_url(broker_url))
            if store is None or isinstance(store, str)
            else store
        )
        # PostgresStore has SqliteStore's interface (tests/test_store.py runs one contract
        # on both); the pipeline is typed against SqliteStore until a Store protocol exists
        self.store = cast(SqliteStore, chosen)
        if only:
            unknown = [name for name in only if name not in app.functions]
            if unknown:
                raise ConfigError(
                    f"no function named {', '.join(map(repr, unknown))}; "
                    f"this app has {', '.join(app.functions) or 'no functions'}"
                )
        self.functions = [f for f in app.functions.values() if not only or f.name in only]
        self.registry = (
            registry
            if isinstance(registry, SchemaRegistry)
            else registry_from_url(registry or default_registry_url(self.store.url, broker_url))
        )
        self.allow_incompatible = allow_incompatible
        self.shutdown_timeout = shutdown_timeout
        self.runners: dict[str, FunctionRunner] = {}
        self.tracing: Tracing | None
        """Spans (nerve.observe.tracing): given, or as the OTEL_* environment says
        (``tracing=None``), or off (``False``). Decided here, once."""
        if tracing is None:
            from nerve.observe import default_tracing

            self.tracing = default_tracing(app.name)
        elif tracing is True:
            from nerve.observe.tracing import Tracing

            self.tracing = Tracing()
        else:
            self.tracing = tracing or None
        self.metrics: Metrics | None
        """Counters and histograms for /metrics (nerve.observe.metrics), or None."""
        if metrics is True:
            from nerve.observe.metrics import Metrics

            self.metrics = Metrics()
        else:
            self.metrics = metrics or None
        if self.metrics is not None:
            self.metrics.runtime = self
        self.client = Client(app, self.transport)
        self.client.tracing, self.client.metrics = self.tracing, self.metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._started = False
        self.started = asyncio.Event()
        """Set once the broker and store are open and every function is consuming."""
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        """Called first in :meth:`stop`, last added first: edges (the HTTP server)
        stop taking requests before the functions drain."""

    async def start(self) -> None:
        await self.transport.start()
        try:
            await self.store.start(self.app.store_schema)
            async with self.registry:
                await register_app(
                    self.registry, self.app, allow_incompatible=self.allow_incompatible
                )
            await self.transport.declare([f.subscription for f in self.functions])
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.close()
            await self.transport.close()
            raise
        for function in self.functions:
            runner = FunctionRunner(self, function)
            self.runners[function.name] = runner
            self._tasks.append(asyncio.create_task(runner.run(), name=f"nerve:{function.name}"))
        self._tasks.append(asyncio.create_task(self._relay_outbox(), name="nerve:outbox"))
        self._started = True
        self.started.set()

    async def stop(self) -> None:
        """Graceful: stop taking work, let in-flight finish (up to the shutdown
        timeout), release the rest for redelivery, flush, close."""
        if not self._started:
            return
        self._started = False
        self.started.clear()
        deadline = time.monotonic() + self.shutdown_timeout
        for hook in reversed(self.on_stop):
            try:
                await hook()
            except Exception as exc:
                log.warning("a stop hook failed: %s", exc)
        await self.client.close()
        await asyncio.gather(*(r.stop(deadline) for r in self.runners.values()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        await self.store.close()
        await self.transport.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Run until SIGINT/SIGTERM (or :meth:`request_stop`), then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def background(self, work: Awaitable[Any]) -> None:
        """Run housekeeping without making the caller wait; errors are logged."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background work failed: %s", task.exception())

    async def _relay_outbox(self) -> None:
        """Publish emitted events left in the outbox by a crash after commit."""
        while True:
            await asyncio.sleep(OUTBOX_RELAY_EVERY)
            try:
                rows = await self.store.outbox_pending(OUTBOX_STALE_AFTER)
                if not rows:
                    continue
                events = []
                for _, body in rows:
                    try:
                        events.append(codec.decode(body))
                    except NerveError as exc:
                        log.error("outbox row is not an event, dropping it: %s", exc)
                await self.transport.publish(events)
                await self.store.outbox_cleared([row_id for row_id, _ in rows])
                log.info("outbox relay published %d stranded event(s)", len(events))
            except NerveError as exc:
                log.warning("outbox relay failed, will retry: %s", exc)

    # -- for tests and tools -----------------------------------------------------------

    async def wait_idle(self, timeout: float = 30.0, settle: float = 0.05) -> None:
        """Wait until no function has work: nothing in flight, nothing ready or
        delayed in the broker (needs an Inspectable transport)."""
        deadline = time.monotonic() + timeout
        names = {f.name for f in self.functions}
        quiet_since: float | None = None
        while True:
            busy = any(r.in_flight for r in self.runners.values())
            if not busy and isinstance(self.transport, Inspectable):
                stats = await self.transport.stats()
                busy = any(s.backlog or s.in_flight for s in stats if s.group in names)
            now = time.monotonic()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= settle:
                return
            if now > deadline:
                raise TimeoutError(f"functions still busy after {timeout} s")
            await asyncio.sleep(0.01)
