"""``nats://host:4222?stream=nerve``: NATS JetStream (server 2.9 or later).

Design (docs/brokers/nats.md): one file-backed stream ``<stream>`` holds events on
``<stream>.ev.<type>`` and targeted redeliveries on ``<stream>.to.<group>``. Each group
is two durable pull consumers created at ``declare()`` with ``DeliverPolicy.NEW``:
``g_<group>`` (filter ``<stream>.ev.<pattern>`` for one pattern, ``<stream>.ev.>``
otherwise; the subscription is matched again client-side and non-matching messages are
acked unseen) and ``t_<group>`` (filter ``<stream>.to.<group>``). The lease is the
consumer's ``ack_wait``; attempts are JetStream's delivery count. Dead letters live in
a second stream ``<stream>_dlq`` (subject ``<stream>_dlq.<group>``). Events travel as
structured CloudEvents JSON; binary-mode messages (``ce-`` headers) are decoded too.

URL options: ``?stream=nerve&visibility_timeout=30&max_payload=1048064&max_age=604800
&dlq_max_age=2592000&max_ack_pending=10000&connect_timeout=2&replicas=1``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from nerve import event as codec
from nerve._native import speedups
from nerve._urls import redact as _redact
from nerve.app import Subscription, matches_pattern
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    InvalidEvent,
    LeaseLost,
    TransportError,
)
from nerve.event import Event
from nerve.transport.base import (
    DeadLetterEntry,
    Delivery,
    Failure,
    Features,
    GroupStats,
    encode_checked,
    wait_event,
)

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_SAFE_PATTERN = re.compile(r"^([A-Za-z0-9_\-]+|\*)(\.([A-Za-z0-9_\-]+|\*))*(\.>)?$|^>$")
_HEADER_ROOM = 512
_DEFAULT_MAX_PAYLOAD = 1024 * 1024 - _HEADER_ROOM
_DEFAULT_MAX_AGE = 7 * 86400.0
_DEFAULT_DLQ_MAX_AGE = 30 * 86400.0
_DEFAULT_MAX_ACK_PENDING = 10_000
"""Bytes of the server's max_payload kept for message headers."""
_STRUCTURED = "application/cloudevents+json"


@dataclass(frozen=True, slots=True)
class NatsConfig:
    server: str = "nats://127.0.0.1:4222"
    """The server URL without nerve's options (it may hold credentials)."""
    host: str = "127.0.0.1"
    port: int = 4222
    stream: str = "nerve"
    visibility_timeout: float = 30.0
    max_payload: int = _DEFAULT_MAX_PAYLOAD
    max_age: float = _DEFAULT_MAX_AGE
    dlq_max_age: float = _DEFAULT_DLQ_MAX_AGE
    max_ack_pending: int = _DEFAULT_MAX_ACK_PENDING
    connect_timeout: float = 2.0
    replicas: int = 1

    @classmethod
    def from_url(cls, url: str) -> NatsConfig:
        parts = urlsplit(url)
        if parts.scheme != "nats":
            raise ConfigError(f"not a nats URL: {_redact(url)!r}")
        try:
            host = parts.hostname or "127.0.0.1"
            port = parts.port or 4222
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {
            "stream",
            "visibility_timeout",
            "max_payload",
            "max_age",
            "dlq_max_age",
            "max_ack_pending",
            "connect_timeout",
            "replicas",
        }
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"{_redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        stream = options.get("stream", "nerve")
        if not _NAME.match(stream) or len(stream) > 32:
            raise ConfigError(
                f"{_redact(url)!r}: stream must be 1-32 characters of A-Z a-z 0-9 _ -"
            )
        try:
            config = cls(
                server=urlunsplit((parts.scheme, parts.netloc, "", "", "")),
                host=host,
                port=port,
                stream=stream,
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", _DEFAULT_MAX_PAYLOAD)),
                max_age=float(options.get("max_age", _DEFAULT_MAX_AGE)),
                dlq_max_age=float(options.get("dlq_max_age", _DEFAULT_DLQ_MAX_AGE)),
                max_ack_pending=int(options.get("max_ack_pending", _DEFAULT_MAX_ACK_PENDING)),
                connect_timeout=float(options.get("connect_timeout", 2.0)),
                replicas=int(options.get("replicas", 1)),
            )
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        if config.visibility_timeout <= 0 or config.max_age <= 0 or config.dlq_max_age <= 0:
            raise ConfigError(
                f"{_redact(url)!r}: visibility_timeout, max_age and dlq_max_age must be > 0"
            )
        if config.max_payload < 1024 or config.max_ack_pending < 1 or config.replicas < 1:
            raise ConfigError(
                f"{_redact(url)!r}: max_payload must be >= 1024, max_ack_pending and replicas >= 1"
            )
        return config


