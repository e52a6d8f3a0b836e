"""The transport contract: the only thing the runtime knows about brokers.

A transport moves encoded events between producers and consumer groups. Its
guarantees, which ``tests/transport/`` checks for every adapter:

- **Durable publish.** :meth:`Transport.publish` returns only once the broker holds
  every event durably (as durable as the broker is configured to be; ``features``
  says). A batch is the fast path. An event over ``features.max_payload`` bytes is
  refused with :class:`~nerve.errors.PayloadTooLarge` and nothing of the batch is sent.
- **Consumer groups.** Every group receives every event that matches its
  :class:`~nerve.app.Subscription` once; the consumers of one group share the work.
  A group receives the events published after it was first declared.
- **At-least-once.** A delivery not settled within its lease (the visibility timeout)
  is handed out again, with ``attempt`` one higher. Settling after the lease was
  taken over raises :class:`~nerve.errors.LeaseLost` (fencing) and changes nothing.
- **Nack with delay** puts a delivery back for its own group only, after ``delay``.
  ``publish(..., to_group=g)`` delivers to group ``g`` only (retries, DLQ replay).
- **Per-key order** (``features.key_ordering``): in an ``ordered`` subscription, a
  delivery whose event has a ``partitionkey`` is not handed out while an earlier
  event of the same key in the same group is unsettled (in flight or waiting for a
  retry), so one key is handled in publish order, across retries and processes,
  while other keys proceed.
- **Dead letters.** :meth:`Delivery.dead_letter` removes the delivery from its group
  and keeps the raw event with its :class:`Failure` for inspection and replay.

Optional abilities are separate small protocols an adapter may also implement:
:class:`DeadLetterQueue` (browse, replay, purge), :class:`Inspectable` (backlog and
counters per group), :class:`EventLog` (read recent events, for ``nerve tail``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from nerve import event as codec
from nerve.app import Subscription
from nerve.errors import PayloadTooLarge
from nerve.event import Event

__all__ = [
    "Consumer",
    "DeadLetterEntry",
    "DeadLetterQueue",
    "Delivery",
    "EventLog",
    "Failure",
    "Features",
    "GroupStats",
    "Inspectable",
    "Transport",
    "encode_checked",
    "wait_event",
]


@dataclass(frozen=True, slots=True)
class Features:
    """What an adapter can guarantee. The conformance suite reads this record: a
    guarantee an adapter does not give is declared here and reported as such.

    An adapter may refine its record in ``start()`` once it can ask the server (Redis
    is durable only with ``appendonly yes`` + ``appendfsync always``); read it after
    starting."""

    durable: bool
    """Published events survive a restart of the broker (and of this process)."""
    shared_across_processes: bool
    """Consumers in several processes can share one group."""
    key_ordering: bool
    """Ordered subscriptions hand out one delivery per partition key at a time."""
    dead_letter_queue: bool
    """Dead letters can be listed, replayed and purged (:class:`DeadLetterQueue`)."""
    max_payload: int
    """Largest encoded event the transport accepts, in bytes."""
    lease_expiry: bool = True
    """A delivery left unsettled by a consumer that is still alive is handed out again
    after the visibility timeout (not only when the consumer's connection dies)."""
    fenced_settlement: bool = True
    """Settling a delivery whose lease was taken over raises LeaseLost and changes
    nothing (otherwise a stale ack may ack the new owner's delivery)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an event was dead-lettered."""

    reason: str
    """Short machine-matchable cause: 'max-attempts', 'dead-letter', 'undecodable',
    'invalid-data', 'not-declared', 'emit-not-declared'."""
    error_type: str
    message: str
    traceback: str = ""
    attempts: int = 1
    first_attempt_at: float = 0.0
    failed_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "error_type": self.error_type,
            "message": self.message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
            "failed_at": self.failed_at,
        }


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead-lettered event of one group, as stored."""

    id: str
    group: str
    raw: bytes
    failure: Failure
    event: Event | None = None
    """The decoded event, or None when the raw bytes were not a valid event."""


@dataclass(frozen=True, slots=True)
class GroupStats:
    group: str
    ready: int = 0
    delayed: int = 0
    in_flight: int = 0
    dead_letters: int = 0
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backlog(self) -> int:
        return self.ready + self.delayed


class Delivery(Protocol):
    """One received event, owned by one consumer until settled exactly once."""

    group: str
    attempt: int
    """1 on first delivery, one higher on each redelivery (nack, lease expiry)."""
    raw: bytes
    received_at: float
    """When this consumer received it (Unix time)."""
    first_at: float
    """When the event was first handed to this group (Unix time), across redeliveries."""

    @property
    def event(self) -> Event:
        """The decoded event. Raises :class:`~nerve.errors.DecodeError` if the bytes
        are not a valid event; dead-letter such a delivery."""
        ...

    async def ack(self) -> None:
        """Done: the group will not see this delivery again."""
        ...

    async def nack(self, delay: float = 0.0) -> None:
        """Not done: hand it to this group again after ``delay`` seconds."""
        ...

    async def dead_letter(self, failure: Failure) -> None:
        """Never done: move it to the group's dead letters with ``failure``."""
        ...

    async def extend(self, seconds: float) -> None:
        """Keep the lease for ``seconds`` more from now (long-running handlers)."""
        ...


