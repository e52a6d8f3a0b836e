"""``sqlite:///path/to/nerve.db``: the embedded durable broker, in one SQLite file.

Design: publishing appends to ``log`` and fans out one ``deliveries`` row per matching
group, in one group-committed transaction (WAL, ``synchronous=FULL`` by default). A
consumer claims rows with one ``UPDATE`` (its own transaction) that sets a lease and a
fresh random fencing token; settlements delete or update a row only while the token
still matches, so a consumer whose lease expired cannot settle what someone else now
owns. Needs SQLite 3.35 or later with the JSON functions (built in since 3.38).
Several processes may share one file: SQLite serialises the writers and a watcher
thread notices other processes' commits (``PRAGMA data_version``) to wake consumers.

URL options: ``?synchronous=FULL|NORMAL|OFF&visibility_timeout=30&max_payload=1048576
&poll_interval=0.05&log_retention=86400`` (see docs/embedded-broker.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from nerve import event as codec
from nerve._batch import Coalescer
from nerve._sqlite import Worker, begin_immediate, connect, execute_write, require_features
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    published_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    declared_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT,
    available_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    token INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    first_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_by_group ON deliveries (grp, id);
CREATE INDEX IF NOT EXISTS deliveries_by_key ON deliveries (grp, key, id) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    event_id TEXT,
    body BLOB NOT NULL,
    failure TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_group ON dead_letters (grp, id);
CREATE TABLE IF NOT EXISTS counters (
    grp TEXT PRIMARY KEY,
    processed INTEGER NOT NULL DEFAULT 0,
    retried INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS count_processed AFTER DELETE ON deliveries WHEN old.token <> 0
BEGIN
    UPDATE counters SET processed = processed + 1 WHERE grp = old.grp;
END;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('groups_version', 0);
"""

_CLAIM_IDS = """
SELECT '[' || group_concat(id) || ']' FROM (
    SELECT d.id FROM deliveries d
    WHERE d.grp = :grp AND d.available_at <= :now AND d.lease_until <= :now
      AND (d.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM deliveries e WHERE e.grp = d.grp AND e.key = d.key AND e.id < d.id))
    ORDER BY d.id LIMIT :limit)
"""
_LEASE = """
UPDATE deliveries SET lease_until = ?, token = ?, attempt = attempt + 1,
       first_at = coalesce(first_at, ?)
WHERE id IN (SELECT value FROM json_each(?)) AND available_at <= ? AND lease_until <= ?
"""
_CLAIMED = """
SELECT json_group_array(
           json_array(d.id, d.attempt, d.first_at, d.key, length(CAST(l.body AS BLOB)))),
       CAST(group_concat(l.body, '') AS BLOB)
FROM deliveries d JOIN log l ON l.seq = d.seq
WHERE d.id IN (SELECT value FROM json_each(?)) AND d.token = ?
"""
"""A claim is three statements, and only the middle one writes: read the ids that are
free (no lock), lease those still free in one UPDATE that is its own transaction
(the write lock is held for one C call: see ``nerve._sqlite.execute_write``), read
the rows the lease made ours with their bodies (no lock). A row another process
leased in between is simply not ours. The last read returns ONE row (the rows as a
JSON array, the bodies concatenated): Python's sqlite3 lets go of the GIL and takes
it back for every row stepped, and taking it back from a busy event loop thread can
take up to the switch interval (5 ms) each time. The ids travel as one JSON array, so
the statements' text never changes and SQLite prepares each once. Per-key order
holds: a row is a candidate only when no earlier row of its key exists, and rows only
ever get later ids."""


def _setup(conn: sqlite3.Connection) -> None:
    require_features(conn, "the embedded broker", TransportError)
    conn.executescript(SCHEMA)


@functools.cache
def _values(width: int, rows: int) -> str:
    """``(?,?,?),(?,?,?)...``: one multi-row VALUES list (one SQLite step for all)."""
    one = "(" + ",".join("?" * width) + ")"
    return ",".join([one] * rows)


_ROWS_PER_INSERT = 256
"""Most rows per multi-row INSERT (5 x 256 parameters, far below SQLite's 32,766)."""


