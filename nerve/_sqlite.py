"""A SQLite connection on its own thread, with group commit.

Python's sqlite3 blocks; a commit with ``synchronous=FULL`` waits for an fsync. So
each database gets one worker thread owning one connection, and the event loop hands
it work:

- :meth:`Worker.write` runs a function inside a write transaction *shared* with every
  other write queued meanwhile (group commit): one fsync for the whole batch. Each
  function runs under its own SAVEPOINT, so one failing does not undo the others. The
  caller's future resolves only after COMMIT, so a returned write is durable.
- :meth:`Worker.call` runs a function as-is (no transaction management), for callers
  that manage their own transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nerve.errors import StoreError

T = TypeVar("T")

MAX_BATCH = 1024


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    in_transaction: bool
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Stop:
    done: threading.Event = field(default_factory=threading.Event)


def connect(
    path: str, *, synchronous: str = "FULL", busy_timeout: float = 30.0
) -> sqlite3.Connection:
    """Open a connection with nerve's settings: WAL, the given sync level, autocommit."""
    if path != ":memory:" and not path.startswith("file:"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=busy_timeout,
        uri=path.startswith("file:"),
    )
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    if path != ":memory:":
        # Switching a new file to WAL takes an exclusive lock without calling the busy
        # handler: processes opening the same new file at once get "database is
        # locked" at once, so retry here.
        mode = retry_busy(
            lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0], max(busy_timeout, 5.0)
        )
        if str(mode).lower() != "wal" and "mode=memory" not in path:
            raise StoreError(f"{path}: could not switch SQLite to WAL mode (got {mode})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def require_features(conn: sqlite3.Connection, who: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``who`` if this SQLite cannot run nerve's statements:
    ``RETURNING`` (3.35) and the JSON functions (built in since 3.38)."""
    if sqlite3.sqlite_version_info < (3, 35, 0):
        raise error(
            f"{who} needs SQLite 3.35 or later (RETURNING); this Python's sqlite3 module "
            f"uses {sqlite3.sqlite_version}"
        )
    try:
        conn.execute("SELECT json_group_array(json_array(1))").fetchall()
    except sqlite3.OperationalError:
        raise error(
            f"{who} needs SQLite's JSON functions; SQLite {sqlite3.sqlite_version} was "
            "built without them (they are built in since 3.38)"
        ) from None


def begin_immediate(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
    """BEGIN IMMEDIATE, retrying a busy database with microsecond-scale backoff.

    SQLite's own busy handler sleeps 1, 2, 5, 10, ... ms between tries; with several
    processes committing hundreds of times a second that turns every collision into
    milliseconds of latency. Writer connections therefore run with busy_timeout=0 and
    retry here instead, starting at 20 microseconds.
    """
    execute_write(conn, "BEGIN IMMEDIATE", (), timeout)


def execute_write(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any], timeout: float = 30.0
) -> int:
    """Run one writing statement, retrying a busy database as :func:`begin_immediate`
    does; returns its row count.

    Outside a transaction the statement is a transaction of its own: SQLite takes the
    write lock, writes, commits and lets go inside one C call. That is the cheapest
    way to hold the lock from Python: between two steps of a longer transaction the
    worker thread must take the GIL back, which can mean waiting for a busy event
    loop thread (up to the interpreter's switch interval, 5 ms), while every other
    process's writers wait for the lock."""
    return retry_busy(lambda: conn.execute(sql, params).rowcount, timeout)


_MAX_BACKOFF = 0.0001
"""Longest sleep between two tries for the write lock, in seconds.

SQLite's lock is not fair: nobody queues for it, whoever tries right after it is let
go gets it. A publisher committing event after event lets go of it for well under
0.1 ms between its transactions, so a writer that sleeps 1 ms between tries (as this
did) can miss gap after gap: a consumer's lease waited up to 30 ms behind a producer
publishing 1,000 events/s, one transaction each (probe in the embedded latency
benchmark). Retrying every 0.1 ms at most catches a gap within a few tries; a waiting
thread costs about an eighth of a core while it waits (measured: 0.26 s of CPU over a
2 s wait)."""


def retry_busy(fn: Callable[[], T], timeout: float) -> T:
    """``fn()``, retried while SQLite says the database is locked or busy, with a
    backoff from 20 to 100 microseconds (``_MAX_BACKOFF``), for up to ``timeout``
    seconds."""
    delay = 0.00002
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, _MAX_BACKOFF)


class Checkpointer(threading.Thread):
    """Moves WAL pages into the database file off the write path.

    With SQLite's automatic checkpoints, whichever commit crosses the threshold pays for
    copying pages and an fsync of the database file: a latency spike for that caller.
    Writer connections instead leave checkpoints to this thread (PASSIVE: it never
    blocks writers), keeping a large automatic threshold only as a safety valve.
    """

    def __init__(self, path: str, every: float = 0.1) -> None:
        super().__init__(name=f"nerve-checkpoint:{path}", daemon=True)
        self._path = path
        self._every = every
        self._halt = threading.Event()

    def run(self) -> None:
        conn = connect(self._path, synchronous="FULL")
        try:
            version = -1
            while not self._halt.wait(self._every):
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    version = current
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._halt.set()


class Worker:
    """One SQLite connection served by one thread."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
        name: str = "",
        error: type[Exception] = StoreError,
        writer: bool = True,
    ) -> None:
        self.path = path
        self._error = error
        self._writer = writer and path != ":memory:"
        self._checkpointer: Checkpointer | None = None
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._name = name or f"nerve-sqlite:{path}"
        self._queue: queue.SimpleQueue[_Job | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.commits = 0
        self.writes = 0

    async def start(self, setup: Callable[[sqlite3.Connection], object] | None = None) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                self._conn = connect(
                    self.path, synchronous=self._synchronous, busy_timeout=self._busy_timeout
                )
                if setup is not None:
                    setup(self._conn)
                if self._writer:
                    # collisions are retried by begin_immediate; checkpoints by a thread
                    self._conn.execute("PRAGMA busy_timeout=0")
                    self._conn.execute("PRAGMA wal_autocheckpoint=10000")
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle_one, ready, None, exc)
                return
            loop.call_soon_threadsafe(_settle_one, ready, None, None)
            self._serve(self._conn)

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        await ready
        if self._writer:
            self._checkpointer = Checkpointer(self.path)
            self._checkpointer.start()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                conn.close()
                first.done.set()
                return
            batch: list[_Job] = [first]
            stop: _Stop | None = None
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = item
                    break
                batch.append(item)
            self._run_batch(conn, batch)
            if stop is not None:
                conn.close()
                stop.done.set()
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        writes = [job for job in batch if job.in_transaction]
        for job in batch:
            if not job.in_transaction:
                try:
                    job.result = job.fn(conn)
                except BaseException as exc:
                    job.error = exc
        if writes:
            try:
                begin_immediate(conn, self._busy_timeout)
                for job in writes:
                    conn.execute("SAVEPOINT job")
                    try:
                        job.result = job.fn(conn)
                    except BaseException as exc:
                        job.error = exc
                        conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                conn.execute("COMMIT")
                self.commits += 1
                self.writes += len(writes)
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                for job in writes:
                    job.error = self._error(f"{self.path}: commit failed: {exc}")
        for job in batch:
            if isinstance(job.error, sqlite3.Error):
                job.error = self._error(f"{self.path}: {job.error}")
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting
                loop.call_soon_threadsafe(_settle_all, jobs)

    def _submit(
        self, fn: Callable[[sqlite3.Connection], T], in_transaction: bool
    ) -> asyncio.Future[T]:
        if self._thread is None or not self._thread.is_alive():
            raise self._error(f"{self.path}: the database is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, future, loop, in_transaction))
        return future

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` to run as-is; the returned future settles when it has run.
        Unlike :meth:`call`, the work is queued even if the caller is cancelled."""
        return self._submit(fn, False)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a group-committed write transaction; return once durable."""
        return await self._submit(fn, True)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the worker's connection as-is."""
        return await self._submit(fn, False)

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            await asyncio.to_thread(self._checkpointer.join, 5)
            self._checkpointer = None
        if self._thread is None or not self._thread.is_alive():
            return
        stop = _Stop()
        self._queue.put(stop)
        await asyncio.to_thread(stop.done.wait, 30)
        self._thread = None


def _settle_one(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(jobs: list[_Job]) -> None:
    for job in jobs:
        _settle_one(job.future, job.result, job.error)