def _safe(group: str) -> str:
    """A consumer/subject token for ``group`` (changed names get a hash suffix)."""
    if _NAME.match(group) and len(group) <= 48:
        return group
    digest = hashlib.blake2b(group.encode(), digest_size=8).hexdigest()[:10]
    return f"{_TOKEN_UNSAFE.sub('_', group)[:32]}_{digest}"


def _subject_type(type_name: str) -> str:
    """The event type as NATS subject tokens (nerve's own types are already safe)."""
    return ".".join(_TOKEN_UNSAFE.sub("_", t) or "_" for t in type_name.split("."))


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Translate nats-py errors into nerve's tree."""
    try:
        yield
    except (
        nats.errors.ConnectionClosedError,
        nats.errors.NoServersError,
        nats.errors.StaleConnectionError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.ConnectionDrainingError,
        nats.errors.OutboundBufferLimitError,
    ) as exc:
        raise BrokerUnavailable(
            f"{what}: the connection to NATS is lost ({type(exc).__name__})"
        ) from None
    except nats.errors.NoRespondersError:
        raise TransportError(
            f"{what}: JetStream did not answer; is it enabled (nats-server -js)?"
        ) from None
    except nats.js.errors.APIError as exc:
        raise TransportError(
            f"{what}: {exc.description} (JetStream error {exc.err_code})"
        ) from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise TransportError(f"{what}: the NATS server did not answer in time") from None
    except nats.errors.Error as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from None


def _ack_meta(reply: str | None) -> tuple[int, int, int] | None:
    """(times delivered, stream sequence, timestamp ns) from a JetStream message's
    reply subject, or None if it is not one. The same tokens nats-py's ``Msg.metadata``
    reads (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``, or
    the 12-token form with domain and account hash), without building its objects:
    this runs once per message."""
    if not reply:
        return None
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5]), int(tokens[7])
    if len(tokens) >= 11:
        return int(tokens[6]), int(tokens[7]), int(tokens[9])
    return None


_SPACE = re.compile(r"\s")