@dataclass(frozen=True, slots=True)
class SqliteConfig:
    path: str = ".nerve/nerve.db"
    synchronous: str = "FULL"
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024
    poll_interval: float = 0.05
    log_retention: float = 86400.0

    @classmethod
    def from_url(cls, url: str) -> SqliteConfig:
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise ConfigError(f"not a sqlite URL: {url!r}")
        if parts.netloc:
            raise ConfigError(
                f"{url!r}: a sqlite URL has no host; use sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigError(f"{url!r}: name the database file, e.g. sqlite:///.nerve/nerve.db")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {
            "synchronous",
            "visibility_timeout",
            "max_payload",
            "poll_interval",
            "log_retention",
        }
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        sync = options.get("synchronous", "FULL").upper()
        if sync not in ("FULL", "NORMAL", "OFF", "EXTRA"):
            raise ConfigError(f"{url!r}: synchronous must be FULL, EXTRA, NORMAL or OFF")
        try:
            return cls(
                path=path,
                synchronous=sync,
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", 1024 * 1024)),
                poll_interval=float(options.get("poll_interval", 0.05)),
                log_retention=float(options.get("log_retention", 86400.0)),
            )
        except ValueError as exc:
            raise ConfigError(f"{url!r}: {exc}") from None


_Settlement = tuple["SqliteDelivery", str, float, Failure | None]


def _token() -> int:
    return random.getrandbits(62) + 1


