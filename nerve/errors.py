"""Every error nerve raises, as one tree under :class:`NerveError`.

::

    NerveError
    ├── InvalidEvent            an envelope attribute is missing or wrong (names which, and why)
    │   └── DecodeError         bytes that are not an event at all (carries the raw bytes)
    ├── DefinitionError         an App declared with a mistake (names the mistake)
    ├── EmitError               a handler emitted a type its function did not declare
    ├── ConfigError             a bad broker/store URL or option (says how to fix it)
    ├── TransportError          the broker failed or refused an operation
    │   ├── BrokerUnavailable   could not connect / lost the connection
    │   ├── PayloadTooLarge     an event is larger than the transport accepts
    │   └── LeaseLost           a delivery was settled after its lease expired (fenced off)
    └── StoreError              the durable store failed

Handler outcomes are exceptions too, but they are signals, not failures of nerve:

    Retry(delay=None)           try this event again later (counts as an attempt)
    DeadLetter(reason)          this event can never succeed: dead-letter it now

Errors of the libraries below nerve (sqlite3, broker clients) are translated at the
boundary into this tree, so callers only ever need to catch ``NerveError``.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DeadLetter",
    "DecodeError",
    "DefinitionError",
    "EmitError",
    "InvalidEvent",
    "LeaseLost",
    "NerveError",
    "PayloadTooLarge",
    "Retry",
    "StoreError",
    "TransportError",
]


class NerveError(Exception):
    """The root of every error nerve raises."""


class InvalidEvent(NerveError):
    """An event envelope violates CloudEvents 1.0 or nerve's rules.

    ``attribute`` names the offending attribute; ``reason`` says what is wrong with it.
    """

    def __init__(self, attribute: str, reason: str) -> None:
        self.attribute = attribute
        self.reason = reason
        super().__init__(f"invalid event attribute {attribute!r}: {reason}")


class DecodeError(InvalidEvent):
    """Bytes received from a broker could not be decoded into an event.

    ``raw`` holds the undecodable bytes so they can be dead-lettered as they arrived.
    """

    def __init__(self, attribute: str, reason: str, raw: bytes = b"") -> None:
        super().__init__(attribute, reason)
        self.raw = raw


class DefinitionError(NerveError):
    """An App was declared with a mistake; the message names it and how to fix it."""


class EmitError(NerveError):
    """A handler emitted an event its function did not declare in ``emits``."""


class ConfigError(NerveError):
    """A configuration value (broker URL, store URL, option) is wrong."""


class TransportError(NerveError):
    """The broker failed or refused an operation."""


class BrokerUnavailable(TransportError):
    """The broker could not be reached, or the connection to it was lost."""


class PayloadTooLarge(TransportError):
    """An encoded event is larger than the transport's limit."""

    def __init__(self, size: int, limit: int, event_id: str = "") -> None:
        self.size = size
        self.limit = limit
        self.event_id = event_id
        which = f"event {event_id} " if event_id else "event "
        super().__init__(
            f"{which}is {size} bytes encoded, over the transport's limit of {limit} bytes; "
            "store large payloads elsewhere and send a reference (claim-check pattern)"
        )


class LeaseLost(TransportError):
    """A delivery was acked or nacked after its lease had expired and been taken over.

    The settlement was refused (fencing): another consumer owns the event now.
    """


class StoreError(NerveError):
    """The durable store (idempotency records, outbox, ctx.store) failed."""


class Retry(Exception):
    """Raised by a handler: try this event again after ``delay`` seconds.

    Counts as a failed attempt; after the function's max attempts the event is
    dead-lettered. ``delay=None`` uses the function's backoff policy.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        self.delay = delay
        self.reason = reason
        super().__init__(reason or "retry requested")


class DeadLetter(Exception):
    """Raised by a handler: this event can never succeed; dead-letter it now with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
