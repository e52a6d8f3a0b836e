"""``kafka://``: Apache Kafka (or a Kafka-protocol broker such as Tansu) via aiokafka.

URL: ``kafka://host:9092[,host2:9092]?prefix=nerve&partitions=8&visibility_timeout=30
&max_payload=1048576&session_timeout=10``

Layout on the broker:

- ``<prefix>.events`` (``partitions`` partitions): every published event, one record
  each, key = the CloudEvents ``partitionkey`` (so one key stays in one partition, in
  publish order), value = the structured-mode CloudEvent JSON (the exact bytes of
  :func:`nerve.event.encode`), header ``content-type: application/cloudevents+json``.
  Records in binary mode (``ce_*`` headers, value = data) are decoded too.
- ``<prefix>.<group>.retry`` (1 partition): events published ``to_group`` (targeted
  redelivery, DLQ replay).
- ``<prefix>.<group>.dlq`` (1 partition): dead letters, value = raw event, failure in
  the ``nerve_failure`` header (JSON). Browsing reads the topic from its start; purge
  and replay append a marker record (empty value, ``nerve_purge`` header = JSON list
  of offsets) that hides those entries; replay first produces the raw event to the
  group's retry topic. Entry ids are ``<group>@<offset>``.

Delivery model: each nerve group is a Kafka consumer group ``<prefix>.<group>`` over
the events topic and its retry topic, so the partitions are shared among the nerve
processes of a function, and its progress is the committed offsets. A new group is
pinned at the end of its topics when declared (it receives events published from then
on). Within a process, the records of the member's partitions feed a lease table:
leases, nacks with delay, fencing and head-of-key order are enforced there; the offset
committed for a partition is its first unsettled record, so whatever a dead process
held is read again by the partition's next owner. How far each partition's records
were handed out is committed too, as the offsets of a second consumer group
``<prefix>.<group>.handed`` (commit metadata would do, but Tansu drops it), so the next
owner counts those records as redeliveries (``attempt`` >= 2). A rebalance never moves
a partition in which a live member holds unsettled deliveries (the ``nerve-keep-busy``
assignor reads them from each member's join metadata). Filters and patterns are
checked client-side: a record no group wants is skipped (and committed past).

Stats are end offsets minus committed offsets (this process's own partitions from its
lease table); ``read_log`` reads the events topic outside any group, a position packing
one offset per partition. Both read end offsets through :class:`_Probe`, which corrects
Tansu's short ListOffsets answers (docs/brokers/kafka.md, "Stats").
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.coordinator.assignors.abstract import (  # type: ignore[import-untyped]
    AbstractPartitionAssignor,
)
from aiokafka.coordinator.protocol import (  # type: ignore[import-untyped]
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
)
from aiokafka.structs import OffsetAndMetadata  # type: ignore[import-untyped]

from nerve import event as codec
from nerve._urls import redact
from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError, LeaseLost, TransportError
from nerve.event import Event
from nerve.transport.base import (
    DeadLetterEntry,
    Delivery,
    Failure,
    Features,
    GroupStats,
    encode_checked,
)

__all__ = ["KafkaConfig", "KafkaTransport"]

_OPTIONS = {"prefix", "partitions", "visibility_timeout", "max_payload", "session_timeout"}
_MAX_BUFFERED = 10_000
"""Records a member holds in its lease table before it stops reading for a while."""

log = logging.getLogger("nerve.transport.kafka")
_CT_STRUCTURED = b"application/cloudevents+json"
_TOPIC_SAFE = re.compile(r"[A-Za-z0-9._-]{1,200}")
_POSITION_BITS = 48
"""Bits of a ``read_log`` position per partition of the events topic (offsets < 2**48)."""
_PROBE_WAIT = 5.0
"""Seconds the probe waits for a partition's records before it gives up on them."""


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap: tuple[str, ...] = ("127.0.0.1:9092",)
    prefix: str = "nerve"
    partitions: int = 8
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024
    session_timeout: float = 10.0
    """Seconds after which the group gives a silent (killed) member's partitions away."""

    @classmethod
    def from_url(cls, url: str) -> KafkaConfig:
        parts = urlsplit(url)
        if parts.scheme != "kafka":
            raise ConfigError(f"not a kafka URL: {redact(url)!r}")
        if "@" in parts.netloc:
            raise ConfigError(
                f"{redact(url)!r}: SASL credentials are not supported by nerve's kafka:// yet"
            )
        hosts = tuple(h for h in parts.netloc.split(",") if h)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"{redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}")
        try:
            config = cls(
                bootstrap=tuple(h if ":" in h else f"{h}:9092" for h in hosts)
                or ("127.0.0.1:9092",),
                prefix=options.get("prefix", "nerve"),
                partitions=int(options.get("partitions", 8)),
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", 1024 * 1024)),
                session_timeout=float(options.get("session_timeout", 10.0)),
            )
        except ValueError as exc:
            raise ConfigError(f"{redact(url)!r}: {exc}") from None
        if config.session_timeout < 1:
            raise ConfigError(f"{redact(url)!r}: session_timeout must be at least 1 second")
        if config.partitions < 1 or not _TOPIC_SAFE.fullmatch(config.prefix):
            raise ConfigError(
                f"{redact(url)!r}: partitions must be >= 1 and prefix made of "
                "letters, digits, '.', '_' and '-'"
            )
        return config


def _published_at(record: Any) -> int:
    """Nanoseconds since the epoch when the record was published (merge key)."""
    for name, value in record.headers or ():
        if name == "nerve_ts":
            with contextlib.suppress(ValueError):
                return int(value)
    return int(record.timestamp) * 1_000_000


