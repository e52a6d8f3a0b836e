"""The store contract: idempotency records, units of work (ctx.store), concurrent units,
outbox. Every test taking ``store`` or ``store_url`` runs on SQLite and on PostgreSQL
(a schema of its own in database ``test`` on the local server)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from transport.conftest import require_server

from nerve.errors import ConfigError, StoreError
from nerve.store import SqliteStore, default_store_url, store_from_url
from nerve.store.postgres import PostgresStore, to_postgres

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"

Store = SqliteStore | PostgresStore


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    # imported here: the adapter module needs the suite's conftest loaded first
    from transport.adapter_postgres import HOST, PORT, drop_schemas, server_url

    require_server("PostgreSQL", HOST, PORT)
    schema = "nerve_store_t_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    drop_schemas(schema)
    yield server_url(schema)
    drop_schemas(schema)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = store_from_url(store_url)
    await s.start([SCHEMA])
    try:
        yield s
    finally:
        await s.close()


async def table(store: Store) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for r in await store.query("SELECT k, v FROM t ORDER BY k")]


async def test_commit_returns_outbox_ids_and_records_processed(store: Store) -> None:
    unit = store.unit("f", "e1")
    assert await unit.execute("INSERT INTO t VALUES (?, ?)", ("a", 1)) == 1
    ids = await unit.commit([b"first", b"second"])
    assert ids is not None and len(ids) == 2 and ids[0] < ids[1]
    assert await store.is_processed("f", "e1")
    assert not await store.is_processed("g", "e1")
    assert not await store.is_processed("f", "e2")
    assert await table(store) == [("a", 1)]
    assert await store.outbox_pending(older_than=0) == [(ids[0], b"first"), (ids[1], b"second")]


async def test_commit_without_store_writes(store: Store) -> None:
    ids = await store.unit("f", "light").commit([b"x"])
    assert ids is not None and len(ids) == 1
    assert await store.unit("f", "light-empty").commit([]) == []
    assert await store.is_processed("f", "light")
    assert await store.is_processed("f", "light-empty")
    assert await store.outbox_pending(older_than=0) == [(ids[0], b"x")]


async def test_second_commit_for_the_same_event_is_refused_and_rolled_back(
    store: Store,
) -> None:
    first = store.unit("f", "e1")
    await first.execute("INSERT INTO t VALUES ('a', 1)")
    assert await first.commit([b"one"]) is not None

    again = store.unit("f", "e1")
    await again.execute("INSERT INTO t VALUES ('b', 2)")
    await again.execute("UPDATE t SET v = 99 WHERE k = 'a'")
    assert await again.commit([b"two"]) is None
    assert await table(store) == [("a", 1)]
    assert [body for _, body in await store.outbox_pending(older_than=0)] == [b"one"]

    assert await store.unit("f", "e1").commit([b"three"]) is None  # light path too
    assert [body for _, body in await store.outbox_pending(older_than=0)] == [b"one"]

    other = store.unit("g", "e1")  # another function may process the same event
    await other.execute("INSERT INTO t VALUES ('c', 3)")
    assert await other.commit([]) == []
    assert await table(store) == [("a", 1), ("c", 3)]


async def test_rollback_undoes_writes(store: Store) -> None:
    unit = store.unit("f", "e1")
    await unit.execute("INSERT INTO t VALUES ('a', 1)")
    await unit.executemany("INSERT INTO t VALUES (?, ?)", [("b", 2), ("c", 3)])
    assert await unit.fetchval("SELECT count(*) FROM t") == 3  # sees its own writes
    await unit.rollback()
    assert await table(store) == []
    assert not await store.is_processed("f", "e1")
    retry = store.unit("f", "e1")
    await retry.execute("INSERT INTO t VALUES ('a', 2)")
    assert await retry.commit([]) == []
    assert await table(store) == [("a", 2)]
    await store.unit("f", "unused").rollback()  # rolling back an unused unit is harmless


async def test_uncommitted_writes_are_invisible_to_readers(store: Store) -> None:
    unit = store.unit("f", "e1")
    await unit.execute("INSERT INTO t VALUES ('a', 1)")
    row = await unit.fetchone("SELECT k, v FROM t")
    assert row is not None and tuple(row) == ("a", 1)
    assert [tuple(r) for r in await unit.fetchall("SELECT k FROM t")] == [("a",)]
    assert await table(store) == []
    assert not await store.is_processed("f", "e1")
    await unit.commit([])
    assert await table(store) == [("a", 1)]  # durable and visible once commit returns


async def test_sql_errors_become_store_errors_and_the_unit_can_roll_back(
    store: Store,
) -> None:
    unit = store.unit("f", "e1")
    await unit.execute("INSERT INTO t VALUES ('a', 1)")
    with pytest.raises(StoreError):
        await unit.execute("INSERT INTO t VALUES ('a', 2)")  # primary key conflict
    with pytest.raises(StoreError):
        await unit.execute("SELECT * FROM no_such_table")
    await unit.rollback()
    assert await table(store) == []
    ok = store.unit("f", "e2")
    await ok.execute("INSERT INTO t VALUES ('a', 3)")
    assert await ok.commit([]) == []
    assert await table(store) == [("a", 3)]


async def test_concurrent_units_are_group_committed(store: Store) -> None:
    async def work(i: int) -> list[int] | None:
        unit = store.unit("f", f"e{i}")
        await asyncio.sleep(0)
        await unit.execute("INSERT INTO t VALUES (?, ?)", (f"k{i:02d}", i))
        ids = await unit.commit([f"out{i}".encode()])
        # a returned commit is committed: another connection sees it at once
        assert await store.query("SELECT v FROM t WHERE k = ?", (f"k{i:02d}",)) != []
        assert await store.is_processed("f", f"e{i}")
        return ids

    results = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(50))), 20)
    assert all(r is not None and len(r) == 1 for r in results)
    outbox_ids = [r[0] for r in results if r is not None]
    assert len(set(outbox_ids)) == 50
    assert await table(store) == [(f"k{i:02d}", i) for i in range(50)]
    checks = await asyncio.gather(*(store.is_processed("f", f"e{i}") for i in range(50)))
    assert all(checks)
    pending = dict(await store.outbox_pending(older_than=0))
    assert {outbox_ids[i]: f"out{i}".encode() for i in range(50)} == pending


async def test_rollbacks_in_a_group_commit_undo_only_their_own_unit(store: Store) -> None:
    async def work(i: int) -> list[int] | None:
        unit = store.unit("f", f"e{i}")
        await unit.execute("INSERT INTO t VALUES (?, ?)", (f"k{i:02d}", i))
        if i % 5 == 0:
            await unit.rollback()
            return None
        return await unit.commit([])

    light = [store.unit("g", f"l{i}").commit([b"l"]) for i in range(20)]
    await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(50)), *light), 20)
    assert await table(store) == [(f"k{i:02d}", i) for i in range(50) if i % 5]
    checks = await asyncio.gather(*(store.is_processed("f", f"e{i}") for i in range(50)))
    assert checks == [bool(i % 5) for i in range(50)]
    assert all(await asyncio.gather(*(store.is_processed("g", f"l{i}") for i in range(20))))


async def test_concurrent_duplicates_commit_once(store: Store) -> None:
    async def work(i: int) -> list[int] | None:
        unit = store.unit("f", "same")
        await unit.execute("INSERT INTO t VALUES (?, ?)", (f"k{i}", i))
        return await unit.commit([b"x"])

    results = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(10))), 20)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert len(await table(store)) == 1
    assert len(await store.outbox_pending(older_than=0)) == 1


async def test_outbox_pending_and_cleared(store: Store) -> None:
    ids = []
    for i in range(5):
        got = await store.unit("f", f"e{i}").commit([f"b{i}".encode()])
        assert got is not None
        ids.extend(got)
    assert [i for i, _ in await store.outbox_pending(older_than=0)] == ids
    assert await store.outbox_pending(older_than=60) == []  # none is stale yet
    assert [i for i, _ in await store.outbox_pending(older_than=0, limit=2)] == ids[:2]
    await store.outbox_cleared(ids[:3])
    assert await store.outbox_pending(older_than=0) == [(ids[3], b"b3"), (ids[4], b"b4")]
    await store.outbox_cleared(ids[3:])
    assert await store.outbox_pending(older_than=0) == []
    await store.outbox_cleared([])


async def test_prune_processed(store: Store) -> None:
    for i in range(3):
        await store.unit("f", f"e{i}").commit([])
    assert await store.prune_processed(older_than=3600) == 0
    assert await store.is_processed("f", "e0")
    await asyncio.sleep(0.01)
    assert await store.prune_processed(older_than=0) == 3
    assert not any(await asyncio.gather(*(store.is_processed("f", f"e{i}") for i in range(3))))
    assert await store.unit("f", "e0").commit([]) == []  # may be processed again


async def test_data_survives_reopening(store_url: str) -> None:
    first = store_from_url(store_url)
    await first.start([SCHEMA])
    unit = first.unit("f", "e1")
    await unit.execute("INSERT INTO t VALUES ('a', 1)")
    ids = await unit.commit([b"keep me"])
    await first.close()

    second = store_from_url(store_url)
    await second.start([SCHEMA])  # the DDL is idempotent
    try:
        assert await second.is_processed("f", "e1")
        assert await table(second) == [("a", 1)]
        assert ids is not None
        assert await second.outbox_pending(older_than=0) == [(ids[0], b"keep me")]
        assert await second.unit("f", "e1").commit([]) is None
    finally:
        await second.close()


async def test_memory_store() -> None:
    store = SqliteStore("memory://")
    await store.start([SCHEMA])
    try:
        unit = store.unit("f", "e1")
        await unit.execute("INSERT INTO t VALUES ('a', 1)")
        assert await unit.commit([b"x"]) is not None
        assert await store.is_processed("f", "e1")
        assert await table(store) == [("a", 1)]
        assert await store.unit("f", "e1").commit([]) is None
    finally:
        await store.close()


@pytest.mark.parametrize(
    "bad", ["postgres://localhost/db", "sqlite://host/store.db", "sqlite:///", "store.db"]
)
def test_bad_store_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        SqliteStore(bad)


def test_default_store_url() -> None:
    assert default_store_url("sqlite:///.nerve/nerve.db") == "sqlite:///.nerve/store.db"
    assert default_store_url("sqlite:////var/lib/n/nerve.db") == "sqlite:////var/lib/n/store.db"
    assert default_store_url("memory://") == "memory://"
    # a postgresql:// broker's store is in its database, beside its schema, so that
    # records and acks share a transaction (tests/transport/test_postgres_specific.py)
    url = "postgresql://u:pw@db:6543/shop?schema=orders&visibility_timeout=3&sslmode=require"
    assert default_store_url(url) == (
        "postgresql://u:pw@db:6543/shop?schema=orders_store&sslmode=require"
    )
    assert default_store_url("postgres://db/shop") == "postgresql://db/shop?schema=nerve_store"
    store = store_from_url(default_store_url(url))
    assert isinstance(store, PostgresStore) and store.schema == "orders_store"
    under = store_from_url("postgresql://h/db?schema=_under&application_name=x")
    assert isinstance(under, PostgresStore) and under.schema == "_under"


def test_postgres_store_urls_and_placeholders() -> None:
    assert isinstance(store_from_url("postgresql://u@h/db?schema=s"), PostgresStore)
    for bad in ("postgresql://h/db?nope=1", "postgresql://h/db?schema=a-b", "redis://h"):
        with pytest.raises(ConfigError):
            PostgresStore(bad)
    with pytest.raises(ConfigError) as caught:
        PostgresStore("postgresql://u:hunter2@h/db?pool_size=0")
    assert "hunter2" not in str(caught.value)
    assert to_postgres("SELECT '?', \"a?\" FROM t WHERE k = ? AND v > ?") == (
        "SELECT '?', \"a?\" FROM t WHERE k = $1 AND v > $2"
    )


async def test_commit_records_in_one_batch_refuses_repeats_and_earlier_records(
    store: Store,
) -> None:
    """One call records many light units: an event recorded before, or twice in the same
    batch, gets None (the first copy wins); the others get their outbox row ids."""
    assert await store.commit_records([("f", "old", [])]) == [[]]
    results = await store.commit_records(
        [
            ("f", "new", [b"a"]),
            ("f", "old", [b"lost"]),
            ("f", "new", [b"again"]),
            ("g", "new", []),
        ]
    )
    assert results[1] is None and results[2] is None
    first = results[0]
    assert first is not None and len(first) == 1
    assert results[3] == []
    assert await store.is_processed("f", "new") and await store.is_processed("g", "new")
    assert await store.outbox_pending(older_than=0) == [(first[0], b"a")]


async def test_commit_records_of_one_function_without_outbox(
    store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner's usual batch: one function's records, no outbox rows (on SQLite one
    statement that commits by itself). An event recorded before, by this store or by
    another process's store on the same database, or twice in the batch, gets None;
    the others get [] and are recorded."""
    if isinstance(store, SqliteStore):  # the one-statement path, not the transaction's

        def refuse(*_: Any) -> None:
            raise AssertionError("a batch of light records took the transaction path")

        monkeypatch.setattr("nerve.store.sqlite._record_many", refuse)
    assert await store.commit_records([("f", "old", [])]) == [[]]
    other = store_from_url(store_url)
    await other.start([SCHEMA])
    try:
        assert await other.commit_records([("f", "theirs", [])]) == [[]]
    finally:
        await other.close()
    batch = [("f", e, []) for e in ("a", "old", "theirs", "a", "b")]
    assert await store.commit_records(batch) == [[], None, None, None, []]
    for event_id in ("a", "b", "old", "theirs"):
        assert await store.is_processed("f", event_id)
    assert not await store.is_processed("g", "a")
    assert await store.commit_records([("f", e, []) for e in ("c", "d")]) == [[], []]


