"""The conformance suite on PostgreSQL: each test broker is its own schema in database
``test``, named after a hash of the broker's directory, dropped before first use (a fresh,
empty broker even if a crashed earlier run left one behind) and after the session, with
``<schema>_store``, where a Runtime on it keeps its store by default."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import getpass
import hashlib
import os
from pathlib import Path

from .conftest import AdapterSpec, require_server
from .restarts import restart_postgres

HOST = os.environ.get("NERVE_TEST_PGHOST", "127.0.0.1")
PORT = int(os.environ.get("NERVE_TEST_PGPORT", "5432"))
USER = os.environ.get("NERVE_TEST_PGUSER", "postgres" if getpass.getuser() == "root" else "")
DATABASE = os.environ.get("NERVE_TEST_PGDATABASE", "test")

_made: set[str] = set()


def server_url(schema: str | None = None) -> str:
    user = f"{USER}@" if USER else ""
    url = f"postgresql://{user}{HOST}:{PORT}/{DATABASE}"
    return f"{url}?schema={schema}" if schema else url


def drop_schemas(*schemas: str) -> None:
    """DROP the schemas, from a thread of its own (callers may run inside an event loop)."""

    import asyncpg  # type: ignore[import-untyped]  # only where PostgreSQL is tested

    async def drop() -> None:
        conn = await asyncpg.connect(server_url(), timeout=10)
        try:
            for schema in schemas:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here (at exit): run it directly
        asyncio.run(drop())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, drop()).result(timeout=60)


def make_url(directory: Path) -> str:
    require_server("PostgreSQL", HOST, PORT)
    schema = "nerve_t_" + hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    if schema not in _made:
        drop_schemas(schema, f"{schema}_store")  # the broker and its default store
        _made.add(schema)
    return server_url(schema)


@atexit.register
def _cleanup() -> None:
    if _made:
        with contextlib.suppress(Exception):
            drop_schemas(*sorted(_made), *sorted(f"{s}_store" for s in _made))


SPEC = AdapterSpec("postgres", make_url, restartable=True, restart_server=restart_postgres)