def _decode_record(value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> bytes:
    """The structured CloudEvent bytes of a record (binary-mode records converted)."""
    head = {k: v for k, v in headers}
    if "ce_id" not in head or head.get("content-type") == _CT_STRUCTURED:
        return value or b""
    doc: dict[str, Any] = {"specversion": "1.0"}
    for name, raw in head.items():
        if name.startswith("ce_"):
            doc[name[3:]] = raw.decode("utf-8", "replace")
    content_type = head.get("content-type", b"application/json").decode("utf-8", "replace")
    doc["datacontenttype"] = content_type
    body = value or b""
    if content_type.endswith("json"):
        try:
            doc["data"] = json.loads(body) if body else None
        except ValueError:
            doc["data"] = body.decode("utf-8", "replace")
    else:
        import base64

        doc["data_base64"] = base64.b64encode(body).decode()
    return json.dumps(doc).encode()


@dataclass(slots=True)
class _Row:
    id: int
    tp: TopicPartition
    offset: int
    raw: bytes
    key: str | None
    attempt: int
    """Times handed out so far (1 already if an earlier owner of the partition did)."""
    available_at: float = 0.0
    lease_until: float = 0.0
    token: int = 0
    first_at: float | None = None
    held: bool = False
    """Handed out by this member and not settled yet."""


@dataclass(slots=True)
class _Part:
    """This member's view of one assigned partition."""

    next: int
    """Offset after the last record read (the position when nothing is open)."""
    handed: int
    """Offset after the highest record ever handed out (committed as metadata, so the
    next owner knows which records are redeliveries)."""
    open: dict[int, _Row] = field(default_factory=dict)
    """Records read and not settled, by offset (in offset order)."""
    committed: tuple[int, int] = (-1, -1)
    held: int = 0
    """Rows of this partition handed out by this member and not settled."""

    @property
    def position(self) -> int:
        return next(iter(self.open)) if self.open else self.next


@dataclass(slots=True)
class _Group:
    subscription: Subscription
    kafka_group: str
    rows: dict[int, _Row] = field(default_factory=dict)
    keys: dict[str, list[int]] = field(default_factory=dict)
    parts: dict[TopicPartition, _Part] = field(default_factory=dict)
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    member: Any = None
    marker: Any = None
    """A client of the ``.handed`` group: commits how far records were handed out."""
    task: asyncio.Task[None] | None = None
    joining: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rebalancing: bool = True
    dirty: bool = False
    active: bool = False
    """A consumer of this process fetched from the group (told in the join metadata)."""
    members: int = 0
    """How many members the last assignment had."""
    assigned: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self, row: _Row) -> None:
        del self.rows[row.id]
        part = self.parts.get(row.tp)
        if part is not None:
            part.open.pop(row.offset, None)
            part.held -= row.held
        if row.key is not None:
            ids = self.keys[row.key]
            ids.remove(row.id)
            if not ids:
                del self.keys[row.key]
        self.dirty = True
        self.wake.set()

    def drop(self, tps: set[TopicPartition]) -> None:
        """Forget partitions this member no longer owns: their rows' leases are lost."""
        for row in [r for r in self.rows.values() if r.tp in tps]:
            self.settle(row)
        for tp in tps:
            self.parts.pop(tp, None)

    def moved(self) -> bool:
        """A partition's position or handed-out mark is past what was committed."""
        return any((p.position, p.handed) != p.committed for p in self.parts.values())

    def busy(self) -> list[TopicPartition]:
        """Partitions with a record handed out and not settled (a lease or a retry)."""
        now = time.time()
        return sorted({r.tp for r in self.rows.values() if r.token or r.available_at > now})