async def test_a_units_session_changes_do_not_outlive_it(store_url: str) -> None:
    """A handler's SQL may change its connection's session (SET without LOCAL): the
    next user of that pooled connection starts from the defaults again."""
    if not store_url.startswith("postgresql"):
        pytest.skip("session settings are PostgreSQL's (SQLite has one connection)")
    store = store_from_url(store_url + "&pool_size=1")  # one connection: reused for sure
    await store.start([SCHEMA])
    try:
        unit = store.unit("f", "e1")
        await unit.execute("SET statement_timeout = '42s'")
        await unit.fetchval("SELECT pg_advisory_lock(4242)")  # a session-level lock
        assert await unit.commit([]) == []
        assert await store.commit_records([("f", "e2", [])]) == [[]]
        again = store.unit("f", "e3")
        assert await again.fetchval("SELECT current_setting('statement_timeout')") == "0"
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
        assert await again.fetchval(held) == 0
        await again.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
        assert await again.commit([]) == []
        assert await store.processed_many("f", ["e1", "e2", "e3"]) == {"e1", "e2", "e3"}
    finally:
        await store.close()


async def test_an_sqlite_too_old_for_nerve_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from nerve.errors import TransportError
    from nerve.transport.sqlite import SqliteTransport

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(TransportError, match=r"needs SQLite 3\.35 or later .* uses 3\.34\.1"):
        await SqliteTransport(f"sqlite:///{tmp_path}/nerve.db").start()
    with pytest.raises(StoreError, match=r"the SQLite store needs SQLite 3\.35"):
        await SqliteStore(f"sqlite:///{tmp_path}/store.db").start()


