"""One function's consumer loop and the pipeline each delivery goes through.

::

    fetch (up to the free concurrency)
      -> decode            undecodable bytes      -> dead letter at once ('undecodable')
      -> look up the type  type not declared      -> dead letter at once ('not-declared')
      -> validate          payload invalid        -> dead letter at once ('invalid-data')
      -> idempotency       processed already      -> ack, handler not called
      -> [key lock]        custom key: one event of a key at a time, in fetch order
      -> handler(payload, ctx) under the timeout
             DeadLetter / EmitError               -> dead letter at once
             Retry / any other error / timeout    -> nack with backoff, or dead letter
                                                     after max attempts ('max-attempts')
      -> commit            ctx.store writes + processed record + outbox, one transaction
      -> publish emitted   (only now; a crash here is healed by the outbox relay)
      -> ack

Concurrency is a live number (``set_concurrency``): the loop only fetches what free
slots there are, so a function with no work holds no tasks (scale to zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import ValidationError

from nerve import event as codec
from nerve.app import Function
from nerve.errors import DeadLetter, DecodeError, EmitError, LeaseLost, NerveError, Retry
from nerve.event import Event
from nerve.runtime.context import Context
from nerve.store.sqlite import SqliteUnit
from nerve.transport.base import Delivery, Failure

if TYPE_CHECKING:
    from nerve.runtime.runtime import Runtime

log = logging.getLogger("nerve.runtime")

LEASE_EXTEND_AFTER = 10.0
"""Seconds a handler may run before the runner starts extending its lease."""


@dataclass
class FunctionStats:
    received: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    lease_lost: int = 0
    cold_starts: int = 0
    handler_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Recent event-time-to-handler-start latencies in seconds (bounded window)."""

    def note_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        if len(self.latencies) > 4096:
            del self.latencies[:2048]


def _summary(exc: BaseException, limit: int = 4000) -> str:
    text = "".join(traceback.format_exception(exc, limit=8))
    return text if len(text) <= limit else "..." + text[-limit:]