class _KeepBusyAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Partitions spread evenly, except that a member keeps the partitions in which it
    holds unsettled deliveries (told in its join metadata): a rebalance never takes a
    lease away from a live consumer, so an ack after it is never refused for that."""

    name = "nerve-keep-busy"
    version = 0

    def __init__(self, group: _Group) -> None:
        self._group = group

    def metadata(self, topics: Any) -> ConsumerProtocolMemberMetadata:
        busy = [[tp.topic, tp.partition] for tp in self._group.busy()]
        doc = {"busy": busy, "active": self._group.active}
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), json.dumps(doc).encode()
        )

    @classmethod
    def assign(cls, cluster: Any, members: Any) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({t for m in members.values() for t in m.subscription})
        every = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(cluster.partitions_for_topic(t) or ())
        ]
        owned: dict[str, list[TopicPartition]] = {m: [] for m in sorted(members)}
        active: list[str] = []
        taken: set[TopicPartition] = set()
        for member_id in sorted(members):
            try:
                doc = json.loads(members[member_id].user_data or b"{}")
                busy = [TopicPartition(str(t), int(p)) for t, p in doc.get("busy", ())]
                is_active = bool(doc.get("active"))
            except (ValueError, TypeError, AttributeError):
                busy, is_active = [], False
            if is_active:
                active.append(member_id)
            for tp in busy:
                if tp in every and tp not in taken:
                    owned[member_id].append(tp)
                    taken.add(tp)
        # what no one is busy with goes to the members that consume (or to all, if none
        # does yet), the fewest first
        takers = active or sorted(members)
        for tp in every:
            if tp not in taken:
                fewest = min(takers, key=lambda m: (len(owned[m]), m))
                owned[fewest].append(tp)
        user_data = json.dumps({"members": len(members)}).encode()
        out = {}
        for member_id, tps in owned.items():
            by_topic: dict[str, list[int]] = {}
            for tp in tps:
                by_topic.setdefault(tp.topic, []).append(tp.partition)
            out[member_id] = ConsumerProtocolMemberAssignment(
                cls.version, sorted(by_topic.items()), user_data
            )
        return out

    def on_assignment(self, assignment: Any) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            self._group.members = int(json.loads(assignment.user_data or b"{}")["members"])


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, transport: KafkaTransport, group: _Group) -> None:
        self._transport = transport
        self._group = group

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # commit where each partition stands before anyone else may own it; keep the
        # rows: the assignor leaves busy partitions with this member
        await self._transport._commit(self._group)
        self._group.rebalancing = True

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._transport._assigned(self._group, set(assigned))


class KafkaDelivery:
    __slots__ = (
        "_event",
        "_row",
        "_transport",
        "attempt",
        "first_at",
        "group",
        "raw",
        "received_at",
        "token",
    )

    def __init__(self, transport: KafkaTransport, group: str, row: _Row, now: float) -> None:
        self._transport = transport
        self._row = row
        self._event: Event | None = None
        self.group = group
        self.token = row.token
        self.raw = row.raw
        self.attempt = row.attempt
        self.received_at = now
        self.first_at = row.first_at if row.first_at is not None else now

    @property
    def event(self) -> Event:
        if self._event is None:
            self._event = codec.decode(self.raw)
        return self._event

    def _owned(self, action: str) -> tuple[_Group, _Row]:
        group = self._transport._groups.get(self.group)
        row = None if group is None else group.rows.get(self._row.id)
        if group is None or row is None or row.token != self.token:
            raise LeaseLost(
                f"delivery {self.group}#{self._row.tp.partition}@{self._row.offset}: the lease "
                f"expired or the partition moved to another consumer; this {action} was refused"
            )
        return group, row

    def _ack(self) -> _Group:
        group, row = self._owned("ack")
        group.settle(row)
        group.processed += 1
        return group

    async def ack(self) -> None:
        self._ack()

    async def nack(self, delay: float = 0.0) -> None:
        group, row = self._owned("nack")
        row.available_at = time.time() + delay
        row.lease_until = 0.0
        row.token = 0
        group.retried += 1
        self._transport._wake_later(group, delay)

    async def dead_letter(self, failure: Failure) -> None:
        group, row = self._owned("dead-letter")
        source = f"{row.tp.topic}:{row.tp.partition}:{row.offset}"
        await self._transport._send_dead(self.group, row.raw, failure, source)
        self._owned("dead-letter")  # still ours after the send
        group.settle(row)
        group.dead_lettered += 1

    async def extend(self, seconds: float) -> None:
        _, row = self._owned("extend")
        row.lease_until = time.time() + seconds


class KafkaConsumer:
    def __init__(self, transport: KafkaTransport, subscription: Subscription) -> None:
        self._transport = transport
        self.subscription = subscription
        self.group = subscription.group
        self._closed = False

    async def fetch(self, limit: int, timeout: float) -> Sequence[KafkaDelivery]:
        deadline = time.monotonic() + timeout
        group = self._transport._groups.get(self.group)
        if group is None:  # declared by another process: join it here
            await self._transport._declare(self.subscription, active=True)
            group = self._transport._groups[self.group]
        elif not group.active:
            group.active = True
            if group.member is None:
                await self._transport._join(group)
            elif group.members > 1:  # assigned while idle, beside others: ask for a share
                group.member._coordinator.request_rejoin()
        while not self._closed:
            group.wake.clear()
            claimed = self._transport._claim(group, limit)
            if claimed:
                await self._transport._commit(group)  # the handed-out mark, for redeliveries
                return claimed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.wake.wait(), min(remaining, 0.05))
        return []

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        group = None
        for delivery in deliveries:
            assert isinstance(delivery, KafkaDelivery)
            try:
                group = delivery._ack()
            except LeaseLost:
                lost.append(delivery)
        if group is not None:
            await self._transport._commit(group)
        return lost

    async def close(self) -> None:
        self._closed = True


class KafkaTransport:
    """A Kafka connection: one producer, one consumer-group member per declared group."""

    def __init__(self, config: KafkaConfig | str) -> None:
        if isinstance(config, str):
            self.url = config
            config = KafkaConfig.from_url(config)
        else:
            self.url = "kafka://" + ",".join(config.bootstrap)
        self.config = config
        self.features = Features(
            durable=True,  # acks=all; as durable as the broker's replication and fsync
            shared_across_processes=True,
            key_ordering=True,
            dead_letter_queue=True,
            max_payload=config.max_payload,
            lease_expiry=True,
            fenced_settlement=True,
        )
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count(1)
        self._timers: set[asyncio.TimerHandle] = set()
        self._producer: Any = None
        self._topics: set[str] = set()
        self._dlq_lock = asyncio.Lock()
        self._probe: _Probe | None = None
        self._admin: Any = None
        self._listing: tuple[float, dict[str, int]] = (0.0, {})
        """When the broker's topics were last listed, and their partition counts."""
        self._dead: dict[str, tuple[int, set[int], set[bytes]]] = {}
        """group -> (next DLQ offset to read, live DLQ offsets, sources seen): the dead
        letters count for stats, read incrementally."""

    # -- connection ------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return ",".join(self.config.bootstrap)

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(f"cannot reach Kafka at {self._where}: {type(exc).__name__}")

    @property
    def events_topic(self) -> str:
        return f"{self.config.prefix}.events"

    def _group_topic(self, group: str, kind: str) -> str:
        return f"{self.config.prefix}.{group}.{kind}"

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=list(self.config.bootstrap),
            acks="all",
            max_request_size=self.config.max_payload + 64 * 1024,
            request_timeout_ms=10_000,
            linger_ms=0,
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise self._unavailable(exc) from None
        self._producer = producer
        await self._ensure_topics({self.events_topic: self.config.partitions})

    async def _ensure_topics(self, wanted: dict[str, int]) -> None:
        missing = {t: n for t, n in wanted.items() if t not in self._topics}
        if not missing:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=list(self.config.bootstrap))
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            new = [
                NewTopic(name=t, num_partitions=n, replication_factor=1)
                for t, n in missing.items()
                if t not in existing
            ]
            if new:
                try:
                    response = await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    response = None
                for item in getattr(response, "topic_errors", ()) or ():
                    code = item[1]
                    if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS
                        raise TransportError(f"Kafka refused to create topic {item[0]}: {item}")
        except TransportError:
            raise
        except (KafkaError, OSError) as exc:
            raise self._unavailable(exc) from None
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        self._topics.update(missing)

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for group in self._groups.values():
            if group.task is not None:
                group.task.cancel()
                with contextlib.suppress(BaseException):
                    await group.task
            if group.member is not None:
                with contextlib.suppress(Exception):
                    await self._commit(group)
                group.drop(set(group.parts))  # busy with nothing while leaving
                coordinator = getattr(group.member, "_coordinator", None)
                if coordinator is not None and getattr(coordinator, "generation", 1) == 0:
                    # aiokafka leaves only from generation 1 on, but Tansu numbers the
                    # first generation 0: without this the group waits a session
                    # timeout for the gone member before anyone else gets a partition
                    coordinator.generation = 1
                with contextlib.suppress(Exception):
                    await group.member.stop()  # leaves the group: a quick rebalance
            if group.marker is not None:
                with contextlib.suppress(Exception):
                    await group.marker.stop()
            group.task = group.member = group.marker = None
            group.drop(set(group.parts))
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None
        probe, self._probe = self._probe, None
        if probe is not None:
            await probe.close()
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    # -- groups ----------------------------------------------------------------------

    def _topics_of(self, group: str) -> list[str]:
        return [self.events_topic, self._group_topic(group, "retry")]

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        await asyncio.gather(*(self._declare(sub, active=False) for sub in subscriptions))

    async def _declare(self, sub: Subscription, *, active: bool) -> None:
        """Create the group's topics, pin a new group's start, and join the group (a
        member is ready when declare returns)."""
        existing = self._groups.get(sub.group)
        if existing is not None:
            existing.subscription = sub
            return
        name = sub.group
        await self._ensure_topics(
            {self._group_topic(name, "retry"): 1, self._group_topic(name, "dlq"): 1}
        )
        group = _Group(sub, f"{self.config.prefix}.{name}", active=active)
        await self._pin_start(group)
        self._groups[name] = group
        await self._join(group)

    def _member_options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": list(self.config.bootstrap),
            "enable_auto_commit": False,
            "max_partition_fetch_bytes": self.config.max_payload + 64 * 1024,
            "fetch_max_bytes": max(52428800, self.config.max_payload * 2),
        }

    async def _pin_start(self, group: _Group) -> None:
        """A new Kafka consumer group starts at the current end of its topics (events
        published from now on), committed at once so no member can start later."""
        pinner = AIOKafkaConsumer(group_id=group.kafka_group, **self._member_options())
        try:
            await pinner.start()
            tps = [TopicPartition(self.events_topic, p) for p in range(self.config.partitions)] + [
                TopicPartition(self._group_topic(group.subscription.group, "retry"), 0)
            ]
            pinner.assign(tps)
            committed = [await pinner.committed(tp) for tp in tps]
            if all(c is None for c in committed):
                ends = await pinner.end_offsets(tps)
                await pinner.commit({tp: OffsetAndMetadata(ends[tp], "") for tp in tps})
        except (KafkaError, OSError) as exc:
            raise self._unavailable(exc) from None
        finally:
            with contextlib.suppress(Exception):
                await pinner.stop()

    async def _join(self, group: _Group) -> None:
        async with group.joining:
            if group.member is not None:
                return
            member = AIOKafkaConsumer(
                group_id=group.kafka_group,
                auto_offset_reset="latest",
                fetch_max_wait_ms=50,
                session_timeout_ms=int(self.config.session_timeout * 1000),
                heartbeat_interval_ms=max(100, int(self.config.session_timeout * 1000 / 4)),
                partition_assignment_strategy=(_KeepBusyAssignor(group),),
                **self._member_options(),
            )
            marker = AIOKafkaConsumer(
                group_id=f"{group.kafka_group}.handed", **self._member_options()
            )
            try:
                await marker.start()
                await member.start()
                member.subscribe(
                    self._topics_of(group.subscription.group), listener=_Rebalance(self, group)
                )
            except (KafkaError, OSError) as exc:
                for client in (member, marker):
                    with contextlib.suppress(Exception):
                        await client.stop()
                raise self._unavailable(exc) from None
            group.member, group.marker = member, marker
            group.task = asyncio.create_task(self._read(group))
        try:
            await asyncio.wait_for(group.assigned.wait(), 6 * self.config.session_timeout + 10)
        except TimeoutError:
            raise BrokerUnavailable(
                f"Kafka at {self._where} did not assign partitions of group "
                f"{group.kafka_group!r} in time"
            ) from None

    async def _assigned(self, group: _Group, assigned: set[TopicPartition]) -> None:
        group.drop(set(group.parts) - assigned)
        new = [tp for tp in assigned if tp not in group.parts]
        if new:
            marker = group.marker
            marker.assign(sorted(set(marker.assignment()) | set(new)))
            marker.pause(*marker.assignment())  # it only commits, never fetches
            for tp in new:
                start = await group.member.committed(tp)
                if start is None or start < 0:
                    start = await group.member.position(tp)
                handed = await marker.committed(tp) or 0
                group.parts[tp] = _Part(next=start, handed=handed, committed=(start, handed))
                group.member.seek(tp, start)
        group.rebalancing = False
        group.assigned.set()
        if group.dirty:
            await self._commit(group)
        group.wake.set()

    async def _commit(self, group: _Group) -> None:
        """Commit each partition's position (the first unsettled record) and its
        handed-out mark, where they moved."""
        member = group.member
        if member is None or group.rebalancing:
            return
        async with group.commit_lock:
            group.dirty = False
            moved = {
                tp: (part.position, part.handed)
                for tp, part in group.parts.items()
                if (part.position, part.handed) != part.committed
            }
            positions = {
                tp: OffsetAndMetadata(state[0], "")
                for tp, state in moved.items()
                if state[0] != group.parts[tp].committed[0]
            }
            marks = {
                tp: OffsetAndMetadata(state[1], "")
                for tp, state in moved.items()
                if state[1] != group.parts[tp].committed[1]
            }
            try:
                # the handed-out marks first: a redelivery must never look like a first try
                if marks:
                    await group.marker.commit(marks)
                if positions:
                    await member.commit(positions)
            except (KafkaError, OSError) as exc:  # rebalancing or away: next time
                group.dirty = True
                log.debug("kafka: commit of %s deferred: %r", group.kafka_group, exc)
                return
            for tp, state in moved.items():
                owned = group.parts.get(tp)
                if owned is not None:
                    owned.committed = state

    async def _read(self, group: _Group) -> None:
        member = group.member
        retry_topic = self._group_topic(group.subscription.group, "retry")
        last_commit = time.monotonic()
        while True:
            if len(group.rows) > _MAX_BUFFERED:  # consumers are behind: let them catch up
                await asyncio.sleep(0.05)
                continue
            try:
                batches = await member.getmany(timeout_ms=200, max_records=500)
            except asyncio.CancelledError:
                raise
            except Exception:  # a broker hiccup: aiokafka reconnects, try again
                await asyncio.sleep(0.2)
                continue
            added = False
            # Kafka orders a partition only: merge the partitions by publish time (each
            # partition's own order kept), so one publisher's events arrive in order
            for record in heapq.merge(*batches.values(), key=_published_at):
                tp = TopicPartition(record.topic, record.partition)
                part = group.parts.get(tp)
                if part is None:
                    continue
                if record.offset < part.next:
                    continue  # still held from before a rebalance
                part.next = record.offset + 1
                raw = _decode_record(record.value, record.headers)
                if record.topic != retry_topic and not self._wanted(group, raw):
                    continue
                key = record.key.decode("utf-8", "replace") if record.key else None
                self._append(group, tp, record.offset, raw, key, part)
                added = True
            if added:
                group.wake.set()
            # commit what moved at least every second, also when the last records read
            # were all skipped (not wanted): the committed offsets are the group's
            # progress for every process's stats, so they must reach the end when idle
            if group.dirty or (time.monotonic() - last_commit > 1.0 and group.moved()):
                await self._commit(group)
                last_commit = time.monotonic()

    @staticmethod
    def _wanted(group: _Group, raw: bytes) -> bool:
        try:
            event = codec.decode(raw)
        except Exception:
            return True  # undecodable: hand it out so it can be dead-lettered
        return group.subscription.matches(event)

    def _append(
        self,
        group: _Group,
        tp: TopicPartition,
        offset: int,
        raw: bytes,
        key: str | None,
        part: _Part,
    ) -> None:
        ordered_key = key if group.subscription.ordered else None
        row = _Row(next(self._ids), tp, offset, raw, ordered_key, 1 if offset < part.handed else 0)
        group.rows[row.id] = row
        part.open[offset] = row
        if ordered_key is not None:
            group.keys.setdefault(ordered_key, []).append(row.id)

    # -- publishing ------------------------------------------------------------------

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        encoded = encode_checked(events, self.config.max_payload)
        if to_group is not None and to_group not in self._groups:
            raise TransportError(f"no consumer group named {to_group!r} is declared (undeclared)")
        if self._producer is None:
            raise TransportError("the Kafka transport is not started")
        topic = self.events_topic if to_group is None else self._group_topic(to_group, "retry")
        await self._send(
            topic,
            [
                (
                    raw,
                    event.partitionkey.encode() if event.partitionkey else None,
                    [("content-type", _CT_STRUCTURED), ("nerve_ts", str(time.time_ns()).encode())],
                )
                for event, raw in encoded
            ],
        )

    async def _send(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        try:
            futures = [
                await self._producer.send(topic, value, key=key, headers=headers)
                for value, key, headers in records
            ]
            if futures:
                await asyncio.gather(*futures)
        except KafkaConnectionError as exc:
            raise self._unavailable(exc) from None
        except KafkaError as exc:
            raise TransportError(f"Kafka refused the publish to {topic}: {exc!r}") from None

    async def _send_dead(self, group: str, raw: bytes, failure: Failure, source: str) -> None:
        headers = [
            ("content-type", _CT_STRUCTURED),
            ("nerve_ts", str(time.time_ns()).encode()),
            ("nerve_failure", json.dumps(failure.to_json()).encode()),
            ("nerve_source", source.encode()),
        ]
        await self._send(self._group_topic(group, "dlq"), [(raw, None, headers)])

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> KafkaConsumer:
        return KafkaConsumer(self, subscription)

    def _claim(self, group: _Group, limit: int) -> list[KafkaDelivery]:
        if group.rebalancing:
            return []
        now = time.time()
        out: list[KafkaDelivery] = []
        # Take from the partitions already in use, and from one more at most: a partition
        # with deliveries in flight stays with this member at the next rebalance, so
        # spreading one batch over every partition would leave nothing to share.
        in_use = {tp for tp, part in group.parts.items() if part.held}
        fresh: TopicPartition | None = None
        for row in group.rows.values():
            if len(out) >= limit:
                break
            if row.tp not in in_use and fresh is not None and row.tp != fresh:
                continue
            if row.available_at > now or row.lease_until > now:
                continue
            if row.key is not None and group.keys[row.key][0] != row.id:
                continue
            if row.tp not in in_use:
                fresh = row.tp
            if not row.held:
                row.held = True
                group.parts[row.tp].held += 1
            row.lease_until = now + self.config.visibility_timeout
            row.token = random.getrandbits(62) + 1
            row.attempt += 1
            if row.first_at is None:
                row.first_at = now
            part = group.parts[row.tp]
            if row.offset >= part.handed:
                part.handed = row.offset + 1
            out.append(KafkaDelivery(self, group.subscription.group, row, now))
        return out

    def _wake_later(self, group: _Group, delay: float) -> None:
        if delay <= 0:
            group.wake.set()
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            group.wake.set()

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    # -- dead letters (DeadLetterQueue) ----------------------------------------------

    async def _read_dlq(self, group: str) -> dict[int, tuple[bytes, Failure]]:
        """The live entries of ``group``'s DLQ topic: offset -> (raw, failure), read
        from the start, with the purge markers (empty records) applied."""
        tp = TopicPartition(self._group_topic(group, "dlq"), 0)
        async with self._dlq_lock:
            # a fresh reader per browse: a reused one kept stale fetch state across seeks
            browser = AIOKafkaConsumer(
                bootstrap_servers=list(self.config.bootstrap),
                group_id=None,
                enable_auto_commit=False,
                fetch_max_wait_ms=50,
                max_partition_fetch_bytes=self.config.max_payload + 64 * 1024,
            )
            try:
                await browser.start()
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await browser.stop()
                raise self._unavailable(exc) from None
            try:
                browser.assign([tp])
                end = (await browser.end_offsets([tp]))[tp]
                await browser.seek_to_beginning(tp)
                live: dict[int, tuple[bytes, Failure]] = {}
                sources: set[bytes] = set()
                deadline = time.monotonic() + 10
                while await browser.position(tp) < end:
                    if time.monotonic() > deadline:
                        raise TransportError(f"reading dead letters of {group!r} timed out")
                    batches = await browser.getmany(tp, timeout_ms=200)
                    for record in batches.get(tp, []):
                        head = dict(record.headers or ())
                        if "nerve_purge" in head:
                            for offset in json.loads(head["nerve_purge"]):
                                live.pop(int(offset), None)
                        elif "nerve_failure" in head and _first_copy(head, sources):
                            doc = json.loads(head["nerve_failure"])
                            live[record.offset] = (record.value or b"", Failure(**doc))
            except KafkaConnectionError as exc:
                raise self._unavailable(exc) from None
            except KafkaError as exc:
                raise TransportError(f"reading dead letters of {group!r}: {exc!r}") from None
            finally:
                with contextlib.suppress(Exception):
                    await browser.stop()
            return live

    def _entry(self, group: str, offset: int, raw: bytes, failure: Failure) -> DeadLetterEntry:
        try:
            event: Event | None = codec.decode(raw)
        except Exception:
            event = None
        return DeadLetterEntry(f"{group}@{offset}", group, raw, failure, event)

    async def _known_groups(self) -> set[str]:
        """The groups declared here or on the broker (by another process)."""
        try:
            topics = await self._topic_partitions()
        except (KafkaConnectionError, OSError) as exc:
            raise self._unavailable(exc) from None
        except KafkaError as exc:
            raise TransportError(f"listing Kafka topics: {exc!r}") from None
        return self._groups_on_broker(topics)

    async def _entries(self, group: str | None) -> list[DeadLetterEntry]:
        known = await self._known_groups()
        names = [group] if group is not None else sorted(known)
        out: list[DeadLetterEntry] = []
        for name in names:
            if name not in known:
                continue
            for offset, (raw, failure) in sorted((await self._read_dlq(name)).items()):
                out.append(self._entry(name, offset, raw, failure))
        out.sort(key=lambda e: (e.failure.failed_at, e.group, int(e.id.rpartition("@")[2])))
        return out

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        return (await self._entries(group))[:limit]

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        group, _, offset = entry_id.rpartition("@")
        if not offset.isdigit() or group not in await self._known_groups():
            return None
        found = (await self._read_dlq(group)).get(int(offset))
        return None if found is None else self._entry(group, int(offset), *found)

    async def _select(
        self, entry_ids: Sequence[str] | None, group: str | None
    ) -> list[DeadLetterEntry]:
        entries = await self._entries(group)
        if entry_ids is None:
            return entries
        wanted = set(entry_ids)
        return [e for e in entries if e.id in wanted]

    async def _purge_marker(self, group: str, offsets: list[int]) -> None:
        headers = [("nerve_purge", json.dumps(offsets).encode())]
        await self._send(self._group_topic(group, "dlq"), [(b"", None, headers)])

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        entries = await self._select(entry_ids, group)
        for entry in entries:
            key = entry.event.partitionkey if entry.event is not None else None
            headers = [("content-type", _CT_STRUCTURED), ("nerve_ts", str(time.time_ns()).encode())]
            await self._send(
                self._group_topic(entry.group, "retry"),
                [(entry.raw, key.encode() if key else None, headers)],
            )
            await self._purge_marker(entry.group, [int(entry.id.rpartition("@")[2])])
        return len(entries)

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        entries = await self._select(entry_ids, group)
        by_group: dict[str, list[int]] = {}
        for entry in entries:
            by_group.setdefault(entry.group, []).append(int(entry.id.rpartition("@")[2]))
        for name, offsets in by_group.items():
            await self._purge_marker(name, offsets)
        return len(entries)

    # -- stats (Inspectable) and the event log (EventLog) --------------------------

    async def _admin_client(self) -> Any:
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=list(self.config.bootstrap))
            try:
                await admin.start()
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await admin.close()
                raise self._unavailable(exc) from None
            self._admin = admin
        return self._admin

    def _probe_client(self) -> _Probe:
        if self._probe is None:
            self._probe = _Probe(self._member_options())
        return self._probe

    async def _topic_partitions(self, fresh: bool = False) -> dict[str, int]:
        """The broker's topics and their partition counts (listed at most every 5 s)."""
        at, topics = self._listing
        if fresh or time.monotonic() - at > 5.0 or self.events_topic not in topics:
            admin = await self._admin_client()
            described = await admin.describe_topics()
            topics = {
                str(t["topic"]): len(t.get("partitions") or ())
                for t in described
                if not t.get("error_code")
            }
            self._listing = (time.monotonic(), topics)
        return topics

    def _groups_on_broker(self, topics: dict[str, int]) -> set[str]:
        """Groups declared here, and those whose retry topic exists on the broker."""
        head, tail = f"{self.config.prefix}.", ".retry"
        found = {
            name[len(head) : -len(tail)]
            for name in topics
            if name.startswith(head) and name.endswith(tail) and len(name) > len(head + tail)
        }
        return found | set(self._groups)

    def _event_partitions(self, topics: dict[str, int]) -> list[TopicPartition]:
        count = topics.get(self.events_topic) or self.config.partitions
        return [TopicPartition(self.events_topic, p) for p in range(count)]

    async def stats(self) -> list[GroupStats]:
        """Per group: ``ready`` is what its members have not settled (end offsets minus
        committed offsets over the events topic and its retry topic), less what this
        process holds, which is told apart as ``in_flight`` (leased) and ``delayed``
        (nacked with a delay). Another process's leased and delayed deliveries count as
        ready (they are below its committed offsets), and its settlements show once it
        commits (at least every second). The counters are this process's."""
        try:
            topics = await self._topic_partitions()
            names = sorted(self._groups_on_broker(topics))
            events = self._event_partitions(topics)
            retry = {g: TopicPartition(self._group_topic(g, "retry"), 0) for g in names}
            dlq = {g: TopicPartition(self._group_topic(g, "dlq"), 0) for g in names}
            admin = await self._admin_client()
            committed: dict[str, dict[TopicPartition, int]] = {}
            for name in names:
                offsets = await admin.list_consumer_group_offsets(
                    f"{self.config.prefix}.{name}", partitions=[*events, retry[name]]
                )
                committed[name] = {tp: int(o.offset) for tp, o in offsets.items()}
            probe = self._probe_client()
            async with probe.lock:
                ends = await probe.ends([*events, *retry.values(), *dlq.values()])
                dead = {name: await self._count_dead(probe, dlq[name], ends) for name in names}
        except (KafkaConnectionError, OSError) as exc:
            raise self._unavailable(exc) from None
        except KafkaError as exc:
            raise TransportError(f"reading Kafka group offsets: {exc!r}") from None
        now = time.time()
        out = []
        for name in names:
            local = self._groups.get(name)
            owned = {} if local is None or local.rebalancing else local.parts
            ready = delayed = in_flight = 0
            for tp in [*events, retry[name]]:
                end = ends.get(tp, 0)
                part = owned.get(tp)
                if part is None:
                    ready += max(0, end - max(0, committed[name].get(tp, -1)))
                    continue
                ready += max(0, end - part.next)
                for row in part.open.values():
                    if row.token and row.lease_until > now:
                        in_flight += 1
                    elif not row.token and row.available_at > now:
                        delayed += 1
                    else:
                        ready += 1
            out.append(
                GroupStats(
                    group=name,
                    ready=ready,
                    delayed=delayed,
                    in_flight=in_flight,
                    dead_letters=dead[name],
                    processed=local.processed if local else 0,
                    retried=local.retried if local else 0,
                    dead_lettered=local.dead_lettered if local else 0,
                    # the counters, in_flight and delayed are this process's
                    extra={"counted_by": "this process"},
                )
            )
        return out

    async def _count_dead(
        self, probe: _Probe, tp: TopicPartition, ends: dict[TopicPartition, int]
    ) -> int:
        """Live dead letters in ``tp`` (a DLQ topic), reading only what is new since the
        last count (call under the probe's lock)."""
        group = tp.topic[len(self.config.prefix) + 1 : -len(".dlq")]
        start, live, sources = self._dead.get(group, (0, set(), set()))
        end = ends.get(tp, 0)
        while start < end:
            records = (await probe.read({tp: start}, {tp: end}, 10_000))[tp]
            if not records:
                break  # the broker is slow or the records are gone: count what is known
            for record in records:
                head = dict(record.headers or ())
                if "nerve_purge" in head:
                    with contextlib.suppress(ValueError, TypeError):
                        live.difference_update(int(o) for o in json.loads(head["nerve_purge"]))
                elif "nerve_failure" in head and _first_copy(head, sources):
                    live.add(record.offset)
            start = records[-1].offset + 1
        self._dead[group] = (start, live, sources)
        return len(live)

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        """The events topic, merged over its partitions by publish time. A position
        packs one offset per partition (:data:`_POSITION_BITS` bits each, partition 0
        lowest), so it grows with every event read and 0 is the start; it does not fit
        a JavaScript number once the topic has more than one partition."""
        try:
            events = self._event_partitions(await self._topic_partitions())
            probe = self._probe_client()
            async with probe.lock:
                ends = await probe.ends(events)
                if after is None:
                    return [(_pack([ends[tp] for tp in events]), b"")]
                offsets = _unpack(after, len(events))
                starts = {tp: offsets[tp.partition] for tp in events}
                todo = {tp: o for tp, o in starts.items() if o < ends[tp]}
                fetched = await probe.read(todo, ends, limit) if todo and limit > 0 else {}
        except (KafkaConnectionError, OSError) as exc:
            raise self._unavailable(exc) from None
        except KafkaError as exc:
            raise TransportError(f"reading the Kafka event log: {exc!r}") from None
        merged = heapq.merge(
            *fetched.values(), key=lambda r: (_published_at(r), r.partition, r.offset)
        )
        out: list[tuple[int, bytes]] = []
        for record in itertools.islice(merged, limit):
            offsets[record.partition] = record.offset + 1
            out.append((_pack(offsets), _decode_record(record.value, record.headers)))
        return out


