"""``postgresql://user@host:5432/db?schema=nerve``: PostgreSQL as the broker.

Design (the sqlite adapter's, on a server): publishing appends to ``log`` and fans out
one ``deliveries`` row per matching group, in one autocommitted statement, so
``publish`` returns after COMMIT. A consumer claims rows with one ``UPDATE ...
RETURNING`` over ``SELECT ... FOR UPDATE SKIP LOCKED``, setting a lease and a fresh
random fencing token; settlements delete or update a row only while the token still
matches. In an ordered group, a row whose key has an earlier row in the group (in
flight, or waiting for a retry) is not claimed. ``NOTIFY`` on one channel per schema
wakes consumers in every process on publish; a short poll covers delayed rows and
expired leases. All times are the database server's clock. A store on the same
database acks deliveries inside its own commit (``ack_ctes``, ``transports_on``), so a
handler's effects and its ack are one transaction.

URL options: ``?schema=nerve&visibility_timeout=30&max_payload=1048576
&poll_interval=0.2&pool_size=10&log_retention=86400`` and the connection options
``sslmode`` and ``application_name`` (see docs/brokers/postgres.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import orjson

from nerve import event as codec
from nerve._batch import Coalescer
from nerve._postgres import int_array, text_array
from nerve._urls import redact as _redact
from nerve.app import Subscription
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    LeaseLost,
    NerveError,
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
)

__all__ = [
    "PostgresConfig",
    "PostgresConsumer",
    "PostgresDelivery",
    "PostgresTransport",
    "database_of",
    "transports_on",
]

log = logging.getLogger("nerve.transport.postgres")

_NOW = "extract(epoch FROM clock_timestamp())::float8"
_MAX_BIGINT = (1 << 63) - 1
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_OPTIONS = (
    "schema",
    "visibility_timeout",
    "max_payload",
    "poll_interval",
    "pool_size",
    "log_retention",
)
_CONNECTION_OPTIONS = ("sslmode", "application_name")
SERVER_SETTINGS = {"random_page_cost": "1.1"}
"""Session settings of every connection (the store's too, which runs the broker's acks).
The queue tables are small and hot in the cache; with the default cost of a random page
(4) the planner settles 200 acks of 10,000 pending rows by scanning and hashing the whole
table (measured 1.8-6 ms) instead of 200 primary-key probes (0.7 ms)."""


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """The connection URL without nerve's options (may hold a password)."""
    host: str = "127.0.0.1"
    port: int = 5432
    schema: str = "nerve"
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024
    poll_interval: float = 0.2
    pool_size: int = 10
    log_retention: float = 86400.0

    @classmethod
    def from_url(cls, url: str) -> PostgresConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"not a postgresql URL: {_redact(url)!r}")
        shown = _redact(url)
        options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(options) - set(_OPTIONS) - set(_CONNECTION_OPTIONS)
        if unknown:
            raise ConfigError(
                f"{shown!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_OPTIONS + _CONNECTION_OPTIONS))}"
            )
        schema = options.get("schema", "nerve")
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigError(
                f"{shown!r}: schema must be a lower-case SQL name of at most 48 characters "
                f"(letters, digits, _), not {schema!r}"
            )
        values: dict[str, Any] = {}
        for name, kind, default in (
            ("visibility_timeout", float, 30.0),
            ("max_payload", int, 1024 * 1024),
            ("poll_interval", float, 0.2),
            ("pool_size", int, 10),
            ("log_retention", float, 86400.0),
        ):
            try:
                value = kind(options.get(name, default))
            except ValueError:
                raise ConfigError(
                    f"{shown!r}: option {name} must be a number, not {options[name]!r}"
                ) from None
            if not value > 0:
                raise ConfigError(f"{shown!r}: option {name} must be positive, not {value}")
            values[name] = value
        passthrough = {k: v for k, v in options.items() if k in _CONNECTION_OPTIONS}
        dsn = urlunsplit(
            ("postgresql", parts.netloc, parts.path, urlencode(passthrough), parts.fragment)
        )
        try:
            port = parts.port or 5432
        except ValueError:
            raise ConfigError(f"{shown!r}: the port must be a number") from None
        return cls(
            dsn=dsn,
            host=parts.hostname or "localhost",
            port=port,
            schema=schema,
            **values,
        )


def _token() -> int:
    return random.getrandbits(62) + 1


async def keep_session(conn: Any) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own (which rolls back a
    transaction left open). nerve's statements leave no session state (their locks and
    settings are transaction-local; LISTEN has a connection of its own), and the default
    reset (``RESET ALL; UNLISTEN *; ...``) is a round trip on every release."""


def database_of(url: str) -> tuple[str, int, str, str]:
    """(host, port, database, user) of a postgresql:// URL: two URLs with the same are
    the same database as the same role, so one transaction can span their tables."""
    parts = urlsplit(url)
    user = unquote(parts.username or "")
    try:
        port = parts.port or 5432
    except ValueError:
        port = 0
    return (parts.hostname or "", port, unquote(parts.path.lstrip("/")) or user, user)


_started: weakref.WeakSet[PostgresTransport] = weakref.WeakSet()
"""The transports started and not closed in this process (see :func:`transports_on`)."""


def transports_on(database: tuple[str, int, str, str]) -> list[PostgresTransport]:
    """The started transports of this process and event loop on ``database``
    (:func:`database_of`): a store on that database acks their deliveries in its own
    transaction (``PostgresTransport.ack_ctes``)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return []
    return [t for t in _started if t._loop is loop and t.database() == database]


