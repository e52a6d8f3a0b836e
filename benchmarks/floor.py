"""The sqlite3 floor: the same workloads written directly against ``sqlite3``.

Same durability as the embedded broker (WAL, ``synchronous=FULL`` for publishes;
the consumer's leases and acks commit with ``synchronous=NORMAL``, as the broker's do:
see docs/embedded-broker.md), same process split, same ~500-byte bodies (the encoded
order events), but nothing else: no envelope decoding, no validation, no idempotency
record, no routing, no asyncio.

- Writers take the lock with ``BEGIN IMMEDIATE``, retried every 50 us while another
  process holds it (``--busy spin``, default), or with SQLite's own sleeping busy
  handler (``--busy sqlite``, as nerve's connections do).
- The consumer (``consume``) creates the schema (that is its "ready" signal), then
  loops: claim up to ``BATCH`` rows in one transaction, "handle" them (no-op, or
  record latencies), ack. With ``--claim lease`` (default) the claim is an
  ``UPDATE ... RETURNING`` that sets a lease and the ack a second transaction that
  deletes the rows and bumps ``acked.n`` (at-least-once, as nerve does it); with
  ``--claim delete`` a single ``DELETE ... RETURNING`` claims and acks at once
  (at-most-once, the absolute floor). When the queue is empty it watches ``PRAGMA
  data_version`` (no lock taken) until another connection commits.
- The producer (``produce-throughput``) inserts rows in batches of 100, one
  transaction per batch; ``produce-latency`` is open loop: rows are due at fixed
  times, each transaction inserts the rows that are due (one, while it keeps up),
  and ``sent_at`` is the scheduled time.

Run as ``python -m benchmarks.floor consume DB [--claim lease|delete]`` etc.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import orjson

from benchmarks.peers.common import settle_gc

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY,
    sent_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS acked (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT OR IGNORE INTO acked (id, n) VALUES (1, 0);
"""

CLAIM_LEASE = """
UPDATE queue SET lease_until = :until
WHERE id IN (SELECT id FROM queue WHERE lease_until <= :now ORDER BY id LIMIT :limit)
RETURNING id, sent_at, body
"""
CLAIM_DELETE = """
DELETE FROM queue WHERE id IN (SELECT id FROM queue ORDER BY id LIMIT :limit)
RETURNING id, sent_at, body
"""

MAX_SECONDS = 600.0
"""No process of the floor runs longer than this, whatever happens."""


def connect(path: str, synchronous: str = "FULL", busy: str = "spin") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(SCHEMA)
    if busy == "spin":
        conn.execute("PRAGMA busy_timeout=0")  # :func:`begin` retries instead
    return conn


def begin(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, retried every 50 us while another process writes.

    SQLite's own busy handler (``busy_timeout``) sleeps 1, 2, 5, 10, 15... ms between
    tries, which puts whole milliseconds into the tail whenever two processes want
    the write lock at once; with ``busy_timeout=0`` on the connection this loop
    retries at once instead. (With ``--busy sqlite`` the timeout stays, and SQLite
    waits as it normally would.)
    """
    give_up = time.monotonic() + 30.0
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.00005)


def consume(
    path: str, *, batch: int, claim: str, synchronous: str, busy: str, expect: int, out: str
) -> None:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # leases and acks are not fsynced on their own, as in the embedded broker
    conn = connect(path, "NORMAL" if synchronous in ("FULL", "EXTRA") else synchronous, busy)
    latencies: list[float] = []
    record = bool(out)
    version = conn.execute("PRAGMA data_version").fetchone()[0]
    give_up = time.monotonic() + MAX_SECONDS
    while not stop and time.monotonic() < give_up:
        now = time.time()
        begin(conn)
        if claim == "delete":
            rows = conn.execute(CLAIM_DELETE, {"limit": batch}).fetchall()
            if rows:
                conn.execute("UPDATE acked SET n = n + ? WHERE id = 1", (len(rows),))
        else:
            rows = conn.execute(
                CLAIM_LEASE, {"until": now + 30.0, "now": now, "limit": batch}
            ).fetchall()
        conn.execute("COMMIT")
        if not rows:
            # Empty: wait for another connection's commit, without taking a lock.
            while not stop and time.monotonic() < give_up:
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    version = current
                    break
                time.sleep(0.0002)
            continue
        started = time.time()
        if record:  # the "handler": note how late each row is
            latencies.extend(started - sent_at for _, sent_at, _ in rows)
        if claim != "delete":
            ids = ",".join(str(row[0]) for row in rows)
            begin(conn)
            conn.execute(f"DELETE FROM queue WHERE id IN ({ids})")
            conn.execute("UPDATE acked SET n = n + ? WHERE id = 1", (len(rows),))
            conn.execute("COMMIT")
        if record and len(latencies) >= expect:
            tmp = Path(out + ".tmp")
            tmp.write_bytes(orjson.dumps(latencies))
            tmp.replace(out)
            record = False
    conn.close()


def _bodies(count: int) -> list[bytes]:
    from benchmarks.apps import make_orders
    from nerve.event import encode

    return [encode(e) for e in make_orders(count)]


def produce_throughput(
    path: str, *, count: int, batch: int, synchronous: str, busy: str
) -> dict[str, float]:
    bodies = _bodies(count)
    conn = connect(path, synchronous, busy)
    settle_gc()
    sql = "INSERT INTO queue (sent_at, body) VALUES (?, ?)"
    first = time.time()
    for start in range(0, count, batch):
        now = time.time()
        begin(conn)
        conn.executemany(sql, [(now, body) for body in bodies[start : start + batch]])
        conn.execute("COMMIT")
    last = time.time()
    conn.close()
    return {"first_publish": first, "last_publish": last, "published": count}


def produce_latency(
    path: str, *, rate: float, seconds: float, synchronous: str, busy: str
) -> dict[str, float]:
    count = int(rate * seconds)
    bodies = _bodies(count)
    conn = connect(path, synchronous, busy)
    settle_gc()
    sql = "INSERT INTO queue (sent_at, body) VALUES (?, ?)"
    t0 = time.time() + 0.1
    sent = 0
    behind = 0.0
    while sent < count:
        now = time.time()
        due_until = min(count, int((now - t0) * rate) + 1)
        if due_until <= sent:
            time.sleep(max(0.0, t0 + sent / rate - now))
            continue
        behind = max(behind, now - (t0 + sent / rate))
        rows = [(t0 + i / rate, bodies[i]) for i in range(sent, due_until)]
        begin(conn)
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
        sent = due_until
    last = time.time()
    conn.close()
    return {"first_publish": t0, "last_publish": last, "published": count, "max_behind_s": behind}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    parser.add_argument("command", choices=["consume", "produce-throughput", "produce-latency"])
    parser.add_argument("db")
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--claim", choices=["lease", "delete"], default="lease")
    parser.add_argument("--busy", choices=["spin", "sqlite"], default="spin")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "consume":
        consume(
            args.db,
            batch=args.batch,
            claim=args.claim,
            synchronous=args.synchronous,
            busy=args.busy,
            expect=int(os.environ.get("NERVE_BENCH_EXPECT", "0") or 0),
            out=os.environ.get("NERVE_BENCH_OUT", ""),
        )
        return
    if args.command == "produce-throughput":
        result = produce_throughput(
            args.db,
            count=args.events,
            batch=args.batch,
            synchronous=args.synchronous,
            busy=args.busy,
        )
    else:
        result = produce_latency(
            args.db,
            rate=args.rate,
            seconds=args.seconds,
            synchronous=args.synchronous,
            busy=args.busy,
        )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