async def test_small_idempotency_checks_read_on_the_loop_and_fall_back_to_the_thread(
    tmp_path: Path,
) -> None:
    """Checks of up to INLINE_READ ids read on the loop's own connection, larger ones
    in the reader thread, and a failing inline read goes to the thread: the answers
    are the same either way, including records committed just before."""
    from nerve.store import sqlite as sqlite_store

    store = store_from_url(f"sqlite:///{tmp_path}/store.db")
    assert isinstance(store, SqliteStore)
    await store.start()
    try:
        assert store._inline is not None
        done = [f"e{i}" for i in range(0, 40, 2)]
        await store.commit_records([("f", e, []) for e in done])
        small = ["e0", "e1", "e2"]
        large = [f"e{i}" for i in range(sqlite_store.INLINE_READ + 44)]
        assert len(small) <= sqlite_store.INLINE_READ < len(large)
        reads: list[str] = []
        inline, call = store._inline, store._reader.call

        class Counted:  # the inline connection, counting its statements
            def execute(self, *args: Any) -> Any:
                reads.append("inline")
                return inline.execute(*args)

        async def counted_call(fn: Any) -> Any:
            reads.append("thread")
            return await call(fn)

        store._inline = Counted()  # type: ignore[assignment]
        store._reader.call = counted_call  # type: ignore[method-assign]
        assert await store.processed_many("f", small) == {"e0", "e2"}
        assert await store.processed_many("f", large) == set(done)
        assert reads == ["inline", "thread"]
        await store.commit_records([("f", "e1", [])])  # seen at once by the next check
        assert await store.processed_many("f", small) == {"e0", "e1", "e2"}
        inline.close()  # every inline read now fails: the thread answers
        reads.clear()
        assert await store.processed_many("f", small) == {"e0", "e1", "e2"}
        assert reads == ["inline", "thread"]
        store._inline = inline
    finally:
        await store.close()


