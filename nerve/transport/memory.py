"""``memory://``: an in-process broker with the full transport semantics, not durable.

A real adapter (it passes the conformance suite), used by tests and ``nerve.testing``.
Events are encoded on publish and decoded on delivery, exactly as on a real broker,
so nothing is shared by reference between producer and consumer.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nerve import event as codec
from nerve.app import Subscription
from nerve.errors import ConfigError, LeaseLost, TransportError
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


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024

    @classmethod
    def from_url(cls, url: str) -> MemoryConfig:
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigError(f"not a memory URL: {url!r}")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"visibility_timeout", "max_payload"}
        if unknown:
            raise ConfigError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        try:
            return cls(
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", 1024 * 1024)),
            )
        except ValueError as exc:
            raise ConfigError(f"{url!r}: {exc}") from None


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

    def remove(self, row: _Row) -> None:
        del self.rows[row.id]
        if row.key is not None:
            ids = self.keys[row.key]
            ids.remove(row.id)
            if not ids:
                del self.keys[row.key]


class MemoryDelivery:
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

    def __init__(self, transport: MemoryTransport, group: str, row: _Row) -> None:
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
        if row.key is not None:
            group.wake.set()

    async def nack(self, delay: float = 0.0) -> None:
        group, row = self._owned("nack")
        row.available_at = time.time() + delay
        row.lease_until = 0.0
        group.retried += 1
        self._transport._wake_later(group, delay)

    async def dead_letter(self, failure: Failure) -> None:
        group, row = self._owned("dead-letter")
        group.remove(row)
        group.dead_lettered += 1
        self._transport._add_dead(self.group, row.raw, failure)
        group.wake.set()

    async def extend(self, seconds: float) -> None:
        _, row = self._owned("extend")
        row.lease_until = time.time() + seconds


class MemoryConsumer:
    def __init__(self, transport: MemoryTransport, group: str) -> None:
        self._transport = transport
        self.group = group
        self._closed = False

    async def fetch(self, limit: int, timeout: float) -> Sequence[MemoryDelivery]:
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
            # leases expire without anyone telling us: look again at least every 50 ms
            await wait_event(group.wake, min(remaining, 0.05))
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


class MemoryTransport:
    """All state lives in this object; two MemoryTransports share nothing."""

    def __init__(self, config: MemoryConfig | str | None = None) -> None:
        if isinstance(config, str):
            config = MemoryConfig.from_url(config)
        self.config = config or MemoryConfig()
        self.url = "memory://"
        self.features = Features(
            durable=False,
            shared_across_processes=False,
            key_ordering=True,
            dead_letter_queue=True,
            max_payload=self.config.max_payload,
        )
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count(1)
        self._dead: dict[int, tuple[str, bytes, Failure]] = {}
        self._log: list[bytes] = []
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        for sub in subscriptions:
            existing = self._groups.get(sub.group)
            if existing is None:
                self._groups[sub.group] = _Group(sub)
            else:
                existing.subscription = sub

    def _append(self, group: _Group, raw: bytes, key: str | None) -> None:
        row = _Row(next(self._ids), raw, key if group.subscription.ordered else None, time.time())
        group.rows[row.id] = row
        if row.key is not None:
            group.keys.setdefault(row.key, []).append(row.id)
        group.wake.set()

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        encoded = encode_checked(events, self.config.max_payload)
        if to_group is not None and to_group not in self._groups:
            raise TransportError(f"no consumer group named {to_group!r} is declared")
        for event, raw in encoded:
            self._log.append(raw)
            for name, group in self._groups.items():
                if (to_group is None and group.subscription.matches(event)) or name == to_group:
                    self._append(group, raw, event.partitionkey)

    def consumer(self, subscription: Subscription) -> MemoryConsumer:
        if subscription.group not in self._groups:
            raise TransportError(f"declare group {subscription.group!r} before consuming it")
        return MemoryConsumer(self, subscription.group)

    def _claim(self, group: _Group, limit: int) -> list[MemoryDelivery]:
        now = time.time()
        out: list[MemoryDelivery] = []
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
            out.append(MemoryDelivery(self, group.subscription.group, row))
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

    def _add_dead(self, group: str, raw: bytes, failure: Failure) -> None:
        self._dead[next(self._ids)] = (group, raw, failure)

    # -- optional abilities ----------------------------------------------------------

    def _entry(self, entry_id: int) -> DeadLetterEntry:
        group, raw, failure = self._dead[entry_id]
        try:
            event: Event | None = codec.decode(raw)
        except Exception:
            event = None
        return DeadLetterEntry(str(entry_id), group, raw, failure, event)

    def _dead_ids(self, entry_ids: Sequence[str] | None, group: str | None) -> list[int]:
        wanted = None if entry_ids is None else {int(i) for i in entry_ids if str(i).isdigit()}
        return [
            i
            for i, (g, _, _) in self._dead.items()
            if (wanted is None or i in wanted) and (group is None or g == group)
        ]

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        return [self._entry(i) for i in self._dead_ids(None, group)[:limit]]

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        if not entry_id.isdigit() or int(entry_id) not in self._dead:
            return None
        return self._entry(int(entry_id))

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        count = 0
        for i in self._dead_ids(entry_ids, group):
            name, raw, _ = self._dead[i]
            target = self._groups.get(name)
            if target is None:
                continue
            try:
                key = codec.decode(raw).partitionkey
            except Exception:
                key = None
            del self._dead[i]
            self._append(target, raw, key)
            count += 1
        return count

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        ids = self._dead_ids(entry_ids, group)
        for i in ids:
            del self._dead[i]
        return len(ids)

    async def stats(self) -> list[GroupStats]:
        now = time.time()
        out = []
        for name, g in sorted(self._groups.items()):
            counts: dict[str, Any] = {"ready": 0, "delayed": 0, "in_flight": 0}
            for row in g.rows.values():
                if row.lease_until > now:
                    counts["in_flight"] += 1
                elif row.available_at > now:
                    counts["delayed"] += 1
                else:
                    counts["ready"] += 1
            out.append(
                GroupStats(
                    group=name,
                    dead_letters=sum(1 for d in self._dead.values() if d[0] == name),
                    processed=g.processed,
                    retried=g.retried,
                    dead_lettered=g.dead_lettered,
                    **counts,
                )
            )
        return out

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        if after is None:
            return [(len(self._log), b"")]
        return [(i + 1, raw) for i, raw in enumerate(self._log[after : after + limit], after)]
