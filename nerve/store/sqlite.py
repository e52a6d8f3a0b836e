"""The SQLite store: idempotency records, the outbox and functions' own tables.

A handler's writes through ``ctx.store``, the record "(function, event id) processed"
and the events it emitted (the outbox) commit in ONE transaction, so a crash can never
leave the effects applied without the record (or the record without the effects).

SQLite has one writer at a time, so units of work take turns: a unit's transaction
starts at its first ``ctx.store`` call (the handler holds the write turn from then
until it returns; keep store work at the end of a handler). Units that follow each
other are group-committed: each runs under its own SAVEPOINT inside a shared write
transaction, which commits (one fsync) when nobody is waiting for a turn, or every
``max_batch`` units. A unit's ``commit`` returns only after that COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson

from nerve._batch import Coalescer
from nerve._sqlite import Worker, begin_immediate, connect, execute_write, require_features
from nerve.errors import ConfigError, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS nerve_processed (
    function TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at REAL NOT NULL,
    PRIMARY KEY (function, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nerve_outbox (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""

Params = Sequence[Any] | dict[str, Any]
T = TypeVar("T")

INLINE_READ = 256
"""Idempotency checks of up to this many event ids run on the event loop, on a read
connection of its own: a few tens of microseconds of SQLite (WAL readers never wait
for the writer; 48 µs for 200 ids here), where the hop to the reader thread and back
adds 100-300 µs of latency to every event on a busy machine, and the two threads
contend for the GIL. 256 covers a runner's whole fetch (twice its concurrency of 100,
the default): on ``python -m benchmarks brokers --brokers redis`` the consumer spent
18.0 and 19.5 µs of CPU an event against 18.5 and 22.0 with 16, alternating runs.
Larger checks go to the reader thread, so the loop never stalls long on one."""
INLINE_BUSY_TIMEOUT = 0.0
"""An inline read never waits on a lock (a WAL recovery, a log restart): it goes to the
reader thread at once instead, so the loop cannot stall behind the busy handler."""
COMMIT_INTERVAL = 0.004
"""Seconds from one commit of processed records (:meth:`SqliteStore.commit_records`)
to the next, at least (URL option ``commit_interval``). At low rates every handled
event would otherwise commit, and fsync, on its own: hundreds of fsyncs a second, which
compete with the broker's own on the same disk (a RabbitMQ quorum queue delivers a
message only once its log is synced, later for every fsync of ours). Records that come
meanwhile join the next commit. What waits is the ack, never a handler: latency to
the handler does not grow, and nothing is acked before its record is durable. Records
with emitted events commit at once: those events are published after the commit, and
the functions they go to would wait."""
_Step = tuple[Any, BaseException | None, BaseException | None]
"""What a turn's last step returns: (result, handler-side error, commit error)."""


class _RolledBack(Exception):
    """The unit was rolled back on purpose (handler failed, or a duplicate)."""


def _translate(exc: Exception) -> BaseException:
    return StoreError(str(exc)) if isinstance(exc, sqlite3.Error) else exc


