"""``amqp://user:pass@host:5672/vhost``: RabbitMQ (3.10+) through aio-pika.

Design (docs/brokers/rabbitmq.md has the full mapping): events go to one durable topic
exchange ``<prefix>.events`` with the event type as routing key, as structured-mode
CloudEvents JSON (binary-mode messages with ``cloudEvents_``/``cloudEvents:`` headers
are decoded too). Each group is one quorum queue ``<prefix>.g.<group>`` bound with its
patterns (``>`` becomes ``*.#``); attribute filters are applied by the consumer, which
acks what does not match. Publishes are persistent and wait for publisher confirms.

The attempt number is ``x-nerve-attempt`` (carried by copies) plus the quorum queue's
``x-delivery-count``. A lease is the consumer's own timer: when it runs out the
consumer requeues the message itself, and settling it afterwards raises LeaseLost (a
dead process's leases end when its connection does). A nack with a delay publishes a
copy to a delay queue ``<prefix>.g.<group>.delay.<ms>.e<epoch>`` (one per delay bucket
and epoch of wall-clock time, with a message TTL and the group queue as dead-letter
target) and then acks the original. Dead letters are kept in the quorum queue
``<prefix>.g.<group>.dlq``.

URL options: ``?prefix=nerve&visibility_timeout=30&max_payload=1048576&prefetch=256
&queue_expires=&connect_timeout=5&heartbeat=60``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from nerve import event as codec
from nerve._urls import redact as _redact
from nerve.app import Subscription, matches_pattern
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    InvalidEvent,
    LeaseLost,
    PayloadTooLarge,
    TransportError,
)
from nerve.event import Event, uuid7
from nerve.transport.base import (
    DeadLetterEntry,
    Delivery,
    Failure,
    Features,
    GroupStats,
    wait_event,
)

__all__ = ["RabbitMQConfig", "RabbitMQConsumer", "RabbitMQDelivery", "RabbitMQTransport"]

_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_\-.]{1,100}$")
_ATTEMPT = "x-nerve-attempt"
_FIRST_AT = "x-nerve-first-at"
_FAILURE = "x-nerve-failure"
_GROUP = "x-nerve-group"
_DEAD_AT = "x-nerve-dead-at"
_CE_PREFIXES = ("cloudEvents_", "cloudEvents:")
_AMQP_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError)


@dataclass(frozen=True, slots=True)
class RabbitMQConfig:
    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    prefix: str = "nerve"
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024
    prefetch: int = 256
    queue_expires: float | None = None
    """Seconds after which an unused group queue (and its DLQ) is deleted; for tests."""
    connect_timeout: float = 5.0
    heartbeat: int = 60

    @classmethod
    def from_url(cls, url: str) -> RabbitMQConfig:
        parts = urlsplit(url)
        if parts.scheme != "amqp":
            raise ConfigError(f"not an amqp:// URL: {_redact(url)!r}")
        try:
            port = parts.port or 5672
        except ValueError:
            raise ConfigError(f"{_redact(url)!r}: the port is not a number") from None
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        known = {
            "prefix",
            "visibility_timeout",
            "max_payload",
            "prefetch",
            "queue_expires",
            "connect_timeout",
            "heartbeat",
        }
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"{_redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        prefix = options.get("prefix", "nerve")
        if not _PREFIX.match(prefix):
            raise ConfigError(
                f"{_redact(url)!r}: prefix must be 1-100 characters of A-Z a-z 0-9 _ - ."
            )
        try:
            expires = options.get("queue_expires") or None
            config = cls(
                host=parts.hostname or "127.0.0.1",
                port=port,
                username=unquote(parts.username) if parts.username else "guest",
                password=unquote(parts.password) if parts.password else "guest",
                vhost=vhost,
                prefix=prefix,
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", 1024 * 1024)),
                prefetch=int(options.get("prefetch", 256)),
                queue_expires=None if expires is None else float(expires),
                connect_timeout=float(options.get("connect_timeout", 5.0)),
                heartbeat=int(options.get("heartbeat", 60)),
            )
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        if config.visibility_timeout <= 0 or config.connect_timeout <= 0:
            raise ConfigError(f"{_redact(url)!r}: timeouts must be positive")
        if not 1 <= config.prefetch <= 65535:
            raise ConfigError(f"{_redact(url)!r}: prefetch must be between 1 and 65535")
        if config.max_payload < 1:
            raise ConfigError(f"{_redact(url)!r}: max_payload must be positive")
        if config.queue_expires is not None and config.queue_expires < 1:
            raise ConfigError(f"{_redact(url)!r}: queue_expires must be at least 1 second")
        return config

    @property
    def where(self) -> str:
        return f"RabbitMQ at {self.host}:{self.port} (vhost {self.vhost!r})"


def binding_key(pattern: str) -> str:
    """The AMQP topic binding key for a nerve pattern. It may match more than the
    pattern (consumers check the pattern again), never less."""
    if pattern == ">":
        return "#"
    words: list[str] = []
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">":
            words.extend(["*", "#"] if i == len(tokens) - 1 else ["#"])
        elif token == "*" or ("*" not in token and "#" not in token and ">" not in token):
            words.append(token)
        else:
            words.append("#")
    key = ".".join(words)
    return key if len(key.encode()) <= 255 else "#"


DELAY_EPOCH = 3600.0
"""Seconds a delay queue takes copies for at most (less with ``queue_expires``)."""


def delay_bucket(delay: float) -> int:
    """``delay`` seconds rounded up to a bucket of milliseconds with 3 significant bits
    (at most 12.5% later), so few delay queues exist per group."""
    ms = max(1, math.ceil(delay * 1000))
    shift = max(0, ms.bit_length() - 3)
    return ((ms + (1 << shift) - 1) >> shift) << shift


def _header_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _binary_event(headers: Mapping[str, Any], content_type: str | None, body: bytes) -> Event:
    """An event from a CloudEvents AMQP binding message in binary mode."""
    attributes: dict[str, Any] = {}
    for name, value in headers.items():
        for prefix in _CE_PREFIXES:
            if name.startswith(prefix):
                attributes[name[len(prefix) :]] = _header_value(value)
    if content_type is not None:
        attributes.setdefault("datacontenttype", content_type)
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    data: Any
    if not body:
        data = None
    elif media == "application/json" or media.endswith("+json"):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError("data", f"is not valid JSON: {exc}", body) from None
    elif media.startswith("text/"):
        data = body.decode("utf-8", "replace")
    else:
        data = body
    try:
        return codec.from_attributes(attributes, data)
    except DecodeError:
        raise
    except InvalidEvent as exc:
        raise DecodeError(exc.attribute, exc.reason, body) from None


def _decode_message(
    headers: Mapping[str, Any], content_type: str | None, body: bytes
) -> tuple[bytes, Event | None, DecodeError | None]:
    """(raw structured bytes, event, error) of a received message in either mode."""
    is_structured = (content_type or "").startswith("application/cloudevents")
    if not is_structured and any(k.startswith(_CE_PREFIXES) for k in headers):
        try:
            event = _binary_event(headers, content_type, body)
        except DecodeError as exc:
            return body, None, exc
        return codec.encode(event), event, None
    return body, None, None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _translate(exc: BaseException, what: str, where: str) -> TransportError:
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError | ConnectionError | OSError):
        return BrokerUnavailable(f"{what}: lost the connection to {where}: {exc!r}")
    if isinstance(exc, aiormq.exceptions.ChannelInvalidStateError):
        return BrokerUnavailable(f"{what}: the channel to {where} is closed (reconnecting)")
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return TransportError(
            f"{what}: {where} refused it ({exc}); a queue or exchange of this prefix exists "
            "with other settings (queue_expires?): delete it or use the same options"
        )
    return TransportError(f"{what}: {where} failed: {exc!r}")


class _Sticky(dict[str, Any]):
    """aiormq's consumer table, keeping one consumer's callback after its cancel-ok."""

    def __init__(self, table: dict[str, Any], tag: str) -> None:
        super().__init__(table)
        self.tag = tag

    def pop(self, key: str, default: Any = None) -> Any:
        if key == self.tag:
            return self.get(key, default)
        return super().pop(key, default)


class _Unroutable(TransportError):
    """A message for one queue found no queue (mandatory publish returned)."""


class _Refused(TransportError):
    """The broker nacked a publish (a quorum queue that cannot take it right now)."""


_REPUBLISH_PAUSES = (0.05, 0.25, 1.0)
"""Seconds to wait before publishing a refused retry copy or dead letter again."""


# -- deliveries and consumers -------------------------------------------------------------

_BUFFERED, _HELD, _SETTLING, _DONE, _LOST = range(5)


class RabbitMQDelivery:
    __slots__ = (
        "_consumer",
        "_deadline",
        "_error",
        "_event",
        "_state",
        "_timer",
        "attempt",
        "content_type",
        "first_at",
        "group",
        "message",
        "raw",
        "received_at",
    )

    def __init__(self, consumer: RabbitMQConsumer, message: DeliveredMessage) -> None:
        self._consumer = consumer
        self.message = message
        self.group = consumer.group
        properties = message.header.properties
        headers = properties.headers or {}
        self.raw, self._event, self._error = _decode_message(
            headers, properties.content_type, message.body
        )
        self.content_type = (
            codec.CONTENT_TYPE_STRUCTURED if self._event is not None else properties.content_type
        )
        self.attempt = _int(headers.get(_ATTEMPT), 1) + _int(headers.get("x-delivery-count"), 0)
        first = headers.get(_FIRST_AT)
        if isinstance(first, int | float) and not isinstance(first, bool):
            self.first_at = float(first)
        elif self.attempt > 1 and properties.timestamp is not None:
            stamp = properties.timestamp
            self.first_at = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
        else:
            self.first_at = 0.0  # set when handed out
        self.received_at = 0.0
        self._state = _BUFFERED
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    @property
    def _tag(self) -> int:
        tag = self.message.delivery_tag
        assert tag is not None
        return tag

    @property
    def event(self) -> Event:
        if self._event is None:
            if self._error is not None:
                raise self._error
            self._event = codec.decode(self.raw)
        return self._event

    def __repr__(self) -> str:
        return f"<RabbitMQDelivery {self.group}#{self.message.delivery_tag} attempt={self.attempt}>"

    # -- lease -----------------------------------------------------------------------

    def _hand_out(self, now: float) -> None:
        self._state = _HELD
        self.received_at = now
        if not self.first_at:
            self.first_at = now
        self._arm(self._consumer.transport.config.visibility_timeout)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._deadline = time.monotonic() + seconds
        self._timer = loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._state == _HELD:
            self._state = _LOST
            self._consumer._expired(self)

    def _begin(self, action: str) -> None:
        """Take the delivery for one settlement, or raise LeaseLost."""
        if self._state != _HELD or not self._consumer._alive(self.message):
            if self._state == _HELD:
                self._state = _LOST
                self._consumer._forget(self)
            raise LeaseLost(
                f"{self!r}: the lease expired or the channel closed and the event went back "
                f"to its group; this {action} was refused"
            )
        self._state = _SETTLING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        """A settlement failed before it changed anything: keep the lease."""
        self._state = _HELD
        self._arm(max(0.0, self._deadline - time.monotonic()))

    async def _finish(self, action: str, counter: str) -> None:
        """Ack or requeue the message on its channel (after anything it needed)."""
        await _settle(self._consumer, [self], action, counter)

    # -- the Delivery protocol -------------------------------------------------------

    async def ack(self) -> None:
        self._begin("ack")
        await self._finish("ack", "processed")

    async def nack(self, delay: float = 0.0) -> None:
        self._begin("nack")
        if delay > 0:
            try:
                await self._consumer.transport._publish_delayed(self, delay)
            except BaseException:
                self._abort()
                raise
            await self._finish("ack", "retried")
        else:
            await self._finish("nack", "retried")

    async def dead_letter(self, failure: Failure) -> None:
        self._begin("dead_letter")
        try:
            await self._consumer.transport._publish_dead_letter(self, failure)
        except BaseException:
            self._abort()
            raise
        await self._finish("ack", "dead_lettered")

    async def extend(self, seconds: float) -> None:
        if self._state != _HELD or not self._consumer._alive(self.message):
            raise LeaseLost(f"{self!r}: the lease was lost; it cannot be extended")
        self._arm(seconds)


async def _settle(
    consumer: RabbitMQConsumer, deliveries: list[RabbitMQDelivery], action: str, counter: str
) -> None:
    """Ack or requeue ``deliveries`` (taken with ``_begin``) on their channel in one
    frame: one of them, or, for an ack, several as a ``multiple`` ack up to the highest
    tag (the caller has checked that no other unsettled message of the channel is under
    it)."""
    last = deliveries[-1]
    try:
        if action == "ack":
            await last.message.channel.basic_ack(last._tag, multiple=len(deliveries) > 1)
        else:
            await last.message.channel.basic_nack(last._tag, requeue=True)
    except aiormq.exceptions.ChannelInvalidStateError:
        for delivery in deliveries:
            delivery._state = _LOST
        raise LeaseLost(
            f"{last!r}: the channel closed and the event went back to its group; "
            f"this {action} was refused"
        ) from None
    except _AMQP_ERRORS as exc:
        for delivery in deliveries:
            delivery._state = _LOST
        raise _translate(exc, action, consumer.transport.config.where) from None
    finally:
        for delivery in deliveries:
            consumer._forget(delivery)
    for delivery in deliveries:
        delivery._state = _DONE
    consumer.transport._count(last.group, counter, len(deliveries))


_ARRIVAL_TURNS = 8
"""At most this many event-loop turns a fetch lets messages already sent arrive."""


class RabbitMQConsumer:
    def __init__(self, transport: RabbitMQTransport, subscription: Subscription) -> None:
        self.transport = transport
        self.subscription = subscription
        self.group = subscription.group
        self._queue_name = transport._queue(self.group)
        self._buffer: deque[RabbitMQDelivery] = deque()
        self._held: set[RabbitMQDelivery] = set()
        self._side: set[tuple[int, int]] = set()
        """(id of the channel, tag) of messages with an ack or requeue on its way outside
        ``ack_many`` (a filtered-out message, an expired lease, a give-back)."""
        self._wake = asyncio.Event()
        self._channel: RawChannel | None = None
        self._tag: str | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._closed = False
        self._cancelled = False
        self._qos = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._exchange = transport._exchange_name

    @staticmethod
    def _alive(message: DeliveredMessage) -> bool:
        return not message.channel.is_closed

    async def _open(self) -> None:
        """Open a channel and consume (again, after a lost connection: what the old
        channel had went back to the queue, and its deliveries' leases are lost)."""
        async with self._opening:
            if self._closed or (self._channel is not None and not self._channel.is_closed):
                return
            self._buffer.clear()
            transport = self.transport
            await transport._require_queue(self._queue_name, f"declare group {self.group!r}")
            try:
                channel = await transport._raw_channel(confirms=False)
                await channel.basic_qos(prefetch_count=self._qos)
                ok = await channel.basic_consume(self._queue_name, self._on_message, no_ack=False)
            except _AMQP_ERRORS as exc:
                raise _translate(exc, "consume", transport.config.where) from None
            self._channel, self._tag = channel, ok.consumer_tag

    async def _on_message(self, message: DeliveredMessage) -> None:
        delivery = RabbitMQDelivery(self, message)
        if message.exchange == self._exchange and not self._wanted(delivery):
            await self._side_settle(delivery, message.channel.basic_ack(delivery._tag))
            return
        if self._cancelled:  # raced the cancel: it never reached a fetch
            self._side.add((id(message.channel), delivery._tag))
            self._spawn(self._give_back(delivery))
            return
        self._buffer.append(delivery)
        self._wake.set()

    def _wanted(self, delivery: RabbitMQDelivery) -> bool:
        sub = self.subscription
        routing_key = delivery.message.routing_key or ""
        if not any(matches_pattern(p, routing_key) for p in sub.patterns):
            return False
        if not sub.filters:
            return True
        try:
            return sub.matches(delivery.event)
        except DecodeError:
            return True  # hand it out: the runtime dead-letters what it cannot decode

    async def _demand(self, limit: int) -> None:
        """Let the broker push about as many as are asked for (no more than the
        ``prefetch`` option): a consumer must not hoard what its peers could handle."""
        want = max(1, min(len(self._held) + limit, self.transport.config.prefetch))
        if self._channel is None or self._channel.is_closed:
            self._qos = want
            await self._open()
        elif want > self._qos or want < self._qos // 2:
            try:
                await self._channel.basic_qos(prefetch_count=want)
            except _AMQP_ERRORS as exc:
                raise _translate(exc, "consume", self.transport.config.where) from None
            self._qos = want

    async def fetch(self, limit: int, timeout: float) -> Sequence[RabbitMQDelivery]:
        deadline = time.monotonic() + timeout
        while True:
            if self._closed:
                return []
            await self._demand(limit)
            if 0 < len(self._buffer) < limit:
                await self._let_arrive(limit)
            out: list[RabbitMQDelivery] = []
            now = time.time()
            while self._buffer and len(out) < limit:
                delivery = self._buffer.popleft()
                if not self._alive(delivery.message):
                    continue  # its channel died: the broker has requeued it
                delivery._hand_out(now)
                self._held.add(delivery)
                out.append(delivery)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wake.clear()
            await wait_event(self._wake, remaining)

    async def _let_arrive(self, limit: int) -> None:
        """Let what the broker has already sent reach the buffer before a batch is taken.

        aiormq hands each message to ``_on_message`` in a task of its own, so a fetch
        woken by the first of a burst would otherwise take it alone, and the whole
        pipeline (idempotency check, commit, ack) would run once per message. A few
        turns of the event loop (no timer, no added wait when nothing more is coming)
        bring in what is buffered in the socket.
        """
        buffer = self._buffer
        still = 0
        for _ in range(_ARRIVAL_TURNS):
            before = len(buffer)
            await asyncio.sleep(0)
            if len(buffer) >= limit:
                return
            still = still + 1 if len(buffer) == before else 0
            if still >= 2:
                return

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Ack a batch: one ``basic.ack`` with ``multiple`` for the longest run of
        delivery tags that covers every unsettled message of the channel up to it (the
        batch's lowest tags, usually all of them), then one ack per remaining delivery."""
        lost: list[Delivery] = []
        mine: list[RabbitMQDelivery] = []
        channel = self._channel
        for delivery in deliveries:
            assert isinstance(delivery, RabbitMQDelivery)
            try:
                delivery._begin("ack")
            except LeaseLost:
                lost.append(delivery)
                continue
            mine.append(delivery)
        covered: list[RabbitMQDelivery] = []
        if channel is not None and len(mine) > 1:
            batch = {id(d) for d in mine}
            # the lowest tag on this channel that must stay unacked: buffered, or held
            # and not in this batch (a handler still running, a nack being published)
            others = [
                d._tag for d in self._held if id(d) not in batch and d.message.channel is channel
            ]
            others += [d._tag for d in self._buffer if d.message.channel is channel]
            others += [tag for of, tag in self._side if of == id(channel)]
            floor = min(others, default=None)
            ours = sorted((d for d in mine if d.message.channel is channel), key=lambda d: d._tag)
            for delivery in ours:
                if floor is not None and delivery._tag > floor:
                    break
                covered.append(delivery)
            if len(covered) < 2:
                covered = []
        try:
            if covered:
                try:
                    await _settle(self, covered, "ack", "processed")
                except LeaseLost:
                    lost += covered
            done = {id(d) for d in covered}
            for delivery in mine:
                if id(delivery) in done:
                    continue
                try:
                    await delivery._finish("ack", "processed")
                except LeaseLost:
                    lost.append(delivery)
        except BaseException:
            for delivery in mine:  # not settled: they keep their leases
                if delivery._state == _SETTLING:
                    delivery._abort()
            raise
        return lost

    def _expired(self, delivery: RabbitMQDelivery) -> None:
        """The lease ran out while this consumer is alive: requeue the message."""
        self._held.discard(delivery)
        self._side.add((id(delivery.message.channel), delivery._tag))  # now, not when it runs
        requeue = delivery.message.channel.basic_nack(delivery._tag, requeue=True)
        self._spawn(self._side_settle(delivery, requeue))

    async def _side_settle(self, delivery: RabbitMQDelivery, settlement: Awaitable[None]) -> None:
        """Await an ack or requeue sent outside ``ack_many`` and the delivery's own
        settlement; until it is done its tag is in ``_side``, so that no ``multiple``
        ack covers it (a tag settled twice closes the channel)."""
        side = (id(delivery.message.channel), delivery._tag)
        self._side.add(side)
        try:
            with contextlib.suppress(*_AMQP_ERRORS):
                await settlement
        finally:
            self._side.discard(side)

    def _forget(self, delivery: RabbitMQDelivery) -> None:
        self._held.discard(delivery)
        if self._closed and not self._held:
            self._spawn(self._close_channel())

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, delivery: RabbitMQDelivery) -> None:
        """Return a buffered (never handed out) message without counting an attempt: a
        copy with the same attempt goes to the queue, then the original is acked."""
        if not self._alive(delivery.message):
            return
        side = (id(delivery.message.channel), delivery._tag)
        self._side.add(side)  # (also done by whoever spawned this, before it runs)
        try:
            with contextlib.suppress(*_AMQP_ERRORS, TransportError):
                await self.transport._publish_copy(delivery, delivery.attempt, self._queue_name)
                await delivery.message.channel.basic_ack(delivery._tag)
        finally:
            self._side.discard(side)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self.transport._consumers.discard(self)
        channel = self._channel
        if channel is not None and self._tag is not None and not channel.is_closed:
            # What a quorum queue handed to this consumer is on its way until the queue has
            # seen the cancel: a get before the cancel (ordered after earlier acks) and one
            # after it (ordered after the cancel) fence those deliveries into the buffer;
            # aiormq would drop any that follow the cancel-ok, so its entry is kept.
            with contextlib.suppress(*_AMQP_ERRORS, TimeoutError):
                for step in ("fence", "cancel", "fence"):
                    if step == "cancel":
                        if isinstance(channel, aiormq.Channel):
                            channel.consumers = _Sticky(channel.consumers, self._tag)
                        await channel.basic_cancel(self._tag, timeout=5)
                        continue
                    got = await channel.basic_get(self._queue_name, no_ack=False, timeout=5)
                    if got.delivery_tag is not None:
                        self._buffer.append(RabbitMQDelivery(self, got))
        self._cancelled = True
        while self._buffer:
            await self._give_back(self._buffer.popleft())
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if not self._held:
            await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        for delivery in list(self._held):
            if delivery._timer is not None:
                delivery._timer.cancel()
        if channel is not None:
            with contextlib.suppress(*_AMQP_ERRORS, TimeoutError):
                await channel.close()

    async def _shutdown(self) -> None:
        """Transport closing: give back the buffer and drop the channel (what is held
        goes back to the group, one attempt higher)."""
        await self.close()
        await self._close_channel()
        for task in list(self._tasks):
            task.cancel()


# -- the transport ----------------------------------------------------------------------


class RabbitMQTransport:
    """Consumer groups on RabbitMQ quorum queues behind one topic exchange."""

    def __init__(self, config: RabbitMQConfig | str | None = None) -> None:
        if isinstance(config, str):
            self.url = config
            config = RabbitMQConfig.from_url(config)
        else:
            config = config or RabbitMQConfig()
            self.url = (
                f"amqp://{config.username}:{config.password}@{config.host}:{config.port}/"
                f"?prefix={config.prefix}"
            )
        self.config = config
        self.features = Features(
            durable=True,
            shared_across_processes=True,
            key_ordering=False,
            dead_letter_queue=True,
            max_payload=config.max_payload,
            lease_expiry=True,
            fenced_settlement=True,
        )
        self._exchange_name = f"{config.prefix}.events"
        self._connection: AbstractRobustConnection | None = None
        self._publisher: RawChannel | None = None
        self._publisher_lock = asyncio.Lock()
        self._groups: dict[str, Subscription] = {}
        self._consumers: set[RabbitMQConsumer] = set()
        self._delay_queues: dict[tuple[str, int, int], float] = {}
        """When this process declared each delay queue, by (group, delay ms, epoch)."""
        self._delay_span = min(config.queue_expires or DELAY_EPOCH, DELAY_EPOCH)
        """Seconds a delay queue takes copies for (see :meth:`_publish_delayed`)."""
        self._delay_epoch = 0
        self._dlqs: dict[str, float] = {}
        self._declaring: dict[str, asyncio.Lock] = {}
        self._counters: dict[str, dict[str, int]] = {}
        self._expires_ms = (
            None if config.queue_expires is None else int(config.queue_expires * 1000)
        )

    def __repr__(self) -> str:
        return f"RabbitMQTransport({_redact(self.url)!r})"

    # -- names -----------------------------------------------------------------------

    def _queue(self, group: str) -> str:
        if not _NAME.match(group):
            raise ConfigError(
                f"group name {group!r} cannot name a RabbitMQ queue: use 1-100 characters "
                "of A-Z a-z 0-9 _ -"
            )
        return f"{self.config.prefix}.g.{group}"

    def _dlq(self, group: str) -> str:
        return self._queue(group) + ".dlq"

    def _queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if self._expires_ms is not None:
            arguments["x-expires"] = self._expires_ms
        return arguments

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        try:
            self._connection = await aio_pika.connect_robust(
                host=config.host,
                port=config.port,
                login=config.username,
                password=config.password,
                virtualhost=config.vhost,
                timeout=config.connect_timeout,
                heartbeat=config.heartbeat,
                reconnect_interval=1.0,
                client_properties={"connection_name": f"nerve {config.prefix}"},
            )
        except aiormq.exceptions.ProbableAuthenticationError:
            raise BrokerUnavailable(
                f"{config.where} refused user {config.username!r}: check the user name and "
                "password in the broker URL, and that the user may use the vhost"
            ) from None
        except (*_AMQP_ERRORS, TimeoutError, ConnectionError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to {config.where}: {type(exc).__name__}; is it running? "
                "(start it with 'rabbitmq-server -detached', or fix host/port in the URL)"
            ) from None
        try:
            channel = await self._channel()
            await channel.exchange_declare(
                self._exchange_name,
                exchange_type="topic",
                durable=True,
                auto_delete=self._expires_ms is not None,
            )
        except _AMQP_ERRORS as exc:
            await self.close()
            raise _translate(exc, "start", config.where) from None

    async def close(self) -> None:
        for consumer in list(self._consumers):
            with contextlib.suppress(Exception):
                await consumer._shutdown()
        self._consumers.clear()
        publisher, self._publisher = self._publisher, None
        if publisher is not None and not publisher.is_closed:
            with contextlib.suppress(*_AMQP_ERRORS, TimeoutError):
                await publisher.close()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*_AMQP_ERRORS, TimeoutError):
                await connection.close()

    def _require_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportError("the RabbitMQ transport is not started (call start())")
        return self._connection

    async def _raw_channel(self, confirms: bool = True) -> RawChannel:
        """A fresh plain (not robust) channel, in confirm mode unless ``confirms`` is
        false; the caller closes it.

        After the connection drops, aio-pika keeps the dead transport until its
        reconnect loop runs, and aiormq refuses a channel on it with a bare
        ``RuntimeError``: that is BrokerUnavailable too. (Letting it escape ended the
        fetch loop of a consumer after a server restart, leaving its queue unconsumed.)
        """
        connection = self._require_connection()
        transport = connection.transport
        unavailable = BrokerUnavailable(f"not connected to {self.config.where} (reconnecting)")
        if transport is None or transport.connection.is_closed:
            raise unavailable
        try:
            return await transport.connection.channel(
                publisher_confirms=confirms, on_return_raises=True
            )
        except RuntimeError:
            if transport.connection.is_closed:  # closed while the channel was asked for
                raise unavailable from None
            raise

    async def _channel(self) -> RawChannel:
        """The shared publishing channel (confirm mode), reopened when it closed."""
        publisher = self._publisher
        if publisher is not None and not publisher.is_closed:
            return publisher
        async with self._publisher_lock:
            if self._publisher is None or self._publisher.is_closed:
                self._publisher = await self._raw_channel()
            return self._publisher

    @contextlib.asynccontextmanager
    async def _scratch(self, what: str) -> AsyncIterator[RawChannel]:
        """A short-lived channel for one admin operation (errors may close it)."""
        try:
            channel = await self._raw_channel()
        except _AMQP_ERRORS as exc:
            raise _translate(exc, what, self.config.where) from None
        try:
            yield channel
        except _AMQP_ERRORS as exc:
            raise _translate(exc, what, self.config.where) from None
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*_AMQP_ERRORS, TimeoutError):
                    await channel.close()

    async def _require_queue(self, name: str, hint: str) -> None:
        try:
            async with self._scratch("check a queue") as channel:
                await channel.queue_declare(name, passive=True)
        except TransportError as exc:
            if "NOT_FOUND" in str(exc):
                raise TransportError(f"{hint} before consuming it (no queue {name!r})") from None
            raise

    # -- declaring and publishing ----------------------------------------------------

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        arguments = self._queue_arguments()
        async with self._scratch("declare") as channel:
            for sub in subscriptions:
                queue = self._queue(sub.group)
                await channel.queue_declare(queue, durable=True, arguments=arguments)
                for key in sorted({binding_key(p) for p in sub.patterns}):
                    await channel.queue_bind(queue, self._exchange_name, routing_key=key)
                self._groups[sub.group] = sub
                self._counters.setdefault(
                    sub.group, {"processed": 0, "retried": 0, "dead_lettered": 0}
                )

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        if not events:
            return
        limit = self.config.max_payload
        now = datetime.now(UTC)
        messages: list[tuple[bytes, Basic.Properties, str]] = []
        for event in events:
            body = codec.encode(event)
            if len(body) > limit:
                raise PayloadTooLarge(len(body), limit, event.id)
            if len(event.type.encode()) > 255:
                raise TransportError(
                    f"event type {event.type[:40]!r}... is over 255 bytes, the longest "
                    "routing key RabbitMQ takes"
                )
            properties = Basic.Properties(
                content_type=codec.CONTENT_TYPE_STRUCTURED,
                delivery_mode=2,
                message_id=event.id,
                message_type=event.type,
                timestamp=now,
            )
            messages.append((body, properties, event.type))
        if to_group is None:
            exchange, mandatory = self._exchange_name, False
        else:
            exchange, mandatory = "", True
            queue = self._queue(to_group)
            messages = [(body, props, queue) for body, props, _ in messages]
        await self._send(exchange, messages, mandatory, to_group)

    async def _send(
        self,
        exchange: str,
        messages: Sequence[tuple[bytes, Basic.Properties, str]],
        mandatory: bool,
        group: str | None,
    ) -> None:
        try:
            channel = await self._channel()
            results = await asyncio.gather(
                *(
                    channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=key,
                        properties=props,
                        mandatory=mandatory,
                    )
                    for body, props, key in messages
                ),
                return_exceptions=True,
            )
        except _AMQP_ERRORS as exc:
            raise _translate(exc, "publish", self.config.where) from None
        for result in results:
            if isinstance(result, aiormq.exceptions.PublishError):
                raise _Unroutable(
                    f"no consumer group named {group!r} is declared on {self.config.where}"
                )
            if isinstance(result, aiormq.exceptions.DeliveryError):
                raise _Refused(
                    f"{self.config.where} refused a publish ({result.frame!r}): a quorum "
                    "queue could not take it"
                )
            if isinstance(result, BaseException):
                if isinstance(result, Exception):
                    raise _translate(result, "publish", self.config.where)
                raise result
            if not isinstance(result, Basic.Ack):
                raise TransportError(f"{self.config.where} did not confirm a publish: {result!r}")

    def _copy_properties(
        self, delivery: RabbitMQDelivery, headers: dict[str, Any]
    ) -> Basic.Properties:
        properties = delivery.message.header.properties
        kept = {
            k: v
            for k, v in (properties.headers or {}).items()
            if not k.startswith("x-") or k in (_ATTEMPT, _FIRST_AT)
        }
        kept.update(headers)
        return Basic.Properties(
            content_type=properties.content_type,
            delivery_mode=2,
            message_id=properties.message_id,
            message_type=properties.message_type,
            timestamp=properties.timestamp,
            headers=kept,
        )

    async def _publish_copy(self, delivery: RabbitMQDelivery, attempt: int, queue: str) -> None:
        headers: dict[str, Any] = {_ATTEMPT: attempt}
        if delivery.first_at:
            headers[_FIRST_AT] = delivery.first_at
        props = self._copy_properties(delivery, headers)
        await self._send("", [(delivery.message.body, props, queue)], True, delivery.group)

    def _delay_name(self, group: str, ms: int, epoch: int) -> str:
        return f"{self._queue(group)}.delay.{ms}.e{epoch}"

    async def _publish_delayed(self, delivery: RabbitMQDelivery, delay: float) -> None:
        """Publish a copy of ``delivery`` that reaches its group queue ``delay`` s later.

        A quorum queue expires ``x-expires`` after it was declared, however often it is
        declared again (RabbitMQ 3.10: rabbitmq-server#5894), and deletes what it holds.
        A delay queue used for longer than its expiry lost the copies waiting in it
        (acknowledged retries, gone). So a delay queue takes copies during one epoch of
        wall-clock time only (``queue_expires``, at most an hour; the next epoch has a
        queue of its own) and expires two epochs and two delays after it was created:
        every copy, published at most an epoch (plus the clock skew between processes)
        after the queue was created, has left it well before.
        """
        ms = delay_bucket(delay)
        group = delivery.group
        span = self._delay_span
        epoch = int(time.time() // span)
        if epoch != self._delay_epoch:  # forget the queues of epochs past
            self._delay_epoch = epoch
            for old in [k for k in self._delay_queues if k[2] < epoch - 1]:
                del self._delay_queues[old]
                old_name = self._delay_name(*old)
                lock = self._declaring.get(old_name)
                if lock is not None and not lock.locked():
                    del self._declaring[old_name]
        name = self._delay_name(group, ms, epoch)
        key = (group, ms, epoch)
        expires_ms = int(2 * span * 1000) + 2 * ms

        async def declare() -> None:
            await self._declare_delay_queue(group, name, ms, expires_ms)

        # declared once (declaring again would not renew it); again only if it vanished
        await self._ensure(name, self._delay_queues, key, math.inf, declare)
        await self._publish_retrying(
            lambda: self._publish_copy(delivery, delivery.attempt + 1, name),
            lambda: self._ensure(name, self._delay_queues, key, 0.0, declare),
        )

    async def _ensure(
        self,
        name: str,
        declared: dict[Any, float],
        key: Any,
        fresh_for: float,
        declare: Callable[[], Awaitable[None]],
    ) -> None:
        """Declare queue ``name`` unless it was declared within ``fresh_for`` seconds,
        one declaration at a time per queue: RabbitMQ 3.10 nacks publishes to a quorum
        queue that another channel is still declaring (the cause of retries that stalled
        until their lease ran out)."""
        lock = self._declaring.setdefault(name, asyncio.Lock())
        asked = time.monotonic()
        async with lock:
            at = declared.get(key)
            if at is not None and (at >= asked or time.monotonic() - at < fresh_for):
                return  # fresh, or declared by someone else while this one waited
            await declare()
            declared[key] = time.monotonic()

    @staticmethod
    async def _publish_retrying(
        publish: Callable[[], Awaitable[None]], redeclare: Callable[[], Awaitable[None]]
    ) -> None:
        """Publish a copy to a queue nerve declares on demand, declaring it again when it
        has expired (unroutable) and retrying a few times when the broker refuses it."""
        for pause in (*_REPUBLISH_PAUSES, None):
            try:
                await publish()
                return
            except (_Unroutable, _Refused):
                if pause is None:
                    raise
                await asyncio.sleep(pause)
                await redeclare()

    async def _declare_delay_queue(self, group: str, name: str, ms: int, expires_ms: int) -> None:
        async with self._scratch("declare a delay queue") as channel:
            await channel.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": ms,
                    "x-expires": expires_ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self._queue(group),
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )

    async def _publish_dead_letter(self, delivery: RabbitMQDelivery, failure: Failure) -> None:
        props = Basic.Properties(
            content_type=delivery.content_type,
            delivery_mode=2,
            message_id=uuid7(),
            timestamp=datetime.now(UTC),
            headers={
                _FAILURE: orjson.dumps(failure.to_json()).decode(),
                _GROUP: delivery.group,
                _DEAD_AT: time.time(),
            },
        )
        group = delivery.group
        message = [(delivery.raw, props, self._dlq(group))]
        await self._ensure(
            self._dlq(group), self._dlqs, group, math.inf, partial(self._declare_dlq, group)
        )
        await self._publish_retrying(
            partial(self._send, "", message, True, None),
            partial(
                self._ensure,
                self._dlq(group),
                self._dlqs,
                group,
                0.0,
                partial(self._declare_dlq, group),
            ),
        )

    async def _declare_dlq(self, group: str) -> None:
        async with self._scratch("declare a dead-letter queue") as channel:
            await channel.queue_declare(
                self._dlq(group), durable=True, arguments=self._queue_arguments()
            )

    def _count(self, group: str, counter: str, n: int = 1) -> None:
        counters = self._counters.setdefault(
            group, {"processed": 0, "retried": 0, "dead_lettered": 0}
        )
        counters[counter] += n

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> RabbitMQConsumer:
        consumer = RabbitMQConsumer(self, subscription)
        self._consumers.add(consumer)
        return consumer

    # -- optional abilities: dead letters and stats ----------------------------------

    def _entry_groups(self, entry_ids: Sequence[str] | None, group: str | None) -> list[str]:
        if group is not None:
            return [group] if _NAME.match(group) else []
        if entry_ids is not None:
            return sorted(
                {i.split(":", 1)[0] for i in entry_ids if ":" in i and _NAME.match(i.split(":")[0])}
            )
        return sorted(self._groups)

    async def _browse(
        self, channel: RawChannel, group: str, limit: int | None
    ) -> list[DeliveredMessage]:
        """Take up to ``limit`` dead letters of ``group`` unacked, in order (the caller
        acks or requeues them). An absent DLQ has none."""
        taken: list[DeliveredMessage] = []
        while limit is None or len(taken) < limit:
            message = await channel.basic_get(self._dlq(group), no_ack=False)
            if message.delivery_tag is None:
                break
            taken.append(message)
        return taken

    async def _requeue(self, channel: RawChannel, messages: Sequence[DeliveredMessage]) -> None:
        for message in messages:
            assert message.delivery_tag is not None
            await channel.basic_nack(message.delivery_tag, requeue=True)

    def _entry(self, group: str, message: DeliveredMessage) -> DeadLetterEntry:
        properties = message.header.properties
        headers = properties.headers or {}
        raw = bytes(message.body)
        failure_doc = headers.get(_FAILURE)
        try:
            if not isinstance(failure_doc, str | bytes):
                raise TypeError("no failure record")
            failure = Failure(**orjson.loads(failure_doc))
        except (orjson.JSONDecodeError, TypeError):
            failure = Failure("unknown", "", "the failure record is unreadable")
        try:
            event: Event | None = codec.decode(raw)
        except DecodeError:
            event = None
        return DeadLetterEntry(
            id=f"{group}:{properties.message_id}",
            group=group,
            raw=raw,
            failure=failure,
            event=event,
        )

    async def _exists(self, channel: RawChannel, queue: str) -> RawChannel | None:
        """``channel`` if ``queue`` exists; None (with a closed channel) if not."""
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return channel

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        found: list[tuple[float, DeadLetterEntry]] = []
        for name in self._entry_groups(None, group):
            async with self._scratch("browse dead letters") as channel:
                if await self._exists(channel, self._dlq(name)) is None:
                    continue
                messages = await self._browse(channel, name, limit)
                for message in messages:
                    headers = message.header.properties.headers or {}
                    dead_at = headers.get(_DEAD_AT)
                    when = float(dead_at) if isinstance(dead_at, int | float) else 0.0
                    found.append((when, self._entry(name, message)))
                await self._requeue(channel, messages)
        found.sort(key=lambda pair: pair[0])
        return [entry for _, entry in found[:limit]]

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        groups = self._entry_groups([entry_id], None)
        if not groups:
            return None
        async with self._scratch("read a dead letter") as channel:
            if await self._exists(channel, self._dlq(groups[0])) is None:
                return None
            messages = await self._browse(channel, groups[0], None)
            entries = [self._entry(groups[0], m) for m in messages]
            await self._requeue(channel, messages)
        return next((e for e in entries if e.id == entry_id), None)

    async def _each_selected(
        self,
        entry_ids: Sequence[str] | None,
        group: str | None,
        what: str,
        replay: bool,
    ) -> int:
        wanted = None if entry_ids is None else set(entry_ids)
        count = 0
        for name in self._entry_groups(entry_ids, group):
            async with self._scratch(what) as channel:
                if await self._exists(channel, self._dlq(name)) is None:
                    continue
                if wanted is None and not replay:
                    ok = await channel.queue_purge(self._dlq(name))
                    count += ok.message_count or 0
                    continue
                messages = await self._browse(channel, name, None)
                keep: list[DeliveredMessage] = []
                for message in messages:
                    entry_id = f"{name}:{message.header.properties.message_id}"
                    if wanted is not None and entry_id not in wanted:
                        keep.append(message)
                        continue
                    if replay and not await self._replay_one(channel, name, message):
                        keep.append(message)
                        continue
                    assert message.delivery_tag is not None
                    await channel.basic_ack(message.delivery_tag)
                    count += 1
                await self._requeue(channel, keep)
        return count

    async def _replay_one(self, channel: RawChannel, group: str, message: DeliveredMessage) -> bool:
        properties = message.header.properties
        props = Basic.Properties(
            content_type=properties.content_type,
            delivery_mode=2,
            message_id=properties.message_id,
            timestamp=datetime.now(UTC),
        )
        try:
            await channel.basic_publish(
                message.body,
                exchange="",
                routing_key=self._queue(group),
                properties=props,
                mandatory=True,
            )
        except aiormq.exceptions.PublishError:
            return False  # the group's queue is gone: keep its dead letter
        return True

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        return await self._each_selected(entry_ids, group, "replay dead letters", True)

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        return await self._each_selected(entry_ids, group, "purge dead letters", False)

    async def _message_count(self, channel: RawChannel, queue: str) -> tuple[RawChannel, int]:
        try:
            ok = await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return await self._raw_channel(), 0
        return channel, ok.message_count or 0

    async def stats(self) -> list[GroupStats]:
        out: list[GroupStats] = []
        channel = await self._raw_channel()
        try:
            for group in sorted(self._groups):
                channel, ready = await self._message_count(channel, self._queue(group))
                channel, dead = await self._message_count(channel, self._dlq(group))
                delayed = 0
                for key in [k for k in self._delay_queues if k[0] == group]:
                    name = self._delay_name(*key)
                    channel, n = await self._message_count(channel, name)
                    delayed += n
                mine = [c for c in list(self._consumers) if c.group == group]
                buffered = sum(len(c._buffer) for c in mine)
                held = sum(len(c._held) for c in mine)
                counters = self._counters.get(group, {})
                out.append(
                    GroupStats(
                        group=group,
                        ready=ready + buffered,
                        delayed=delayed,
                        in_flight=held,
                        dead_letters=dead,
                        processed=counters.get("processed", 0),
                        retried=counters.get("retried", 0),
                        dead_lettered=counters.get("dead_lettered", 0),
                        extra={"counted_by": "this process", "prefetched": buffered},
                    )
                )
        except _AMQP_ERRORS as exc:
            raise _translate(exc, "stats", self.config.where) from None
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*_AMQP_ERRORS, TimeoutError):
                    await channel.close()
        return out
