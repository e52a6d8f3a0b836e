"""One function's consumer loop and the pipeline each delivery goes through.

::

    fetch a batch (up to the free concurrency)
      -> decode            undecodable bytes      -> dead letter at once ('undecodable')
      -> look up the type  type not declared      -> dead letter at once ('not-declared')
      -> read              upcast to the version the function reads (nerve.schema.upcast)
                           an upcaster failed     -> dead letter at once ('upcast-failed')
      -> validate          payload invalid        -> dead letter at once ('invalid-data')
      -> idempotency       processed already      -> ack, handler not called
         (one store query for the whole batch)
      -> [key lock]        custom key: one event of a key at a time, in fetch order
      -> handler(payload, ctx) under the timeout           (one task per event)
             DeadLetter / EmitError               -> dead letter at once
             Retry / any other error / timeout    -> nack with backoff, or dead letter
                                                     after max attempts ('max-attempts')
      -> commit            ctx.store writes + processed record + outbox, one transaction
                           (handlers that did not touch ctx.store: many in one commit)
      -> publish emitted   (only now; a crash here is healed by the outbox relay)
      -> ack               (batched: one broker round trip for many deliveries)

The concurrency limit is a gate around handler calls: at most ``limit`` handlers run
at once. ``in_flight`` counts deliveries from fetch until settled; ``settling`` those
among them whose handler is done and that wait for their commit and ack. The loop
fetches ahead (up to ``PREFETCH`` times the limit not yet handled, and
``SETTLE_BUFFER`` times the limit in all), so the next batch is claimed while this one
runs, and committed while the next one runs: the broker round trips and fsyncs overlap
with work. Concurrency is a live number (``set_concurrency``); a function with no work
holds no tasks (scale to zero).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from nerve import event as codec
from nerve.app import Function
from nerve.errors import DeadLetter, DecodeError, EmitError, LeaseLost, NerveError, Retry
from nerve.event import Event
from nerve.observe.hooks import observer_for
from nerve.runtime.context import Context
from nerve.schema.upcast import UpcastError
from nerve.store.sqlite import SqliteUnit
from nerve.transport.base import Delivery, Failure

if TYPE_CHECKING:
    from nerve.runtime.runtime import Runtime

log = logging.getLogger("nerve.runtime")

LEASE_EXTEND_AFTER = 10.0
"""Seconds a handler may run before the runner starts extending its lease."""

SETTLE_BUFFER = 8
"""How many times the concurrency limit may be fetched and not yet settled. Handled
deliveries wait for their commit (at most one a store commit interval, 4 ms) and then
their ack: at a high rate, hundreds of them. At 4 times the limit (400 at the default
100) the fetch loop waited for room for a third of a drain of 20,000 events on Redis
(0.17-0.29 s of 0.6-0.8 s, ``python -m benchmarks.observe drain``); at 8, almost
never (0.01-0.05 s): 49.8k events/s against 32.9k (medians of 4 alternating drains).
End to end, together with the SQLite store's one-statement records
(``benchmarks brokers``' nerve side on Redis, 6 alternating runs): 43.1k against 35.6k."""

PREFETCH = 2
"""How many times the concurrency limit may be fetched and not yet handled."""


class _Gate:
    """A semaphore whose size can change while it is in use (the concurrency limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        """Wait for a place (the runner takes a free one in place, without a call)."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.active -= 1  # granted, then cancelled: give the place on
                self._wake()
            raise

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)


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
    """Recent event-time-to-handler-start latencies in seconds (bounded window: the
    runner appends a fetched batch's, then trims to the last 2,048-4,096)."""


@dataclass(slots=True)
class _Done:
    """A delivery whose handler succeeded (or that was a duplicate), awaiting settlement."""

    delivery: Delivery
    event_id: str
    emitted: list[Event]
    committed: bool
    """True when the store commit already happened (the unit used ctx.store), or for
    duplicates; False when the finisher must commit the idempotency record."""
    outbox_ids: list[int] | None = None
    duplicate: bool = False