def _header_lines(raw: bytes) -> dict[str, str]:
    """What nats-py's ``Client._parse_header_lines`` returns, in fewer Python steps (the
    twin of ``_speedups.nats_headers``, where the C speedups are not built)."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _SPACE.search(key) is not None:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


class _Client(Client):
    r"""nats-py's client, parsing message headers with the same result in less time.

    Every JetStream message nerve publishes carries three headers (``Nats-Msg-Id``,
    ``Content-Type``, ``Nats-Expected-Stream``), and nats-py 2.x checks each header name
    for whitespace with a generator over its characters: about 46 Python steps per
    message (9.4 us of the consumer's ~50 us per event here). One regular-expression search
    does the same in 4.7 us (``\s`` is ``str.isspace``; the name is ASCII); the C speedups
    do the whole block in one call (``_speedups.nats_headers``: about 125 Python steps a
    message fewer). Tests compare both with nats-py's own on generated header blocks, and
    check that nats-py still calls this hook.
    """

    _parse_header_lines = staticmethod(_header_lines if speedups is None else speedups.nats_headers)


async def _connect(**options: Any) -> Client:
    """``nats.connect`` with :class:`_Client`."""
    nc = _Client()
    await nc.connect(**options)
    return nc


def _decode_msg(subject: str, data: bytes, headers: dict[str, str] | None) -> tuple[bytes, Event]:
    """(structured raw bytes, event) of a message in either CloudEvents NATS mode.

    Raises DecodeError carrying the bytes as received."""
    if headers:
        lowered = {k.lower(): v for k, v in headers.items()}
        if "ce-specversion" in lowered:
            attributes: dict[str, Any] = {
                k[3:]: v for k, v in lowered.items() if k.startswith("ce-") and len(k) > 3
            }
            content_type = lowered.get("content-type")
            if content_type is not None:
                attributes["datacontenttype"] = content_type
            body: Any = data
            if not data:
                body = None
            elif content_type is None or codec._is_json_content(content_type):
                try:
                    body = orjson.loads(data)
                except orjson.JSONDecodeError:
                    if content_type is None or not content_type.startswith("text/"):
                        raise DecodeError("data", "is not valid JSON", data) from None
                    body = data.decode("utf-8", "replace")
            try:
                event = codec.from_attributes(attributes, body)
            except InvalidEvent as exc:
                raise DecodeError(exc.attribute, exc.reason, data) from None
            return codec.encode(event), event
    return data, codec.decode(data)


# -- deliveries and consumers ------------------------------------------------------------


class NatsDelivery:
    __slots__ = (
        "_consumer",
        "_event",
        "_heartbeat",
        "_msg",
        "_renewed",
        "_settled",
        "attempt",
        "first_at",
        "group",
        "key",
        "raw",
        "received_at",
        "seq",
    )

    def __init__(
        self,
        consumer: NatsConsumer,
        msg: Msg,
        raw: bytes,
        event: Event | None,
        attempt: int,
        seq: int,
        received_at: float,
        renewed: float,
        first_at: float,
    ) -> None:
        self._consumer = consumer
        self._msg = msg
        self._event = event
        self._renewed = renewed
        self._settled = False
        self._heartbeat: asyncio.Task[None] | None = None
        self.group = consumer.group
        self.raw = raw
        self.attempt = attempt
        self.seq = seq
        self.received_at = received_at
        self.first_at = first_at
        self.key = None if event is None else event.partitionkey

    @property
    def event(self) -> Event:
        if self._event is None:
            self._event = codec.decode(self.raw)
        return self._event

    def _claim(self, action: str) -> None:
        """Refuse a settlement this process knows comes too late (best-effort fencing:
        JetStream itself applies a late ack to whoever holds the message now)."""
        lease = self._consumer.transport.config.visibility_timeout
        margin = min(1.0, lease * 0.1)
        if self._settled:
            raise LeaseLost(f"{self!r}: already settled; this {action} was refused")
        if time.monotonic() > self._renewed + lease - margin:
            raise LeaseLost(
                f"{self!r}: the lease expired and the event may be handed to another "
                f"consumer; this {action} was refused"
            )
        self._settled = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def _reply(self, body: bytes, action: str) -> None:
        transport = self._consumer.transport
        reply = self._msg.reply
        with _errors(f"{action} of {self!r}"):
            await transport.nc.request(reply, body, timeout=transport.request_timeout)

    async def ack(self) -> None:
        self._claim("ack")
        await self._reply(b"+ACK", "ack")
        self._consumer.transport._counter(self.group).processed += 1

    async def nack(self, delay: float = 0.0) -> None:
        self._claim("nack")
        if delay > 0:
            body = b"-NAK " + orjson.dumps({"delay": int(delay * 1e9)})
        else:
            body = b"-NAK"
        await self._reply(body, "nack")
        counter = self._consumer.transport._counter(self.group)
        counter.retried += 1
        if delay > 0:
            counter.delayed[(self._consumer.main.durable, self.seq)] = time.time() + delay

    async def dead_letter(self, failure: Failure) -> None:
        self._claim("dead-letter")
        transport = self._consumer.transport
        await transport._store_dead(self.group, self.raw, failure, f"{self._msg.reply}")
        await self._reply(b"+TERM", "dead-letter")
        transport._counter(self.group).dead_lettered += 1

    async def extend(self, seconds: float) -> None:
        lease = self._consumer.transport.config.visibility_timeout
        if self._settled:
            raise LeaseLost(f"{self!r}: already settled; extend was refused")
        if time.monotonic() > self._renewed + lease:
            raise LeaseLost(f"{self!r}: the lease expired; extend was refused")
        await self._touch()
        until = time.monotonic() + seconds
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if until > self._renewed + lease:
            self._heartbeat = asyncio.create_task(self._keep_until(until))

    async def _touch(self) -> None:
        """JetStream's +WPI restarts the ack_wait from now."""
        with _errors(f"extend of {self!r}"):
            await self._consumer.transport.nc.publish(self._msg.reply, b"+WPI")
        self._renewed = time.monotonic()

    async def _keep_until(self, until: float) -> None:
        lease = self._consumer.transport.config.visibility_timeout
        with contextlib.suppress(TransportError):
            while not self._settled and self._renewed + lease < until:
                await asyncio.sleep(lease / 3)
                if not self._settled:
                    await self._touch()

    def __repr__(self) -> str:
        return f"<NatsDelivery {self.group}#{self.seq} attempt={self.attempt}>"


@dataclass(slots=True)
class _Arrival:
    msg: Msg
    wall: float
    mono: float


class _Source:
    """One durable pull consumer, pulled through one persistent inbox subscription.

    Messages land in ``buffer`` whichever pull request they answer; a pull request's
    terminal status (404/408/409) is recorded under its request id."""

    def __init__(self, consumer: NatsConsumer, durable: str) -> None:
        self.consumer = consumer
        self.durable = durable
        transport = consumer.transport
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{transport.config.stream}.{durable}"
        self.inbox = transport.nc.new_inbox()
        self.buffer: deque[_Arrival] = deque()
        self.statuses: dict[int, str] = {}
        self.next_id = 0
        self.linger_id = -1
        self.linger_until = 0.0
        self.sub: Any = None

    async def open(self) -> None:
        self.sub = await self.consumer.transport.nc.subscribe(f"{self.inbox}.*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            self.buffer.append(_Arrival(msg, time.time(), time.monotonic()))
        else:
            status = (msg.headers or {}).get("Status", "")
            if status and status != "100":
                with contextlib.suppress(ValueError):
                    self.statuses[int(msg.subject.rpartition(".")[2])] = status
                if self.linger_id in self.statuses:
                    self.linger_until = 0.0
        self.consumer.arrived.set()

    async def request(self, batch: int, expires: float | None) -> int:
        rid = self.next_id
        self.next_id += 1
        doc: dict[str, Any] = {"batch": batch}
        if expires is None:
            doc["no_wait"] = True
        else:
            doc["expires"] = int(expires * 1e9)
        with _errors(f"fetch for group {self.consumer.group!r}"):
            await self.consumer.transport.nc.publish(
                self.api, orjson.dumps(doc), reply=f"{self.inbox}.{rid}"
            )
        return rid

    def take(self, limit: int) -> list[_Arrival]:
        out: list[_Arrival] = []
        while self.buffer and len(out) < limit:
            out.append(self.buffer.popleft())
        if out and self.linger_until:
            self.linger_until = 0.0  # a batch-1 linger ends with its message
        return out


class _PublishBatch:
    """The acks a window of pipelined publishes waits for."""

    __slots__ = ("done", "error", "left")

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.left = count
        self.error: str | None = None
        self.done = done

    def settle(self, error: str | None) -> None:
        if error is not None and self.error is None:
            self.error = error  # the first refusal is the one reported
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


def _pull_ended(source: _Source, rid: int, want: int) -> Callable[[], bool]:
    return lambda: rid in source.statuses or len(source.buffer) >= want


class NatsConsumer:
    def __init__(self, transport: NatsTransport, subscription: Subscription) -> None:
        self.transport = transport
        self.subscription = subscription
        self.group = subscription.group
        safe = _safe(subscription.group)
        self.to_subject = f"{transport.config.stream}.to.{safe}"
        self.main = _Source(self, f"g_{safe}")
        self.targeted = _Source(self, f"t_{safe}")
        self.arrived = asyncio.Event()
        self._opened = False
        self._closed = False
        self._lock = asyncio.Lock()

    async def _open(self) -> None:
        transport = self.transport
        for source in (self.targeted, self.main):
            with _errors(f"consumer for group {self.group!r}"):
                try:
                    await transport.js.consumer_info(transport.config.stream, source.durable)
                except nats.js.errors.NotFoundError:
                    raise TransportError(
                        f"declare group {self.group!r} before consuming it"
                    ) from None
            await source.open()
        self._opened = True

    async def _wait(self, done: Callable[[], bool], until: float) -> None:
        while not done():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self.arrived.clear()
            if done():
                return
            await wait_event(self.arrived, remaining)

    async def fetch(self, limit: int, timeout: float) -> Sequence[NatsDelivery]:
        async with self._lock:
            if self._closed:
                return []
            if not self._opened:
                await self._open()
            return await self._fetch(limit, timeout)

    async def _fetch(self, limit: int, timeout: float) -> list[NatsDelivery]:
        deadline = time.monotonic() + timeout
        out: list[NatsDelivery] = []
        sources = (self.targeted, self.main)
        while not self._closed:
            # what already arrived (a lingering pull's messages) goes out at once: the
            # pull requests below cost a round trip each, paid before the first event of
            # a quiet stream could be handled (p99 latency at a steady rate)
            for source in sources:
                if source.buffer and len(out) < limit:
                    out += await self._accept(source.take(limit - len(out)))
            if out:
                return out
            # both consumers asked at once (one round trip, not one each); what comes
            # beyond the limit stays buffered for the next fetch
            more = False
            requested = [(source, await source.request(limit, None)) for source in sources]
            bound = max(deadline, time.monotonic() + 5.0)
            for source, rid in requested:
                await self._wait(_pull_ended(source, rid, limit), bound)
                ended = source.statuses.pop(rid, None)
                if ended is None and len(source.buffer) >= limit:
                    more = True  # the batch was filled: there may be more right now
                elif ended is not None and ended.startswith("409"):
                    self._check_status(ended)
            for source in sources:
                if len(out) < limit:
                    out += await self._accept(source.take(limit - len(out)))
            if len(out) >= limit or (out and not more):
                return out
            if more:
                continue
            remaining = deadline - time.monotonic()
            if remaining < 0.005:
                return out
            now = time.monotonic()
            for source in sources:
                if source.linger_until <= now:
                    source.linger_id = await source.request(1, remaining)
                    source.linger_until = now + remaining
            # wait for a message, or for every linger to end (the server ends it at
            # its expiry, so no request is left open to swallow a later message)
            await self._wait(
                lambda: any(s.buffer for s in sources) or all(not s.linger_until for s in sources),
                deadline + 0.5,
            )
            if not any(s.buffer for s in sources) and time.monotonic() >= deadline:
                return out
        return out

    def _check_status(self, status: str) -> None:
        if "Consumer Deleted" in status or "Consumer is push based" in status:
            raise TransportError(f"group {self.group!r}: {status}")

    async def _accept(self, arrivals: list[_Arrival]) -> list[NatsDelivery]:
        out: list[NatsDelivery] = []
        skip: list[Msg] = []
        counter = self.transport._counter(self.group)
        for arrival in arrivals:
            msg = arrival.msg
            meta = _ack_meta(msg.reply)
            if meta is None:
                continue
            targeted = msg.subject == self.to_subject
            event: Event | None
            try:
                raw, event = _decode_msg(msg.subject, msg.data, msg.headers)
            except DecodeError:
                raw, event = msg.data, None
            if event is not None:
                matched = targeted or self.subscription.matches(event)
            else:  # undecodable: hand it out (to be dead-lettered) if its subject matches
                prefix = f"{self.transport.config.stream}.ev."
                type_name = msg.subject[len(prefix) :] if msg.subject.startswith(prefix) else ""
                matched = targeted or any(
                    matches_pattern(p, type_name) for p in self.subscription.patterns
                )
            if not matched:
                skip.append(msg)
                continue
            attempt, seq, stamp_ns = meta
            counter.delayed.pop((self.main.durable, seq), None)
            first_at = arrival.wall
            if attempt > 1:
                first_at = min(first_at, stamp_ns / 1e9)
            out.append(
                NatsDelivery(
                    self, msg, raw, event, attempt, seq, arrival.wall, arrival.mono, first_at
                )
            )
        if skip:
            with _errors(f"skipping events group {self.group!r} does not match"):
                for msg in skip:
                    await self.transport.nc.publish(msg.reply, b"+ACK")
        return out

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        refused: list[Delivery] = []
        pending: list[NatsDelivery] = []
        for delivery in deliveries:
            assert isinstance(delivery, NatsDelivery)
            try:
                delivery._claim("ack")
            except LeaseLost:
                refused.append(delivery)
                continue
            pending.append(delivery)
        if pending:
            # Per JetStream consumer (the reply subject without its per-message tokens),
            # every ack but the last is published and the last one is a request: the
            # server handles one connection's messages in order, so its reply confirms
            # the whole batch, for one round trip instead of one per delivery.
            last: dict[str, NatsDelivery] = {}
            nc = self.transport.nc
            with _errors(f"ack of {len(pending)} deliveries of group {self.group!r}"):
                for delivery in pending:
                    reply = delivery._msg.reply
                    previous = last.get(reply.rsplit(".", 5)[0])
                    if previous is not None:
                        await nc.publish(previous._msg.reply, b"+ACK")
                    last[reply.rsplit(".", 5)[0]] = delivery
            await asyncio.gather(*(d._reply(b"+ACK", "ack") for d in last.values()))
            self.transport._counter(self.group).processed += len(pending)
        return refused

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.arrived.set()
        self.transport._consumers.discard(self)
        for source in (self.targeted, self.main):
            left = source.take(len(source.buffer))
            with contextlib.suppress(Exception):
                if source.sub is not None:
                    await source.sub.unsubscribe()
                for arrival in left:  # never handed out: give them back at once
                    if arrival.msg.reply:
                        await self.transport.nc.publish(arrival.msg.reply, b"-NAK")


# -- the transport -----------------------------------------------------------------------


@dataclass(slots=True)
class _Counter:
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    delayed: dict[tuple[str, int], float] = field(default_factory=dict)


class NatsTransport:
    """NATS JetStream."""

    def __init__(self, config: NatsConfig | str | None = None) -> None:
        if isinstance(config, str):
            self.url = config
            config = NatsConfig.from_url(config)
        else:
            config = config or NatsConfig()
            self.url = f"{config.server}?stream={config.stream}"
        self.config = config
        self.features = Features(
            durable=True,
            shared_across_processes=True,
            key_ordering=False,
            dead_letter_queue=True,
            max_payload=config.max_payload,
            lease_expiry=True,
            fenced_settlement=False,
        )
        self.dlq_stream = f"{config.stream}_dlq"
        self.request_timeout = 5.0
        self._nc: Client | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._consumers: set[NatsConsumer] = set()
        self._groups: set[str] = set()
        self._counters: dict[str, _Counter] = {}
        self._ack_prefix: str | None = None
        """Reply subject prefix of this connection's publish acks (one subscription)."""
        self._ack_waiting: dict[str, _PublishBatch] = {}
        self._ack_seq = 0

    def __repr__(self) -> str:
        return (
            f"NatsTransport({self.config.host}:{self.config.port}, stream={self.config.stream!r})"
        )

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise TransportError("the NATS transport is not started (await start() first)")
        return self._nc

    @property
    def js(self) -> nats.js.JetStreamContext:
        if self._js is None:
            raise TransportError("the NATS transport is not started (await start() first)")
        return self._js

    def _counter(self, group: str) -> _Counter:
        counter = self._counters.get(group)
        if counter is None:
            counter = self._counters[group] = _Counter()
        return counter

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        where = f"{config.host}:{config.port}"

        async def quiet(exc: Exception) -> None:
            return None

        try:
            # one attempt while starting (fail fast); reconnect forever once connected
            nc = await asyncio.wait_for(
                _connect(
                    servers=[config.server],
                    connect_timeout=config.connect_timeout,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.05,
                    error_cb=quiet,
                    name="nerve",
                ),
                config.connect_timeout + 1.0,
            )
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 1.0
            self._nc = nc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            detail = type(exc).__name__
            if isinstance(exc, nats.errors.NoServersError | OSError):
                detail = "nothing answered"
            raise BrokerUnavailable(
                f"cannot connect to NATS at {where} ({detail}); start nats-server with "
                "JetStream (nats-server -js) or fix the host/port in the broker URL"
            ) from None
        self._js = self._nc.jetstream(timeout=self.request_timeout)
        server_max = self._nc.max_payload
        if config.max_payload + _HEADER_ROOM > server_max:
            await self._nc.close()
            self._nc = None
            raise ConfigError(
                f"max_payload={config.max_payload} does not fit the server's max_payload "
                f"of {server_max} bytes (minus {_HEADER_ROOM} for headers); lower the option "
                "or raise max_payload in the nats-server configuration"
            )
        await self._ensure_streams()

    async def _ensure_streams(self) -> None:
        config = self.config
        wanted = [
            api.StreamConfig(
                name=config.stream,
                subjects=[f"{config.stream}.ev.>", f"{config.stream}.to.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=config.max_age,
                duplicate_window=min(120.0, config.max_age),
                num_replicas=config.replicas,
                description="nerve events",
            ),
            api.StreamConfig(
                name=self.dlq_stream,
                subjects=[f"{self.dlq_stream}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=config.dlq_max_age,
                duplicate_window=min(120.0, config.dlq_max_age),
                num_replicas=config.replicas,
                description="nerve dead letters",
            ),
        ]
        for stream in wanted:
            assert stream.name is not None
            with _errors(f"creating JetStream stream {stream.name!r}"):
                try:
                    await self.js.stream_info(stream.name)
                except nats.js.errors.NotFoundError:
                    await self.js.add_stream(stream)

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.close()
        self._ack_prefix = None
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(Exception):
                await nc.close()

    # -- declaring and publishing ----------------------------------------------------

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        config = self.config
        for sub in subscriptions:
            safe = _safe(sub.group)
            if len(sub.patterns) == 1 and _SAFE_PATTERN.match(sub.patterns[0]):
                events = f"{config.stream}.ev.{sub.patterns[0]}"
            else:
                events = f"{config.stream}.ev.>"
            description = orjson.dumps(sub.to_json()).decode()
            for durable, subject in (
                (f"g_{safe}", events),
                (f"t_{safe}", f"{config.stream}.to.{safe}"),
            ):
                wanted = api.ConsumerConfig(
                    durable_name=durable,
                    description=description,
                    deliver_policy=api.DeliverPolicy.NEW,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=config.visibility_timeout,
                    max_deliver=-1,
                    filter_subject=subject,
                    max_ack_pending=config.max_ack_pending,
                    max_waiting=512,
                )
                with _errors(f"declaring group {sub.group!r}"):
                    try:
                        info = await self.js.consumer_info(config.stream, durable)
                    except nats.js.errors.NotFoundError:
                        await self.js.add_consumer(config.stream, wanted)
                        continue
                    have = info.config
                    if (
                        have.filter_subject != subject
                        or have.ack_wait != config.visibility_timeout
                        or have.max_ack_pending != config.max_ack_pending
                        or have.description != description
                    ):
                        await self.js.add_consumer(config.stream, wanted)
            self._groups.add(sub.group)

    def _encode(self, events: Sequence[Event]) -> list[tuple[Event, bytes]]:
        return encode_checked(events, self.config.max_payload)

    async def _require_group(self, group: str) -> None:
        if group in self._groups:
            return
        with _errors(f"publishing to group {group!r}"):
            try:
                await self.js.consumer_info(self.config.stream, f"t_{_safe(group)}")
            except nats.js.errors.NotFoundError:
                raise TransportError(f"no consumer group named {group!r} is declared") from None
        self._groups.add(group)

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        if not events:
            return
        encoded = self._encode(events)
        stream = self.config.stream
        if to_group is not None:
            await self._require_group(to_group)
            subject = f"{stream}.to.{_safe(to_group)}"
            nonce = uuid.uuid4().hex[:12]
            messages = [
                (subject, body, f"{event.id}:{to_group}:{nonce}") for event, body in encoded
            ]
        else:
            messages = [
                (f"{stream}.ev.{_subject_type(event.type)}", body, event.id)
                for event, body in encoded
            ]
        await self._publish_all(messages, "publishing events")

    async def _publish_all(self, messages: list[tuple[str, bytes, str]], what: str) -> None:
        """JetStream-publish ``messages`` (subject, body, Nats-Msg-Id); return once the
        server acknowledged every one, or raise.

        Pipelined, as JetStream's async publish in the Go client: up to 256 messages are
        published with reply subjects under one subscription of this connection, then
        their acks awaited together. nats-py's ``js.publish`` makes a request per
        message (a reply token, a future and a timeout task each): three times the CPU.
        """
        nc = self.nc
        stream = self.config.stream if not messages[0][0].startswith(self.dlq_stream) else None
        expect = {"Content-Type": _STRUCTURED}
        if stream is not None:
            expect["Nats-Expected-Stream"] = stream  # as js.publish(stream=...) sends
        waiting = self._ack_waiting
        window = 256
        with _errors(what):
            prefix = await self._acks()
            loop = asyncio.get_running_loop()
            for start in range(0, len(messages), window):
                chunk = messages[start : start + window]
                batch = _PublishBatch(len(chunk), loop.create_future())
                replies: list[str] = []
                try:
                    for subject, body, msg_id in chunk:
                        self._ack_seq += 1
                        reply = f"{prefix}{self._ack_seq}"
                        waiting[reply] = batch
                        replies.append(reply)
                        await nc.publish(
                            subject, body, reply=reply, headers={"Nats-Msg-Id": msg_id, **expect}
                        )
                    try:
                        async with asyncio.timeout(self.request_timeout):
                            await batch.done
                    except TimeoutError:
                        raise TransportError(
                            f"{what}: the NATS server did not acknowledge {batch.left} of "
                            f"{len(chunk)} publishes in time"
                        ) from None
                finally:
                    for reply in replies:
                        waiting.pop(reply, None)
                if batch.error is not None:
                    raise TransportError(f"{what}: {batch.error}")

    async def _acks(self) -> str:
        """The reply prefix of publish acks, subscribing on first use."""
        if self._ack_prefix is None:
            prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(prefix + "*", cb=self._on_ack)
            self._ack_prefix = prefix
        return self._ack_prefix

    async def _on_ack(self, msg: Msg) -> None:
        batch = self._ack_waiting.pop(msg.subject, None)
        if batch is None:
            return  # a batch that timed out meanwhile
        if not msg.data:  # a status message: no stream listens on the subject
            status = (msg.headers or {}).get("Status", "")
            batch.settle(
                f"no JetStream stream takes this subject (status {status or 'unknown'}); "
                "is JetStream enabled (nats-server -js) and the stream declared?"
            )
            return
        try:
            doc = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            batch.settle("JetStream answered the publish with something that is not JSON")
            return
        error = doc.get("error") if isinstance(doc, dict) else None
        if error:
            batch.settle(
                f"{error.get('description', error)} (JetStream error {error.get('err_code')})"
                if isinstance(error, dict)
                else str(error)
            )
        else:
            batch.settle(None)

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> NatsConsumer:
        consumer = NatsConsumer(self, subscription)
        self._consumers.add(consumer)
        return consumer

    # -- dead letters ----------------------------------------------------------------

    async def _store_dead(self, group: str, raw: bytes, failure: Failure, ref: str) -> None:
        doc = {
            "group": group,
            "failure": failure.to_json(),
            "raw": base64.b64encode(raw).decode("ascii"),
            "dead_at": time.time(),
        }
        msg_id = "dl:" + hashlib.blake2b(ref.encode(), digest_size=16).hexdigest()
        with _errors(f"dead-lettering an event of group {group!r}"):
            await self.js.publish(
                f"{self.dlq_stream}.{_safe(group)}",
                orjson.dumps(doc),
                stream=self.dlq_stream,
                headers={"Nats-Msg-Id": msg_id},
            )

    async def _get_next(self, stream: str, seq: int, subject: str) -> api.RawStreamMsg | None:
        with _errors(f"reading stream {stream!r}"):
            try:
                return await self.js.get_msg(stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return None

    def _dlq_subject(self, group: str | None) -> str:
        return f"{self.dlq_stream}.{_safe(group)}" if group is not None else f"{self.dlq_stream}.>"

    def _entry(self, msg: api.RawStreamMsg) -> DeadLetterEntry | None:
        try:
            doc = orjson.loads(msg.data or b"")
            raw = base64.b64decode(doc["raw"])
            failure = Failure(**doc["failure"])
            group = str(doc["group"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        try:
            event: Event | None = codec.decode(raw)
        except Exception:
            event = None
        return DeadLetterEntry(id=str(msg.seq), group=group, raw=raw, failure=failure, event=event)

    async def _scan_dead(self, group: str | None, limit: int | None) -> list[DeadLetterEntry]:
        subject = self._dlq_subject(group)
        out: list[DeadLetterEntry] = []
        seq = 1
        while limit is None or len(out) < limit:
            msg = await self._get_next(self.dlq_stream, seq, subject)
            if msg is None or msg.seq is None:
                break
            seq = msg.seq + 1
            entry = self._entry(msg)
            if entry is not None and (group is None or entry.group == group):
                out.append(entry)
        return out

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        return await self._scan_dead(group, limit)

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        if not entry_id.isdigit() or int(entry_id) < 1:
            return None
        with _errors("reading a dead letter"):
            try:
                msg = await self.js.get_msg(self.dlq_stream, int(entry_id))
            except nats.js.errors.NotFoundError:
                return None
        return self._entry(msg)

    async def _select_dead(
        self, entry_ids: Sequence[str] | None, group: str | None
    ) -> list[DeadLetterEntry]:
        if entry_ids is None:
            return await self._scan_dead(group, None)
        out = []
        for entry_id in entry_ids:
            entry = await self.dead_letter_entry(str(entry_id))
            if entry is not None and (group is None or entry.group == group):
                out.append(entry)
        return out

    async def _delete_dead(self, entry_id: str) -> bool:
        with _errors("deleting a dead letter"):
            try:
                return await self.js.delete_msg(self.dlq_stream, int(entry_id))
            except nats.js.errors.NotFoundError:
                return False

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        count = 0
        for entry in await self._select_dead(entry_ids, group):
            try:
                await self._require_group(entry.group)
            except TransportError:
                continue  # the function is gone; keep its dead letter
            subject = f"{self.config.stream}.to.{_safe(entry.group)}"
            await self._publish_all(
                [(subject, entry.raw, f"replay:{self.dlq_stream}:{entry.id}:{time.time()}")],
                "replaying a dead letter",
            )
            if await self._delete_dead(entry.id):
                count += 1
        return count

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        if entry_ids is not None:
            count = 0
            for entry in await self._select_dead(entry_ids, group):
                count += await self._delete_dead(entry.id)
            return count
        request: dict[str, Any] = {}
        if group is not None:
            request["filter"] = self._dlq_subject(group)
        with _errors("purging dead letters"):
            reply = await self.nc.request(
                f"$JS.API.STREAM.PURGE.{self.dlq_stream}",
                orjson.dumps(request),
                timeout=self.request_timeout,
            )
        doc = orjson.loads(reply.data)
        if "error" in doc:
            raise TransportError(f"purging dead letters: {doc['error'].get('description')}")
        return int(doc.get("purged", 0))

    # -- stats and log ---------------------------------------------------------------

    async def stats(self) -> list[GroupStats]:
        stream = self.config.stream
        infos: list[api.ConsumerInfo] = []
        with _errors("reading consumer state"):
            while True:
                page = await self.js.consumers_info(stream, offset=len(infos))
                infos.extend(page)
                if len(page) < 256:
                    break
            dlq = await self.js.stream_info(self.dlq_stream, subjects_filter=f"{self.dlq_stream}.>")
        dead_by_subject = dlq.state.subjects or {}
        groups: dict[str, dict[str, api.ConsumerInfo]] = {}
        names: dict[str, str] = {}
        for info in infos:
            durable = info.name
            if len(durable) < 3 or durable[1] != "_" or durable[0] not in "gt":
                continue
            safe = durable[2:]
            groups.setdefault(safe, {})[durable[0]] = info
            with contextlib.suppress(Exception):
                names[safe] = str(orjson.loads(info.config.description or "")["group"])
        now = time.time()
        out = []
        for safe, parts in groups.items():
            name = names.get(safe, safe)
            counter = self._counter(name)
            for key, until in list(counter.delayed.items()):
                if until <= now:
                    del counter.delayed[key]
            delayed = len(counter.delayed)
            ready = sum(i.num_pending or 0 for i in parts.values())
            unacked = sum(i.num_ack_pending or 0 for i in parts.values())
            out.append(
                GroupStats(
                    group=name,
                    ready=ready,
                    delayed=delayed,
                    in_flight=max(0, unacked - delayed),
                    dead_letters=int(dead_by_subject.get(f"{self.dlq_stream}.{safe}", 0)),
                    processed=counter.processed,
                    retried=counter.retried,
                    dead_lettered=counter.dead_lettered,
                    # the counters (and `delayed`) are this process's own
                    extra={"counted_by": "this process"},
                )
            )
        return sorted(out, key=lambda s: s.group)

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        stream = self.config.stream
        if after is None:
            with _errors("reading the event log"):
                info = await self.js.stream_info(stream)
            return [(info.state.last_seq, b"")]
        out: list[tuple[int, bytes]] = []
        seq = after + 1
        while len(out) < limit:
            msg = await self._get_next(stream, seq, f"{stream}.ev.>")
            if msg is None or msg.seq is None:
                break
            seq = msg.seq + 1
            data = msg.data or b""
            try:
                raw, _ = _decode_msg(msg.subject or "", data, msg.headers)
            except DecodeError:
                raw = data
            out.append((msg.seq, raw))
        return out


__all__ = ["NatsConfig", "NatsConsumer", "NatsDelivery", "NatsTransport"]
