"""The PostgreSQL store: idempotency records, the outbox and ``ctx.store`` in PostgreSQL,
so several machines (and the ``postgresql://`` broker) can share them.

Same interface and guarantees as :class:`~nerve.store.sqlite.SqliteStore`: a handler's
writes through ``ctx.store``, the record "(function, event id) processed" and its
outbox rows commit in ONE transaction. A unit takes a pooled connection and opens its
transaction at its first ``ctx.store`` call; units run in parallel (PostgreSQL's row
locks order them), and two units of the same (function, event id) commit once: the
second waits on the first's processed row, then finds it and rolls back. Handlers that
never touch ``ctx.store`` are recorded many at a time in one statement.

On the database of a ``postgresql://`` broker of this process (the default store of
one), the commit also acks the events' deliveries, in the same statement: records and
acks commit together or not at all (see :meth:`PostgresStore._brokers` and
docs/brokers/postgres.md).

SQL is written as for SQLite, with ``?`` placeholders: they become ``$1, $2, ...``
outside quoted text. Differences from SQLite to know: a failed statement aborts the
unit's transaction (roll back, then retry), and DDL types follow PostgreSQL (``REAL`` is
4 bytes there: use ``DOUBLE PRECISION`` for timestamps; ``BLOB`` is ``BYTEA``).

URL: ``postgresql://user:password@host:5432/db?schema=public&pool_size=10``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from nerve._batch import Coalescer
from nerve._postgres import int_array, lock_ddl, text_array
from nerve._urls import redact
from nerve.errors import ConfigError, StoreError

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the installed extras
    asyncpg = None

__all__ = ["PostgresStore", "PostgresUnit"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS nerve_processed (
    function TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (function, event_id)
);
CREATE TABLE IF NOT EXISTS nerve_outbox (
    id BIGSERIAL PRIMARY KEY,
    body BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
"""

_PROCESSED_MANY = """
SELECT u.event_id FROM unnest($2::text::text[]) AS u(event_id),
LATERAL (SELECT 1 FROM nerve_processed p
         WHERE p.function = $1 AND p.event_id = u.event_id LIMIT 1) AS hit
"""
"""One primary-key probe per id, whatever the table's statistics say: written as
``event_id = ANY($2)``, a table grown since its last ANALYZE was read as "all rows of the
function, filtered" (measured: 16-67 ms for 200 ids of 10,000 rows, growing with it)."""

Params = Sequence[Any] | dict[str, Any]
_CONNECTION_OPTIONS = {"sslmode", "application_name"}
_OPTIONS = {"schema", "pool_size"} | _CONNECTION_OPTIONS
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@functools.lru_cache(maxsize=1024)
def to_postgres(sql: str) -> str:
    """``sql`` with each ``?`` placeholder outside quotes turned into ``$1, $2, ...``."""
    out: list[str] = []
    n = 0
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "?":
            n += 1
            out.append(f"${n}")
            continue
        out.append(char)
    return "".join(out)


async def _keep_session(conn: Any) -> None:
    """The pool's reset on release, beyond asyncpg's rollback of an open transaction:
    none. The store's own statements leave no session state; a unit, whose handler's SQL
    may, resets its connection itself (``PostgresUnit._release``). asyncpg's default
    reset is a round trip on every release."""


def _args(params: Params) -> list[Any]:
    if isinstance(params, dict):
        raise StoreError(
            "named parameters are not supported by the PostgreSQL store: "
            "write ? placeholders and pass a sequence"
        )
    return list(params)