def _schema_sql(s: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.log (
    seq bigserial PRIMARY KEY,
    event_id text NOT NULL,
    type text NOT NULL,
    published_at float8 NOT NULL,
    body bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.groups (
    name text PRIMARY KEY,
    spec text NOT NULL,
    declared_at float8 NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.deliveries (
    grp text NOT NULL,
    seq bigint NOT NULL,
    key text,
    available_at float8 NOT NULL,
    lease_until float8 NOT NULL DEFAULT 0,
    token bigint NOT NULL DEFAULT 0,
    attempt integer NOT NULL DEFAULT 0,
    first_at float8,
    PRIMARY KEY (grp, seq)
) WITH (fillfactor = 50);
CREATE INDEX IF NOT EXISTS deliveries_by_key ON {s}.deliveries (grp, key, seq)
    WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.dead_letters (
    id bigserial PRIMARY KEY,
    grp text NOT NULL,
    event_id text,
    body bytea NOT NULL,
    failure text NOT NULL,
    dead_at float8 NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_group ON {s}.dead_letters (grp, id);
CREATE TABLE IF NOT EXISTS {s}.counters (
    grp text PRIMARY KEY,
    processed bigint NOT NULL DEFAULT 0,
    retried bigint NOT NULL DEFAULT 0,
    dead_lettered bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS {s}.meta (k text PRIMARY KEY, v bigint NOT NULL);
INSERT INTO {s}.meta (k, v) VALUES ('groups_version', 0) ON CONFLICT DO NOTHING;
"""


class _Sql:
    """Every statement, with the schema filled in (a validated SQL name)."""

    def __init__(self, s: str) -> None:
        self.schema = s
        self.create = _schema_sql(s)
        self.analyze = f"ANALYZE {s}.deliveries"
        self.routes = (
            f"SELECT v, CASE WHEN v <> $1 THEN "
            f"coalesce((SELECT array_agg(spec ORDER BY name) FROM {s}.groups), '{{}}') END "
            f"FROM {s}.meta WHERE k = 'groups_version'"
        )
        # $1 count, $2 event ids, $3 types, $4 the bodies one after another, $11 where
        # each starts (1-based) and $12 its length, $5 target index (1-based), $6 target
        # groups, $7 target keys (the text and integer columns as array literals, the
        # bodies one value: a list parameter costs asyncpg two ABC instance checks an
        # element; see nerve._postgres.text_array), $8 channel, $9 notify payload, $10
        # the routing version the targets were computed with (NULL: no check). The log's
        # sequence is looked up once a statement (an InitPlan), not once a row: per row,
        # the lookup and the text -> regclass cast took 0.6 of the 2 ms a 100-event
        # publish ran (EXPLAIN ANALYZE). Nothing is written when the groups changed since
        # (the caller reloads its routes and tries again), so a publish is one round trip
        # while the groups stay as they are.
        self.publish = f"""
WITH now AS (SELECT {_NOW} AS t),
fresh AS (SELECT v, $10::bigint IS NULL OR v = $10::bigint AS ok
          FROM {s}.meta WHERE k = 'groups_version'),
numbered AS MATERIALIZED (
    SELECT n, nextval((SELECT pg_get_serial_sequence('{s}.log', 'seq')::regclass)) AS seq
    FROM generate_series(1, $1::int) AS n WHERE (SELECT ok FROM fresh)),
input AS (SELECT u.event_id, u.type, substring($4::bytea FROM u.at FOR u.len) AS body, u.n
          FROM unnest($2::text::text[], $3::text::text[], $11::text::int[], $12::text::int[])
          WITH ORDINALITY AS u(event_id, type, at, len, n)),
logged AS (
    INSERT INTO {s}.log (seq, event_id, type, published_at, body)
    SELECT nb.seq, i.event_id, i.type, now.t, i.body
    FROM input i JOIN numbered nb USING (n), now),
fanned AS (
    INSERT INTO {s}.deliveries (grp, seq, key, available_at)
    SELECT t.grp, nb.seq, t.key, now.t
    FROM unnest($5::text::int[], $6::text::text[], $7::text::text[]) AS t(n, grp, key)
    JOIN numbered nb USING (n), now)
SELECT fresh.v, fresh.ok,
       CASE WHEN fresh.ok AND $9::text <> '' THEN pg_notify($8, $9) END
FROM fresh
"""
        # A claim commits without waiting for the WAL flush (synchronous_commit off for
        # its own transaction only): a claim lost in a server crash leaves the rows
        # claimable again, which is a redelivery, never a loss; the next synchronous
        # commit (any publish or ack) flushes it anyway. It saves a disk flush per fetch.
        # The time is read as a scalar (an InitPlan), not joined: then the cheap lease
        # checks and the per-key subquery are one filter, ordered by cost, and the rows
        # leased at the head of the group skip the subquery (a 200-row claim behind 400
        # leased rows: 3.5 -> 2.1 ms, EXPLAIN ANALYZE). The UPDATE finds the rows just
        # locked by their ctid (a Tid Scan; they cannot move while locked) instead of
        # searching the primary key again (0.45 ms of a 200-row claim).
        self.claim = f"""
WITH now AS (SELECT {_NOW} AS t, set_config('synchronous_commit', 'off', true)),
picked AS (
    SELECT d.ctid FROM {s}.deliveries d
    WHERE d.grp = $1
      AND d.available_at <= (SELECT t FROM now) AND d.lease_until <= (SELECT t FROM now)
      AND (d.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {s}.deliveries e
          WHERE e.grp = d.grp AND e.key = d.key AND e.seq < d.seq))
    ORDER BY d.seq LIMIT $2
    FOR UPDATE OF d SKIP LOCKED),
claimed AS (
    UPDATE {s}.deliveries d
    SET lease_until = now.t + $3, token = $4, attempt = d.attempt + 1,
        first_at = coalesce(d.first_at, now.t)
    FROM now
    WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING d.seq, d.key, d.attempt, d.first_at)
SELECT c.seq, c.key, c.attempt, c.first_at, l.event_id, l.body, {{processed}}
FROM claimed c JOIN {s}.log l ON l.seq = c.seq{{processed_join}}
ORDER BY c.seq
"""
        # settlements: $1 groups, $2 seqs, $3 tokens (+ per-row amounts); the redundant
        # `seq = ANY($2)` lets the planner probe the primary key instead of hashing the
        # whole table (measured: 3 ms for 200 rows of 10,000 pending, and growing)
        match = (
            "d.grp = u.grp AND d.seq = u.seq AND d.token = u.token AND d.seq = ANY($2::bigint[])"
        )
        self.ack = f"""
DELETE FROM {s}.deliveries d
USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(grp, seq, token)
WHERE {match}
RETURNING d.grp, d.seq
"""
        # acks and their `processed` counters in one statement (one round trip)
        self.ack_counted = f"WITH {self.ack_ctes('acked', 1)}\nSELECT grp, seq FROM acked"
        self.nack = f"""
UPDATE {s}.deliveries d SET available_at = {_NOW} + u.delay, lease_until = 0
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::float8[]) AS u(grp, seq, token, delay)
WHERE {match}
RETURNING d.grp, d.seq
"""
        self.extend = f"""
UPDATE {s}.deliveries d SET lease_until = {_NOW} + u.seconds
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::float8[]) AS u(grp, seq, token, seconds)
WHERE {match}
RETURNING d.grp, d.seq
"""
        self.dead = f"""
WITH gone AS (
    DELETE FROM {s}.deliveries d
    USING unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[])
          WITH ORDINALITY AS u(grp, seq, token, failure, n)
    WHERE {match}
    RETURNING d.grp, d.seq, u.failure, u.n),
kept AS (
    INSERT INTO {s}.dead_letters (grp, event_id, body, failure, dead_at)
    SELECT g.grp, nullif(l.event_id, ''), l.body, g.failure, {_NOW}
    FROM gone g JOIN {s}.log l ON l.seq = g.seq
    ORDER BY g.n)
SELECT grp, seq FROM gone
"""
        self.lock_counters = (
            f"SELECT grp FROM {s}.counters WHERE grp = ANY($1::text[]) ORDER BY grp FOR UPDATE"
        )
        self.count = f"""
UPDATE {s}.counters c
SET processed = c.processed + u.processed, retried = c.retried + u.retried,
    dead_lettered = c.dead_lettered + u.dead_lettered
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
     AS u(grp, processed, retried, dead_lettered)
WHERE c.grp = u.grp
"""
        self.declare = f"""
INSERT INTO {s}.groups (name, spec, declared_at)
SELECT name, spec, {_NOW} FROM unnest($1::text[], $2::text[]) AS u(name, spec)
ON CONFLICT (name) DO UPDATE SET spec = excluded.spec
WHERE {s}.groups.spec IS DISTINCT FROM excluded.spec
RETURNING name
"""
        self.declare_counters = (
            f"INSERT INTO {s}.counters (grp) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING"
        )
        self.bump = f"UPDATE {s}.meta SET v = v + 1 WHERE k = 'groups_version'"
        self.group_exists = f"SELECT 1 FROM {s}.groups WHERE name = $1"
        self.group_specs = f"SELECT name, spec FROM {s}.groups"
        self.dead_rows = f"SELECT id, grp, body, failure FROM {s}.dead_letters"
        self.dead_entry = f"SELECT id, grp, body, failure FROM {s}.dead_letters WHERE id = $1"
        self.dead_for_replay = f"SELECT id, grp, event_id, body FROM {s}.dead_letters"
        self.dead_delete = f"DELETE FROM {s}.dead_letters"
        self.stats_live = f"""
WITH now AS (SELECT {_NOW} AS t)
SELECT grp,
       count(*) FILTER (WHERE available_at <= now.t AND lease_until <= now.t),
       count(*) FILTER (WHERE available_at > now.t AND lease_until <= now.t),
       count(*) FILTER (WHERE lease_until > now.t)
FROM {s}.deliveries, now GROUP BY grp
"""
        self.stats_dead = f"SELECT grp, count(*) FROM {s}.dead_letters GROUP BY grp"
        self.stats_counters = (
            f"SELECT grp, processed, retried, dead_lettered FROM {s}.counters ORDER BY grp"
        )
        self.log_head = f"SELECT coalesce(max(seq), 0) FROM {s}.log"
        self.log_read = f"SELECT seq, body FROM {s}.log WHERE seq > $1 ORDER BY seq LIMIT $2"
        # What the log may lose: rows older than the retention ($1 seconds) below the
        # oldest pending delivery. Both bounds are found through primary keys (the
        # first row young enough, in seq order; each group's oldest delivery), so a
        # prune reads about what it deletes. Written as filters, it read every pending
        # delivery and every logged row below the oldest of them (with consumers that
        # keep up: the whole retained log) every 30 s. A row published after a younger
        # one (a server clock set back) waits for that one: kept longer, never early.
        self.prune = f"""
WITH bound AS (SELECT {_NOW} - $1 AS t),
pending AS (SELECT coalesce(min(o.seq), {_MAX_BIGINT}) AS seq FROM {s}.groups g,
            LATERAL (SELECT d.seq FROM {s}.deliveries d WHERE d.grp = g.name
                     ORDER BY d.seq LIMIT 1) o),
young AS (SELECT l.seq FROM {s}.log l
          WHERE l.seq < (SELECT seq FROM pending) AND l.published_at >= (SELECT t FROM bound)
          ORDER BY l.seq LIMIT 1)
DELETE FROM {s}.log
WHERE seq < coalesce((SELECT seq FROM young), (SELECT seq FROM pending))
  AND published_at < (SELECT t FROM bound)
"""

    def claim_noting(self, processed_in: str | None) -> str:
        """The claim; with a store's schema, it also says per row whether the store has
        recorded the event as processed by the group (``note_processed_in``)."""
        if processed_in is None:
            return self.claim.format(processed="NULL::bool", processed_join="")
        # one primary-key probe per claimed row (a LATERAL with LIMIT cannot be hashed):
        # as `EXISTS (...)` the planner, going by a table grown since its last ANALYZE,
        # read all the group's records into a hash on every claim (1.4 ms a claim at
        # 10,000 records, growing with them: EXPLAIN ANALYZE)
        return self.claim.format(
            processed="p.hit IS NOT NULL",
            processed_join=f'\nLEFT JOIN LATERAL (SELECT true AS hit FROM "{processed_in}"'
            ".nerve_processed p\n    WHERE p.function = $1 AND p.event_id = l.event_id "
            "LIMIT 1) p ON true",
        )

    def ack_ctes(self, name: str, first: int, *, tagged: bool = False) -> str:
        """CTEs that ack deliveries, fenced by their tokens, and count them as processed,
        ending in ``name(grp, seq, tag)``: the deliveries acked. Parameters ``$first``,
        ``$first+1``, ``$first+2``: groups, seqs, tokens; with ``tagged``, ``$first+3``: a
        number per delivery, returned as its ``tag`` (else NULL). The columns are array
        literals (:func:`nerve._postgres.int_array`, :func:`~nerve._postgres.text_array`).
        Counters rows are locked in name order, as ``lock_counters`` does. Part of
        ``ack_counted`` and of a store's commit (:meth:`PostgresTransport.ack_ctes`)."""
        s = self.schema
        g, q, t = f"${first}", f"${first + 1}::text::bigint[]", f"${first + 2}::text::bigint[]"
        # the redundant filter (see `match` in __init__) reads the seqs once, as an
        # InitPlan: written `ANY({q})`, the kept (generic) plan cast the text to an array
        # again for every row it deleted (200 acks: 4.4 ms -> 0.6 ms, EXPLAIN ANALYZE)
        once = f"ARRAY(SELECT unnest({q}))"
        tags = (
            f"${first + 3}::text::int[]"
            if tagged
            else f"array_fill(NULL::int, ARRAY[cardinality({q})])"
        )
        return f"""{name}_gone AS (
    DELETE FROM {s}.deliveries d
    USING unnest({g}::text::text[], {q}, {t}, {tags}) AS u(grp, seq, token, tag)
    WHERE d.grp = u.grp AND d.seq = u.seq AND d.token = u.token AND d.seq = ANY({once})
    RETURNING d.grp, d.seq, u.tag),
{name}_tally AS (SELECT grp, count(*) AS n FROM {name}_gone GROUP BY grp),
{name}_locked AS (
    SELECT c.grp FROM {s}.counters c WHERE c.grp IN (SELECT grp FROM {name}_tally)
    ORDER BY c.grp FOR UPDATE),
{name}_counted AS (
    UPDATE {s}.counters c SET processed = c.processed + t.n
    FROM {name}_tally t WHERE c.grp = t.grp AND c.grp IN (SELECT grp FROM {name}_locked)),
{name} AS (SELECT grp, seq, tag FROM {name}_gone)"""


class _Router:
    """Which groups an event goes to; reloaded when the groups' version changes."""

    def __init__(self) -> None:
        self.version = -1
        self.groups: dict[str, Subscription] = {}
        self._by_type: dict[str, list[Subscription]] = {}

    def load(self, version: int, specs: Sequence[str] | None) -> None:
        if version == self.version or specs is None:
            return
        groups = [Subscription.from_json(orjson.loads(spec)) for spec in specs]
        self.groups = {g.group: g for g in groups}
        self._by_type = {}
        self.version = version

    def targets(self, event: Event) -> list[Subscription]:
        candidates = self._by_type.get(event.type)
        if candidates is None:
            candidates = [
                g for g in self.groups.values() if Subscription(g.group, g.patterns).matches(event)
            ]
            self._by_type[event.type] = candidates
        return [g for g in candidates if not g.filters or g.matches(event)]


_Settlement = tuple["PostgresDelivery", str, float, Failure | None]


class PostgresDelivery:
    __slots__ = (
        "_consumer",
        "_event",
        "acked_within",
        "attempt",
        "event_id",
        "first_at",
        "group",
        "key",
        "processed",
        "raw",
        "received_at",
        "seq",
        "token",
    )

    def __init__(
        self,
        consumer: PostgresConsumer,
        seq: int,
        token: int,
        raw: bytes,
        attempt: int,
        first_at: float,
        key: str | None,
        received_at: float,
        event_id: str = "",
    ) -> None:
        self._consumer = consumer
        self._event: Event | None = None
        self.acked_within: bool | None = None
        """Settled by a store's transaction (``PostgresTransport.ack_ctes``): True if
        acked there, False if its lease was lost; None while it is not."""
        self.event_id = event_id
        self.processed: tuple[str, bool] | None = None
        """(store schema, whether that store had recorded the event as processed by
        this group when it was claimed), when a store asked (``note_processed_in``)."""
        self.group = consumer.group
        self.seq = seq
        self.token = token
        self.raw = raw
        self.attempt = attempt
        self.first_at = first_at
        self.key = key
        self.received_at = received_at

    @property
    def event(self) -> Event:
        if self._event is None:
            self._event = codec.decode(self.raw)
        return self._event

    async def ack(self) -> None:
        if self.acked_within is not None:
            if not self.acked_within:
                raise LeaseLost(f"{self!r}: the lease expired and another consumer took it")
            return  # acked in the store's transaction already
        await self._consumer.transport._settle(self, "ack", 0.0, None)

    async def nack(self, delay: float = 0.0) -> None:
        await self._consumer.transport._settle(self, "nack", max(delay, 0.0), None)

    async def dead_letter(self, failure: Failure) -> None:
        await self._consumer.transport._settle(self, "dead", 0.0, failure)

    async def extend(self, seconds: float) -> None:
        await self._consumer.transport._settle(self, "extend", max(seconds, 0.0), None)

    def __repr__(self) -> str:
        return f"<PostgresDelivery {self.group}#{self.seq} attempt={self.attempt}>"


class PostgresConsumer:
    def __init__(self, transport: PostgresTransport, subscription: Subscription) -> None:
        self.transport = transport
        self.subscription = subscription
        self.group = subscription.group
        self.wake = asyncio.Event()
        self._closed = False
        self._declared = False

    async def fetch(self, limit: int, timeout: float) -> Sequence[PostgresDelivery]:
        transport = self.transport
        if not self._declared:
            await transport._require_group(self.group)
            self._declared = True
        deadline = time.monotonic() + timeout
        while not self._closed:
            self.wake.clear()
            token, rows = await transport._claim(self.group, limit)
            if rows:
                now = time.time()
                out = [
                    PostgresDelivery(
                        self, seq, token, bytes(body), attempt, first_at, key, now, event_id
                    )
                    for seq, key, attempt, first_at, event_id, body, _ in rows
                ]
                noted = transport._processed_in
                if noted is not None:
                    for delivery, row in zip(out, rows, strict=True):
                        delivery.processed = (noted, bool(row[6]))
                transport._hold(out)
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.wake.wait(), min(remaining, transport.config.poll_interval)
                )
        return []

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        batch: list[_Settlement] = []
        for delivery in deliveries:
            assert isinstance(delivery, PostgresDelivery)
            if delivery.acked_within is None:
                batch.append((delivery, "ack", 0.0, None))
            elif not delivery.acked_within:
                lost.append(delivery)  # its lease was lost when the store committed
        if batch:
            results = await self.transport._settle_batch(batch)
            lost += [d for (d, *_), r in zip(batch, results, strict=True) if r is not None]
        return lost

    async def close(self) -> None:
        self._closed = True
        self.wake.set()
        self.transport._consumers.discard(self)


