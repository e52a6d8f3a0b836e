"""Request/reply over events: publish an event, wait for the event that answers it.

**Correlation.** Every event a function emits carries ``correlationid``: the
``correlationid`` of the event it handled, or that event's ``id`` when it had none
(see :meth:`nerve.Context.emit`). So every event of one flow, however many functions
deep, carries the correlation id of the event that started it. A *reply* to a
request event R is the first published event whose type matches one of the awaited
patterns and whose ``correlationid`` is R's ``correlationid`` (R's ``id`` if R has
none). No handler has to know that someone is waiting.

**Seeing replies.** Each process reads the transport's event log (the
:class:`~nerve.transport.EventLog` ability: the embedded broker, PostgreSQL, Redis,
NATS, Kafka and memory have it) from the position it had just before the request was
published, only while some request is waiting. Since every process reads the whole
log, a reply is seen wherever it was produced (another ``nerve run`` process,
another machine), and no consumer group is created per process (a per-process group
would keep collecting events after the process is gone).

**No leaked waiters.** A waiter is removed when its reply arrives, when it times out
and when its caller is cancelled; the reader stops once no waiter is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from nerve import event as codec
from nerve.app import matches_pattern
from nerve.errors import ConfigError, NerveError
from nerve.event import Event
from nerve.transport.base import EventLog, Transport

__all__ = ["CORRELATION_ATTRIBUTE", "ReplyWaiters", "correlation_of"]

log = logging.getLogger("nerve.replies")

CORRELATION_ATTRIBUTE = "correlationid"
_MARKER = b'"correlationid":"'
READ_BATCH = 1000


def correlation_of(event: Event) -> str:
    """The correlation id replies to ``event`` will carry."""
    value = event.extensions.get(CORRELATION_ATTRIBUTE)
    return event.id if value is None else str(value)


def _raw_correlation(raw: bytes) -> str | None:
    start = raw.find(_MARKER)
    if start < 0:
        return None
    start += len(_MARKER)
    end = raw.find(b'"', start)
    if end < 0:
        return None
    return raw[start:end].decode("utf-8", "replace")


@dataclass(eq=False)
class _Waiter:
    patterns: tuple[str, ...]
    exclude: str
    future: asyncio.Future[Event] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ReplyWaiters:
    """The requests of one process waiting for their replies."""

    def __init__(
        self, transport: Transport, *, poll_interval: float = 0.02, linger: float = 2.0
    ) -> None:
        self.transport = transport
        self.poll_interval = poll_interval
        self.linger = linger
        self._waiting: dict[str, list[_Waiter]] = {}
        self._position: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._idle_since = 0.0
        self._closed = False

    @property
    def pending(self) -> int:
        """Requests waiting right now (0 when nothing leaked)."""
        return sum(len(ws) for ws in self._waiting.values())

    async def request(
        self,
        event: Event,
        replies: Sequence[str],
        timeout: float,
        publish: Callable[[Event], Awaitable[None]],
    ) -> Event:
        """Publish ``event`` with ``publish`` and return its first reply of a type
        matching ``replies``; raises :class:`TimeoutError` after ``timeout`` seconds
        (the request event stays published)."""
        if not replies:
            raise ConfigError("a request needs the reply types it waits for (replies=[...])")
        if self._closed:
            raise NerveError("the runtime is stopping; no new requests")
        log_ = self.transport
        if not isinstance(log_, EventLog):
            raise ConfigError(
                f"request/reply reads the broker's event log, which {type(log_).__name__} "
                "does not offer; use the embedded broker, postgres, redis, nats or kafka"
            )
        await self._ensure_reader(log_)
        key = correlation_of(event)
        waiter = _Waiter(tuple(replies), exclude=event.id)
        self._waiting.setdefault(key, []).append(waiter)
        try:
            await publish(event)
            return await asyncio.wait_for(waiter.future, timeout)
        finally:
            self._forget(key, waiter)

    def _forget(self, key: str, waiter: _Waiter) -> None:
        waiters = self._waiting.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                del self._waiting[key]
        if not waiter.future.done():
            waiter.future.cancel()
        if not self._waiting:
            self._idle_since = time.monotonic()

    async def _ensure_reader(self, source: EventLog) -> None:
        if self._reader is not None and not self._reader.done():
            return
        async with self._starting:
            if self._reader is not None and not self._reader.done():
                return
            # the position BEFORE the request is published: its reply comes after it
            self._position = (await source.read_log(None, 0))[0][0]
            self._idle_since = time.monotonic()
            self._reader = asyncio.create_task(self._read(source), name="nerve:replies")

    async def _read(self, source: EventLog) -> None:
        while True:
            if not self._waiting and time.monotonic() - self._idle_since > self.linger:
                self._reader = None
                return
            try:
                rows = await source.read_log(self._position, READ_BATCH)
            except NerveError as exc:
                log.warning("reading the event log for replies failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for position, raw in rows:
                self._position = position
                if self._waiting:
                    self._offer(raw)
            if len(rows) < READ_BATCH:
                await asyncio.sleep(self.poll_interval)

    def _offer(self, raw: bytes) -> None:
        key = _raw_correlation(raw)
        if key is None and b"correlationid" in raw:  # not our compact encoding: decode
            with contextlib.suppress(NerveError):
                key = correlation_of(codec.decode(raw))
        if key is None or key not in self._waiting:
            return
        try:
            event = codec.decode(raw)
        except NerveError:
            return
        for waiter in list(self._waiting.get(key, ())):
            if waiter.future.done() or event.id == waiter.exclude:
                continue
            if any(matches_pattern(p, event.type) for p in waiter.patterns):
                waiter.future.set_result(event)

    async def close(self) -> None:
        """Stop reading; requests still waiting get a :class:`NerveError`."""
        self._closed = True
        for waiters in list(self._waiting.values()):
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(NerveError("the runtime stopped"))
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