def _summary(exc: BaseException, limit: int = 4000) -> str:
    text = "".join(traceback.format_exception(exc, limit=8))
    return text if len(text) <= limit else "..." + text[-limit:]


def _log_context(function: str, delivery: Delivery, attempt: int) -> dict[str, Any]:
    """The event fields of a log record about ``delivery`` (structured logs)."""
    fields: dict[str, Any] = {"function": function, "attempt": attempt}
    try:
        event = delivery.event
    except DecodeError:
        return fields
    fields["event_id"] = event.id
    fields["event_type"] = event.type
    fields["correlation_id"] = str(event.extensions.get("correlationid") or event.id)
    return fields


class FunctionRunner:
    def __init__(self, runtime: Runtime, function: Function) -> None:
        self.runtime = runtime
        self.function = function
        self.limit = function.concurrency
        self._gate = _Gate(self.limit)
        self.in_flight = 0
        self.settling = 0
        self.stats = FunctionStats()
        self._slot = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started: dict[Delivery, float] = {}
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        """Worker tasks inside a handler with a timeout -> when it runs out (monotonic).
        One timeout per function, so insertion order is deadline order."""
        self._timed_out: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._consumer = runtime.transport.consumer(function.subscription)
        self._readers = runtime.app.readers(function)
        self._key_turns: dict[str, collections.deque[asyncio.Future[None]] | None] = {}
        """Keys being handled; the value queues the deliveries waiting for the key's turn."""
        self._idle_since = time.monotonic()
        self._done: list[_Done] = []
        self._ready: collections.deque[tuple[Delivery, Event, Any]] = collections.deque()
        self._workers = 0
        self._starting = 0
        """Workers spawned that have not taken their first delivery yet."""
        self._finisher: asyncio.Task[None] | None = None
        self._observer = observer_for(runtime, function.name)  # None: nothing observes
        self._handler = function.handler
        self._traced: Callable[[Context], None] | None = None
        """Starts a handler attempt's span (None: tracing is off)."""
        if self._observer is not None:
            self._handler = self._observer.wrap(function.handler)
            if self._observer.tracing is not None:
                self._traced = self._observer.starter()

    # -- the loop --------------------------------------------------------------------

    def set_concurrency(self, limit: int) -> None:
        """Change how many events this function handles at once, while it runs."""
        self.limit = max(0, limit)
        self._gate.resize(self.limit)
        self._slot.set()

    async def run(self) -> None:
        keeper = asyncio.create_task(self._keep_leases())
        try:
            while not self._stopping.is_set():
                free = min(
                    self.limit * PREFETCH - (self.in_flight - self.settling),
                    self.limit * SETTLE_BUFFER - self.in_flight,
                )
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
                if not deliveries:
                    continue
                if self._stopping.is_set():
                    for delivery in deliveries:
                        with contextlib.suppress(NerveError):
                            await delivery.nack(0)
                    break
                if self.in_flight == 0 and time.monotonic() - self._idle_since > 60:
                    self.stats.cold_starts += 1
                self.in_flight += len(deliveries)
                await self._dispatch(deliveries)
        finally:
            keeper.cancel()

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "function %s: unexpected error", self.function.name, exc_info=task.exception()
            )

    def _settled(self, count: int = 1) -> None:
        self.in_flight -= count
        if self.in_flight == 0:
            self._idle_since = time.monotonic()
        self._slot.set()

    async def stop(self, deadline: float) -> None:
        """Stop taking work; let in-flight events finish until ``deadline`` (monotonic),
        then release the rest for redelivery."""
        self._stopping.set()
        self._slot.set()
        await self._consumer.close()
        while self._ready:  # fetched but not started: straight back to the broker
            delivery, _, _ = self._ready.popleft()
            await self._release(delivery, 0.0)
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self._finisher is not None:
            await asyncio.wait([self._finisher], timeout=5)
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _watch_timeouts(self) -> None:
        """Cancel the handlers that run over the function's timeout, each at its
        deadline; runs while handlers with a deadline run, then ends.

        One task per runner instead of ``asyncio.timeout`` around every call (a timer
        handle made and cancelled per event, about 5 us here). The cancellation lands
        in the handler, where its worker task waits: an entry exists only from just
        before the handler is called to just after it returns, with no await between.
        """
        deadlines = self._deadlines
        try:
            while deadlines:
                task, deadline = next(iter(deadlines.items()))
                wait = deadline - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # entries may come and go meanwhile
                    continue
                del deadlines[task]
                self._timed_out.add(task)
                task.cancel()
        finally:
            self._watchdog = None

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_EXTEND_AFTER / 2)
            now = time.monotonic()
            for delivery, started in list(self._started.items()):
                if now - started > LEASE_EXTEND_AFTER:
                    with contextlib.suppress(NerveError):
                        await delivery.extend(LEASE_EXTEND_AFTER * 3)

    # -- a fetched batch -------------------------------------------------------------

    async def _dispatch(self, deliveries: Sequence[Delivery]) -> None:
        fn = self.function
        readers = self._readers
        stats = self.stats
        stats.received += len(deliveries)
        latencies = stats.latencies
        noted = len(latencies)  # this batch's latencies are appended after these
        now = time.time()
        ready: list[tuple[Delivery, Event, Any]] = []
        for delivery in deliveries:
            try:
                event = delivery.event
            except DecodeError as exc:
                self._spawn(self._dead(delivery, "undecodable", exc, delivery.attempt))
                continue
            reader = readers.get(event.type)
            if reader is None:
                error = NerveError(f"event type {event.type!r} is not declared by this app")
                self._spawn(self._dead(delivery, "not-declared", error, delivery.attempt))
                continue
            schema = event.dataschema
            try:
                if schema is None or schema == reader.dataschema:  # read's common case
                    payload = reader.validate(event.data)
                else:
                    payload = reader.read(event.data, schema)
            except ValidationError as exc:
                self._spawn(self._dead(delivery, "invalid-data", exc, delivery.attempt))
                continue
            except UpcastError as exc:
                self._spawn(self._dead(delivery, "upcast-failed", exc, delivery.attempt))
                continue
            if event.time is not None:
                latencies.append(now - event.time.timestamp())
            ready.append((delivery, event, payload))
        timed = len(latencies) - noted
        if len(latencies) > 4096:
            del latencies[:2048]  # (keeps this batch's: observers read them)
        if not ready:
            return
        if self._observer is not None:
            self._observer.dispatched(ready, latencies[-timed:] if timed else [])
        try:
            seen = await self.runtime.store.processed_many(fn.name, [e.id for _, e, _ in ready])
        except NerveError as exc:
            log.error("function %s: idempotency check failed, retrying later: %s", fn.name, exc)
            for delivery, _, _ in ready:
                self._spawn(self._release(delivery, 1.0))
            return
        for delivery, event, payload in ready:
            if event.id in seen:
                stats.duplicates += 1
                self._finish(_Done(delivery, event.id, [], committed=True, duplicate=True))
            else:
                self._ready.append((delivery, event, payload))
        self._more_workers()

    def _more_workers(self) -> None:
        """Start one more worker if deliveries wait and none is on its way: each worker
        starts the next as it takes its first delivery, so the pool grows by one per
        event-loop turn while work waits, up to the limit, without a task per event."""
        if self._ready and not self._starting and self._workers < self.limit:
            self._workers += 1
            self._starting += 1
            self._spawn(self._work())

    async def _work(self) -> None:
        """A worker: handles queued deliveries one after another while there are any.

        Workers outlive a batch while work keeps coming (no task per event), at most
        ``limit`` of them; with nothing queued they end, so an idle function holds none.
        """
        keyed = self.function.key is not None
        ready = self._ready
        done = 0
        task = asyncio.current_task()
        assert task is not None  # a worker runs as a task of its own
        self._starting -= 1
        try:
            while ready and self._workers <= self.limit:
                delivery, event, payload = ready.popleft()
                if ready and not self._starting and self._workers < self.limit:
                    self._more_workers()  # the rest must not wait for this handler
                if keyed:
                    await self._keyed(delivery, event, payload, task)
                else:
                    await self._attempt(
                        delivery, event, payload, delivery.attempt, hold=False, task=task
                    )
                done += 1
                if done % 64 == 0:
                    await asyncio.sleep(0)  # handlers that never wait must not starve the loop
        finally:
            self._workers -= 1

    async def _keyed(
        self, delivery: Delivery, event: Event, payload: Any, task: asyncio.Task[Any]
    ) -> None:
        assert self.function.key is not None
        key = self.function.key(payload)
        if key is None:
            await self._attempt(delivery, event, payload, delivery.attempt, hold=False, task=task)
            return
        turns = self._key_turns
        if key not in turns:
            turns[key] = None  # the key's turn is ours, nobody waits (the common case)
        else:
            waiting = turns[key]
            if waiting is None:
                waiting = turns[key] = collections.deque()
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._pass_turn(key)  # given the turn, then cancelled: pass it on
                else:
                    waiting.remove(turn)
                raise
        try:
            await self._attempt(delivery, event, payload, delivery.attempt, hold=True, task=task)
        finally:
            self._pass_turn(key)

    def _pass_turn(self, key: str) -> None:
        """Give ``key``'s turn to the next waiter in arrival order, or free the key."""
        waiting = self._key_turns[key]
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        del self._key_turns[key]

    # -- one handler call --------------------------------------------------------------

    async def _attempt(
        self,
        delivery: Delivery,
        event: Event,
        payload: Any,
        attempt: int,
        *,
        hold: bool,
        task: asyncio.Task[Any],
    ) -> None:
        """Run the handler until it succeeds, or its failure is settled.

        With ``hold`` (a custom ordering key) retries happen in place, keeping the key's
        turn so later events of that key wait; otherwise a retry is a delayed nack.
        ``task`` is the worker's task this runs in (looked up once a worker, not once
        an event: the timeout watchdog cancels it).
        """
        fn = self.function
        runtime = self.runtime
        handler, obs, traced = self._handler, self._observer, self._traced
        gate = self._gate
        timeout = fn.timeout
        while True:
            ctx = Context(runtime.app, fn, event, attempt, runtime.store)
            started = time.monotonic()
            self._started[delivery] = started
            # the handler's run time, from when it has its place: the runner's stats and
            # the observer's duration metric share these two clock reads
            seconds = 0.0
            try:
                if gate.active < gate.limit and not gate._waiters:
                    gate.active += 1  # a free place: taken in place (the common case)
                else:
                    await gate.acquire()
                    started = time.monotonic()
                try:
                    if traced is not None:
                        traced(ctx)
                    if timeout is None:
                        await handler(payload, ctx)
                    else:  # cancelled by the watchdog after `timeout` s: TimeoutError
                        self._deadlines[task] = started + timeout
                        if self._watchdog is None:
                            self._watchdog = asyncio.create_task(self._watch_timeouts())
                        try:
                            await handler(payload, ctx)
                        except asyncio.CancelledError:
                            if task not in self._timed_out:
                                raise
                            self._timed_out.discard(task)
                            task.uncancel()
                            raise TimeoutError(
                                f"handler ran over its timeout of {timeout} s"
                            ) from None
                        finally:
                            self._deadlines.pop(task, None)
                        if task in self._timed_out:  # cancelled, but the handler returned
                            self._timed_out.discard(task)
                            task.uncancel()
                finally:
                    seconds = time.monotonic() - started
                    gate.active -= 1  # the place given back, in place (no call)
                    if gate._waiters:
                        gate._wake()
            except asyncio.CancelledError:
                if obs is not None:
                    obs.end(ctx, seconds, "released")
                if ctx._unit is not None:
                    await ctx._unit.rollback()
                await self._release(delivery, 0.0)
                raise
            except (DeadLetter, EmitError) as exc:
                if ctx._unit is not None:
                    await ctx._unit.rollback()
                reason = "dead-letter" if isinstance(exc, DeadLetter) else "emit-not-declared"
                if obs is not None:
                    obs.end(ctx, seconds, "dead_lettered", exc)
                await self._dead(delivery, reason, exc, attempt)
                return
            except Exception as exc:
                if ctx._unit is not None:
                    await ctx._unit.rollback()
                self.stats.failed += 1
                if obs is not None:
                    retry = attempt < fn.retry.max_attempts
                    obs.end(ctx, seconds, "retried" if retry else "dead_lettered", exc)
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
                    extra=ctx.log.extra,
                )
                if hold:
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                await self._release(delivery, delay)
                return
            finally:
                self.stats.handler_seconds += seconds
                self._started.pop(delivery, None)
            if obs is not None:
                obs.end(ctx, seconds, "processed")
            unit = ctx._unit
            if unit is not None and unit.active:
                await self._succeeded(delivery, event, unit, ctx.emitted)
            else:  # the store untouched: the finisher records it with its batch
                self._finish(_Done(delivery, event.id, ctx.emitted, committed=False))
            return

    async def _succeeded(
        self, delivery: Delivery, event: Event, unit: SqliteUnit, emitted: list[Event]
    ) -> None:
        # The unit holds the store's write turn: commit it here, then settle in a batch.
        try:
            ids = await unit.commit([codec.encode(e) for e in emitted])
        except NerveError as exc:
            log.error("function %s: commit failed, will retry: %s", self.function.name, exc)
            await self._release(delivery, 1.0)
            return
        duplicate = ids is None  # a concurrent duplicate committed first
        if duplicate:
            self.stats.duplicates += 1
            emitted = []
        self._finish(
            _Done(delivery, event.id, emitted, committed=True, outbox_ids=ids, duplicate=duplicate)
        )

    # -- settling ----------------------------------------------------------------------

    def _finish(self, done: _Done) -> None:
        self.settling += 1
        self._slot.set()
        self._done.append(done)
        if self._finisher is None:
            self._finisher = asyncio.create_task(self._finish_batches())

    async def _finish_batches(self) -> None:
        """Commit, publish and ack successful deliveries, a batch at a time, in two
        overlapping stages: batch N is acked while batch N+1 is committed. A batch of
        records alone (no emitted events) is taken once the store's commit interval
        allows its commit, with all that was handled until then."""
        acking: asyncio.Task[None] | None = None
        try:
            while True:
                if not self._done:
                    if acking is None:
                        break
                    await acking  # more may arrive meanwhile: look again
                    acking = None
                    continue
                light = [d for d in self._done if not d.committed]
                if light and not any(d.emitted for d in light):
                    # the store's commit interval first, the batch then: what is handled
                    # meanwhile joins this commit (its ack would wait an interval more)
                    await self.runtime.store.records_due()
                batch, self._done = self._done, []
                batch, duplicates = await self._commit_batch(batch)
                if acking is not None:
                    await acking  # acks stay in order, one batch at a time
                acking = asyncio.create_task(self._ack_batch(batch, duplicates))
        finally:
            self._finisher = None

    async def _commit_batch(self, batch: list[_Done]) -> tuple[list[_Done], int]:
        """Record the light units as processed, publish what the batch emitted. Returns
        the deliveries to ack and how many of them are duplicates. (One pass over the
        batch: this runs for every event.)"""
        runtime = self.runtime
        name = self.function.name
        encode = codec.encode
        light: list[_Done] = []
        records: list[tuple[str, str, list[bytes]]] = []
        duplicates = 0
        emitting = False
        for d in batch:
            if not d.committed:
                light.append(d)
                emitted = d.emitted
                records.append((name, d.event_id, [encode(e) for e in emitted] if emitted else []))
            elif d.duplicate:
                duplicates += 1
            elif d.emitted:
                emitting = True
        if light:
            try:
                results = await runtime.store.commit_records(records)
            except NerveError as exc:
                log.error("function %s: commit failed, will retry: %s", name, exc)
                self.settling -= len(light)
                for d in light:
                    await self._release(d.delivery, 1.0)
                batch = [d for d in batch if d.committed]  # still to publish and ack
            else:
                for d, ids in zip(light, results, strict=True):
                    if ids is None:
                        self.stats.duplicates += 1
                        duplicates += 1
                        d.emitted = []
                        d.duplicate = True
                    elif d.emitted:
                        d.outbox_ids = ids
                        emitting = True
        if not emitting:
            return batch, duplicates
        emitted_events = [e for d in batch for e in d.emitted]
        if emitted_events and self._observer is not None:
            self._observer.emitted(emitted_events)
        if emitted_events:
            try:
                await runtime.transport.publish(emitted_events)
            except NerveError as exc:
                log.warning("publishing emitted events failed (the outbox will retry): %s", exc)
            else:
                ids = [i for d in batch for i in (d.outbox_ids or [])]
                runtime.background(runtime.store.outbox_cleared(ids))
        return batch, duplicates

    async def _ack_batch(self, batch: list[_Done], duplicates: int) -> None:
        fn = self.function
        deliveries = [d.delivery for d in batch]
        try:
            lost = await self._consumer.ack_many(deliveries)
        except NerveError as exc:
            log.error("function %s: ack failed (events will be redelivered): %s", fn.name, exc)
            lost = deliveries
        if lost:
            self.stats.lease_lost += len(lost)
            log.warning("function %s: %d ack(s) refused: lease lost", fn.name, len(lost))
        self.stats.processed += len(batch) - duplicates
        self.settling -= len(batch)
        self._settled(len(batch))

    async def _release(self, delivery: Delivery, delay: float) -> None:
        """Hand a delivery back to its group after ``delay`` seconds."""
        await self._settle_one(delivery.nack(delay), "nack")

    async def _settle_one(self, settlement: Awaitable[None], what: str) -> None:
        """Await one nack or dead-letter. A lost lease or a broker error is logged; the
        delivery leaves this runner either way (if unsettled, its lease expires and it
        comes back)."""
        try:
            await settlement
        except LeaseLost as exc:
            self.stats.lease_lost += 1
            log.warning("function %s: %s", self.function.name, exc)
        except NerveError as exc:
            log.error(
                "function %s: %s failed (the lease will expire): %s", self.function.name, what, exc
            )
        finally:
            self._settled()

    async def _dead(
        self, delivery: Delivery, reason: str, exc: BaseException, attempts: int
    ) -> None:
        now = time.time()
        failure = Failure(
            reason=reason,
            error_type=type(exc).__name__,
            message=str(exc)[:4000],
            traceback=_summary(exc),
            attempts=attempts,
            first_attempt_at=delivery.first_at,
            failed_at=now,
        )
        self.stats.dead_lettered += 1
        if self._observer is not None:
            early = reason in ("undecodable", "not-declared", "invalid-data")
            self._observer.dead(delivery, reason, before_handler=early)
        log.warning(
            "function %s: dead-lettered a delivery (%s: %s: %s)",
            self.function.name,
            reason,
            failure.error_type,
            failure.message[:200],
            extra=_log_context(self.function.name, delivery, attempts),
        )
        await self._settle_one(delivery.dead_letter(failure), "dead-lettering")
