"""The schema registry: every version of every event type's schema, kept durably.

Subjects are event types. Each subject has a compatibility mode (default
``BACKWARD``, see :mod:`nerve.schema.compat`); registering a version that breaks it
raises :class:`~nerve.schema.compat.IncompatibleSchema` with the findings, unless
forced. Versions are the ones the code declares (``@app.event(..., version=N)``);
registering a different schema under a version that exists is a new *revision* of it,
checked like a new version (so a compatible edit of a model needs no new number, and
a breaking one is caught). Registering the same schema again changes nothing, so every
process of a service can register at start.

Storage is one small interface (:class:`SchemaStorage`) with two implementations:
SQLite (``sqlite:///.nerve/schema.db``, beside the embedded broker; ``memory://`` for
tests) and PostgreSQL (``postgresql://...``, with asyncpg), picked by URL
(:func:`registry_from_url`). Writers append with optimistic concurrency: each entry
takes the next sequence number of its subject; two processes racing for one lose one
insert, which re-reads and checks again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson

from nerve._postgres import lock_ddl
from nerve._sqlite import connect
from nerve.errors import ConfigError, StoreError
from nerve.schema.compat import (
    Compatibility,
    Finding,
    IncompatibleSchema,
    check_compatibility,
)

if TYPE_CHECKING:
    from nerve.app import App

__all__ = [
    "PostgresSchemaStorage",
    "RegisterResult",
    "SchemaRegistry",
    "SchemaStorage",
    "SchemaVersion",
    "SqliteSchemaStorage",
    "default_registry_url",
    "register_app",
    "registry_from_url",
]

log = logging.getLogger("nerve.schema")
T = TypeVar("T")


def canonical(schema: Mapping[str, Any] | bool) -> bytes:
    """The schema as canonical JSON (sorted keys): equal schemas, equal bytes."""
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)


def fingerprint(schema: Mapping[str, Any] | bool) -> str:
    return hashlib.sha256(canonical(schema)).hexdigest()


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One registered schema: ``seq`` orders a subject's entries (1, 2, ...),
    ``revision`` counts the schemas registered under one ``version``."""

    subject: str
    version: int
    revision: int
    seq: int
    schema: dict[str, Any]
    fingerprint: str
    registered_at: float
    forced: bool = False
    """Registered although it broke the subject's mode (``allow_incompatible``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "version": self.version,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "registered_at": self.registered_at,
            "forced": self.forced,
            "schema": self.schema,
        }


@dataclass(frozen=True, slots=True)
class RegisterResult:
    entry: SchemaVersion
    created: bool
    """False when the same schema was registered under that version already."""
    findings: tuple[Finding, ...] = ()
    """What a forced registration broke (empty otherwise)."""


class SchemaStorage(Protocol):
    """Where the registry keeps its entries. Every method is one short transaction."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def history(self, subject: str) -> list[SchemaVersion]:
        """Every entry of ``subject``, by ``seq``."""
        ...

    async def subjects(self) -> list[str]: ...

    async def append(self, entry: SchemaVersion) -> bool:
        """Insert ``entry``; False (and nothing written) if its ``seq`` is taken."""
        ...

    async def mode(self, subject: str) -> Compatibility | None: ...

    async def set_mode(self, subject: str, mode: Compatibility) -> None: ...


