"""The causal chain of a flow, from what the broker and the store already record.

Every event a handler emits carries ``causationid`` (the event that caused it) and
``correlationid`` (shared by all events of one flow: the first event's id). So the
events of a flow are found in the broker's event log by their correlation id, and
their tree is rebuilt from causation ids. What happened to each event in each function
comes from three records that exist anyway:

- the store's processed records (``nerve_processed``: function, event id, when),
- the broker's dead letters (with the failure, attempt count and times),
- the broker's pending deliveries (in flight, or waiting for a retry).

Used by ``nerve trace`` and the dashboard's search. A broker offering
``search_log``/``fate`` (the embedded sqlite:// broker) answers with an SQL query;
any other :class:`~nerve.transport.base.EventLog` is scanned, up to a bound.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from nerve import event as codec
from nerve.errors import NerveError
from nerve.event import Event
from nerve.transport.base import DeadLetterEntry, EventLog, Transport

__all__ = [
    "FlowEvent",
    "Outcome",
    "attribute_text",
    "find_flow",
    "flow_json",
    "json_position",
    "search_events",
]

SCAN_LIMIT = 100_000
"""Most log entries scanned on a broker that cannot search its log."""
MAX_FLOW_EVENTS = 2_000
MAX_FLOWS = 20


@dataclass
class Outcome:
    """What happened to one event in one function."""

    function: str
    state: str
    """'processed', 'dead-lettered', 'retrying' (waiting for a retry), 'in-flight' or
    'ready' (waiting for a consumer)."""
    at: float | None = None
    """When it was processed or dead-lettered (or, retrying: when it will be retried)."""
    attempts: int | None = None
    reason: str | None = None
    error: str | None = None
    dead_letter_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class FlowEvent:
    """One event of a flow, its outcomes per function and the events it caused."""

    event: Event
    position: int
    published_at: float
    outcomes: list[Outcome] = field(default_factory=list)
    children: list[FlowEvent] = field(default_factory=list)

    @property
    def causation(self) -> str | None:
        value = self.event.extensions.get("causationid")
        return None if value is None else str(value)

    @property
    def correlation(self) -> str:
        value = self.event.extensions.get("correlationid")
        return self.event.id if value is None else str(value)

    def walk(self) -> list[FlowEvent]:
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return out


def attribute_text(name: str, value: str) -> str:
    """The exact text an attribute has in a structured-mode encoded event."""
    return f'"{name}":{orjson.dumps(value).decode()}'


async def search_events(
    transport: Transport,
    *,
    ids: Sequence[str] = (),
    contains: Sequence[str] = (),
    types: Sequence[str] = (),
    before: int | None = None,
    limit: int = 100,
) -> list[tuple[int, float, Event]]:
    """Logged events, newest first, matching any of ``ids``/``contains`` (both empty:
    any) and one of ``types`` (if given), decoded; undecodable entries are skipped."""
    search = getattr(transport, "search_log", None)
    rows: list[tuple[int, float, bytes]]
    if search is not None:
        rows = await search(ids=ids, contains=contains, types=types, before=before, limit=limit)
    elif isinstance(transport, EventLog):
        rows = await _scan(transport, ids, contains, types, before, limit)
    else:
        raise NerveError("this broker keeps no event log to search")
    out = []
    for position, published, raw in rows:
        try:
            out.append((position, published, codec.decode(raw)))
        except NerveError:
            continue
    return out


async def _scan(
    log: EventLog,
    ids: Sequence[str],
    contains: Sequence[str],
    types: Sequence[str],
    before: int | None,
    limit: int,
) -> list[tuple[int, float, bytes]]:
    wanted = set(ids)
    needles = [c.encode() for c in contains]
    kinds = set(types)
    found: list[tuple[int, float, bytes]] = []
    position = 0
    scanned = 0
    while scanned < SCAN_LIMIT:
        batch = await log.read_log(position, 1000)
        if not batch:
            break
        for seq, raw in batch:
            position = seq
            if before is not None and seq >= before:
                continue
            body = bytes(raw)
            if wanted or needles:
                hit = any(n in body for n in needles)
                if not hit and wanted:
                    try:
                        hit = codec.decode(body).id in wanted
                    except NerveError:
                        hit = False
                if not hit:
                    continue
            if kinds:
                try:
                    if codec.decode(body).type not in kinds:
                        continue
                except NerveError:
                    continue
            found.append((seq, 0.0, body))
        scanned += len(batch)
    found.sort(key=lambda row: row[0], reverse=True)
    return found[:limit]


async def find_flow(
    transport: Transport,
    store: Any,
    *,
    event_id: str | None = None,
    subject: str | None = None,
    correlation: str | None = None,
) -> list[FlowEvent]:
    """The flows (trees of events, roots first by time) that an event id, a subject or
    a correlation id selects, with every event's outcome per function."""
    correlations: list[str] = []
    if correlation is not None:
        correlations.append(correlation)
    if event_id is not None:
        for _, _, event in await search_events(transport, ids=[event_id], limit=1):
            value = event.extensions.get("correlationid")
            correlations.append(event.id if value is None else str(value))
    if subject is not None:
        hits = await search_events(
            transport, contains=[attribute_text("subject", subject)], limit=200
        )
        for _, _, event in hits:
            value = event.extensions.get("correlationid")
            found = event.id if value is None else str(value)
            if found not in correlations:
                correlations.append(found)
    correlations = correlations[:MAX_FLOWS]
    if not correlations:
        return []
    rows = await search_events(
        transport,
        ids=correlations,
        contains=[attribute_text("correlationid", c) for c in correlations],
        limit=MAX_FLOW_EVENTS,
    )
    nodes: dict[str, FlowEvent] = {}
    for position, published, event in sorted(rows, key=lambda r: r[0]):
        if event.id not in nodes:  # a DLQ replay logs the same event again: keep the first
            nodes[event.id] = FlowEvent(event, position, published)
    await _outcomes(transport, store, nodes)
    roots: list[FlowEvent] = []
    for node in nodes.values():
        parent = nodes.get(node.causation or "")
        if parent is not None and parent is not node:
            parent.children.append(node)
        else:
            roots.append(node)
    return roots