async def test_many_openers_of_one_new_database_all_succeed(tmp_path: Path) -> None:
    """Processes starting together (two workers of one app) open the same new SQLite
    files at once. Switching a new file to WAL takes an exclusive lock without SQLite's
    busy handler, so without a retry one opener in ~15 got "database is locked" (the
    schema registry failed this way in CI). Threads race the same way as processes."""
    import threading

    from nerve._sqlite import connect
    from nerve.http.auth import KeyStore
    from nerve.schema.registry import SqliteSchemaStorage

    def open_one(kind: int, path: str, start: threading.Barrier, errors: list[Exception]) -> None:
        start.wait()
        try:
            if kind == 0:
                connect(path).close()
            elif kind == 1:
                KeyStore(path).close()
            else:
                storage = SqliteSchemaStorage(path)
                asyncio.run(storage.start())
                asyncio.run(storage.close())
        except Exception as exc:
            errors.append(exc)

    for round_ in range(40):
        path = str(tmp_path / f"db{round_}.db")
        start = threading.Barrier(6)
        errors: list[Exception] = []
        threads = [
            threading.Thread(target=open_one, args=(n % 3, path, start, errors)) for n in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [], f"round {round_}: {errors}"


async def test_records_join_a_transaction_left_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records that come while a unit holds the write turn wait for it; the unit leaves
    its transaction open for them (someone waits), and they join it instead of
    committing alone: one COMMIT for both, which each returns only after."""

    def refuse(*_: Any) -> None:
        raise AssertionError("the records committed alone beside an open transaction")

    monkeypatch.setattr("nerve.store.sqlite._record_alone", refuse)
    store = SqliteStore(f"sqlite:///{tmp_path}/store.db")
    store._max_batch_age = 60.0  # (a slow machine must not commit the unit for its age)
    await store.start([SCHEMA])
    try:
        unit = store.unit("f", "e1")
        assert await unit.execute("INSERT INTO t VALUES (?, ?)", ("a", 1)) == 1  # the turn
        records = asyncio.create_task(store.commit_records([("g", "e2", [])]))
        await asyncio.sleep(0.05)
        assert not records.done()  # waiting for the turn
        assert await unit.commit([]) == []
        assert await records == [[]]
        assert await store.is_processed("f", "e1") and await store.is_processed("g", "e2")
        assert await table(store) == [("a", 1)]
    finally:
        await store.close()


async def test_records_commit_at_most_once_per_commit_interval(tmp_path: Path) -> None:
    """commit_records waits out the rest of ``commit_interval`` after the last commit
    began (at low rates a handled event would otherwise fsync on its own), except for
    records with emitted events, and the records stay exact; the URL option sets it, a
    bad value is refused by name."""
    from nerve.store import sqlite as sqlite_store

    store = SqliteStore(f"sqlite:///{tmp_path}/store.db?commit_interval=0.5")
    await store.start()
    try:
        loop = asyncio.get_running_loop()
        first = loop.time()
        assert await store.commit_records([("f", "e1", [])]) == [[]]
        began = loop.time()
        assert await store.commit_records([("f", "e2", [])]) == [[]]
        assert loop.time() - first >= 0.5  # the second waited for the interval
        assert began - first < 0.25  # (the first did not)
        # emitted events are published after their commit: it does not wait for them
        second = loop.time()
        assert await store.commit_records([("f", "e3", [b"x"])]) == [[1]]
        assert loop.time() - second < 0.25  # (it would have waited about 0.5 s)
        assert await store.commit_records([("f", "e1", [])]) == [None]  # a repeat
        assert await store.processed_many("f", ["e1", "e2", "e3", "e4"]) == {"e1", "e2", "e3"}
    finally:
        await store.close()
    assert SqliteStore(f"sqlite:///{tmp_path}/s.db")._commit_interval == (
        sqlite_store.COMMIT_INTERVAL
    )
    assert SqliteStore("memory://")._commit_interval == 0.0  # no fsync to spare
    assert SqliteStore(f"sqlite:///{tmp_path}/s.db", commit_interval=0)._commit_interval == 0
    for bad in ("-1", "2", "soon"):
        with pytest.raises(ConfigError, match="commit_interval is in seconds, from 0 to 1"):
            SqliteStore(f"sqlite:///{tmp_path}/s.db?commit_interval={bad}")