class SqliteStore:
    """``sqlite:///path/store.db`` (durable) or ``memory://`` (one process, for tests)."""

    def __init__(
        self,
        url: str = "sqlite:///.nerve/store.db",
        *,
        max_batch: int = 256,
        commit_interval: float | None = None,
    ) -> None:
        parts = urlsplit(url)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.scheme == "memory":
            self.path = ":memory:"
        elif parts.scheme == "sqlite":
            path = parts.path[1:] if parts.path.startswith("/") else parts.path
            if not path or parts.netloc:
                raise ConfigError(
                    f"store URL {url!r}: use sqlite:///relative/store.db or sqlite:////abs/store.db"
                )
            self.path = path
        else:
            raise ConfigError(f"store URL {url!r}: use sqlite:///path/store.db or memory://")
        synchronous = options.get("synchronous", "FULL").upper()
        given = options.get("commit_interval") if commit_interval is None else commit_interval
        try:
            interval = COMMIT_INTERVAL if given is None else float(given)
            if not 0 <= interval <= 1:
                raise ValueError(interval)
        except ValueError:
            raise ConfigError(
                f"store URL {url!r}: commit_interval is in seconds, from 0 to 1 "
                f"(default {COMMIT_INTERVAL})"
            ) from None
        self._commit_interval = 0.0 if self.path == ":memory:" else interval
        self._next_commit = 0.0
        self.url = url
        self._worker = Worker(self.path, synchronous=synchronous, name=f"nerve-store:{self.path}")
        self._reader = (
            self._worker
            if self.path == ":memory:"
            else Worker(
                self.path,
                synchronous=synchronous,
                name=f"nerve-store-read:{self.path}",
                writer=False,
            )
        )
        self._max_batch = max_batch
        self._max_batch_age = 0.05
        """Seconds a shared transaction may stay open while units wait for the turn."""
        self._inline: sqlite3.Connection | None = None
        """A read connection of the event loop's own, for small idempotency checks."""
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._tx_open = False  # only read/written inside worker jobs
        self._batch: list[tuple[asyncio.Future[Any], Any]] = []
        self._batch_started = 0.0
        self._light: Coalescer[tuple[str, str, list[bytes]], list[int] | None] = Coalescer(
            self.commit_records
        )
        self._outbox_deletes: Coalescer[int, None] = Coalescer(self._delete_outbox)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, schema: Sequence[str] = ()) -> None:
        def setup(conn: sqlite3.Connection) -> None:
            require_features(conn, "the SQLite store", StoreError)
            conn.row_factory = sqlite3.Row
            conn.executescript(SCHEMA)
            for ddl in schema:
                conn.executescript(ddl)

        try:
            await self._worker.start(setup)
            if self._reader is not self._worker:
                await self._reader.start()
                self._inline = connect(self.path, busy_timeout=INLINE_BUSY_TIMEOUT)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the store at {self.path!r}: {exc}") from None

    async def close(self) -> None:
        await self._outbox_deletes.drain()
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._reader is not self._worker:
            await self._reader.close()
        await self._worker.close()

    # -- idempotency -----------------------------------------------------------------

    async def is_processed(self, function: str, event_id: str) -> bool:
        return event_id in await self.processed_many(function, [event_id])

    async def processed_many(self, function: str, event_ids: Sequence[str]) -> set[str]:
        """Which of ``event_ids`` ``function`` has processed already (one query, of
        one statement text whatever the number of ids: see :func:`_record_many`)."""
        ids = orjson.dumps(list(event_ids)).decode()

        def check(conn: sqlite3.Connection) -> set[str]:
            (found,) = conn.execute(_EXISTING, (function, ids)).fetchall()[0]
            return set(orjson.loads(found))

        inline = self._inline
        if inline is not None and len(event_ids) <= INLINE_READ:
            try:
                return check(inline)
            except sqlite3.Error:  # busy (a WAL recovery...): the reader thread waits
                pass
        return await self._reader.call(check)

    async def commit_records(
        self, items: Sequence[tuple[str, str, list[bytes]]]
    ) -> list[list[int] | None]:
        """Record many (function, event id, outbox) as processed in one commit.

        For units that never touched ctx.store. Returns, per item, its outbox row ids,
        or None if it had been processed already.
        """
        for _, _, outbox in items:  # (a loop, not any(): this runs for every event)
            if outbox:
                break
        else:
            await self.records_due()  # one commit an interval, at most
        self._next_commit = time.monotonic() + self._commit_interval
        rows = list(items)
        return await self._in_turn(lambda conn: _record_many(conn, rows), _records_alone(rows))

    async def records_due(self) -> None:
        """Wait until the next commit of records without outbox rows may start (at most
        one an interval, see :data:`COMMIT_INTERVAL`). Whoever gathers records for
        :meth:`commit_records` waits here *before* taking them, so that the records that
        come meanwhile join that commit instead of waiting for the next one."""
        wait = self._next_commit - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    # -- write turns and group commit --------------------------------------------------
    #
    # One unit holds the write turn at a time. Worker-side, a turn is a SAVEPOINT inside
    # the shared transaction; each step below is ONE round trip to the worker thread.
    # Whether a step ends with COMMIT is decided when it is submitted: commit when no one
    # else waits for a turn, or the batch is large or old. Units whose savepoint was
    # released wait for that COMMIT; settling them happens in a done-callback, so a
    # cancelled caller can never strand the others.

    async def _acquire(self) -> None:
        self._waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self._waiting -= 1

    def _commit_due(self) -> bool:
        return (
            self._waiting == 0
            or len(self._batch) + 1 >= self._max_batch
            or time.monotonic() - self._batch_started > self._max_batch_age
        )

    def _begin(self, conn: sqlite3.Connection) -> None:
        if not self._tx_open:
            begin_immediate(conn)
            self._tx_open = True
            self._batch_started = time.monotonic()
        conn.execute("SAVEPOINT unit")

    def _finish(self, conn: sqlite3.Connection, keep: bool, commit: bool) -> BaseException | None:
        """Release or roll back the savepoint; COMMIT if asked. Returns a commit error."""
        if keep:
            conn.execute("RELEASE unit")
        else:
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
        if not commit or not self._tx_open:
            return None
        self._tx_open = False
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return StoreError(f"store commit failed: {exc}")
        return None

    def _shot(
        self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], commit: bool
    ) -> tuple[T | None, BaseException | None, BaseException | None]:
        self._begin(conn)
        try:
            result = fn(conn)
        except Exception as exc:
            return None, _translate(exc), self._finish(conn, False, commit)
        return result, None, self._finish(conn, True, commit)

    def _settle_turn(
        self, step: asyncio.Future[_Step], mine: asyncio.Future[Any], commit: bool
    ) -> None:
        """Done-callback of a turn's last step: pass the turn on, settle who waits."""
        self._turn.release()
        if step.cancelled() or step.exception() is not None:
            cause = "cancelled" if step.cancelled() else step.exception()
            error = StoreError(f"store step failed: {cause}")
            waiting = [mine] + ([f for f, _ in self._batch] if commit else [])
            if commit:
                self._batch = []
            for future in waiting:
                if not future.done():
                    future.set_exception(error)
            return
        result, fn_error, commit_error = step.result()
        if fn_error is not None:
            if not mine.done():
                mine.set_exception(fn_error)
        else:
            self._batch.append((mine, result))
        if not commit:
            return
        batch, self._batch = self._batch, []
        for future, value in batch:
            if future.done():
                continue
            if commit_error is not None:
                future.set_exception(commit_error)
            else:
                future.set_result(value)

    def _step(self, fn: Callable[[sqlite3.Connection], _Step], commit: bool) -> asyncio.Future[Any]:
        mine: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        step = self._worker.submit(fn)
        step.add_done_callback(lambda f: self._settle_turn(f, mine, commit))
        return mine

    async def _in_turn(
        self,
        fn: Callable[[sqlite3.Connection], T],
        alone: Callable[[sqlite3.Connection], T] | None = None,
    ) -> T:
        """Run ``fn`` as a whole unit in one round trip; returns once committed.
        ``alone``: the same work as one statement, which commits by itself; used
        instead when the unit would commit on its own anyway (see :meth:`_shot_alone`)."""
        await self._acquire()
        commit = self._commit_due()
        if alone is not None and commit:
            result: T = await self._step(lambda c: self._shot_alone(c, fn, alone), commit)
        else:
            result = await self._step(lambda c: self._shot(c, fn, commit), commit)
        return result

    def _shot_alone(
        self,
        conn: sqlite3.Connection,
        fn: Callable[[sqlite3.Connection], T],
        alone: Callable[[sqlite3.Connection], T],
    ) -> _Step:
        """A unit that commits alone, as one statement outside any transaction: SQLite
        takes the write lock, writes, commits and lets go inside one C call. Written as
        BEGIN, SAVEPOINT, the statements, RELEASE and COMMIT, the worker thread let go
        of the GIL five to seven times and took it back from a busy event loop thread
        each time (up to the switch interval, 5 ms, each). With a transaction open
        (earlier units waiting for its COMMIT), ``fn`` joins it as before."""
        if self._tx_open:
            return self._shot(conn, fn, True)
        try:
            return alone(conn), None, None
        except Exception as exc:
            return None, _translate(exc), None

    async def _open_turn(self) -> None:
        """Take the turn for a unit that will run statements across awaits."""
        await self._acquire()
        try:
            await self._worker.call(self._begin)
        except BaseException:
            self._turn.release()
            raise

    async def _close_turn(
        self, record: Callable[[sqlite3.Connection], T | None] | None
    ) -> T | None:
        """End a unit's turn: run ``record`` (None = roll back), maybe commit.

        Returns what ``record`` returned once committed, or None if it returned None
        (the event was processed already) or the unit was rolled back: then the
        unit's writes are undone.
        """
        commit = self._commit_due()

        def last(c: sqlite3.Connection) -> _Step:
            if record is None:
                return None, _RolledBack(), self._finish(c, False, commit)
            try:
                result = record(c)
            except Exception as exc:
                return None, _translate(exc), self._finish(c, False, commit)
            if result is None:
                return None, _RolledBack(), self._finish(c, False, commit)
            return result, None, self._finish(c, True, commit)

        try:
            value: T = await self._step(last, commit)
        except _RolledBack:
            return None
        return value

    # -- units of work ---------------------------------------------------------------

    def unit(self, function: str, event_id: str) -> SqliteUnit:
        return SqliteUnit(self, function, event_id)

    # -- outbox ----------------------------------------------------------------------

    async def outbox_cleared(self, ids: Sequence[int]) -> None:
        """The outbox rows ``ids`` have been published: forget them (batched)."""
        await asyncio.gather(*(self._outbox_deletes.submit(i) for i in ids))

    async def _delete_outbox(self, ids: list[int]) -> list[None]:
        rows = [(i,) for i in ids]
        await self._in_turn(lambda c: c.executemany("DELETE FROM nerve_outbox WHERE id = ?", rows))
        return [None] * len(ids)

    async def outbox_pending(self, older_than: float, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Outbox rows left behind by a crash between commit and publish."""
        cutoff = time.time() - older_than
        rows = await self._reader.call(
            lambda c: c.execute(
                "SELECT id, body FROM nerve_outbox WHERE created_at < ? ORDER BY id LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    async def prune_processed(self, older_than: float) -> int:
        """Forget idempotency records older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        return await self._in_turn(
            lambda c: (
                c.execute("DELETE FROM nerve_processed WHERE processed_at < ?", (cutoff,)).rowcount
            )
        )

    async def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Read data (for tools, tests and invariant checks): committed data on a file
        store; on ``memory://`` (one connection) also writes of units still in flight."""
        return await self._reader.call(lambda c: _fetchall(c, sql, params))


def _fetchall(conn: sqlite3.Connection, sql: str, params: Params) -> list[sqlite3.Row]:
    conn.row_factory = sqlite3.Row
    return conn.execute(sql, params).fetchall()


def _release(conn: sqlite3.Connection) -> None:
    conn.execute("RELEASE unit")


def _rollback(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK TO unit")
    conn.execute("RELEASE unit")


def _record(
    conn: sqlite3.Connection, function: str, event_id: str, outbox: list[bytes]
) -> list[int] | None:
    """Mark processed and stage the outbox; None if it was processed already."""
    cur = conn.execute(
        "INSERT INTO nerve_processed (function, event_id, processed_at) VALUES (?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        (function, event_id, time.time()),
    )
    if cur.rowcount == 0:
        return None
    return _stage_outbox(conn, outbox, time.time())


def _stage_outbox(conn: sqlite3.Connection, outbox: list[bytes], now: float) -> list[int]:
    """Insert the outbox rows of one unit; their row ids, in order."""
    ids = []
    for body in outbox:
        row = conn.execute(
            "INSERT INTO nerve_outbox (body, created_at) VALUES (?, ?)", (body, now)
        ).lastrowid
        assert row is not None
        ids.append(row)
    return ids


_EXISTING = (
    "SELECT json_group_array(event_id) FROM nerve_processed "
    "WHERE function = ? AND event_id IN (SELECT value FROM json_each(?))"
)
_RECORD = (
    "INSERT INTO nerve_processed (function, event_id, processed_at) "
    "SELECT ?1, value, ?2 FROM json_each(?3)"
)
"""The idempotency records' check and insert: one function, its event ids as one JSON
array (see :func:`_record_many`)."""
_RECORD_NEW = (
    "INSERT OR IGNORE INTO nerve_processed (function, event_id, processed_at) "
    "SELECT ?1, value, ?2 FROM json_each(?3)"
)
_RECORDED_AT = (
    "SELECT json_group_array(event_id) FROM nerve_processed "
    "WHERE function = ?1 AND processed_at = ?2 AND event_id IN (SELECT value FROM json_each(?3))"
)
"""A batch of records as one statement (:func:`_record_alone`), and the records it wrote
when it did not write them all."""


def _records_alone(
    items: Sequence[tuple[str, str, list[bytes]]],
) -> Callable[[sqlite3.Connection], list[list[int] | None]] | None:
    """:func:`_record_many` of ``items`` as one statement, if they can be: records of
    one function without outbox rows (a runner's usual batch). Else None."""
    if not items:
        return None
    function = items[0][0]
    for name, _, outbox in items:
        if outbox or name != function:
            return None
    return lambda conn: _record_alone(conn, function, items)


def _record_alone(
    conn: sqlite3.Connection, function: str, items: Sequence[tuple[str, str, list[bytes]]]
) -> list[list[int] | None]:
    """Record ``items`` (one function's, no outbox rows) with one ``INSERT OR IGNORE``,
    a transaction of its own; each gets ``[]``, or None if recorded before (or earlier
    in the batch). When the statement wrote fewer rows than ids, the rows stamped with
    this call's time are the ones it wrote. (Another writer's record of the same event
    stamped to the same bit of a float would count as ours: a duplicate counted as
    processed, nothing more, as these units have no outbox rows.)"""
    now = time.time()
    unique = list(dict.fromkeys(event_id for _, event_id, _ in items))
    ids = orjson.dumps(unique).decode()
    ours: set[str] | None = None  # None: all of them (the common case)
    if execute_write(conn, _RECORD_NEW, (function, now, ids)) != len(unique):
        (found,) = conn.execute(_RECORDED_AT, (function, now, ids)).fetchall()[0]
        ours = set(orjson.loads(found))
    taken: set[str] = set()
    results: list[list[int] | None] = []
    for _, event_id, _ in items:
        if event_id in taken or (ours is not None and event_id not in ours):
            results.append(None)
        else:
            taken.add(event_id)
            results.append([])
    return results


def _record_many(
    conn: sqlite3.Connection, items: Sequence[tuple[str, str, list[bytes]]]
) -> list[list[int] | None]:
    """:func:`_record` for many items: per function, one query for the records that
    exist already and one INSERT of the others, each taking the event ids as one JSON
    array. So the statements' text never changes (SQLite prepares them once, where a
    list of ``?`` per batch size would be parsed again and again), and neither returns
    a row per item (each row stepped lets go of the GIL and must take it back: a wait
    when the event loop thread is busy)."""
    now = time.time()
    by_function: dict[str, dict[str, None]] = {}
    for function, event_id, _ in items:
        by_function.setdefault(function, {})[event_id] = None  # ordered, unique
    inserted: set[tuple[str, str]] = set()
    for function, unique in by_function.items():
        ids = orjson.dumps(list(unique)).decode()
        (found,) = conn.execute(_EXISTING, (function, ids)).fetchall()[0]
        existing = set(orjson.loads(found))
        new = [event_id for event_id in unique if event_id not in existing]
        if new:
            conn.execute(_RECORD, (function, now, orjson.dumps(new).decode()))
        inserted.update((function, event_id) for event_id in new)
    results: list[list[int] | None] = []
    for function, event_id, outbox in items:
        if (function, event_id) not in inserted:
            results.append(None)  # processed before, or earlier in this batch
            continue
        inserted.discard((function, event_id))
        results.append(_stage_outbox(conn, outbox, now))
    return results


class SqliteUnit:
    """``ctx.store``: the handler's transaction. Runs SQL on the store's connection;
    the transaction opens at the first call and commits with the idempotency record."""

    __slots__ = ("_active", "_store", "event_id", "function")

    def __init__(self, store: SqliteStore, function: str, event_id: str) -> None:
        self._store = store
        self.function = function
        self.event_id = event_id
        self._active = False

    @property
    def active(self) -> bool:
        """True once the handler used the store: the unit holds the write turn."""
        return self._active

    async def _ensure(self) -> None:
        if not self._active:
            await self._store._open_turn()
            self._active = True

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        await self._ensure()
        return await self._store._worker.call(lambda c: c.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> int:
        await self._ensure()
        return await self._store._worker.call(lambda c: c.executemany(sql, rows).rowcount)

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        await self._ensure()
        return await self._store._worker.call(lambda c: c.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        await self._ensure()
        row: sqlite3.Row | None = await self._store._worker.call(
            lambda c: c.execute(sql, params).fetchone()
        )
        return row

    async def fetchval(self, sql: str, params: Params = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    # -- used by the runtime -------------------------------------------------------

    async def commit(self, outbox: Sequence[bytes]) -> list[int] | None:
        """Commit the unit with its idempotency record and outbox rows; durable on return.

        Returns the outbox row ids, or None if the event had been processed already
        (a concurrent duplicate): then the unit's writes are rolled back.
        """
        store = self._store
        if not self._active:
            return await store._light.submit((self.function, self.event_id, list(outbox)))
        self._active = False
        bodies = list(outbox)
        return await store._close_turn(lambda c: _record(c, self.function, self.event_id, bodies))

    async def rollback(self) -> None:
        """Undo the unit's writes (the handler failed)."""
        if self._active:
            self._active = False
            await self._store._close_turn(None)


def default_store_url(broker_url: str) -> str:
    """The store that goes with a broker: beside the embedded broker's file; in the
    same database as a ``postgresql://`` broker (schema ``<broker schema>_store``), so
    the idempotency records and the broker's acks commit in one transaction."""
    parts = urlsplit(broker_url)
    if parts.scheme == "memory":
        return "memory://"
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return "sqlite:///" + str(Path(path).with_name("store.db"))
    if parts.scheme in ("postgresql", "postgres"):
        from urllib.parse import urlencode, urlunsplit

        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        query = {"schema": f"{options.get('schema', 'nerve')}_store"}
        query |= {k: options[k] for k in ("sslmode", "application_name") if k in options}
        return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
    return "sqlite:///.nerve/store.db"