def _row(subject: str, row: Sequence[Any]) -> SchemaVersion:
    version, revision, seq, body, fp, at, forced = row
    return SchemaVersion(
        subject=subject,
        version=int(version),
        revision=int(revision),
        seq=int(seq),
        schema=orjson.loads(body),
        fingerprint=str(fp),
        registered_at=float(at),
        forced=bool(forced),
    )


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS nerve_schemas (
    subject TEXT NOT NULL,
    seq INTEGER NOT NULL,
    version INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    schema BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    registered_at REAL NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, seq)
);
CREATE TABLE IF NOT EXISTS nerve_schema_modes (
    subject TEXT PRIMARY KEY,
    mode TEXT NOT NULL
);
"""
_COLUMNS = "version, revision, seq, schema, fingerprint, registered_at, forced"


class SqliteSchemaStorage:
    """The registry in a SQLite file (WAL, synchronous=FULL), or in memory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        def open_db() -> sqlite3.Connection:
            conn = connect(self.path)
            conn.executescript(_SQLITE_SCHEMA)
            return conn

        if self._conn is None:
            self._conn = await self._run(open_db, opening=True)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    async def _run(self, fn: Callable[..., T], *args: Any, opening: bool = False) -> T:
        if self._conn is None and not opening:
            raise StoreError("the schema registry is not started")
        async with self._lock:
            try:
                return await asyncio.to_thread(fn, *args)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"schema registry ({self.path}): {exc}") from None

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def history(self, subject: str) -> list[SchemaVersion]:
        def read() -> list[SchemaVersion]:
            rows = self._db().execute(
                f"SELECT {_COLUMNS} FROM nerve_schemas WHERE subject = ? ORDER BY seq",
                (subject,),
            )
            return [_row(subject, r) for r in rows.fetchall()]

        return await self._run(read)

    async def subjects(self) -> list[str]:
        def read() -> list[str]:
            rows = self._db().execute("SELECT DISTINCT subject FROM nerve_schemas ORDER BY 1")
            return [str(r[0]) for r in rows.fetchall()]

        return await self._run(read)

    async def append(self, entry: SchemaVersion) -> bool:
        def insert() -> bool:
            try:
                self._db().execute(
                    f"INSERT INTO nerve_schemas (subject, {_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        entry.subject,
                        entry.version,
                        entry.revision,
                        entry.seq,
                        canonical(entry.schema),
                        entry.fingerprint,
                        entry.registered_at,
                        int(entry.forced),
                    ),
                )
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._run(insert)

    async def mode(self, subject: str) -> Compatibility | None:
        def read() -> str | None:
            row = (
                self._db()
                .execute("SELECT mode FROM nerve_schema_modes WHERE subject = ?", (subject,))
                .fetchone()
            )
            return None if row is None else str(row[0])

        found = await self._run(read)
        return None if found is None else Compatibility.parse(found)

    async def set_mode(self, subject: str, mode: Compatibility) -> None:
        def write() -> None:
            self._db().execute(
                "INSERT INTO nerve_schema_modes (subject, mode) VALUES (?, ?) "
                "ON CONFLICT (subject) DO UPDATE SET mode = excluded.mode",
                (subject, mode.value),
            )

        await self._run(write)