class _Router:
    """Which groups an event goes to; lives in the worker thread, reloaded on change."""

    def __init__(self) -> None:
        self.version = -1
        self.groups: list[Subscription] = []
        self._by_type: dict[str, list[Subscription]] = {}

    def refresh(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("SELECT v FROM meta WHERE k = 'groups_version'").fetchone()[0]
        if version == self.version:
            return
        rows = conn.execute("SELECT spec FROM groups ORDER BY name").fetchall()
        self.groups = [Subscription.from_json(orjson.loads(spec)) for (spec,) in rows]
        self._by_type = {}
        self.version = version

    def targets(self, event: Event) -> list[Subscription]:
        candidates = self._by_type.get(event.type)
        if candidates is None:
            candidates = [
                g for g in self.groups if Subscription(g.group, g.patterns).matches(event)
            ]
            self._by_type[event.type] = candidates
        return [g for g in candidates if not g.filters or g.matches(event)]


class SqliteDelivery:
    __slots__ = (
        "_consumer",
        "_event",
        "attempt",
        "first_at",
        "group",
        "key",
        "raw",
        "received_at",
        "row_id",
        "token",
    )

    def __init__(
        self,
        consumer: SqliteConsumer,
        row_id: int,
        token: int,
        raw: bytes,
        attempt: int,
        first_at: float,
        key: str | None,
        received_at: float,
    ) -> None:
        self._consumer = consumer
        self._event: Event | None = None
        self.group = consumer.group
        self.row_id = row_id
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
        await self._consumer.transport._settle(self, "ack", 0.0, None)

    async def nack(self, delay: float = 0.0) -> None:
        await self._consumer.transport._settle(self, "nack", delay, None)

    async def dead_letter(self, failure: Failure) -> None:
        await self._consumer.transport._settle(self, "dead", 0.0, failure)

    async def extend(self, seconds: float) -> None:
        await self._consumer.transport._settle(self, "extend", seconds, None)

    def __repr__(self) -> str:
        return f"<SqliteDelivery {self.group}#{self.row_id} attempt={self.attempt}>"


class SqliteConsumer:
    def __init__(self, transport: SqliteTransport, subscription: Subscription) -> None:
        self.transport = transport
        self.subscription = subscription
        self.group = subscription.group
        self.wake = asyncio.Event()
        self._closed = False
        self._declared = False

    async def fetch(self, limit: int, timeout: float) -> Sequence[SqliteDelivery]:
        transport = self.transport
        if not self._declared:
            await transport._require_group(self.group)
            self._declared = True
        deadline = time.monotonic() + timeout
        while not self._closed:
            self.wake.clear()
            rows = await transport._claim(self.group, limit)
            if rows:
                now = time.time()
                return [
                    SqliteDelivery(self, rid, tok, body, attempt, first_at, key, now)
                    for rid, tok, body, attempt, first_at, key in rows
                ]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            transport.waiting += 1
            try:
                await wait_event(self.wake, min(remaining, transport.config.poll_interval))
            finally:
                transport.waiting -= 1
        return []

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        batch: list[_Settlement] = []
        for delivery in deliveries:
            assert isinstance(delivery, SqliteDelivery)
            batch.append((delivery, "ack", 0.0, None))
        if not batch:
            return []
        results = await self.transport._settle_batch(batch)
        return [d for d, r in zip(deliveries, results, strict=True) if r is not None]

    async def close(self) -> None:
        self._closed = True
        self.wake.set()
        self.transport._consumers.discard(self)


class _Watcher(threading.Thread):
    """Wakes this process's consumers when another connection publishes."""

    def __init__(self, path: str, notify: Callable[[], None], hungry: Callable[[], bool]) -> None:
        super().__init__(name=f"nerve-watch:{path}", daemon=True)
        self._path = path
        self._notify = notify
        self._hungry = hungry
        self._halt = threading.Event()

    def run(self) -> None:
        conn = connect(self._path, synchronous="NORMAL")
        try:
            version = -1
            last_seq = -1
            idle = 0.0
            while not self._halt.is_set():
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    version = current
                    seq = conn.execute("SELECT max(seq) FROM log").fetchone()[0] or 0
                    if seq != last_seq:
                        last_seq = seq
                        idle = 0.0
                        self._notify()
                # poll fast while a consumer waits and events flow; slower otherwise
                # (a consumer that is busy fetches again by itself when it has room)
                idle = min(idle + 0.0002, 0.004)
                self._halt.wait(0.001 + idle if self._hungry() else 0.005)
        finally:
            conn.close()

    def stop(self) -> None:
        self._halt.set()


class SqliteTransport:
    """The embedded durable broker."""

    def __init__(self, config: SqliteConfig | str | None = None) -> None:
        if isinstance(config, str):
            config = SqliteConfig.from_url(config)
        self.config = config or SqliteConfig()
        self.url = f"sqlite:///{self.config.path}"
        self.features = Features(
            durable=self.config.synchronous in ("FULL", "EXTRA"),
            shared_across_processes=True,
            key_ordering=True,
            dead_letter_queue=True,
            max_payload=self.config.max_payload,
        )
        self._worker = Worker(
            self.config.path, synchronous=self.config.synchronous, error=TransportError
        )
        self._router = _Router()
        self._consumers: set[SqliteConsumer] = set()
        self._watcher: _Watcher | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self.waiting = 0
        """Consumers of this transport waiting for work right now."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._settler: Coalescer[_Settlement, None] = Coalescer(self._settle_batch)

    def __repr__(self) -> str:
        return f"SqliteTransport({self.config.path!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._worker.start(_setup)
        except (sqlite3.Error, OSError) as exc:
            raise TransportError(
                f"cannot open the embedded broker at {self.config.path!r}: {exc}"
            ) from None
        self._watcher = _Watcher(
            self.config.path, self._wake_all_threadsafe, lambda: self.waiting > 0
        )
        self._watcher.start()
        self._maintenance = asyncio.create_task(self._maintain())

    async def _maintain(self) -> None:
        """Prune the log: events older than the retention that no delivery needs."""
        while True:
            await asyncio.sleep(30.0)
            with contextlib.suppress(TransportError):
                await self.prune_log()

    async def prune_log(self, older_than: float | None = None) -> int:
        """Delete logged events older than ``older_than`` seconds (default: the
        configured retention) that no pending delivery refers to."""
        cutoff = time.time() - (self.config.log_retention if older_than is None else older_than)

        def prune(conn: sqlite3.Connection) -> int:
            oldest = conn.execute("SELECT min(seq) FROM deliveries").fetchone()[0]
            limit = oldest if oldest is not None else 1 << 62
            # the first row within the retention, in seq order, bounds what may go: the
            # delete then reads about what it deletes, not the whole retained log (as
            # it did, in the writer's thread, every 30 s). A row published after a
            # younger one (the clock set back) is kept longer, never pruned early.
            young = conn.execute(
                "SELECT seq FROM log WHERE seq < ? AND published_at >= ? ORDER BY seq LIMIT 1",
                (limit, cutoff),
            ).fetchone()
            if young is not None:
                limit = young[0]
            return conn.execute(
                "DELETE FROM log WHERE seq < ? AND published_at < ?", (limit, cutoff)
            ).rowcount

        return await self._worker.write(prune)

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        for consumer in list(self._consumers):
            await consumer.close()
        for timer in self._timers:
            timer.cancel()
        if self._watcher is not None:
            self._watcher.stop()
            await asyncio.to_thread(self._watcher.join, 5)
            self._watcher = None
        await self._worker.close()

    def _wake_all_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_groups, None)

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
        specs = [(s.group, orjson.dumps(s.to_json()).decode()) for s in subscriptions]

        def declare(conn: sqlite3.Connection) -> None:
            changed = False
            now = time.time()
            for name, spec in specs:
                row = conn.execute("SELECT spec FROM groups WHERE name = ?", (name,)).fetchone()
                if row is None or row[0] != spec:
                    conn.execute(
                        "INSERT INTO groups (name, spec, declared_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                        (name, spec, now),
                    )
                    conn.execute("INSERT OR IGNORE INTO counters (grp) VALUES (?)", (name,))
                    changed = True
            if changed:
                conn.execute("UPDATE meta SET v = v + 1 WHERE k = 'groups_version'")

        await self._worker.write(declare)

    def _encode(self, events: Sequence[Event]) -> list[tuple[Event, bytes]]:
        return encode_checked(events, self.config.max_payload)

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        if not events:
            return
        encoded = self._encode(events)
        router = self._router

        def publish(conn: sqlite3.Connection) -> set[str]:
            router.refresh(conn)
            now = time.time()
            touched: set[str] = set()
            # seq is assigned here, as SQLite would (max + 1), so that the log rows
            # and the deliveries can each go in as one multi-row INSERT
            seq = conn.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0]
            logged: list[Any] = []
            rows: list[Any] = []
            for event, body in encoded:
                seq += 1
                logged += (seq, event.id, event.type, now, body)
                if to_group is not None:
                    targets = [g for g in router.groups if g.group == to_group]
                    if not targets:
                        raise TransportError(f"no consumer group named {to_group!r} is declared")
                else:
                    targets = router.targets(event)
                for sub in targets:
                    rows += (sub.group, seq, event.partitionkey if sub.ordered else None, now)
                    touched.add(sub.group)
            _insert(conn, "log (seq, event_id, type, published_at, body)", 5, logged)
            _insert(conn, "deliveries (grp, seq, key, available_at)", 4, rows)
            return touched

        touched = await self._worker.write(publish)
        self._wake_groups(touched)

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> SqliteConsumer:
        consumer = SqliteConsumer(self, subscription)
        self._consumers.add(consumer)
        return consumer

    async def _require_group(self, group: str) -> None:
        row = await self._worker.call(
            lambda c: c.execute("SELECT 1 FROM groups WHERE name = ?", (group,)).fetchone()
        )
        if row is None:
            raise TransportError(f"declare group {group!r} before consuming it")

    async def _claim(
        self, group: str, limit: int
    ) -> list[tuple[int, int, bytes, int, float, str | None]]:
        token = _token()
        lease = self.config.visibility_timeout
        relaxed = self._relaxed

        def claim(conn: sqlite3.Connection) -> list[tuple[int, int, bytes, int, float, str | None]]:
            for _ in range(3):  # another process may lease what we saw first
                now = time.time()
                found = conn.execute(
                    _CLAIM_IDS, {"now": now, "grp": group, "limit": limit}
                ).fetchall()[0][0]
                if not found:
                    return []
                with relaxed(conn):  # a lease need not survive a power loss
                    leased = execute_write(conn, _LEASE, (now + lease, token, now, found, now, now))
                if leased:
                    return _claimed(conn, found, token)
            return []

        return await self._worker.call(claim)

    @contextlib.contextmanager
    def _relaxed(self, conn: sqlite3.Connection) -> Iterator[None]:
        """The commits inside run with ``synchronous=NORMAL`` (no fsync of their own)
        when the broker is configured ``FULL`` or ``EXTRA``: for leases and acks, which
        a power loss may undo without losing an event (docs/embedded-broker.md). Their
        WAL frames are written, so a crashed process loses nothing, and the next
        fsynced commit (a publish, a nack...) carries them to disk."""
        synchronous = self.config.synchronous
        if synchronous not in ("FULL", "EXTRA"):
            yield
            return
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA synchronous={synchronous}")

    async def _settle(
        self, delivery: SqliteDelivery, action: str, amount: float, failure: Failure | None
    ) -> None:
        await self._settler.submit((delivery, action, amount, failure))

    async def _settle_batch(self, batch: list[_Settlement]) -> list[BaseException | None]:
        if all(action == "ack" for _, action, _, _ in batch):
            relaxed = self._relaxed

            def ack(conn: sqlite3.Connection) -> set[int]:
                with relaxed(conn):  # the runtime's store record is fsynced already
                    return _ack_alone(conn, batch)

            acked = await self._worker.call(ack)
            outcomes = [delivery.row_id in acked for delivery, _, _, _ in batch]
        else:
            outcomes = await self._worker.write(lambda conn: _settle_rows(conn, batch))
        results: list[BaseException | None] = []
        wake: set[str] = set()
        for (delivery, action, amount, _), ok in zip(batch, outcomes, strict=True):
            if not ok:
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

    # -- optional abilities: dead letters, stats, log ----------------------------------

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        sql = "SELECT id, grp, body, failure FROM dead_letters"
        params: tuple[Any, ...] = ()
        if group is not None:
            sql += " WHERE grp = ?"
            params = (group,)
        sql += " ORDER BY id LIMIT ?"
        rows = await self._worker.call(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [_entry(*row) for row in rows]

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        if not entry_id.isdigit():
            return None
        row = await self._worker.call(
            lambda c: c.execute(
                "SELECT id, grp, body, failure FROM dead_letters WHERE id = ?", (int(entry_id),)
            ).fetchone()
        )
        return None if row is None else _entry(*row)

    def _select_dead(
        self, entry_ids: Sequence[str] | None, group: str | None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if entry_ids is not None:
            ids = [int(i) for i in entry_ids if str(i).isdigit()]
            clauses.append(f"id IN ({','.join('?' * len(ids)) or 'NULL'})")
            params.extend(ids)
        if group is not None:
            clauses.append("grp = ?")
            params.append(group)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        return where, params

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        where, params = self._select_dead(entry_ids, group)

        def replay(conn: sqlite3.Connection) -> tuple[int, set[str]]:
            now = time.time()
            rows = conn.execute(
                f"SELECT id, grp, event_id, body FROM dead_letters{where} ORDER BY id", params
            ).fetchall()
            self._router.refresh(conn)
            declared = {sub.group: sub for sub in self._router.groups}
            touched: set[str] = set()
            count = 0
            for rid, grp, event_id, body in rows:
                if grp not in declared:
                    continue  # the function is gone; keep its dead letter
                try:
                    decoded = codec.decode(body)
                    key, type_name = decoded.partitionkey, decoded.type
                except Exception:
                    key, type_name = None, "(undecodable)"
                if not declared[grp].ordered:
                    key = None
                seq = conn.execute(
                    "INSERT INTO log (event_id, type, published_at, body) VALUES (?, ?, ?, ?)",
                    (event_id or "", type_name, now, body),
                ).lastrowid
                conn.execute(
                    "INSERT INTO deliveries (grp, seq, key, available_at) VALUES (?, ?, ?, ?)",
                    (grp, seq, key, now),
                )
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (rid,))
                touched.add(grp)
                count += 1
            return count, touched

        count, touched = await self._worker.write(replay)
        self._wake_groups(touched)
        return count

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        where, params = self._select_dead(entry_ids, group)
        return await self._worker.write(
            lambda c: c.execute(f"DELETE FROM dead_letters{where}", params).rowcount
        )

    async def stats(self) -> list[GroupStats]:
        def stats(conn: sqlite3.Connection) -> list[GroupStats]:
            now = time.time()
            live = {
                grp: (ready, delayed, in_flight)
                for grp, ready, delayed, in_flight in conn.execute(
                    "SELECT grp, sum(available_at <= ? AND lease_until <= ?), "
                    "sum(available_at > ? AND lease_until <= ?), sum(lease_until > ?) "
                    "FROM deliveries GROUP BY grp",
                    (now, now, now, now, now),
                )
            }
            dead = dict(conn.execute("SELECT grp, count(*) FROM dead_letters GROUP BY grp"))
            out = []
            for grp, processed, retried, dead_lettered in conn.execute(
                "SELECT grp, processed, retried, dead_lettered FROM counters ORDER BY grp"
            ):
                ready, delayed, in_flight = live.get(grp, (0, 0, 0))
                out.append(
                    GroupStats(
                        group=grp,
                        ready=ready or 0,
                        delayed=delayed or 0,
                        in_flight=in_flight or 0,
                        dead_letters=dead.get(grp, 0),
                        processed=processed,
                        retried=retried,
                        dead_lettered=dead_lettered,
                    )
                )
            return out

        return await self._worker.call(stats)

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        def read(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            if after is None:
                seq = conn.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0]
                return [(seq, b"")]
            return conn.execute(
                "SELECT seq, body FROM log WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()

        return await self._worker.call(read)

    async def search_log(
        self,
        *,
        ids: Sequence[str] = (),
        contains: Sequence[str] = (),
        types: Sequence[str] = (),
        before: int | None = None,
        limit: int = 100,
    ) -> list[tuple[int, float, bytes]]:
        """Logged events, newest first, as (position, published_at, raw): those whose id
        is in ``ids`` or whose encoded body contains one of ``contains`` (exact text,
        like ``'"correlationid":"..."'``; no ``ids`` and no ``contains``: any), of one
        of ``types`` (if given), before position ``before``. For ``nerve trace`` and
        the dashboard (observability; a scan, not on the hot path)."""
        match = [f"event_id IN ({','.join('?' * len(ids))})"] if ids else []
        match += ["instr(CAST(body AS TEXT), ?) > 0"] * len(contains)
        clauses = [f"({' OR '.join(match)})"] if match else []
        params: list[Any] = [*ids, *contains]
        if types:
            clauses.append(f"type IN ({','.join('?' * len(types))})")
            params.extend(types)
        if before is not None:
            clauses.append("seq < ?")
            params.append(before)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"SELECT seq, published_at, body FROM log{where} ORDER BY seq DESC LIMIT ?"
        return await self._worker.call(lambda c: c.execute(sql, (*params, limit)).fetchall())

    async def fate(
        self, event_ids: Sequence[str]
    ) -> tuple[list[tuple[str, str, int, float, float]], list[DeadLetterEntry]]:
        """Where events are now: their pending deliveries as (group, event id, attempt,
        available_at, lease_until), and their dead letters."""
        marks = ",".join("?" * len(event_ids)) or "NULL"

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[str, str, int, float, float]], list[DeadLetterEntry]]:
            pending = conn.execute(
                "SELECT d.grp, l.event_id, d.attempt, d.available_at, d.lease_until "
                f"FROM deliveries d JOIN log l ON l.seq = d.seq WHERE l.event_id IN ({marks})",
                list(event_ids),
            ).fetchall()
            dead = conn.execute(
                "SELECT id, grp, body, failure FROM dead_letters "
                f"WHERE event_id IN ({marks}) ORDER BY id",
                list(event_ids),
            ).fetchall()
            return pending, [_entry(*row) for row in dead]

        return await self._worker.call(read)


def _insert(conn: sqlite3.Connection, into: str, width: int, flat: list[Any]) -> None:
    """Insert ``flat`` (``width`` values a row) with multi-row INSERTs of a power of two
    rows each (100 rows: 64 + 32 + 4), so that a connection sees at most nine statement
    texts per table and SQLite's statement cache keeps them prepared: parsing a
    100-row INSERT costs about as much as running it."""
    rows = len(flat) // width
    start = 0
    while rows:
        size = min(_ROWS_PER_INSERT, 1 << (rows.bit_length() - 1))
        end = start + size * width
        conn.execute(f"INSERT INTO {into} VALUES {_values(width, size)}", flat[start:end])
        start, rows = end, rows - size


def _claimed(
    conn: sqlite3.Connection, ids: str, token: int
) -> list[tuple[int, int, bytes, int, float, str | None]]:
    """The rows of a claim (``ids``: a JSON array), read as one row (see ``_CLAIMED``),
    in id order."""
    meta, bodies = conn.execute(_CLAIMED, (ids, token)).fetchall()[0]
    if not meta or bodies is None:
        return []
    rows = []
    at = 0
    for rid, attempt, first_at, key, size in orjson.loads(meta):
        rows.append((rid, token, bodies[at : at + size], attempt, first_at, key))
        at += size
    rows.sort()
    return rows


def _by_token(batch: list[_Settlement]) -> dict[int, list[int]]:
    """The acked row ids of ``batch`` per claim token."""
    by_token: dict[int, list[int]] = {}
    for delivery, action, _, _ in batch:
        if action == "ack":
            by_token.setdefault(delivery.token, []).append(delivery.row_id)
    return by_token


_OURS = "WHERE token = ? AND id IN (SELECT value FROM json_each(?))"
"""The rows of one claim token among a JSON array of ids: one statement text for any
number of ids, so SQLite prepares it once."""


def _ack_rows(conn: sqlite3.Connection, batch: list[_Settlement]) -> set[int]:
    """Inside a transaction: delete the acked rows of ``batch`` whose lease (token) is
    still theirs; returns the row ids deleted. (The ``count_processed`` trigger counts
    them.)"""
    deleted: set[int] = set()
    for token, ids in _by_token(batch).items():
        deleted.update(_delete_ours(conn, (token, orjson.dumps(ids).decode())))
    return deleted


def _delete_ours(conn: sqlite3.Connection, params: tuple[int, str]) -> list[int]:
    """Delete the rows of ``params`` (token, ids as a JSON array) still leased with that
    token; returns their ids."""
    return [row[0] for row in conn.execute(f"DELETE FROM deliveries {_OURS} RETURNING id", params)]


def _ack_alone(conn: sqlite3.Connection, batch: list[_Settlement]) -> set[int]:
    """A batch of acks only, outside any transaction: per token, count the rows still
    ours (no lock), then delete them with one statement that is its own transaction
    (the write lock is held for one C call). Only when some lease was lost does it
    fall back to a transaction that returns the ids it deleted."""
    deleted: set[int] = set()
    for token, ids in _by_token(batch).items():
        params = (token, orjson.dumps(ids).decode())
        ours = conn.execute(f"SELECT count(*) FROM deliveries {_OURS}", params).fetchall()[0][0]
        if ours == len(ids):
            if execute_write(conn, f"DELETE FROM deliveries {_OURS}", params) == len(ids):
                deleted.update(ids)
                continue
            # another process took a lease over between the count and the DELETE
            # (microseconds): the rows still there are not ours
            present = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM deliveries WHERE id IN (SELECT value FROM json_each(?))",
                    params[1:],
                )
            }
            deleted.update(i for i in ids if i not in present)
        elif ours:
            begin_immediate(conn)
            try:
                deleted.update(_delete_ours(conn, params))
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
    return deleted


def _settle_rows(conn: sqlite3.Connection, batch: list[_Settlement]) -> list[bool]:
    now = time.time()
    outcomes: list[bool] = []
    counts: dict[tuple[str, str], int] = {}
    acked = _ack_rows(conn, batch)
    for delivery, action, amount, failure in batch:
        rid, token = delivery.row_id, delivery.token
        if action == "ack":
            outcomes.append(rid in acked)
            continue
        if action == "nack":
            cur = conn.execute(
                "UPDATE deliveries SET available_at = ?, lease_until = 0 "
                "WHERE id = ? AND token = ?",
                (now + amount, rid, token),
            )
        elif action == "extend":
            cur = conn.execute(
                "UPDATE deliveries SET lease_until = ? WHERE id = ? AND token = ?",
                (now + amount, rid, token),
            )
        else:
            assert failure is not None
            # token 0 first: the count_processed trigger counts only acks
            cur = conn.execute(
                "UPDATE deliveries SET token = 0 WHERE id = ? AND token = ?", (rid, token)
            )
            if cur.rowcount:
                conn.execute("DELETE FROM deliveries WHERE id = ?", (rid,))
                try:
                    event_id: str | None = codec.decode(delivery.raw).id
                except Exception:
                    event_id = None
                conn.execute(
                    "INSERT INTO dead_letters (grp, event_id, body, failure, dead_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (delivery.group, event_id, delivery.raw, orjson.dumps(failure.to_json()), now),
                )
        ok = cur.rowcount == 1
        outcomes.append(ok)
        if ok and action != "extend":
            counts[(delivery.group, action)] = counts.get((delivery.group, action), 0) + 1
    column = {"nack": "retried", "dead": "dead_lettered"}
    for (group, action), n in counts.items():
        conn.execute(
            f"UPDATE counters SET {column[action]} = {column[action]} + ? WHERE grp = ?",
            (n, group),
        )
    return outcomes


def _entry(rid: int, group: str, body: bytes, failure_json: str | bytes) -> DeadLetterEntry:
    doc = orjson.loads(failure_json)
    try:
        event: Event | None = codec.decode(body)
    except Exception:
        event = None
    return DeadLetterEntry(
        id=str(rid), group=group, raw=bytes(body), failure=Failure(**doc), event=event
    )