async def _outcomes(transport: Transport, store: Any, nodes: dict[str, FlowEvent]) -> None:
    ids = list(nodes)
    if not ids:
        return
    if store is not None:
        marks = ",".join("?" * len(ids))
        rows = await store.query(
            "SELECT function, event_id, processed_at FROM nerve_processed "
            f"WHERE event_id IN ({marks}) ORDER BY processed_at",
            ids,
        )
        for row in rows:
            nodes[row["event_id"]].outcomes.append(
                Outcome(row["function"], "processed", at=row["processed_at"])
            )
    fate = getattr(transport, "fate", None)
    if fate is None:
        return
    pending, dead = await fate(ids)
    now = time.time()
    for group, event_id, attempt, available_at, lease_until in pending:
        if lease_until > now:
            outcome = Outcome(group, "in-flight", attempts=attempt)
        elif available_at > now:
            outcome = Outcome(group, "retrying", at=available_at, attempts=attempt)
        else:
            outcome = Outcome(group, "ready", attempts=attempt)
        nodes[event_id].outcomes.append(outcome)
    entry: DeadLetterEntry
    for entry in dead:
        if entry.event is None or entry.event.id not in nodes:
            continue
        f = entry.failure
        nodes[entry.event.id].outcomes.append(
            Outcome(
                entry.group,
                "dead-lettered",
                at=f.failed_at,
                attempts=f.attempts,
                reason=f.reason,
                error=f"{f.error_type}: {f.message}"[:500],
                dead_letter_id=entry.id,
            )
        )


def json_position(position: int) -> int | str:
    """A log position for JSON: a number while a browser holds it exactly (2**53), else
    a string (``kafka://`` packs an offset per partition into one position, and orjson
    refuses integers over 2**64)."""
    return position if position < 2**53 else str(position)


def flow_json(node: FlowEvent) -> dict[str, Any]:
    """A flow tree as JSON (for the dashboard)."""
    event = node.event
    return {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "subject": event.subject,
        "time": event.time.timestamp() if event.time else None,
        "published_at": node.published_at or None,
        "position": json_position(node.position),
        "correlation": node.correlation,
        "causation": node.causation,
        "traceparent": event.extensions.get("traceparent"),
        "key": event.partitionkey,
        "data": None if isinstance(event.data, bytes) else event.data,
        "outcomes": [o.to_json() for o in node.outcomes],
        "children": [flow_json(child) for child in node.children],
    }