class FunctionRunner:
    def __init__(self, runtime: Runtime, function: Function) -> None:
        self.runtime = runtime
        self.function = function
        self.limit = function.concurrency
        self.in_flight = 0
        self.stats = FunctionStats()
        self._slot = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started: dict[Delivery, float] = {}
        self._stopping = asyncio.Event()
        self._consumer = runtime.transport.consumer(function.subscription)
        self._key_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._idle_since = time.monotonic()

    # -- the loop --------------------------------------------------------------------

    def set_concurrency(self, limit: int) -> None:
        """Change how many events this function handles at once, while it runs."""
        self.limit = max(0, limit)
        self._slot.set()

    async def run(self) -> None:
        keeper = asyncio.create_task(self._keep_leases())
        try:
            while not self._stopping.is_set():
                free = self.limit - self.in_flight
                if free <= 0:
                    self._slot.clear()
                    await self._slot.wait()
                    continue
                try:
                    deliveries = await self._consumer.fetch(free, 0.5)
                except NerveError as exc:
                    log.error("function %s: fetch failed: %s", self.function.name, exc)
                    await asyncio.sleep(1.0)
                    continue
                if self._stopping.is_set():
                    await asyncio.gather(*(d.nack(0) for d in deliveries), return_exceptions=True)
                    break
                if deliveries and self.in_flight == 0 and time.monotonic() - self._idle_since > 60:
                    self.stats.cold_starts += 1
                for delivery in deliveries:
                    self.in_flight += 1
                    task = asyncio.create_task(self._process(delivery))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            keeper.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle_since = time.monotonic()
        self._slot.set()
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "function %s: unexpected error", self.function.name, exc_info=task.exception()
            )

    async def stop(self, deadline: float) -> None:
        """Stop taking work; let in-flight events finish until ``deadline`` (monotonic),
        then release the rest for redelivery."""
        self._stopping.set()
        self._slot.set()
        await self._consumer.close()
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_EXTEND_AFTER / 2)
            now = time.monotonic()
            for delivery, started in list(self._started.items()):
                if now - started > LEASE_EXTEND_AFTER:
                    with contextlib.suppress(NerveError):
                        await delivery.extend(LEASE_EXTEND_AFTER * 3)

    # -- one delivery ----------------------------------------------------------------

    async def _process(self, delivery: Delivery) -> None:
        fn = self.function
        stats = self.stats
        stats.received += 1
        try:
            event = delivery.event
        except DecodeError as exc:
            await self._dead(delivery, "undecodable", exc, retryable_attempts=delivery.attempt)
            return
        declared = self.runtime.app.events.get(event.type)
        if declared is None:
            await self._dead(
                delivery,
                "not-declared",
                NerveError(f"event type {event.type!r} is not declared by this app"),
                delivery.attempt,
            )
            return
        try:
            payload = declared.model.model_validate(event.data)
        except ValidationError as exc:
            await self._dead(delivery, "invalid-data", exc, delivery.attempt)
            return
        if event.time is not None:
            stats.note_latency(time.time() - event.time.timestamp())
        store = self.runtime.store
        if await store.is_processed(fn.name, event.id):
            stats.duplicates += 1
            await self._settle(delivery.ack())
            return
        if fn.key is None:
            await self._attempt(delivery, event, payload, delivery.attempt, hold=False)
            return
        key = fn.key(payload)
        if key is None:
            await self._attempt(delivery, event, payload, delivery.attempt, hold=False)
            return
        lock, users = self._key_locks.get(key) or (asyncio.Lock(), 0)
        self._key_locks[key] = (lock, users + 1)
        try:
            async with lock:
                await self._attempt(delivery, event, payload, delivery.attempt, hold=True)
        finally:
            lock, users = self._key_locks[key]
            if users <= 1:
                del self._key_locks[key]
            else:
                self._key_locks[key] = (lock, users - 1)

    async def _attempt(
        self, delivery: Delivery, event: Event, payload: object, attempt: int, *, hold: bool
    ) -> None:
        """Run the handler until it succeeds, or its failure is settled.

        With ``hold`` (a custom ordering key) retries happen in place, keeping the key's
        turn so later events of that key wait; otherwise a retry is a delayed nack.
        """
        fn = self.function
        runtime = self.runtime
        while True:
            unit = runtime.store.unit(fn.name, event.id)
            ctx = Context(runtime.app, fn, event, attempt, unit)
            started = time.monotonic()
            self._started[delivery] = started
            try:
                if fn.timeout is None:
                    await fn.handler(payload, ctx)
                else:
                    async with asyncio.timeout(fn.timeout):
                        await fn.handler(payload, ctx)
            except asyncio.CancelledError:
                await self._settle(unit.rollback())
                await self._settle(delivery.nack(0))
                raise
            except (DeadLetter, EmitError) as exc:
                await self._settle(unit.rollback())
                reason = "dead-letter" if isinstance(exc, DeadLetter) else "emit-not-declared"
                await self._dead(delivery, reason, exc, attempt)
                return
            except Exception as exc:
                await self._settle(unit.rollback())
                self.stats.failed += 1
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError(f"handler ran over its timeout of {fn.timeout} s")
                if attempt >= fn.retry.max_attempts:
                    await self._dead(delivery, "max-attempts", exc, attempt)
                    return
                delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
                if delay is None:
                    delay = fn.retry.delay(attempt)
                self.stats.retried += 1
                log.info(
                    "function %s: event %s attempt %d failed (%s: %s); retrying in %.2fs",
                    fn.name,
                    event.id,
                    attempt,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                if hold:
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                await self._settle(delivery.nack(delay))
                return
            finally:
                self.stats.handler_seconds += time.monotonic() - started
                self._started.pop(delivery, None)
            await self._commit(delivery, unit, ctx.emitted)
            return

    async def _commit(self, delivery: Delivery, unit: SqliteUnit, emitted: Sequence[Event]) -> None:
        runtime = self.runtime
        bodies = [codec.encode(e) for e in emitted]
        ids = await unit.commit(bodies)
        if ids is None:
            self.stats.duplicates += 1  # a concurrent duplicate committed first
        elif emitted:
            try:
                await asyncio.shield(runtime.transport.publish(emitted))
            except NerveError as exc:
                log.warning("publishing emitted events failed (the outbox will retry): %s", exc)
            else:
                runtime.background(runtime.store.outbox_cleared(ids))
        self.stats.processed += 1
        await self._settle(delivery.ack())

    async def _dead(
        self, delivery: Delivery, reason: str, exc: BaseException, retryable_attempts: int
    ) -> None:
        now = time.time()
        failure = Failure(
            reason=reason,
            error_type=type(exc).__name__,
            message=str(exc)[:4000],
            traceback=_summary(exc),
            attempts=retryable_attempts,
            first_attempt_at=float(getattr(delivery, "first_at", None) or delivery.received_at),
            failed_at=now,
        )
        self.stats.dead_lettered += 1
        log.warning(
            "function %s: dead-lettered a delivery (%s: %s: %s)",
            self.function.name,
            reason,
            failure.error_type,
            failure.message[:200],
        )
        await self._settle(delivery.dead_letter(failure))

    async def _settle(self, settlement: Awaitable[None]) -> None:
        """Await a settlement. Settlements are queued for a batch as soon as they are
        awaited, so a cancellation while waiting cannot undo them halfway."""
        try:
            await settlement
        except LeaseLost as exc:
            self.stats.lease_lost += 1
            log.warning("function %s: %s", self.function.name, exc)