def _first_copy(head: dict[str, bytes], sources: set[bytes]) -> bool:
    """A DLQ record is the first of its source record (``topic:partition:offset``), and
    remembered as seen. A record can be dead-lettered twice: its DLQ copy is produced
    before the group's committed offset moves past it, so a member killed in between
    leaves it to the partition's next owner, which dead-letters it again; and a lease
    that runs out during the produce hands it to another consumer meanwhile."""
    source = head.get("nerve_source")
    if source is None:
        return True  # written before sources were recorded
    if source in sources:
        return False
    sources.add(source)
    return True


def _pack(offsets: Sequence[int]) -> int:
    position = 0
    for partition, offset in enumerate(offsets):
        if not 0 <= offset < 1 << _POSITION_BITS:
            raise TransportError(f"offset {offset} of partition {partition} is out of range")
        position |= offset << (_POSITION_BITS * partition)
    return position


def _unpack(position: int, partitions: int) -> list[int]:
    mask = (1 << _POSITION_BITS) - 1
    return [(position >> (_POSITION_BITS * p)) & mask for p in range(partitions)]


class _Probe:
    """A consumer outside any group, for reading partitions at given offsets: the end
    offsets as they really are, the dead letters count, ``read_log``. Its partitions
    stay paused except while one of its reads runs, so it fetches nothing in between.

    End offsets: Tansu (v0.6.0, in-memory storage) answers ListOffsets(latest) with the
    base offset of the partition's last record batch plus one, not the offset after
    its last record, so ``end_offsets`` lags by the size of the last batch minus one
    (a producer batch of 50 records: 49). The high watermark in a Fetch response is
    right. So a listed end is checked by fetching from one before it (the last batch,
    on Tansu; the last record, on Kafka) and taking the highest of the listed end, the
    high watermark and the offset after the last record fetched; the answer is kept
    until the listed end moves."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._consumer = AIOKafkaConsumer(
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            **options,
        )
        self._started = False
        self._assigned: set[TopicPartition] = set()
        self._checked: dict[TopicPartition, tuple[int, int]] = {}
        """tp -> (listed end, real end) of the last check."""
        self.lock = asyncio.Lock()

    async def _start(self) -> Any:
        if not self._started:
            await self._consumer.start()
            self._started = True
        return self._consumer

    async def close(self) -> None:
        if self._started:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        self._started = False

    async def ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset after the last record of each partition (call under ``lock``)."""
        consumer = await self._start()
        listed: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
        out: dict[TopicPartition, int] = {}
        check: dict[TopicPartition, int] = {}
        for tp, end in listed.items():
            known = self._checked.get(tp)
            if end <= 0:
                out[tp] = 0
            elif known is not None and known[0] == end:
                out[tp] = known[1]
            else:
                out[tp] = end
                check[tp] = end - 1
        if check:
            fetched = await self.read(check, None, 1 << 30)
            for tp in check:
                records = fetched.get(tp, [])
                real = max(listed[tp], consumer.highwater(tp) or 0)
                if records:
                    real = max(real, records[-1].offset + 1)
                out[tp] = real
                if records:  # a check that saw nothing is not kept
                    self._checked[tp] = (listed[tp], real)
        return out

    async def read(
        self,
        starts: dict[TopicPartition, int],
        stops: dict[TopicPartition, int] | None,
        limit: int,
    ) -> dict[TopicPartition, list[Any]]:
        """Records of each partition from ``starts[tp]`` up to ``stops[tp]`` (exclusive),
        at most ``limit`` per partition; with ``stops`` None, the first records fetched
        (one batch). Gives up on a partition after :data:`_PROBE_WAIT` seconds."""
        consumer = await self._start()
        wanted = set(starts)
        if wanted - self._assigned:
            self._assigned |= wanted
            consumer.assign(sorted(self._assigned))
            consumer.pause(*self._assigned)
        out: dict[TopicPartition, list[Any]] = {tp: [] for tp in wanted}
        open_ = {tp for tp in wanted if stops is None or starts[tp] < stops.get(tp, 0)}
        for tp in open_:
            consumer.seek(tp, starts[tp])
        consumer.resume(*open_)
        deadline = time.monotonic() + _PROBE_WAIT
        try:
            while open_ and time.monotonic() < deadline:
                batches = await consumer.getmany(*open_, timeout_ms=100)
                for tp, records in batches.items():
                    if tp not in open_:
                        continue
                    stop = None if stops is None else stops[tp]
                    for record in records:
                        if (stop is not None and record.offset >= stop) or len(out[tp]) >= limit:
                            break
                        out[tp].append(record)
                    done = (
                        stop is None
                        or len(out[tp]) >= limit
                        or (await consumer.position(tp)) >= stop
                    )
                    if records and done:
                        consumer.pause(tp)
                        open_.discard(tp)
        finally:
            consumer.pause(*wanted)
        return out