def _count(status: str) -> int:
    """Rows changed, from a command status such as ``INSERT 0 3`` or ``UPDATE 2``."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


_ERRORS: tuple[type[BaseException], ...] = (
    (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) if asyncpg is not None else (OSError,)
)
_START_ERRORS: tuple[type[BaseException], ...] = (*_ERRORS, TimeoutError)


class PostgresStore:
    """``postgresql://user@host/db?schema=nerve``: the store in PostgreSQL."""

    def __init__(self, url: str, *, max_batch: int = 1024) -> None:
        if asyncpg is None:
            raise ConfigError("the PostgreSQL store needs asyncpg: pip install 'nerve[postgres]'")
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"store URL {redact(url)!r}: not a postgresql:// URL")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(
                f"store URL {redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_OPTIONS))}"
            )
        self.schema = options.get("schema", "public")
        if not _SCHEMA_NAME.fullmatch(self.schema):
            raise ConfigError(
                f"store URL {redact(url)!r}: schema must be letters, digits and _ "
                "(not starting with a digit)"
            )
        try:
            self._pool_size = int(options.get("pool_size", 10))
        except ValueError:
            raise ConfigError(f"store URL {redact(url)!r}: pool_size must be a number") from None
        if self._pool_size < 1:
            raise ConfigError(f"store URL {redact(url)!r}: pool_size must be at least 1")
        self.url = url
        passthrough = {k: v for k, v in options.items() if k in _CONNECTION_OPTIONS}
        self._dsn = urlunsplit(parts._replace(query=urlencode(passthrough)))
        self._database: tuple[str, int, str, str] | None = None
        self._where = f"PostgreSQL at {parts.hostname or 'localhost'}:{parts.port or 5432}"
        self._pool: Any = None
        self._max_batch = max_batch
        self._light: Coalescer[tuple[str, str, list[bytes]], list[int] | None] = Coalescer(
            self.commit_records
        )
        self._outbox_deletes: Coalescer[int, None] = Coalescer(self._delete_outbox)

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self.url)!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, schema: Sequence[str] = ()) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=10,
                # random_page_cost: the broker's acks run on these connections too (see
                # nerve.transport.postgres.SERVER_SETTINGS)
                server_settings={"search_path": self.schema, "random_page_cost": "1.1"},
                reset=_keep_session,  # units reset what handlers' SQL may leave: _release
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await lock_ddl(conn, "nerve-store-ddl")
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(SCHEMA)
                for ddl in schema:
                    await conn.execute(ddl)
        except _START_ERRORS as exc:
            await self.close()
            raise StoreError(f"cannot open the store on {self._where}: {exc}") from None
        self._brokers()  # transports on this database look up its records as they claim

    async def close(self) -> None:
        if self._pool is not None:
            for transport in self._brokers():
                if transport.processed_in == self.schema:
                    transport.note_processed_in(None)
            await self._outbox_deletes.drain()
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:  # a unit still holds a connection: cut it off
                pool.terminate()

    def _require(self) -> Any:
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not started (await start() first)")
        return self._pool

    # -- idempotency -----------------------------------------------------------------

    async def is_processed(self, function: str, event_id: str) -> bool:
        return event_id in await self.processed_many(function, [event_id])

    async def processed_many(self, function: str, event_ids: Sequence[str]) -> set[str]:
        """Which of ``event_ids`` ``function`` has processed already (one query, or none
        for events whose claim by a transport on this database looked it up)."""
        seen, ask = self._seen_at_claim(function, event_ids)
        if not ask:
            return seen
        try:
            rows = await self._require().fetch(_PROCESSED_MANY, function, text_array(ask))
        except _ERRORS as exc:
            raise StoreError(f"idempotency check on {self._where}: {exc}") from None
        return seen | {r[0] for r in rows}

    def _seen_at_claim(self, function: str, event_ids: Sequence[str]) -> tuple[set[str], list[str]]:
        """(processed, still to ask) from what the claims of the held deliveries of
        these events said about this store (``PostgresTransport.note_processed_in``).
        Each answer is used once: the runtime checks a batch right after fetching it;
        a later question about the same event asks the database."""
        brokers = self._brokers()
        if not brokers:
            return set(), list(event_ids)
        seen: set[str] = set()
        ask: list[str] = []
        for event_id in event_ids:
            delivery: Any = None
            for transport in brokers:
                delivery = transport.claimed(function, event_id)
                if delivery is not None:
                    break
            noted = None if delivery is None else delivery.processed
            if noted is None or noted[0] != self.schema:
                ask.append(event_id)
                continue
            delivery.processed = None
            if noted[1]:
                seen.add(event_id)
        return seen, ask

    async def records_due(self) -> None:
        """Records commit as they come here (no commit interval): nothing to wait for
        (:meth:`SqliteStore.records_due <nerve.store.sqlite.SqliteStore.records_due>`)."""

    async def commit_records(
        self, items: Sequence[tuple[str, str, list[bytes]]]
    ) -> list[list[int] | None]:
        """Record many (function, event id, outbox) as processed in one transaction.
        Returns, per item, its outbox row ids, or None if it had been processed already.

        The deliveries of these events that a ``postgresql://`` transport of this process
        holds on the same database are acked in the same statement (:meth:`_brokers`):
        records and acks commit together or not at all. An item whose delivery's lease
        was lost is not recorded (None; the delivery's ack then reports the lost lease).
        """
        rows = list(items)
        if not rows:
            return []
        shared = self._claimed([(function, event_id) for function, event_id, _ in rows])
        out: list[list[int] | None] = []
        settled: list[tuple[Any, list[Any], list[bool]]] = []
        try:
            async with self._require().acquire() as conn:
                if len(rows) <= self._max_batch:  # one statement: its own transaction
                    out, settled = await _commit(conn, rows, shared)
                else:
                    async with conn.transaction():
                        for start in range(0, len(rows), self._max_batch):
                            part = rows[start : start + self._max_batch]
                            mine = {
                                i - start: v
                                for i, v in shared.items()
                                if start <= i < start + len(part)
                            }
                            ids, acks = await _commit(conn, part, mine)
                            out += ids
                            settled += acks
        except _ERRORS as exc:
            raise StoreError(f"commit on {self._where}: {exc}") from None
        for transport, deliveries, acked in settled:
            transport.settled_within(deliveries, acked)
        return out

    def _brokers(self) -> list[Any]:
        """The ``postgresql://`` transports started in this process (and event loop) on
        this store's database, as the same role: their deliveries are acked inside this
        store's transactions. A process-wide look-up, so that the runtime need not
        introduce the two (it hands the store only (function, event id))."""
        from nerve.transport.postgres import database_of, transports_on

        if self._database is None:
            self._database = database_of(self._dsn)
        found = transports_on(self._database)
        if self._pool is not None:  # started: its tables exist for their claims to read
            for transport in found:
                if transport.processed_in is None:
                    transport.note_processed_in(self.schema)
        return found

    def _claimed(self, keys: Sequence[tuple[str, str]]) -> dict[int, tuple[Any, Any]]:
        """Index of each key -> (transport, delivery) for the deliveries of these
        (function, event id) that a transport on this database holds."""
        brokers = self._brokers()
        found: dict[int, tuple[Any, Any]] = {}
        if not brokers:
            return found
        taken: set[int] = set()
        for index, (function, event_id) in enumerate(keys):
            for transport in brokers:
                delivery = transport.claimed(function, event_id)
                if delivery is not None and id(delivery) not in taken:
                    taken.add(id(delivery))
                    found[index] = (transport, delivery)
                    break
        return found

    def unit(self, function: str, event_id: str) -> PostgresUnit:
        return PostgresUnit(self, function, event_id)

    # -- outbox ----------------------------------------------------------------------

    async def outbox_cleared(self, ids: Sequence[int]) -> None:
        """The outbox rows ``ids`` have been published: forget them (batched)."""
        for i in ids:
            await self._outbox_deletes.submit(i)

    async def _delete_outbox(self, ids: list[int]) -> list[None]:
        try:
            await self._require().execute(
                "DELETE FROM nerve_outbox WHERE id = ANY($1::bigint[])", ids
            )
        except _ERRORS as exc:
            raise StoreError(f"outbox on {self._where}: {exc}") from None
        return [None] * len(ids)

    async def outbox_pending(self, older_than: float, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Outbox rows left behind by a crash between commit and publish."""
        rows = await self.query(
            "SELECT id, body FROM nerve_outbox WHERE created_at < ? ORDER BY id LIMIT ?",
            (time.time() - older_than, limit),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    async def prune_processed(self, older_than: float) -> int:
        """Forget idempotency records older than ``older_than`` seconds."""
        try:
            status = await self._require().execute(
                "DELETE FROM nerve_processed WHERE processed_at < $1", time.time() - older_than
            )
        except _ERRORS as exc:
            raise StoreError(f"prune on {self._where}: {exc}") from None
        return _count(status)

    async def query(self, sql: str, params: Params = ()) -> list[Any]:
        """Read committed data (for tools, tests and invariant checks)."""
        try:
            return list(await self._require().fetch(to_postgres(sql), *_args(params)))
        except _ERRORS as exc:
            raise StoreError(str(exc)) from None


_COMMIT = """
WITH {acks}{sep}
ok AS ({acked}),
input AS (
    SELECT * FROM unnest($1::text::text[], $2::text::text[], $3::text::int[], $4::text::bigint[])
    WITH ORDINALITY AS i(function, event_id, b, seq, n)),
keep AS (SELECT * FROM input WHERE b IS NULL OR n = ANY(ARRAY(SELECT n FROM ok))),
rec AS (
    INSERT INTO nerve_processed (function, event_id, processed_at)
    SELECT function, event_id, $5 FROM keep ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING function, event_id),
done AS (SELECT k.n FROM keep k JOIN rec r USING (function, event_id)),
ob AS (
    INSERT INTO nerve_outbox (body, created_at)
    SELECT o.body, $5 FROM unnest($6::bytea[], $7::text::int[]) WITH ORDINALITY AS o(body, item, k)
    WHERE o.item IN (SELECT n FROM done)
    ORDER BY o.k
    RETURNING id)
SELECT (SELECT coalesce(array_agg(n), '{{}}') FROM done),
       (SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM ob),
       (SELECT coalesce(array_agg(n), '{{}}') FROM ok)
"""
"""Record items as processed, stage their outbox rows, and ack their deliveries (the CTEs
each broker gives, ``acks``), in one statement: items 1..N in ``$1`` (function), ``$2``
(event id), ``$3`` (index of the broker holding its delivery, or NULL), ``$4`` (the
delivery's seq); ``$5`` now; ``$6``/``$7`` outbox bodies and their item (the integer and
text columns as array literals: :func:`nerve._postgres.int_array`, ``text_array``). An item whose
delivery was not acked (lease lost) is not recorded."""


async def _commit(
    conn: Any,
    items: Sequence[tuple[str, str, list[bytes]]],
    shared: dict[int, tuple[Any, Any]],
) -> tuple[list[list[int] | None], list[tuple[Any, list[Any], list[bool]]]]:
    """One statement for :meth:`PostgresStore.commit_records` and a unit's commit.

    Returns, per item, its outbox row ids or None (processed already, or earlier in
    ``items``, or its lease lost), and per broker, (transport, deliveries, acked) for
    ``settled_within`` once the transaction has committed."""
    # (written for the usual batch: distinct events, one broker, no outbox rows)
    first: set[tuple[str, str]] = set()
    unique: list[int] = []
    functions: list[str] = []
    event_ids: list[str] = []
    for n, (function, event_id, _) in enumerate(items):
        key = (function, event_id)
        if key not in first:
            first.add(key)
            unique.append(n)
            functions.append(function)
            event_ids.append(event_id)
    brokers: list[Any] = []
    held: list[list[tuple[int, Any]]] = []  # per broker: (item position, delivery)
    b_col: list[int | None] = []
    seq_col: list[int | None] = []
    bodies: list[bytes] = []
    owners: list[int] = []
    for position, n in enumerate(unique, start=1):
        found = shared.get(n)
        if found is None:
            b_col.append(None)
            seq_col.append(None)
        else:
            transport, delivery = found
            if brokers and brokers[0] is transport:
                b = 0
            elif transport in brokers:
                b = brokers.index(transport)
            else:
                b = len(brokers)
                brokers.append(transport)
                held.append([])
            held[b].append((position, delivery))
            b_col.append(b)
            seq_col.append(delivery.seq)
        outbox = items[n][2]
        if outbox:
            bodies += outbox
            owners += [position] * len(outbox)
    ctes = [t.ack_ctes(f"acked{b}", 8 + 4 * b) for b, t in enumerate(brokers)]
    union = " UNION ALL ".join(f"SELECT tag AS n FROM acked{b}" for b in range(len(brokers)))
    sql = _COMMIT.format(
        acks=",\n".join(ctes),
        sep="," if ctes else "",
        acked=union or "SELECT NULL::int AS n WHERE false",
    )
    args: list[Any] = [
        text_array(functions),
        text_array(event_ids),
        int_array(b_col),
        int_array(seq_col),
        time.time(),
        bodies,
        int_array(owners),
    ]
    for b, transport in enumerate(brokers):
        args += transport.ack_args([d for _, d in held[b]], [p for p, _ in held[b]])
    recorded, ids, acked_items = await conn.fetchrow(sql, *args)
    new = set(recorded)
    next_ids = iter(sorted(ids))
    out: list[list[int] | None] = [None] * len(items)
    for position, n in enumerate(unique, start=1):
        if position in new:  # outbox ids follow the items' order (one sorted insert)
            outbox = items[n][2]
            out[n] = [next(next_ids) for _ in outbox] if outbox else []
    acked = set(acked_items)
    settled = [
        (transport, [d for _, d in held[b]], [p in acked for p, _ in held[b]])
        for b, transport in enumerate(brokers)
    ]
    return out, settled


class PostgresUnit:
    """``ctx.store`` on PostgreSQL: the handler's transaction on a pooled connection,
    opened at the first call, committed with the idempotency record."""

    __slots__ = ("_conn", "_store", "_tx", "event_id", "function")

    def __init__(self, store: PostgresStore, function: str, event_id: str) -> None:
        self._store = store
        self.function = function
        self.event_id = event_id
        self._conn: Any = None
        self._tx: Any = None

    @property
    def active(self) -> bool:
        """True once the handler used the store: the unit holds a connection."""
        return self._conn is not None

    async def _connection(self) -> Any:
        if self._conn is None:
            pool = self._store._require()
            try:
                conn = await pool.acquire()
            except _ERRORS as exc:
                raise StoreError(f"cannot reach {self._store._where}: {exc}") from None
            try:
                tx = conn.transaction()
                await tx.start()
            except BaseException:
                await pool.release(conn)
                raise
            self._conn, self._tx = conn, tx
        return self._conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        conn = await self._connection()
        try:
            return _count(await conn.execute(to_postgres(sql), *_args(params)))
        except _ERRORS as exc:
            raise StoreError(str(exc)) from None

    async def executemany(self, sql: str, rows: Sequence[Params]) -> int:
        return sum([await self.execute(sql, row) for row in rows])

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        conn = await self._connection()
        try:
            return list(await conn.fetch(to_postgres(sql), *_args(params)))
        except _ERRORS as exc:
            raise StoreError(str(exc)) from None

    async def fetchone(self, sql: str, params: Params = ()) -> Any:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Params = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    # -- used by the runtime -------------------------------------------------------

    async def commit(self, outbox: Sequence[bytes]) -> list[int] | None:
        """Commit the unit with its idempotency record and outbox rows; durable on return.

        Returns the outbox row ids, or None if the event had been processed already
        (a concurrent duplicate): then the unit's writes are rolled back.
        """
        if self._conn is None:
            return await self._store._light.submit((self.function, self.event_id, list(outbox)))
        shared = self._store._claimed([(self.function, self.event_id)])
        settled: list[tuple[Any, list[Any], list[bool]]] = []
        try:
            # the record, the outbox rows and the broker's ack (if shared): one statement
            (ids,), settled = await _commit(
                self._conn, [(self.function, self.event_id, list(outbox))], shared
            )
            if ids is None:
                await self._tx.rollback()
            else:
                await self._tx.commit()
        except _ERRORS as exc:
            await self.rollback()
            raise StoreError(f"commit on {self._store._where}: {exc}") from None
        except BaseException:
            await self.rollback()
            raise
        await self._release()
        for transport, deliveries, acked in settled:
            if ids is not None or not all(acked):
                # committed, or refused for a lost lease; a duplicate whose ack was
                # rolled back with it stays for the runner's ack
                transport.settled_within(deliveries, acked)
        return ids

    async def rollback(self) -> None:
        """Undo the unit's writes (the handler failed)."""
        if self._conn is not None:
            try:
                await self._tx.rollback()
            except _ERRORS:
                pass  # already over, or a broken connection: the server rolls back
            finally:
                await self._release()

    async def _release(self) -> None:
        conn, self._conn, self._tx = self._conn, None, None
        if conn is not None:
            try:  # handlers' SQL may have changed the session (SET, cursors, locks)
                await conn.execute(conn.get_reset_query())
            except _ERRORS:  # broken (asyncpg may have taken it back already)
                with contextlib.suppress(*_ERRORS):
                    conn.terminate()  # the pool replaces it
            await self._store._require().release(conn)