_PG_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS {prefix}schemas (
    subject TEXT NOT NULL,
    seq INTEGER NOT NULL,
    version INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    schema BYTEA NOT NULL,
    fingerprint TEXT NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    forced BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (subject, seq)
);
CREATE TABLE IF NOT EXISTS {prefix}schema_modes (
    subject TEXT PRIMARY KEY,
    mode TEXT NOT NULL
);
"""


class PostgresSchemaStorage:
    """The registry in PostgreSQL (asyncpg): for services on several machines.

    Tables ``<schema>.schemas`` and ``<schema>.schema_modes`` with ``?schema=`` (the
    PostgreSQL broker's own option, so a broker URL puts the registry beside the
    broker's tables), else ``<prefix>schemas`` and ``<prefix>schema_modes`` in the
    search path (``?prefix=``, default ``nerve_``). Other options are ignored."""

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        parts = urlsplit(url)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        schema = options.get("schema")
        prefix = prefix or options.get("prefix", "" if schema else "nerve_")
        if prefix and not _PG_NAME.fullmatch(prefix):
            raise ConfigError(f"registry table prefix {prefix!r}: use a-z, 0-9 and '_'")
        if schema is not None and not _PG_NAME.fullmatch(schema):
            raise ConfigError(f"registry schema {schema!r}: use a-z, 0-9 and '_'")
        self.url = urlunsplit(parts._replace(query=""))  # the options are nerve's, not libpq's
        self.schema = schema
        self.prefix = f"{schema}.{prefix}" if schema else prefix
        self._pool: Any = None

    async def start(self) -> None:
        try:
            import asyncpg  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError(
                "a postgresql:// schema registry needs asyncpg: pip install 'nerve[postgres]'"
            ) from None
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=2)
            async with self._pool.acquire() as conn, conn.transaction():
                await lock_ddl(conn, "nerve-registry-ddl")
                if self.schema:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                await conn.execute(_PG_SCHEMA.format(prefix=self.prefix))
        except (OSError, asyncpg.PostgresError) as exc:
            await self.close()
            raise StoreError(f"schema registry: cannot use PostgreSQL: {exc}") from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        import asyncpg

        if self._pool is None:
            raise StoreError("the schema registry is not started")
        try:
            async with self._pool.acquire() as conn:
                return list(await conn.fetch(sql.format(prefix=self.prefix), *args))
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"schema registry: {exc}") from None

    async def history(self, subject: str) -> list[SchemaVersion]:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM {{prefix}}schemas WHERE subject = $1 ORDER BY seq", subject
        )
        return [_row(subject, tuple(r)) for r in rows]

    async def subjects(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT subject FROM {prefix}schemas ORDER BY 1")
        return [str(r[0]) for r in rows]

    async def append(self, entry: SchemaVersion) -> bool:
        rows = await self._fetch(
            f"INSERT INTO {{prefix}}schemas (subject, {_COLUMNS}) "
            "VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (subject, seq) DO NOTHING RETURNING seq",
            entry.subject,
            entry.version,
            entry.revision,
            entry.seq,
            canonical(entry.schema),
            entry.fingerprint,
            entry.registered_at,
            entry.forced,
        )
        return bool(rows)

    async def mode(self, subject: str) -> Compatibility | None:
        rows = await self._fetch(
            "SELECT mode FROM {prefix}schema_modes WHERE subject = $1", subject
        )
        return Compatibility.parse(str(rows[0][0])) if rows else None

    async def set_mode(self, subject: str, mode: Compatibility) -> None:
        await self._fetch(
            "INSERT INTO {prefix}schema_modes (subject, mode) VALUES ($1, $2) "
            "ON CONFLICT (subject) DO UPDATE SET mode = EXCLUDED.mode",
            subject,
            mode.value,
        )


# ---------------------------------------------------------------------------------------


def _latest_per_version(history: Sequence[SchemaVersion]) -> dict[int, SchemaVersion]:
    latest: dict[int, SchemaVersion] = {}
    for entry in history:  # by seq: later revisions replace earlier ones
        latest[entry.version] = entry
    return dict(sorted(latest.items()))


class SchemaRegistry:
    """Register, look up and list schemas; enforce each subject's compatibility mode."""

    def __init__(
        self, storage: SchemaStorage, *, default_mode: Compatibility = Compatibility.BACKWARD
    ) -> None:
        self.storage = storage
        self.default_mode = default_mode

    async def __aenter__(self) -> SchemaRegistry:
        await self.storage.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.storage.close()

    async def mode(self, subject: str) -> Compatibility:
        return await self.storage.mode(subject) or self.default_mode

    async def set_mode(self, subject: str, mode: Compatibility | str) -> None:
        parsed = Compatibility.parse(mode) if isinstance(mode, str) else mode
        await self.storage.set_mode(subject, parsed)

    async def subjects(self) -> list[str]:
        return await self.storage.subjects()

    async def versions(self, subject: str) -> list[SchemaVersion]:
        """The current schema of each version of ``subject``, oldest version first."""
        return list(_latest_per_version(await self.storage.history(subject)).values())

    async def history(self, subject: str) -> list[SchemaVersion]:
        """Every entry of ``subject`` (revisions included), in registration order."""
        return await self.storage.history(subject)

    async def lookup(self, subject: str, version: int | None = None) -> SchemaVersion | None:
        """The current schema of ``version`` (default: the highest) of ``subject``."""
        latest = _latest_per_version(await self.storage.history(subject))
        if not latest:
            return None
        return latest.get(version if version is not None else max(latest))

    async def check(
        self,
        subject: str,
        version: int,
        schema: Mapping[str, Any],
        *,
        upcast_from: Collection[int] = (),
    ) -> list[Finding]:
        """What registering ``schema`` as ``version`` would break (empty: nothing)."""
        history = await self.storage.history(subject)
        return _check(history, version, dict(schema), await self.mode(subject), upcast_from)

    async def register(
        self,
        subject: str,
        version: int,
        schema: Mapping[str, Any],
        *,
        allow_incompatible: bool = False,
        upcast_from: Collection[int] = (),
    ) -> RegisterResult:
        """Register ``schema`` as ``version`` of ``subject``.

        Raises :class:`IncompatibleSchema` when it breaks the subject's mode, unless
        ``allow_incompatible`` (then it is registered, marked ``forced``, and the
        result carries the findings). ``upcast_from`` lists older versions that
        consumers of this one upcast (their BACKWARD check is the upcaster's job).
        """
        body = dict(schema)
        fp = fingerprint(body)
        mode = await self.mode(subject)
        for _ in range(20):  # lost races re-read and check again
            history = await self.storage.history(subject)
            current = _latest_per_version(history).get(version)
            if current is not None and current.fingerprint == fp:
                return RegisterResult(current, created=False)
            findings = _check(history, version, body, mode, upcast_from)
            if findings and not allow_incompatible:
                raise IncompatibleSchema(subject, version, mode.value, findings)
            entry = SchemaVersion(
                subject=subject,
                version=version,
                revision=1 if current is None else current.revision + 1,
                seq=(history[-1].seq + 1) if history else 1,
                schema=body,
                fingerprint=fp,
                registered_at=time.time(),
                forced=bool(findings),
            )
            if await self.storage.append(entry):
                return RegisterResult(entry, created=True, findings=tuple(findings))
        raise StoreError(f"registering {subject!r} version {version}: too many concurrent writers")


def _check(
    history: Sequence[SchemaVersion],
    version: int,
    schema: dict[str, Any],
    mode: Compatibility,
    upcast_from: Collection[int],
) -> list[Finding]:
    if mode is Compatibility.NONE or not history:
        return []
    latest = _latest_per_version(history)
    older = [(v, e.schema) for v, e in latest.items() if v < version]
    if version in latest:  # a new revision is checked against the one it replaces
        older.append((version, latest[version].schema))
    newer = [(v, e.schema) for v, e in latest.items() if v > version]
    findings: list[Finding] = []
    for v, old in older if mode.transitive else older[-1:]:
        applies: Compatibility = mode
        if v in upcast_from and v != version:
            applies = _forward_only(mode)
        findings += check_compatibility(schema, [(v, old)], applies)
    for v, new in newer if mode.transitive else newer[:1]:
        for f in check_compatibility(new, [(version, schema)], mode):
            findings.append(
                Finding(f.path, f.rule, f.message, f.old, f.new, f.direction, version=v)
            )
    return findings


def _forward_only(mode: Compatibility) -> Compatibility:
    if not mode.forward:
        return Compatibility.NONE
    return Compatibility.FORWARD_TRANSITIVE if mode.transitive else Compatibility.FORWARD


# ---------------------------------------------------------------------------------------


def default_registry_url(store_url: str, broker_url: str | None = None) -> str:
    """The registry beside the broker: in a PostgreSQL broker's database (its
    ``?schema=``, default ``nerve``), else ``schema.db`` in the store's folder."""
    if broker_url is not None and urlsplit(broker_url).scheme in ("postgres", "postgresql"):
        parts = urlsplit(broker_url)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        schema = options.get("schema", "nerve")
        return urlunsplit(parts._replace(query=f"schema={schema}"))
    parts = urlsplit(store_url)
    if parts.scheme == "memory":
        return "memory://"
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return "sqlite:///" + str(Path(path).with_name("schema.db"))
    if parts.scheme in ("postgres", "postgresql"):
        return store_url
    return "sqlite:///.nerve/schema.db"


def registry_from_url(
    url: str, *, default_mode: Compatibility | str = "BACKWARD"
) -> SchemaRegistry:
    """``sqlite:///path/schema.db``, ``memory://`` or ``postgresql://...``."""
    mode = Compatibility.parse(default_mode) if isinstance(default_mode, str) else default_mode
    parts = urlsplit(url)
    storage: SchemaStorage
    if parts.scheme == "memory":
        storage = SqliteSchemaStorage(":memory:")
    elif parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path or parts.netloc:
            raise ConfigError(
                f"registry URL {url!r}: use sqlite:///relative/schema.db or sqlite:////abs/schema.db"
            )
        storage = SqliteSchemaStorage(path)
    elif parts.scheme in ("postgres", "postgresql"):
        storage = PostgresSchemaStorage(url)
    else:
        raise ConfigError(
            f"registry URL {url!r}: use sqlite:///path/schema.db, memory:// or postgresql://..."
        )
    return SchemaRegistry(storage, default_mode=mode)


async def register_app(
    registry: SchemaRegistry, app: App, *, allow_incompatible: bool = False
) -> list[RegisterResult]:
    """Register every version of every event type ``app`` declares, oldest first.

    Raises :class:`IncompatibleSchema` on the first breaking one, unless
    ``allow_incompatible`` (then each forced registration is logged with its diff).
    """
    results: list[RegisterResult] = []
    for name in sorted(app.versions):
        declared = app.versions[name]
        for version in sorted(declared):
            covered = {
                k
                for k in range(1, version)
                if (chain := app.upcasters.chain(name, k, version)) and chain[-1][1] == version
            }
            try:
                result = await registry.register(
                    name,
                    version,
                    declared[version].json_schema(),
                    allow_incompatible=allow_incompatible,
                    upcast_from=covered,
                )
            except IncompatibleSchema as exc:
                log.error(
                    "%s version %d breaks its registered schemas:\n%s", name, version, exc.diff()
                )
                raise IncompatibleSchema(
                    exc.subject,
                    exc.version,
                    exc.mode,
                    exc.findings,
                    hint="declare a new version with an upcaster, make the change compatible, "
                    "or start anyway with allow_incompatible (nerve run --allow-incompatible)",
                ) from None
            if result.findings:
                error = IncompatibleSchema(name, version, "its mode", result.findings)
                log.warning(
                    "registered %s version %d although it is incompatible "
                    "(allow_incompatible):\n%s",
                    name,
                    version,
                    error.diff(),
                )
            results.append(result)
    return results
