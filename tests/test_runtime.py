"""The runtime pipeline: typed handlers, retries, dead letters, outbox, effectively-once,
ordering, concurrency and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from nerve import App, ConfigError, Context, DeadLetter, InvalidEvent, Retry, RetryPolicy, Runtime
from nerve.errors import StoreError
from nerve.event import Event
from nerve.transport.base import DeadLetterEntry, DeadLetterQueue


class OrderPlaced(BaseModel):
    order_id: str
    amount: int = 0


class PaymentRequested(BaseModel):
    order_id: str


class PaymentDone(BaseModel):
    order_id: str


class Audit(BaseModel):
    order_id: str


class Transfer(BaseModel):
    account: str
    seq: int


def make_app() -> App:
    app = App("shop")
    app.event("order.placed")(OrderPlaced)
    app.event("payment.requested")(PaymentRequested)
    app.event("payment.done")(PaymentDone)
    app.event("audit.logged", key=lambda a: f"audit-{a.order_id}")(Audit)
    app.event("transfer.made")(Transfer)
    return app


FAST = RetryPolicy(max_attempts=3, base=0.01, cap=0.02, jitter=False)


async def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.005)


async def dead_letters(rt: Runtime, group: str) -> list[DeadLetterEntry]:
    assert isinstance(rt.transport, DeadLetterQueue)
    return await rt.transport.dead_letters(group)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/n.db"


@pytest.fixture(params=["memory", "sqlite"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else sqlite_url(tmp_path)


# ---------------------------------------------------------------------------------------
# Handlers, attempts, retries


async def test_handler_receives_typed_payload_and_envelope() -> None:
    app = make_app()
    seen: list[tuple[Any, Event, int, str]] = []

    @app.function("order.placed")
    async def handle(order: OrderPlaced, ctx: Context) -> None:
        seen.append((order, ctx.event, ctx.attempt, ctx.function))

    async with Runtime(app, "memory://") as rt:
        published = await rt.client.publish(
            OrderPlaced(order_id="o1", amount=5),
            subject="eu-1",
            key="cust-1",
            extensions={"tenant": "acme"},
        )
        await rt.wait_idle()
        stats = rt.runners["handle"].stats
        assert (stats.received, stats.processed, stats.failed) == (1, 1, 0)
    [(order, envelope, attempt, function)] = seen
    assert type(order) is OrderPlaced
    assert order == OrderPlaced(order_id="o1", amount=5)
    assert envelope == published
    assert envelope.subject == "eu-1" and envelope.partitionkey == "cust-1"
    assert envelope.extensions["tenant"] == "acme"
    assert (attempt, function) == (1, "handle")


async def test_attempt_counts_up_and_retry_waits_its_delay() -> None:
    app = make_app()
    attempts: list[tuple[int, float]] = []

    # the policy's own backoff would be 5 s: a quick retry proves Retry(delay) was used
    @app.function("order.placed", retry=RetryPolicy(max_attempts=5, base=5.0, jitter=False))
    async def flaky(order: OrderPlaced, ctx: Context) -> None:
        attempts.append((ctx.attempt, time.monotonic()))
        if ctx.attempt < 3:
            raise Retry(delay=0.05)

    async with Runtime(app, "memory://") as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle(timeout=10)
        stats = rt.runners["flaky"].stats
        assert (stats.processed, stats.retried, stats.dead_lettered) == (1, 2, 0)
        assert await dead_letters(rt, "flaky") == []
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert all(0.045 <= gap < 2.0 for gap in gaps), gaps


async def test_errors_retry_with_backoff_then_dead_letter(broker: str) -> None:
    app = make_app()
    calls: list[float] = []

    @app.function("order.placed", retry=RetryPolicy(max_attempts=3, base=0.05, jitter=False))
    async def explode(order: OrderPlaced, ctx: Context) -> None:
        calls.append(time.monotonic())
        raise ValueError(f"boom for {order.order_id}")

    async with Runtime(app, broker) as rt:
        before = time.time()
        published = await rt.client.publish(OrderPlaced(order_id="o42"))
        await rt.wait_idle(timeout=10)
        after = time.time()
        [entry] = await dead_letters(rt, "explode")
        stats = rt.runners["explode"].stats
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.045  # base * 2**0
    assert calls[2] - calls[1] >= 0.095  # base * 2**1
    assert (stats.failed, stats.retried, stats.dead_lettered, stats.processed) == (3, 2, 1, 0)
    failure = entry.failure
    assert entry.group == "explode"
    assert entry.event is not None and entry.event.id == published.id
    assert failure.reason == "max-attempts"
    assert failure.error_type == "ValueError"
    assert failure.message == "boom for o42"
    assert "ValueError: boom for o42" in failure.traceback
    assert "explode" in failure.traceback  # the handler's frame
    assert failure.attempts == 3
    assert before <= failure.first_attempt_at <= failure.failed_at <= after


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_dead_letter_first_attempt_time_is_the_first_attempt(
    kind: str, tmp_path: Path
) -> None:
    app = make_app()
    calls: list[float] = []

    @app.function("order.placed", retry=RetryPolicy(max_attempts=3, base=0.1, jitter=False))
    async def explode(order: OrderPlaced, ctx: Context) -> None:
        calls.append(time.time())
        raise ValueError("boom")

    url = "memory://" if kind == "memory" else sqlite_url(tmp_path)
    async with Runtime(app, url) as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle(timeout=10)
        [entry] = await dead_letters(rt, "explode")
    assert len(calls) == 3
    assert entry.failure.first_attempt_at <= calls[0] + 0.01
    assert entry.failure.failed_at >= calls[-1]


async def test_dead_letter_signal_goes_to_the_dlq_at_once(broker: str) -> None:
    app = make_app()
    calls = 0

    @app.function("order.placed", retry=RetryPolicy(max_attempts=5, base=0.01))
    async def refuse(order: OrderPlaced, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        raise DeadLetter("why: order is cancelled")

    async with Runtime(app, broker) as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle()
        [entry] = await dead_letters(rt, "refuse")
        stats = rt.runners["refuse"].stats
    assert calls == 1
    assert entry.failure.reason == "dead-letter"
    assert entry.failure.error_type == "DeadLetter"
    assert entry.failure.message == "why: order is cancelled"
    assert entry.failure.attempts == 1
    assert (stats.dead_lettered, stats.retried) == (1, 0)


async def test_timeout_counts_as_a_failed_attempt() -> None:
    app = make_app()
    cancelled = 0
    attempts: list[int] = []

    @app.function(
        "order.placed", timeout=0.1, retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False)
    )
    async def slow(order: OrderPlaced, ctx: Context) -> None:
        nonlocal cancelled
        attempts.append(ctx.attempt)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    async with Runtime(app, "memory://") as rt:
        started = time.monotonic()
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle(timeout=10)
        elapsed = time.monotonic() - started
        [entry] = await dead_letters(rt, "slow")
        stats = rt.runners["slow"].stats
    assert attempts == [1, 2] and cancelled == 2
    assert elapsed < 5
    assert entry.failure.reason == "max-attempts"
    assert entry.failure.error_type == "TimeoutError"
    assert "timeout" in entry.failure.message
    assert entry.failure.attempts == 2
    assert stats.failed == 2


async def test_timeouts_cancel_only_the_handlers_that_run_over_at_their_deadline() -> None:
    """Many handlers with one timeout, some slow: each slow one is cancelled about
    ``timeout`` after it started (not at a later one's deadline, not at an earlier
    one's), the fast ones are not touched, and a worker that had a handler cancelled
    still runs the next handler, ``asyncio.timeout`` inside it included."""
    app = make_app()
    timed_out: dict[str, float] = {}
    handled: list[str] = []

    @app.function("order.placed", timeout=0.3, concurrency=8, retry=RetryPolicy(max_attempts=1))
    async def mixed(order: OrderPlaced, ctx: Context) -> None:
        started = time.monotonic()
        if order.order_id.startswith("slow"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                timed_out[order.order_id] = time.monotonic() - started
                raise
        else:
            await asyncio.sleep(0.01)
            async with asyncio.timeout(5):  # the task's cancel count is clean again
                await asyncio.sleep(0)
        handled.append(order.order_id)

    async with Runtime(app, "memory://") as rt:
        orders = [
            OrderPlaced(order_id=f"{'slow' if i % 4 == 0 else 'fast'}-{i}") for i in range(24)
        ]
        for order in orders:
            await rt.client.publish(order)
            await asyncio.sleep(0.01)  # deadlines spread over time
        await rt.wait_idle(timeout=15)
        dead = await dead_letters(rt, "mixed")
        stats = rt.runners["mixed"].stats
    slow = {o.order_id for o in orders if o.order_id.startswith("slow")}
    assert set(timed_out) == slow
    assert all(0.28 <= took < 0.6 for took in timed_out.values()), timed_out
    assert sorted(handled) == sorted(o.order_id for o in orders if o.order_id not in slow)
    assert {e.failure.error_type for e in dead} == {"TimeoutError"} and len(dead) == len(slow)
    assert all("over its timeout of 0.3 s" in e.failure.message for e in dead)
    assert stats.processed == len(orders) - len(slow)


async def test_a_handler_that_swallows_its_timeout_and_returns_is_processed() -> None:
    app = make_app()
    calls = 0

    @app.function("order.placed", timeout=0.1, retry=RetryPolicy(max_attempts=1))
    async def stubborn(order: OrderPlaced, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        with contextlib.suppress(asyncio.CancelledError):  # swallowed: it returns normally
            await asyncio.sleep(30)
        async with asyncio.timeout(5):  # its task is not left cancelling
            await asyncio.sleep(0.01)

    async with Runtime(app, "memory://") as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.client.publish(OrderPlaced(order_id="o2"))
        await rt.wait_idle(timeout=10)
        assert await dead_letters(rt, "stubborn") == []
        stats = rt.runners["stubborn"].stats
    assert calls == 2 and stats.processed == 2 and stats.failed == 0


async def test_a_handler_own_timeout_error_keeps_its_message() -> None:
    app = make_app()

    @app.function("order.placed", timeout=5, retry=RetryPolicy(max_attempts=1))
    async def calls_out(order: OrderPlaced, ctx: Context) -> None:
        raise TimeoutError("the payment service did not answer")

    async with Runtime(app, "memory://") as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle(timeout=10)
        [entry] = await dead_letters(rt, "calls_out")
    assert entry.failure.error_type == "TimeoutError"
    assert entry.failure.message == "the payment service did not answer"


async def test_timeout_then_success() -> None:
    app = make_app()
    attempts: list[int] = []

    @app.function("order.placed", timeout=0.1, retry=FAST)
    async def slow_once(order: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(30)

    async with Runtime(app, "memory://") as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle(timeout=10)
        assert rt.runners["slow_once"].stats.processed == 1
        assert await dead_letters(rt, "slow_once") == []
    assert attempts == [1, 2]


async def test_replayed_dead_letter_is_processed_after_a_fix(broker: str) -> None:
    app = make_app()
    broken = True
    handled: list[tuple[str, int]] = []

    @app.function("order.placed", retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False))
    async def fragile(order: OrderPlaced, ctx: Context) -> None:
        if broken:
            raise RuntimeError("bug")
        handled.append((ctx.event.id, ctx.attempt))

    async with Runtime(app, broker) as rt:
        event = await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle()
        [entry] = await dead_letters(rt, "fragile")
        broken = False
        assert isinstance(rt.transport, DeadLetterQueue)
        assert await rt.transport.replay([entry.id]) == 1
        await until(lambda: bool(handled), 10, "the replayed event")
        await rt.wait_idle()
        assert await dead_letters(rt, "fragile") == []
    assert [event_id for event_id, _ in handled] == [event.id]


# ---------------------------------------------------------------------------------------
# Non-retryable failures


async def test_invalid_data_is_dead_lettered_without_calling_the_handler(broker: str) -> None:
    app = make_app()
    calls = 0

    @app.function("order.placed", retry=FAST)
    async def handle(order: OrderPlaced, ctx: Context) -> None:
        nonlocal calls
        calls += 1

    bad = Event(type="order.placed", source="/elsewhere", data={"amount": "lots"})
    async with Runtime(app, broker) as rt:
        with pytest.raises(InvalidEvent) as info:
            await rt.client.publish_events([bad])  # the client validates
        assert info.value.attribute == "data"
        await rt.transport.publish([bad])  # a foreign producer does not
        await rt.wait_idle()
        [entry] = await dead_letters(rt, "handle")
    assert calls == 0
    assert entry.failure.reason == "invalid-data"
    assert entry.failure.error_type == "ValidationError"
    assert "order_id" in entry.failure.message
    assert entry.failure.attempts == 1
    assert entry.event is not None and entry.event.id == bad.id


async def test_publish_events_validates_at_the_version_named_even_one_declared_later() -> None:
    app = make_app()
    async with Runtime(app, "memory://") as rt:
        ok = Event(type="order.placed", source="/t", data={"order_id": "o1"})
        await rt.client.publish_events([ok])  # version 1, the latest: valid
        two = ok.evolve(data={"order_id": "o2"}, dataschema="nerve:schema/order.placed/2")

        class OrderPlacedV2(BaseModel):
            order_id: str
            channel: str

        app.event("order.placed", version=2)(OrderPlacedV2)  # declared after a publish
        with pytest.raises(InvalidEvent, match="channel"):
            await rt.client.publish_events([two])  # version 2 needs the channel
        await rt.client.publish_events([two.evolve(data={"order_id": "o2", "channel": "web"})])
        with pytest.raises(InvalidEvent, match="channel"):  # no dataschema: the latest, 2
            await rt.client.publish_events([ok.evolve(data={"order_id": "o3"})])


async def test_undeclared_event_type_is_dead_lettered() -> None:
    app = make_app()
    calls = 0

    @app.function("order.*", retry=FAST)
    async def any_order(order: Any, ctx: Context) -> None:
        nonlocal calls
        calls += 1

    stray = Event(type="order.refunded", source="/elsewhere", data={"order_id": "o1"})
    async with Runtime(app, "memory://") as rt:
        await rt.transport.publish([stray])
        await rt.wait_idle()
        [entry] = await dead_letters(rt, "any_order")
    assert calls == 0
    assert entry.failure.reason == "not-declared"
    assert "order.refunded" in entry.failure.message
    assert entry.failure.attempts == 1


async def test_emitting_an_undeclared_type_is_dead_lettered() -> None:
    app = make_app()
    calls = 0
    downstream: list[str] = []

    @app.function("order.placed", emits=["payment.done"], retry=FAST)
    async def sneaky(order: OrderPlaced, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        ctx.emit(PaymentDone(order_id=order.order_id))  # declared
        ctx.emit(PaymentRequested(order_id=order.order_id))  # not declared

    @app.function(["payment.requested", "payment.done"])
    async def watcher(payload: Any, ctx: Context) -> None:
        downstream.append(ctx.event.type)

    async with Runtime(app, "memory://") as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle()
        [entry] = await dead_letters(rt, "sneaky")
    assert calls == 1
    assert entry.failure.reason == "emit-not-declared"
    assert entry.failure.error_type == "EmitError"
    assert "payment.requested" in entry.failure.message
    assert entry.failure.attempts == 1
    assert downstream == []  # not even the declared one: the handler failed


# ---------------------------------------------------------------------------------------
# Emitting: outbox, causation, correlation, keys


async def test_emitted_events_are_published_only_if_the_handler_succeeds(broker: str) -> None:
    app = make_app()
    emitted: list[str] = []
    received: list[str] = []

    @app.function("order.placed", emits=["payment.requested"], retry=FAST)
    async def place(order: OrderPlaced, ctx: Context) -> None:
        emitted.append(ctx.emit(PaymentRequested(order_id=order.order_id)).id)
        if ctx.attempt == 1:
            raise RuntimeError("failed after emitting")

    @app.function("payment.requested")
    async def pay(request: PaymentRequested, ctx: Context) -> None:
        received.append(ctx.event.id)

    async with Runtime(app, broker) as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle(timeout=10)
        assert len(emitted) == 2
        assert received == [emitted[1]]
        assert rt.runners["pay"].stats.processed == 1
        deadline = time.monotonic() + 5
        while (await rt.store.query("SELECT count(*) FROM nerve_outbox"))[0][0] != 0:
            assert time.monotonic() < deadline, "the outbox was never cleared"
            await asyncio.sleep(0.01)


async def test_dead_lettered_handler_emits_nothing() -> None:
    app = make_app()
    received: list[str] = []

    @app.function("order.placed", emits=["payment.requested"])
    async def place(order: OrderPlaced, ctx: Context) -> None:
        ctx.emit(PaymentRequested(order_id=order.order_id))
        raise DeadLetter("no")

    @app.function("payment.requested")
    async def pay(request: PaymentRequested, ctx: Context) -> None:
        received.append(ctx.event.id)

    async with Runtime(app, "memory://") as rt:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle()
        assert len(await dead_letters(rt, "place")) == 1
    assert received == []


async def test_causation_correlation_and_keys_through_two_hops() -> None:
    app = make_app()
    seen: dict[str, Event] = {}

    @app.function("order.placed", emits=["payment.requested", "audit.logged"])
    async def place(order: OrderPlaced, ctx: Context) -> None:
        seen["root"] = ctx.event
        ctx.emit(PaymentRequested(order_id=order.order_id))
        ctx.emit(Audit(order_id=order.order_id))

    @app.function("payment.requested", emits=["payment.done"])
    async def pay(request: PaymentRequested, ctx: Context) -> None:
        seen["requested"] = ctx.event
        ctx.emit(PaymentDone(order_id=request.order_id), subject="paid")

    @app.function("payment.done")
    async def done(event: PaymentDone, ctx: Context) -> None:
        seen["done"] = ctx.event

    @app.function("audit.logged")
    async def audit(event: Audit, ctx: Context) -> None:
        seen["audit"] = ctx.event

    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with Runtime(app, "memory://") as rt:
        root = await rt.client.publish(
            OrderPlaced(order_id="o1"), key="cust-1", extensions={"traceparent": trace}
        )
        await rt.wait_idle()
    assert set(seen) == {"root", "requested", "done", "audit"}
    requested, done_event, audit_event = seen["requested"], seen["done"], seen["audit"]
    assert "causationid" not in root.extensions
    assert requested.extensions["causationid"] == root.id
    assert requested.extensions["correlationid"] == root.id
    assert done_event.extensions["causationid"] == requested.id
    assert done_event.extensions["correlationid"] == root.id
    assert audit_event.extensions["causationid"] == root.id
    assert audit_event.extensions["correlationid"] == root.id
    # the key is inherited along the flow, unless the emitted type declares its own
    assert requested.partitionkey == "cust-1"
    assert done_event.partitionkey == "cust-1"
    assert audit_event.partitionkey == "audit-o1"
    assert requested.traceparent == trace and done_event.traceparent == trace
    assert requested.source == app.source and done_event.subject == "paid"
    assert len({root.id, requested.id, done_event.id, audit_event.id}) == 4


# ---------------------------------------------------------------------------------------
# Effectively-once


def recording_app(calls: list[tuple[str, int]], fail_first: bool = False) -> App:
    app = make_app()
    app.store_tables(
        "CREATE TABLE IF NOT EXISTS seen (event_id TEXT NOT NULL, attempt INTEGER NOT NULL)"
    )

    @app.function("order.placed", emits=["payment.requested"], retry=FAST)
    async def record(order: OrderPlaced, ctx: Context) -> None:
        calls.append((ctx.event.id, ctx.attempt))
        await ctx.store.execute("INSERT INTO seen VALUES (?, ?)", (ctx.event.id, ctx.attempt))
        ctx.emit(PaymentRequested(order_id=order.order_id))
        if fail_first and ctx.attempt == 1:
            raise RuntimeError("fail after writing")

    @app.function("payment.requested")
    async def downstream(request: PaymentRequested, ctx: Context) -> None:
        calls.append((f"downstream:{request.order_id}", ctx.attempt))

    return app


async def rows(rt: Runtime) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for r in await rt.store.query("SELECT event_id, attempt FROM seen")]


async def test_redelivered_duplicate_runs_the_handler_once(broker: str) -> None:
    calls: list[tuple[str, int]] = []
    app = recording_app(calls)
    event = app.make_event(OrderPlaced(order_id="o1"))
    async with Runtime(app, broker) as rt:
        await rt.client.publish_events([event])
        await rt.wait_idle()
        await rt.client.publish_events([event])  # same id: a redelivered duplicate
        await rt.wait_idle()
        stats = rt.runners["record"].stats
        assert await rows(rt) == [(event.id, 1)]
        assert (stats.received, stats.processed, stats.duplicates) == (2, 1, 1)
    assert calls == [(event.id, 1), ("downstream:o1", 1)]


async def test_duplicate_after_a_restart_is_not_processed_again(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    app = recording_app(calls)
    event = app.make_event(OrderPlaced(order_id="o1"))
    async with Runtime(app, sqlite_url(tmp_path)) as rt:
        await rt.client.publish_events([event])
        await rt.wait_idle()
    async with Runtime(app, sqlite_url(tmp_path)) as rt:
        await rt.client.publish_events([event])
        await rt.wait_idle()
        assert rt.runners["record"].stats.duplicates == 1
        assert await rows(rt) == [(event.id, 1)]
    assert calls == [(event.id, 1), ("downstream:o1", 1)]


async def test_concurrent_duplicates_take_effect_once(broker: str) -> None:
    calls: list[tuple[str, int]] = []
    app = recording_app(calls)
    event = app.make_event(OrderPlaced(order_id="o1"))
    async with Runtime(app, broker) as rt:
        await rt.client.publish_events([event, event, event])
        await rt.wait_idle()
        assert await rows(rt) == [(event.id, 1)]
        stats = rt.runners["record"].stats
        assert stats.received == 3
        assert stats.duplicates == 2
        assert stats.processed == 1
    assert calls.count(("downstream:o1", 1)) == 1


async def test_a_failed_commit_releases_its_light_units_and_still_acks_the_rest(
    broker: str,
) -> None:
    """A batch's commit of its light units (handlers that wrote nothing) fails: they go
    back to the broker for another attempt, and the batch's units that committed their
    own writes are acked all the same. Once, the failure left the batch half done: the
    committed unit was never acked and stayed in flight."""
    app = make_app()
    app.store_tables("CREATE TABLE IF NOT EXISTS seen (event_id TEXT NOT NULL)")
    calls: list[tuple[str, int]] = []

    @app.function("order.placed")
    async def mixed(order: OrderPlaced, ctx: Context) -> None:
        calls.append((order.order_id, ctx.attempt))
        if order.amount:  # a heavy unit: commits its write itself
            await ctx.store.execute("INSERT INTO seen VALUES (?)", (order.order_id,))

    async with Runtime(app, broker) as rt:
        commits = 0
        real = rt.store.commit_records

        async def flaky(items: Any) -> Any:
            nonlocal commits
            commits += 1
            if commits == 1:  # slow: the next two units finish meanwhile, one batch
                await asyncio.sleep(0.3)
            elif commits == 2:
                raise StoreError("the store went away for a moment")
            return await real(items)

        rt.store.commit_records = flaky  # type: ignore[method-assign]
        await rt.client.publish(OrderPlaced(order_id="light-1"))
        await until(lambda: commits == 1, what="the first commit")
        await rt.client.publish_events(
            [
                app.make_event(OrderPlaced(order_id="light-2")),
                app.make_event(OrderPlaced(order_id="heavy", amount=1)),
            ]
        )
        await rt.wait_idle(timeout=10)
        stats = rt.runners["mixed"].stats
        assert (stats.processed, stats.duplicates, stats.lease_lost) == (3, 0, 0)
        assert [r[0] for r in await rt.store.query("SELECT event_id FROM seen")] == ["heavy"]
    assert sorted(calls) == [("heavy", 1), ("light-1", 1), ("light-2", 1), ("light-2", 2)]


async def test_records_handled_while_the_commit_interval_runs_join_that_commit(
    tmp_path: Path,
) -> None:
    """A store that commits idempotency records at most every 0.3 s: the first event's
    record commits at once, and the events handled during the interval that follows
    commit together when it ends, in one commit. Once, the runner took its batch before
    waiting the interval out: what was handled meanwhile waited a whole interval more
    for its commit and ack, and a busy consumer ran into its in-flight limit."""
    from nerve.store import SqliteStore

    app = make_app()
    handled: list[str] = []

    @app.function("order.placed")
    async def note(order: OrderPlaced, ctx: Context) -> None:
        handled.append(order.order_id)

    store = SqliteStore(f"sqlite:///{tmp_path / 'store.db'}", commit_interval=0.3)
    async with Runtime(app, sqlite_url(tmp_path), store) as rt:
        sizes: list[int] = []
        real = rt.store.commit_records

        async def counted(items: Any) -> Any:
            sizes.append(len(items))
            return await real(items)

        rt.store.commit_records = counted  # type: ignore[method-assign]
        await rt.client.publish(OrderPlaced(order_id="first"))
        await until(lambda: sizes == [1], what="the first commit")
        started = time.monotonic()
        for i in range(3):
            await rt.client.publish(OrderPlaced(order_id=f"later-{i}"))
            await until(lambda n=2 + i: len(handled) == n, what=f"later-{i} handled")
        assert time.monotonic() - started < 0.3, "too slow to land within the interval"
        await rt.wait_idle(timeout=10)
        assert sizes == [1, 3]
        assert rt.runners["note"].stats.processed == 4


async def test_failed_handler_writes_are_rolled_back(broker: str) -> None:
    calls: list[tuple[str, int]] = []
    app = recording_app(calls, fail_first=True)
    async with Runtime(app, broker) as rt:
        event = await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle()
        assert await rows(rt) == [(event.id, 2)]
        processed = await rt.store.query(
            "SELECT event_id FROM nerve_processed WHERE function = 'record'"
        )
        assert [r[0] for r in processed] == [event.id]
    assert [c for c in calls if c[0] == event.id] == [(event.id, 1), (event.id, 2)]
    assert calls.count(("downstream:o1", 1)) == 1


# ---------------------------------------------------------------------------------------
# Ordering and concurrency


async def test_custom_key_orders_per_key_and_holds_retries_in_place() -> None:
    app = make_app()
    done: list[tuple[str, int]] = []
    attempts: dict[tuple[str, int], int] = {}
    rng = random.Random(7)

    def others_done() -> bool:
        return sum(1 for account, _ in done if account != "a") == 20

    @app.function(
        "transfer.made",
        key=lambda t: t.account,
        concurrency=16,
        # a0 keeps failing until b and c are done (about 10 s of attempts at most): it
        # only succeeds if a failing key blocks nothing but itself
        retry=RetryPolicy(max_attempts=500, base=0.01, jitter=False),
    )
    async def apply(t: Transfer, ctx: Context) -> None:
        attempts[(t.account, t.seq)] = ctx.attempt
        await asyncio.sleep(rng.uniform(0, 0.01))
        if (t.account, t.seq) == ("a", 0) and (ctx.attempt < 3 or not others_done()):
            raise Retry(delay=0.02)
        done.append((t.account, t.seq))

    events = [
        app.make_event(Transfer(account=account, seq=seq))
        for seq in range(10)
        for account in ("a", "b", "c")
    ]
    async with Runtime(app, "memory://") as rt:
        await rt.client.publish_events(events)
        await rt.wait_idle(timeout=30)
        assert await dead_letters(rt, "apply") == []
    for account in ("a", "b", "c"):
        assert [s for a, s in done if a == account] == list(range(10)), account
    assert attempts[("a", 0)] >= 3
    assert all(n == 1 for key, n in attempts.items() if key != ("a", 0))
    # retries were held in place: no later event of key a ran before a0 succeeded
    assert done.index(("a", 0)) > max(done.index((k, s)) for k in ("b", "c") for s in range(10))


async def test_concurrency_limit_and_live_changes() -> None:
    app = make_app()
    running = 0
    peak = 0
    handled = 0

    @app.function("order.placed", concurrency=3)
    async def work(order: OrderPlaced, ctx: Context) -> None:
        nonlocal running, peak, handled
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0 if order.order_id == "flush" else 0.03)
        finally:
            running -= 1
            handled += 1

    async def burst(rt: Runtime, n: int) -> int:
        nonlocal peak, handled
        peak = 0
        target = handled + n
        await rt.client.publish_events(
            [app.make_event(OrderPlaced(order_id=f"o{i}")) for i in range(n)]
        )
        await until(lambda: handled >= target, 10, "the burst")
        return peak

    async def flush(rt: Runtime) -> None:
        # a fetch started under the old limit may still be waiting: let it take one event
        target = handled + 1
        await rt.client.publish(OrderPlaced(order_id="flush"))
        await until(lambda: handled >= target, 5, "the flush event")

    async with Runtime(app, "memory://") as rt:
        runner = rt.runners["work"]
        assert await burst(rt, 15) == 3
        runner.set_concurrency(7)
        await flush(rt)
        assert await burst(rt, 35) == 7
        runner.set_concurrency(2)
        await flush(rt)
        assert await burst(rt, 10) == 2
        await rt.wait_idle()
        assert runner.stats.processed == 15 + 1 + 35 + 1 + 10


# ---------------------------------------------------------------------------------------
# Graceful shutdown


async def test_stop_lets_running_handlers_finish(tmp_path: Path) -> None:
    app = make_app()
    started = asyncio.Event()
    finished: list[str] = []

    @app.function("order.placed", timeout=None)
    async def slow(order: OrderPlaced, ctx: Context) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(order.order_id)

    rt = Runtime(app, sqlite_url(tmp_path), shutdown_timeout=5)
    await rt.start()
    try:
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await asyncio.wait_for(started.wait(), 5)
    finally:
        t0 = time.monotonic()
        await rt.stop()
    assert finished == ["o1"]
    assert time.monotonic() - t0 < 3
    assert rt.runners["slow"].stats.processed == 1

    # acked: a new runtime on the same file has nothing to do
    again: list[str] = []
    app2 = make_app()

    @app2.function("order.placed", name="slow")
    async def slow2(order: OrderPlaced, ctx: Context) -> None:
        again.append(order.order_id)

    async with Runtime(app2, sqlite_url(tmp_path)) as rt2:
        await rt2.wait_idle()
        assert rt2.runners["slow"].stats.received == 0
    assert again == []


async def test_handler_outliving_the_shutdown_timeout_is_released_not_lost(
    tmp_path: Path,
) -> None:
    app = make_app()
    app.store_tables("CREATE TABLE IF NOT EXISTS seen (event_id TEXT, attempt INTEGER)")
    started = asyncio.Event()
    cancelled: list[int] = []

    @app.function("order.placed", name="slow", timeout=None)
    async def stuck(order: OrderPlaced, ctx: Context) -> None:
        await ctx.store.execute("INSERT INTO seen VALUES (?, ?)", (ctx.event.id, ctx.attempt))
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(ctx.attempt)
            raise

    rt = Runtime(app, sqlite_url(tmp_path), shutdown_timeout=0.3)
    await rt.start()
    try:
        event = await rt.client.publish(OrderPlaced(order_id="o1"))
        await asyncio.wait_for(started.wait(), 5)
    finally:
        t0 = time.monotonic()
        await rt.stop()
    assert time.monotonic() - t0 < 5
    assert cancelled == [1]

    app2 = make_app()
    app2.store_tables("CREATE TABLE IF NOT EXISTS seen (event_id TEXT, attempt INTEGER)")
    later: list[tuple[str, int]] = []

    @app2.function("order.placed", name="slow")
    async def fine(order: OrderPlaced, ctx: Context) -> None:
        later.append((ctx.event.id, ctx.attempt))
        await ctx.store.execute("INSERT INTO seen VALUES (?, ?)", (ctx.event.id, ctx.attempt))

    async with Runtime(app2, sqlite_url(tmp_path)) as rt2:
        await until(lambda: bool(later), 10, "the released event to be redelivered")
        await rt2.wait_idle()
        assert [tuple(r) for r in await rt2.store.query("SELECT * FROM seen")] == [
            (event.id, 2)
        ]  # the cancelled attempt's write was rolled back
    assert later == [(event.id, 2)]


# ---------------------------------------------------------------------------------------
# Selecting functions


async def test_only_runs_the_named_functions() -> None:
    app = make_app()
    ran: list[str] = []

    @app.function("order.placed")
    async def first(order: OrderPlaced, ctx: Context) -> None:
        ran.append("first")

    @app.function("order.placed")
    async def second(order: OrderPlaced, ctx: Context) -> None:
        ran.append("second")

    async with Runtime(app, "memory://", only=["second"]) as rt:
        assert set(rt.runners) == {"second"}
        await rt.client.publish(OrderPlaced(order_id="o1"))
        await rt.wait_idle()
    assert ran == ["second"]


def test_only_with_an_unknown_name_is_a_config_error() -> None:
    app = make_app()

    @app.function("order.placed")
    async def first(order: OrderPlaced, ctx: Context) -> None:
        return None

    with pytest.raises(ConfigError) as info:
        Runtime(app, "memory://", only=["first", "nope"])
    assert "'nope'" in str(info.value)
    assert "first" in str(info.value)


def test_bad_broker_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        Runtime(make_app(), "bogus://x")


async def test_the_duration_metric_and_the_stats_time_each_handler_call() -> None:
    app = make_app()

    @app.function("order.placed", concurrency=1)
    async def slow(order: OrderPlaced, ctx: Context) -> None:
        await asyncio.sleep(0.05)

    async with Runtime(app, "memory://", metrics=True) as rt:
        for i in range(4):
            await rt.client.publish(OrderPlaced(order_id=f"o{i}", amount=i))
        await rt.wait_idle()
        assert rt.metrics is not None
        duration = rt.metrics.function("slow").duration
        stats = rt.runners["slow"].stats
    assert sum(duration.counts) == 4
    # one clock pair per call, shared by the metric and the stats: ~0.05 s each
    assert 0.2 <= duration.sum < 0.4, duration.sum
    assert stats.handler_seconds == pytest.approx(duration.sum)


def test_tune_gc_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    """What ``nerve run`` does to the collector, offered to apps that run a Runtime in
    a process of their own: start-up objects frozen (out of the collector's walks),
    young objects collected every YOUNG_THRESHOLD allocations instead of 700."""
    import gc

    from nerve.runtime import tune_gc
    from nerve.runtime.runtime import YOUNG_THRESHOLD

    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        tune_gc()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