class PostgresTransport:
    """A PostgreSQL database (one schema) as a durable, shared broker."""

    def __init__(self, config: PostgresConfig | str | None = None) -> None:
        if isinstance(config, str):
            url = config
            config = PostgresConfig.from_url(config)
        else:
            config = config or PostgresConfig()
            url = config.dsn
        self.config = config
        self.url = url
        self.features = Features(
            durable=True,
            shared_across_processes=True,
            key_ordering=True,
            dead_letter_queue=True,
            max_payload=config.max_payload,
        )
        self._sql = _Sql(config.schema)
        self._channel = f"{config.schema}_nerve_wake"
        self._pool: Any = None
        self._listener: Any = None
        self._router = _Router()
        self._consumers: set[PostgresConsumer] = set()
        self._maintenance: asyncio.Task[None] | None = None
        # planner statistics: see _note_changes
        self._changed_rows = 0
        self._analyzed_at = 0.0
        self._analyzing: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._settler: Coalescer[_Settlement, None] = Coalescer(self._settle_batch)
        self._held: dict[tuple[str, str], PostgresDelivery | list[PostgresDelivery]] = {}
        """Claimed deliveries by (group, event id): see :meth:`_hold`."""
        self._processed_in: str | None = None
        self._claim_sql = self._sql.claim_noting(None)

    def __repr__(self) -> str:
        return f"PostgresTransport({_redact(self.url)!r})"

    # -- errors ----------------------------------------------------------------------

    def _where(self) -> str:
        return f"PostgreSQL at {self.config.host}:{self.config.port}"

    def _translate(self, exc: BaseException, doing: str) -> NerveError:
        where = self._where()
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, _CONNECTION_ERRORS) or (
            isinstance(exc, asyncpg.PostgresError)
            and str(getattr(exc, "sqlstate", "")).startswith(("08", "28", "3D", "57"))
        ):
            return BrokerUnavailable(
                f"cannot {doing}: {where} is unreachable or refused the connection "
                f"({detail}); check that the server runs, the host, port, user and "
                "database in the broker URL, and pg_hba.conf"
            )
        return TransportError(f"{where} failed to {doing}: {type(exc).__name__}: {detail}")

    @contextlib.asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[Any]:
        """A pooled connection; driver and OS errors become nerve errors."""
        if self._pool is None:
            raise TransportError(f"cannot {doing}: the transport is not started (or closed)")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except Exception as exc:
            if not _is_driver_error(exc):
                raise
            raise self._translate(exc, doing) from exc

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        config = self.config
        try:
            self._pool = await asyncpg.create_pool(
                config.dsn,
                min_size=1,
                max_size=config.pool_size,
                timeout=10,
                server_settings=SERVER_SETTINGS,
                reset=keep_session,
            )
        except Exception as exc:
            if not _is_driver_error(exc):
                raise
            raise self._translate(exc, "connect") from None
        try:
            async with self._connection("create the broker tables") as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)",
                    zlib.crc32(f"nerve:{config.schema}".encode()),
                )
                await conn.execute(self._sql.create)
            await self._listen()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self._maintenance = asyncio.create_task(self._maintain())
        _started.add(self)

    async def _listen(self) -> None:
        """A connection outside the pool, LISTENing for publishes (best effort: the
        poll fallback covers the time it is down)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            conn = await asyncpg.connect(self.config.dsn, timeout=10)
            await conn.add_listener(self._channel, self._notified)
        except Exception as exc:
            if not _is_driver_error(exc):
                raise
            raise self._translate(exc, "listen for publishes") from None
        self._listener = conn

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._wake_groups(None if payload == "*" else set(payload.split("\n")))

    async def _maintain(self) -> None:
        """Re-listen after a lost connection; prune the log every 30 s."""
        ticks = 0
        while True:
            await asyncio.sleep(2.0)
            ticks += 1
            with contextlib.suppress(NerveError):
                await self._listen()
            if ticks % 15 == 0:
                with contextlib.suppress(NerveError):
                    await self.prune_log()

    async def prune_log(self, older_than: float | None = None) -> int:
        """Delete logged events older than ``older_than`` seconds (default: the
        configured retention) that no pending delivery refers to."""
        age = self.config.log_retention if older_than is None else older_than
        async with self._connection("prune the log") as conn:
            status: str = await conn.execute(self._sql.prune, age)
        return int(status.split()[-1])

    async def close(self) -> None:
        _started.discard(self)
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._analyzing is not None:
            with contextlib.suppress(Exception):
                await self._analyzing
        for consumer in list(self._consumers):
            await consumer.close()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        with contextlib.suppress(Exception):
            await self._settler.drain()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 5)
            if not listener.is_closed():
                listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (Exception, TimeoutError):
                pool.terminate()

    def _wake_groups(self, groups: set[str] | None) -> None:
        for consumer in self._consumers:
            if groups is None or consumer.group in groups:
                consumer.wake.set()

    def _wake_later(self, group: str, delay: float) -> None:
        if self._loop is None:
            return
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._wake_groups({group})

        handle = self._loop.call_later(delay, fire)
        self._timers.add(handle)

    # -- declaring and publishing ----------------------------------------------------

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        if not subscriptions:
            return
        names = [s.group for s in subscriptions]
        specs = [orjson.dumps(s.to_json()).decode() for s in subscriptions]
        async with self._connection("declare groups") as conn, conn.transaction():
            changed = await conn.fetch(self._sql.declare, names, specs)
            await conn.execute(self._sql.declare_counters, names)
            if changed:
                await conn.execute(self._sql.bump)

    def _encode(self, events: Sequence[Event]) -> list[tuple[Event, bytes]]:
        return encode_checked(events, self.config.max_payload)

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        if not events:
            return
        encoded = self._encode(events)
        rows = [(e.id, e.type, body) for e, body in encoded]
        router = self._router
        async with self._connection("publish") as conn:
            reloaded = False
            for _ in range(5):
                routed = self._route(encoded, to_group)
                if routed is not None:
                    t_index, t_group, t_key = routed
                    touched = set(t_group)
                    version = router.version
                    if await self._insert(conn, rows, t_index, t_group, t_key, touched, version):
                        break
                elif reloaded:
                    raise TransportError(f"no consumer group named {to_group!r} is declared")
                # the groups changed since the routes were loaded: reload, route again
                version, specs = await conn.fetchrow(self._sql.routes, router.version)
                router.load(int(version), specs)
                reloaded = True
            else:
                raise TransportError("the consumer groups kept changing during a publish")
        self._wake_groups(touched)
        self._note_changes(len(t_group))

    def _route(
        self, encoded: list[tuple[Event, bytes]], to_group: str | None
    ) -> tuple[list[int], list[str], list[str | None]] | None:
        """Which groups each event goes to, as the (1-based index, group, key) columns
        of the publish statement; None if ``to_group`` is not in the routes loaded."""
        router = self._router
        t_index: list[int] = []
        t_group: list[str] = []
        t_key: list[str | None] = []
        for n, (event, _) in enumerate(encoded, start=1):
            if to_group is not None:
                sub = router.groups.get(to_group)
                if sub is None:
                    return None
                targets = [sub]
            else:
                targets = router.targets(event)
            for sub in targets:
                t_index.append(n)
                t_group.append(sub.group)
                t_key.append(event.partitionkey if sub.ordered else None)
        return t_index, t_group, t_key

    def _note_changes(self, rows: int) -> None:
        """Keep the planner's statistics on ``deliveries`` fresh.

        The claim is fast only as an index scan in ``seq`` order that stops at its
        LIMIT; with statistics from a nearly empty table the planner instead scans and
        sorts the whole group (measured: 27 ms instead of 5 ms per claim with 10,000
        pending). Autovacuum analyzes at most once a minute, too late for a burst, so
        after 1,000 changed rows (at most every 2 s) this process runs ANALYZE in the
        background.
        """
        self._changed_rows += rows
        if (
            self._changed_rows >= 1000
            and self._analyzing is None
            and time.monotonic() - self._analyzed_at >= 2.0
        ):
            self._analyzing = asyncio.ensure_future(self._analyze())

    async def _analyze(self) -> None:
        try:
            async with self._connection("analyze deliveries") as conn:
                await conn.execute(self._sql.analyze)
        except NerveError as exc:
            log.debug("ANALYZE failed (will try again): %s", exc)
        finally:
            self._changed_rows = 0
            self._analyzed_at = time.monotonic()
            self._analyzing = None

    async def _insert(
        self,
        conn: Any,
        events: list[tuple[str, str, bytes]],
        t_index: list[int],
        t_group: list[str],
        t_key: list[str | None],
        touched: set[str],
        version: int | None = None,
    ) -> bool:
        """Append ``events`` to the log and fan them out, in one statement (and so one
        transaction), notifying the touched groups' consumers in every process. With a
        routing ``version``, nothing is written (False) if the groups changed since."""
        payload = "\n".join(sorted(touched))
        if len(payload.encode()) > 7000:
            payload = "*"
        lengths = [len(e[2]) for e in events]
        _, ok, _ = await conn.fetchrow(
            self._sql.publish,
            len(events),
            text_array([e[0] for e in events]),
            text_array([e[1] for e in events]),
            b"".join([e[2] for e in events]),
            int_array(t_index),
            text_array(t_group),
            text_array(t_key),
            self._channel,
            payload,
            version,
            int_array(list(itertools.accumulate(lengths, initial=1))[:-1]),  # the starts
            int_array(lengths),
        )
        return bool(ok)

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> PostgresConsumer:
        consumer = PostgresConsumer(self, subscription)
        self._consumers.add(consumer)
        return consumer

    async def _require_group(self, group: str) -> None:
        async with self._connection("look up a group") as conn:
            row = await conn.fetchval(self._sql.group_exists, group)
        if row is None:
            raise TransportError(f"declare group {group!r} before consuming it")

    async def _claim(self, group: str, limit: int) -> tuple[int, list[Any]]:
        token = _token()
        async with self._connection("claim deliveries") as conn:
            rows = await conn.fetch(
                self._claim_sql, group, limit, self.config.visibility_timeout, token
            )
        self._note_changes(len(rows))
        return token, list(rows)

    async def _settle(
        self, delivery: PostgresDelivery, action: str, amount: float, failure: Failure | None
    ) -> None:
        await self._settler.submit((delivery, action, amount, failure))

    async def _settle_batch(self, batch: list[_Settlement]) -> list[BaseException | None]:
        by_action: dict[str, list[_Settlement]] = {}
        for item in batch:
            by_action.setdefault(item[1], []).append(item)
        done: set[tuple[str, str, int]] = set()
        try:
            for attempt in range(5):
                try:
                    done = await self._settle_rows(by_action)
                    break
                except TransportError as exc:
                    cause = exc.__cause__
                    retry = isinstance(
                        cause,
                        asyncpg.exceptions.DeadlockDetectedError
                        | asyncpg.exceptions.SerializationError,
                    )
                    if not retry or attempt == 4:
                        raise
        finally:  # settled or failed: either way this process is done with them
            for delivery, action, _, _ in batch:
                if action != "extend":
                    self._unhold(delivery)
        results: list[BaseException | None] = []
        wake: set[str] = set()
        for delivery, action, amount, _ in batch:
            if (action, delivery.group, delivery.seq) not in done:
                results.append(
                    LeaseLost(
                        f"{delivery!r}: the lease expired and another consumer took "
                        f"the event over; this {action} was refused"
                    )
                )
                continue
            results.append(None)
            if action == "nack":
                if amount > 0:
                    self._wake_later(delivery.group, amount)
                else:
                    wake.add(delivery.group)
            elif delivery.key is not None and action != "extend":
                wake.add(delivery.group)  # the next event of this key may go now
        if wake:
            self._wake_groups(wake)
        return results

    async def _settle_rows(
        self, by_action: dict[str, list[_Settlement]]
    ) -> set[tuple[str, str, int]]:
        """Apply the settlements in one transaction; returns (action, group, seq) of
        those whose token still matched."""
        sql = self._sql
        done: set[tuple[str, str, int]] = set()
        if by_action.keys() == {"ack"}:  # the common case: one statement, one round trip
            items = by_action["ack"]
            async with self._connection("ack deliveries") as conn:
                rows = await conn.fetch(sql.ack_counted, *self._columns(items))
            return {("ack", grp, seq) for grp, seq in rows}
        counts: dict[str, list[int]] = {}
        column = {"ack": 0, "nack": 1, "dead": 2}
        async with self._connection("settle deliveries") as conn, conn.transaction():
            for action, items in by_action.items():
                groups = [d.group for d, _, _, _ in items]
                seqs = [d.seq for d, _, _, _ in items]
                tokens = [d.token for d, _, _, _ in items]
                if action == "ack":
                    rows = await conn.fetch(sql.ack, groups, seqs, tokens)
                elif action == "nack":
                    rows = await conn.fetch(
                        sql.nack, groups, seqs, tokens, [a for *_, a, _ in items]
                    )
                elif action == "extend":
                    rows = await conn.fetch(
                        sql.extend, groups, seqs, tokens, [a for *_, a, _ in items]
                    )
                else:
                    failures = [
                        orjson.dumps(f.to_json()).decode() if f else "{}" for *_, f in items
                    ]
                    rows = await conn.fetch(sql.dead, groups, seqs, tokens, failures)
                for grp, seq in rows:
                    done.add((action, grp, seq))
                    if action in column:
                        counts.setdefault(grp, [0, 0, 0])[column[action]] += 1
            if counts:
                names = sorted(counts)
                await conn.execute(sql.lock_counters, names)
                await conn.execute(
                    sql.count,
                    names,
                    [counts[g][0] for g in names],
                    [counts[g][1] for g in names],
                    [counts[g][2] for g in names],
                )
        return done

    @staticmethod
    def _columns(items: Sequence[_Settlement]) -> tuple[str, str, str]:
        """The parameters of ``ack_counted`` for ``items``."""
        return (
            text_array([d.group for d, *_ in items]),
            int_array([d.seq for d, *_ in items]),
            int_array([d.token for d, *_ in items]),
        )

    # -- acks inside a store's transaction (nerve.store.postgres) ---------------------

    def _hold(self, deliveries: list[PostgresDelivery]) -> None:
        """Remember claimed deliveries by (group, event id), for :meth:`claimed`: the
        delivery, or a list of them in claim order for an event claimed more than once
        (published twice, or claimed again after its lease expired) while held here."""
        held = self._held
        for d in deliveries:
            key = (d.group, d.event_id)
            if key not in held:
                held[key] = d
            else:
                same = held[key]
                if isinstance(same, list):
                    same.append(d)
                else:
                    held[key] = [same, d]

    def _unhold(self, delivery: PostgresDelivery) -> None:
        held = self._held
        key = (delivery.group, delivery.event_id)
        same = held.get(key)
        if same is delivery:
            del held[key]
        elif isinstance(same, list):
            if delivery in same:
                same.remove(delivery)
            if not same:
                del held[key]

    def claimed(self, group: str, event_id: str) -> PostgresDelivery | None:
        """The delivery of ``event_id`` to ``group`` this process holds unsettled, or
        None. Of several (a lease that expired and was claimed again here, or the event
        published twice), the last claimed: the one whose lease is current."""
        same = self._held.get((group, event_id))
        if same is None:
            return None
        if not isinstance(same, list):
            return same if same.acked_within is None else None
        for delivery in reversed(same):
            if delivery.acked_within is None:
                return delivery
        return None

    def note_processed_in(self, schema: str | None) -> None:
        """From now on, claims also look up whether the store in ``schema`` (on this
        database; None: none) has recorded each event as processed by the group, so that
        store can answer its idempotency check for a fetched batch without a round trip
        (``PostgresDelivery.processed``)."""
        if schema != self._processed_in:
            self._processed_in = schema
            self._claim_sql = self._sql.claim_noting(schema)

    @property
    def processed_in(self) -> str | None:
        """The store schema claims look up (:meth:`note_processed_in`), or None."""
        return self._processed_in

    def ack_ctes(self, name: str, first: int) -> str:
        """SQL for a statement of a store on this database (as the same role): CTEs that
        ack deliveries fenced by their tokens and count them as processed, ending in
        ``name(grp, seq, tag)``, the deliveries acked with the caller's tag of each; they
        take parameters ``$first`` to ``$first+3``, which :meth:`ack_args` gives. The
        store's records and these acks then commit in one transaction; once it has, the
        store calls :meth:`settled_within`."""
        return self._sql.ack_ctes(name, first, tagged=True)

    @staticmethod
    def ack_args(deliveries: Sequence[PostgresDelivery], tags: Sequence[int]) -> list[Any]:
        """The parameters of :meth:`ack_ctes` for ``deliveries``, tagged ``tags``."""
        return [
            text_array([d.group for d in deliveries]),
            int_array([d.seq for d in deliveries]),
            int_array([d.token for d in deliveries]),
            int_array(tags),
        ]

    def settled_within(self, deliveries: Sequence[PostgresDelivery], acked: Sequence[bool]) -> None:
        """The store's transaction with :meth:`ack_ctes` committed: ``deliveries`` are
        settled (acked, or refused as their lease was lost); ``ack``/``ack_many`` say so
        (no round trip)."""
        wake: set[str] = set()
        for delivery, ok in zip(deliveries, acked, strict=True):
            delivery.acked_within = ok
            self._unhold(delivery)
            if ok and delivery.key is not None:
                wake.add(delivery.group)  # the next event of this key may go now
        if wake:
            self._wake_groups(wake)
        self._note_changes(len(deliveries))

    def database(self) -> tuple[str, int, str, str]:
        """(host, port, database, user) of the broker's connections, to tell whether a
        store is on the same database."""
        return database_of(self.config.dsn)

    # -- optional abilities: dead letters, stats, log ----------------------------------

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        async with self._connection("list dead letters") as conn:
            if group is None:
                rows = await conn.fetch(self._sql.dead_rows + " ORDER BY id LIMIT $1", limit)
            else:
                rows = await conn.fetch(
                    self._sql.dead_rows + " WHERE grp = $1 ORDER BY id LIMIT $2", group, limit
                )
        return [_entry(*row) for row in rows]

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        if not entry_id.isdigit() or int(entry_id) > _MAX_BIGINT:
            return None
        async with self._connection("read a dead letter") as conn:
            row = await conn.fetchrow(self._sql.dead_entry, int(entry_id))
        return None if row is None else _entry(*row)

    @staticmethod
    def _select_dead(entry_ids: Sequence[str] | None, group: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if entry_ids is not None:
            ids = [int(i) for i in entry_ids if str(i).isdigit() and int(i) <= _MAX_BIGINT]
            params.append(ids)
            clauses.append(f"id = ANY(${len(params)}::bigint[])")
        if group is not None:
            params.append(group)
            clauses.append(f"grp = ${len(params)}")
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        return where, params

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        where, params = self._select_dead(entry_ids, group)
        sql = self._sql
        async with self._connection("replay dead letters") as conn, conn.transaction():
            rows = await conn.fetch(
                f"{sql.dead_for_replay}{where} ORDER BY id FOR UPDATE SKIP LOCKED", *params
            )
            declared = {
                name: Subscription.from_json(orjson.loads(spec))
                for name, spec in await conn.fetch(sql.group_specs)
            }
            events: list[tuple[str, str, bytes]] = []
            t_group: list[str] = []
            t_key: list[str | None] = []
            replayed: list[int] = []
            for rid, grp, event_id, body in rows:
                sub = declared.get(grp)
                if sub is None:
                    continue  # the function is gone; keep its dead letter
                try:
                    decoded = codec.decode(bytes(body))
                    key, type_name = decoded.partitionkey, decoded.type
                except Exception:
                    key, type_name = None, "(undecodable)"
                events.append((event_id or "", type_name, bytes(body)))
                t_group.append(grp)
                t_key.append(key if sub.ordered else None)
                replayed.append(rid)
            if not replayed:
                return 0
            touched = set(t_group)
            await self._insert(
                conn, events, list(range(1, len(events) + 1)), t_group, t_key, touched
            )
            await conn.execute(f"{sql.dead_delete} WHERE id = ANY($1::bigint[])", replayed)
        self._wake_groups(touched)
        return len(replayed)

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        where, params = self._select_dead(entry_ids, group)
        async with self._connection("purge dead letters") as conn:
            status: str = await conn.execute(f"{self._sql.dead_delete}{where}", *params)
        return int(status.split()[-1])

    async def stats(self) -> list[GroupStats]:
        sql = self._sql
        async with (
            self._connection("read stats") as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            live = {grp: (r, d, f) for grp, r, d, f in await conn.fetch(sql.stats_live)}
            dead = {grp: n for grp, n in await conn.fetch(sql.stats_dead)}
            counters = await conn.fetch(sql.stats_counters)
        out = []
        for grp, processed, retried, dead_lettered in counters:
            ready, delayed, in_flight = live.get(grp, (0, 0, 0))
            out.append(
                GroupStats(
                    group=grp,
                    ready=ready,
                    delayed=delayed,
                    in_flight=in_flight,
                    dead_letters=dead.get(grp, 0),
                    processed=processed,
                    retried=retried,
                    dead_lettered=dead_lettered,
                )
            )
        return out

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        async with self._connection("read the log") as conn:
            if after is None:
                return [(int(await conn.fetchval(self._sql.log_head)), b"")]
            rows = await conn.fetch(self._sql.log_read, after, limit)
        return [(int(seq), bytes(body)) for seq, body in rows]


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # connection closed / in a bad state
    asyncpg.exceptions.InternalClientError,  # a connection the server ended while idle
)


def _is_driver_error(exc: BaseException) -> bool:
    """An error of the layers below nerve (the driver, the OS), to translate."""
    if isinstance(exc, NerveError):
        return False
    return isinstance(exc, OSError | TimeoutError) or type(exc).__module__.startswith("asyncpg")


def _entry(rid: int, group: str, body: bytes, failure_json: str) -> DeadLetterEntry:
    doc = orjson.loads(failure_json)
    try:
        event: Event | None = codec.decode(bytes(body))
    except Exception:
        event = None
    return DeadLetterEntry(
        id=str(rid), group=group, raw=bytes(body), failure=Failure(**doc), event=event
    )
