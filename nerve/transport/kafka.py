"""``kafka://``: Apache Kafka (or a Kafka-protocol broker such as Tansu) via aiokafka.

URL: ``kafka://host:9092[,host2:9092]?prefix=nerve&partitions=8&visibility_timeout=30
&max_payload=1048576``

Layout on the broker:

- ``<prefix>.events`` (``partitions`` partitions): every published event, one record
  each, key = the CloudEvents ``partitionkey`` (so one key stays in one partition, in
  publish order), value = the structured-mode CloudEvent JSON (the exact bytes of
  :func:`nerve.event.encode`), header ``content-type: application/cloudevents+json``.
  Records in binary mode (``ce_*`` headers, value = data) are decoded too.
- ``<prefix>.<group>.retry`` (1 partition): events published ``to_group`` (targeted
  redelivery, DLQ replay by other tools).
- ``<prefix>.<group>.dlq`` (1 partition): dead letters, value = raw event, failure in
  the ``nerve_failure`` header (JSON). Browsing reads the topic from its start; purge
  and replay append a marker record (empty value, ``nerve_purge`` header = JSON list
  of offsets) that hides those entries; replay first produces the raw event to the
  group's retry topic. Entry ids are ``<group>@<offset>``.

Delivery model (what is true, see ``features``): each declared group is read by ONE
reader in this process (manual partition assignment, starting at the log end when the
group is declared) that feeds an in-process lease table shared by every consumer of
the group in this transport. Leases, nacks with delay, fencing and per-key order are
enforced in that table, so they hold within one process; consumers in other processes
do not share the group (``shared_across_processes=False``) and nothing of a group's
progress survives the process (no committed offsets yet). Filters and patterns are
checked client-side: a record no group wants is simply skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
)

from nerve import event as codec
from nerve._urls import redact
from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError, LeaseLost, TransportError
from nerve.event import Event
from nerve.transport.base import DeadLetterEntry, Delivery, Failure, Features, encode_checked

__all__ = ["KafkaConfig", "KafkaTransport"]

_OPTIONS = {"prefix", "partitions", "visibility_timeout", "max_payload"}
_CT_STRUCTURED = b"application/cloudevents+json"
_TOPIC_SAFE = re.compile(r"[A-Za-z0-9._-]{1,200}")


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap: tuple[str, ...] = ("127.0.0.1:9092",)
    prefix: str = "nerve"
    partitions: int = 8
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024

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
            )
        except ValueError as exc:
            raise ConfigError(f"{redact(url)!r}: {exc}") from None
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
    raw: bytes
    key: str | None
    available_at: float
    lease_until: float = 0.0
    token: int = 0
    attempt: int = 0
    first_at: float | None = None


@dataclass(slots=True)
class _Group:
    subscription: Subscription
    rows: dict[int, _Row] = field(default_factory=dict)
    keys: dict[str, list[int]] = field(default_factory=dict)
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reader: Any = None
    task: asyncio.Task[None] | None = None

    def remove(self, row: _Row) -> None:
        del self.rows[row.id]
        if row.key is not None:
            ids = self.keys[row.key]
            ids.remove(row.id)
            if not ids:
                del self.keys[row.key]


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

    def __init__(self, transport: KafkaTransport, group: str, row: _Row) -> None:
        self._transport = transport
        self._row = row
        self._event: Event | None = None
        self.group = group
        self.token = row.token
        self.raw = row.raw
        self.attempt = row.attempt
        self.received_at = time.time()
        self.first_at = row.first_at if row.first_at is not None else self.received_at

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
                f"delivery {self.group}#{self._row.id}: the lease expired and another "
                f"consumer took the event over; this {action} was refused"
            )
        return group, row

    async def ack(self) -> None:
        group, row = self._owned("ack")
        group.remove(row)
        group.processed += 1
        group.wake.set()

    async def nack(self, delay: float = 0.0) -> None:
        group, row = self._owned("nack")
        row.available_at = time.time() + delay
        row.lease_until = 0.0
        row.token = 0
        group.retried += 1
        self._transport._wake_later(group, delay)

    async def dead_letter(self, failure: Failure) -> None:
        group, row = self._owned("dead-letter")
        await self._transport._send_dead(self.group, row.raw, failure)
        group.remove(row)
        group.dead_lettered += 1
        group.wake.set()

    async def extend(self, seconds: float) -> None:
        _, row = self._owned("extend")
        row.lease_until = time.time() + seconds


class KafkaConsumer:
    def __init__(self, transport: KafkaTransport, group: str) -> None:
        self._transport = transport
        self.group = group
        self._closed = False

    async def fetch(self, limit: int, timeout: float) -> Sequence[KafkaDelivery]:
        deadline = time.monotonic() + timeout
        while not self._closed:
            group = self._transport._groups[self.group]
            group.wake.clear()
            claimed = self._transport._claim(group, limit)
            if claimed:
                return claimed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.wake.wait(), min(remaining, 0.05))
        return []

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        for delivery in deliveries:
            try:
                await delivery.ack()
            except LeaseLost:
                lost.append(delivery)
        return lost

    async def close(self) -> None:
        self._closed = True


class KafkaTransport:
    """A Kafka connection: one producer, one reader per declared group."""

    def __init__(self, config: KafkaConfig | str) -> None:
        if isinstance(config, str):
            self.url = config
            config = KafkaConfig.from_url(config)
        else:
            self.url = "kafka://" + ",".join(config.bootstrap)
        self.config = config
        self.features = Features(
            # a group's progress lives in this process (no committed offsets yet), so
            # a restart of the process loses it, whatever the broker keeps
            durable=False,
            shared_across_processes=False,
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
            if group.reader is not None:
                with contextlib.suppress(Exception):
                    await group.reader.stop()
            group.task = group.reader = None
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    # -- groups ----------------------------------------------------------------------

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        for sub in subscriptions:
            existing = self._groups.get(sub.group)
            if existing is not None:
                existing.subscription = sub
                continue
            group = _Group(sub)
            await self._start_reader(group)
            self._groups[sub.group] = group

    async def _start_reader(self, group: _Group) -> None:

        name = group.subscription.group
        retry = self._group_topic(name, "retry")
        await self._ensure_topics({retry: 1, self._group_topic(name, "dlq"): 1})
        reader = AIOKafkaConsumer(
            bootstrap_servers=list(self.config.bootstrap),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=self.config.max_payload + 64 * 1024,
            fetch_max_bytes=max(52428800, self.config.max_payload * 2),
        )
        partitions = [TopicPartition(self.events_topic, i) for i in range(self.config.partitions)]
        partitions.append(TopicPartition(retry, 0))
        try:
            await reader.start()
            reader.assign(partitions)
            await reader.seek_to_end(*partitions)
            for tp in partitions:  # pin the start: events published from now on
                await reader.position(tp)
        except (KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await reader.stop()
            raise self._unavailable(exc) from None
        group.reader = reader
        group.task = asyncio.create_task(self._read(group, retry))

    async def _read(self, group: _Group, retry_topic: str) -> None:
        reader = group.reader
        while True:
            try:
                batches = await reader.getmany(timeout_ms=200, max_records=500)
            except asyncio.CancelledError:
                raise
            except Exception:  # a broker hiccup: aiokafka reconnects, try again
                await asyncio.sleep(0.2)
                continue
            added = False
            # Kafka orders a partition only: merge the partitions by publish time (each
            # partition's own order kept), so one publisher's events arrive in order
            merged = heapq.merge(*batches.values(), key=_published_at)
            for record in merged:
                raw = _decode_record(record.value, record.headers)
                key = record.key.decode("utf-8", "replace") if record.key else None
                if record.topic != retry_topic and not self._wanted(group, raw):
                    continue
                self._append(group, raw, key)
                added = True
            if added:
                group.wake.set()

    @staticmethod
    def _wanted(group: _Group, raw: bytes) -> bool:
        try:
            event = codec.decode(raw)
        except Exception:
            return True  # undecodable: hand it out so it can be dead-lettered
        return group.subscription.matches(event)

    def _append(self, group: _Group, raw: bytes, key: str | None) -> None:
        row = _Row(next(self._ids), raw, key if group.subscription.ordered else None, time.time())
        group.rows[row.id] = row
        if row.key is not None:
            group.keys.setdefault(row.key, []).append(row.id)

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

    async def _send_dead(self, group: str, raw: bytes, failure: Failure) -> None:
        headers = [
            ("content-type", _CT_STRUCTURED),
            ("nerve_ts", str(time.time_ns()).encode()),
            ("nerve_failure", json.dumps(failure.to_json()).encode()),
        ]
        await self._send(self._group_topic(group, "dlq"), [(raw, None, headers)])

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> KafkaConsumer:
        if subscription.group not in self._groups:
            raise TransportError(f"declare group {subscription.group!r} before consuming it")
        return KafkaConsumer(self, subscription.group)

    def _claim(self, group: _Group, limit: int) -> list[KafkaDelivery]:
        now = time.time()
        out: list[KafkaDelivery] = []
        for row in group.rows.values():
            if len(out) >= limit:
                break
            if row.available_at > now or row.lease_until > now:
                continue
            if row.key is not None and group.keys[row.key][0] != row.id:
                continue
            row.lease_until = now + self.config.visibility_timeout
            row.token = random.getrandbits(62) + 1
            row.attempt += 1
            if row.first_at is None:
                row.first_at = now
            out.append(KafkaDelivery(self, group.subscription.group, row))
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
                        elif "nerve_failure" in head:
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

    async def _entries(self, group: str | None) -> list[DeadLetterEntry]:
        names = [group] if group is not None else list(self._groups)
        out: list[DeadLetterEntry] = []
        for name in names:
            if name not in self._groups:
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
        if group not in self._groups or not offset.isdigit():
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