class Consumer(Protocol):
    """A stream of deliveries for one group."""

    async def fetch(self, limit: int, timeout: float) -> Sequence[Delivery]:
        """Up to ``limit`` deliveries, waiting at most ``timeout`` seconds for the first."""
        ...

    async def ack_many(self, deliveries: Sequence[Delivery]) -> Sequence[Delivery]:
        """Ack several deliveries of this consumer at once (one broker round trip where
        the broker allows). Returns those refused because their lease was lost."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """A broker connection: publish events, consume them per group."""

    features: Features
    url: str
    """The broker URL this transport was built from. It may hold credentials: never
    log or print it without redacting the password."""

    async def start(self) -> None:
        """Connect (and create what the broker needs). Raises BrokerUnavailable."""
        ...

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        """Create or update the groups (idempotent). Events published from now on
        reach them."""
        ...

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        """Durably publish ``events`` to every matching group, or to ``to_group`` only."""
        ...

    def consumer(self, subscription: Subscription) -> Consumer:
        """A consumer of ``subscription.group`` (declare the subscription first)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class DeadLetterQueue(Protocol):
    """Optional: browse, replay and purge dead letters."""

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]: ...

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None: ...

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        """Re-deliver entries to their own group only (all, or by id / group)."""
        ...

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int: ...


@runtime_checkable
class Inspectable(Protocol):
    """Optional: backlog, in-flight and counters per group. The figures may trail the
    latest settlements for a moment (RabbitMQ's sum two counts read one after the
    other: the queue's, then its consumers' prefetch buffers); they settle within
    seconds."""

    async def stats(self) -> list[GroupStats]: ...


@runtime_checkable
class EventLog(Protocol):
    """Optional: read published events in order (``nerve tail``)."""

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        """Events published after position ``after`` (None: only the newest position
        is returned, with no events), as (position, raw) pairs."""
        ...


def encode_checked(events: Sequence[Event], limit: int) -> list[tuple[Event, bytes]]:
    """Encode ``events`` (structured JSON), refusing the whole batch with
    :class:`~nerve.errors.PayloadTooLarge` if any is over ``limit`` bytes."""
    encoded = []
    for event in events:
        body = codec.encode(event)
        if len(body) > limit:
            raise PayloadTooLarge(len(body), limit, event.id)
        encoded.append((event, body))
    return encoded


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds; True if it was set.

    For fetch loops: unlike ``asyncio.wait_for(event.wait(), timeout)`` it starts no
    task per call (a fetch that waits for a batch to arrive may wait many times).
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
