"""The shop, live: ``python -m examples.shop.demo`` (what ``nerve demo`` runs).

The demo fills the warehouse, starts the shop's services (in worker processes, or in
this process with ``--processes 1``), places orders and shows, live, what every service
does: events processed, retried and dead-lettered, backlogs, and how orders end.

- ``--orders N``: stop once N orders have ended, check the shop's invariants
  (:mod:`examples.shop.invariants`) and exit 0 only if every one holds.
- no ``--orders``: run until Ctrl-C; then stop placing orders, let the orders in flight
  end (a second Ctrl-C skips that), check the invariants and exit.

Each run starts from scratch: it first deletes its own database files, but only
inside a ``.nerve/`` directory (the default ``sqlite:///.nerve/nerve.db``); it refuses
to run on an existing database anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from examples.shop import invariants, load
from examples.shop.app import TERMINAL_STATES, OrderCreated, app
from examples.shop.chaos import with_failures
from nerve import Client, Runtime
from nerve.http import auth, webhooks
from nerve.store.sqlite import SqliteStore, default_store_url
from nerve.transport import DEFAULT_BROKER, Transport, from_url
from nerve.transport.base import DeadLetterQueue, GroupStats, Inspectable

DASHBOARD = ("127.0.0.1", 8000)
"""Where a continuous demo serves the dashboard (``--dashboard HOST:PORT``)."""

MAX_OPEN = 1000
"""Orders placed but not yet ended before the producer waits (backpressure)."""
STALL_AFTER = 60.0
"""Seconds without any progress, with orders open, before the demo gives up."""
DRAIN_FOR = 30.0
"""Seconds the open orders get to end after Ctrl-C."""

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the ``examples`` package: worker processes import from it."""


class DemoError(Exception):
    """The demo cannot go on (a worker died, nothing moves); the message says why."""


@dataclass
class Snapshot:
    """What the shop looks like at one moment."""

    at: float
    placed: int
    states: Counter[str]
    groups: list[GroupStats]
    dead_orders: set[str]

    @property
    def terminal(self) -> int:
        return sum(self.states[state] for state in TERMINAL_STATES)

    @property
    def ended(self) -> int:
        """Orders that will not move any more: terminal, or stuck in a dead-letter queue."""
        return self.terminal + len(self.dead_orders)

    @property
    def busy(self) -> bool:
        return any(g.backlog or g.in_flight for g in self.groups)


@dataclass
class Demo:
    orders: int | None
    rate: float | None
    processes: int
    broker: str
    store_url: str
    seed: int = 7
    fail_rate: float = 0.0
    console: Console = field(default_factory=Console)
    dashboard: tuple[str, int] | None = DASHBOARD
    """Where the HTTP edge serves the dashboard (``None``: no dashboard)."""
    dashboard_url: str | None = None
    placed: int = 0
    ended: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while fewer than MAX_OPEN orders are open: the producer waits for it."""
    started: float = field(default_factory=time.monotonic)
    history: deque[Snapshot] = field(default_factory=lambda: deque(maxlen=40))
    workers: list[asyncio.subprocess.Process] = field(default_factory=list)

    # -- the run -------------------------------------------------------------------------

    async def main(self) -> int:
        self.room.set()
        self.started = time.monotonic()
        removed = fresh_start([self.broker, self.store_url])
        for path in removed:
            self.console.print(f"[dim]fresh start: removed {path}[/]")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self._interrupted)
        try:
            if self.processes == 1:
                shop = with_failures(app, self.fail_rate, self.seed) if self.fail_rate else app
                async with Runtime(
                    shop,
                    broker=self.broker,
                    store=self.store_url,
                    metrics=self.dashboard is not None,  # the dashboard's latency charts
                ) as runtime:
                    await self._serve_dashboard(runtime)
                    return await self._run(runtime.transport, runtime.store, runtime.client)
            transport = from_url(self.broker)
            await transport.start()
            store = SqliteStore(self.store_url)
            try:
                await store.start(app.store_schema)
                # Declare the functions' groups now, so no order is published before them.
                await transport.declare(app.subscriptions())
                return await self._run(transport, store, Client(app, transport))
            finally:
                await self._stop_workers()
                await store.close()
                await transport.close()
        finally:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)

    async def _serve_dashboard(self, runtime: Runtime) -> None:
        """The HTTP edge with the dashboard, on the runtime that runs the services (a
        busy port only means no dashboard: the demo goes on without it)."""
        if self.dashboard is None:
            return
        try:
            from nerve.http.running import HttpPlan, attach
        except ImportError:  # the http extra is not installed
            self.console.print("[dim]no dashboard: pip install 'nerve[http,observe]'[/]")
            return
        host, port = self.dashboard
        plan = HttpPlan(host, port, self.store_url, explicit=False)
        if await attach(runtime, plan):
            self.dashboard_url = plan.address + "/"
        else:
            self.console.print(f"[yellow]no dashboard: {host}:{port} is busy[/]")

    def _interrupted(self) -> None:
        if self.stopping.is_set():
            self.hurry.set()
        self.stopping.set()

    async def _run(self, transport: Transport, store: SqliteStore, client: Client) -> int:
        await load.seed_stock(store, load.initial_stock(self.orders))
        if self.processes > 1:
            for number in range(1, self.processes + 1):
                await self._start_worker(number)
        self.console.print(self._title())
        producer = asyncio.create_task(
            load.place_orders(
                client,
                load.generate(self.seed, self.orders),
                rate=self.rate,
                admit=self._admit,
                on_placed=self._placed,
            )
        )
        try:
            last = await self._watch(transport, store, producer)
        except DemoError as exc:
            self.console.print(f"[bold red]demo stopped: {exc}[/]")
            return 1
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        self.console.print(self._render(last))
        if self.hurry.is_set():
            self.console.print("[yellow]stopped before the open orders ended: not checked[/]")
            return 130
        return await self._verdict(transport, store, last)

    async def _watch(
        self, transport: Transport, store: SqliteStore, producer: asyncio.Task[int]
    ) -> Snapshot:
        """Refresh the live view until the run is over; return the last snapshot."""
        snap = await self._snapshot(transport, store)
        draining_since: float | None = None
        progress_at = time.monotonic()
        with Live(self._render(snap), console=self.console, transient=True) as live:
            while True:
                await asyncio.sleep(0.25)
                previous, snap = snap, await self._snapshot(transport, store)
                live.update(self._render(snap, draining=draining_since is not None))
                self._check_workers()
                if producer.done() and not producer.cancelled() and producer.exception():
                    raise DemoError(f"placing orders failed: {producer.exception()}")
                if (snap.ended, snap.placed) != (previous.ended, previous.placed):
                    progress_at = time.monotonic()
                elif snap.placed > snap.ended and time.monotonic() - progress_at > STALL_AFTER:
                    raise DemoError(f"no order moved for {STALL_AFTER:.0f} s")
                everything_ended = snap.ended >= snap.placed and not snap.busy
                if self.orders is not None and snap.ended >= self.orders and not snap.busy:
                    return snap
                if self.stopping.is_set():
                    if draining_since is None:
                        draining_since = time.monotonic()
                        producer.cancel()
                    if everything_ended or self.hurry.is_set():
                        return snap
                    if time.monotonic() - draining_since > DRAIN_FOR:
                        return snap

    async def _verdict(self, transport: Transport, store: SqliteStore, last: Snapshot) -> int:
        problems = await invariants.check(store, dead_lettered=last.dead_orders)
        dead = sum(g.dead_letters for g in last.groups)
        if dead:
            problems.append(f"{dead} event(s) were dead-lettered (see the dead-letter queues)")
        if not problems:
            self.console.print(f"[bold green]✓ all invariants hold for {last.ended:,} orders[/]")
            return 0
        self.console.print(f"[bold red]✗ {len(problems)} invariant violation(s):[/]")
        for problem in problems[:20]:
            self.console.print(f"  - {problem}")
        if len(problems) > 20:
            self.console.print(f"  ... and {len(problems) - 20} more")
        return 1

    # -- the producer's hooks ------------------------------------------------------------

    async def _admit(self) -> None:
        await self.room.wait()

    def _placed(self, order: OrderCreated) -> None:
        self.placed += 1
        self._update_room()

    def _update_room(self) -> None:
        if self.placed - self.ended < MAX_OPEN:
            self.room.set()
        else:
            self.room.clear()

    # -- looking at the shop -------------------------------------------------------------

    async def _snapshot(self, transport: Transport, store: SqliteStore) -> Snapshot:
        rows = await store.query("SELECT state, count(*) AS n FROM orders GROUP BY state")
        states = Counter({row["state"]: row["n"] for row in rows})
        groups = await transport.stats() if isinstance(transport, Inspectable) else []
        dead_orders: set[str] = set()
        if any(g.dead_letters for g in groups) and isinstance(transport, DeadLetterQueue):
            for entry in await transport.dead_letters(limit=10_000):
                data = entry.event.data if entry.event is not None else None
                if isinstance(data, dict) and isinstance(data.get("order_id"), str):
                    dead_orders.add(data["order_id"])
            if dead_orders:
                marks = ",".join("?" * len(dead_orders))
                ended = await store.query(
                    f"SELECT order_id FROM orders WHERE order_id IN ({marks}) "
                    f"AND state IN ({','.join('?' * len(TERMINAL_STATES))})",
                    [*dead_orders, *TERMINAL_STATES],
                )
                dead_orders -= {row["order_id"] for row in ended}
        snap = Snapshot(time.monotonic(), self.placed, states, groups, dead_orders)
        self.ended = snap.ended
        self._update_room()
        self.history.append(snap)
        return snap

    def _rates(self) -> tuple[float, float]:
        """Orders placed and ended per second, over the last ten seconds or so."""
        if len(self.history) < 2:
            return 0.0, 0.0
        first, last = self.history[0], self.history[-1]
        seconds = max(last.at - first.at, 1e-9)
        return (last.placed - first.placed) / seconds, (last.ended - first.ended) / seconds

    def _title(self) -> Text:
        where = "in this process" if self.processes == 1 else f"{self.processes} worker processes"
        goal = f"{self.orders} orders" if self.orders else "until Ctrl-C"
        chaos = f", {self.fail_rate:.0%} of first attempts fail" if self.fail_rate else ""
        board = f" · dashboard [link={self.dashboard_url}]{self.dashboard_url}[/link]"
        return Text.from_markup(
            f"[bold]nerve shop demo[/] · {self.broker} · {where} · {goal}{chaos}"
            + (board if self.dashboard_url else "")
        )

    def _render(self, snap: Snapshot, *, draining: bool = False) -> Group:
        placed_rate, ended_rate = self._rates()
        elapsed = snap.at - self.started
        head = Text.from_markup(
            f"{elapsed:,.0f} s · orders placed [bold]{snap.placed:,}[/] ({placed_rate:,.1f}/s) · "
            f"ended [bold]{snap.ended:,}[/] ({ended_rate:,.1f}/s) · "
            f"open {max(0, snap.placed - snap.ended):,}"
        )
        if draining:
            head.append(" · stopping: open orders may end (Ctrl-C again: quit)", style="yellow")
        services = Table(box=None, header_style="bold", pad_edge=False)
        services.add_column("service")
        for column in ("processed", "retried", "dead-lettered", "backlog", "in flight"):
            services.add_column(column, justify="right")
        for g in snap.groups:
            services.add_row(
                g.group,
                f"{g.processed:,}",
                f"{g.retried:,}",
                f"{g.dead_lettered:,}",
                f"{g.backlog:,}",
                f"{g.in_flight:,}",
            )
        outcomes = Table(box=None, header_style="bold", pad_edge=False)
        outcomes.add_column("outcome")
        outcomes.add_column("orders", justify="right")
        for state in TERMINAL_STATES:
            outcomes.add_row(state, f"{snap.states[state]:,}")
        dead = sum(g.dead_letters for g in snap.groups)
        outcomes.add_row(
            Text("dead-lettered", style="red" if dead else ""), f"{len(snap.dead_orders):,}"
        )
        return Group(head, Text(), services, Text(), outcomes)

    # -- worker processes ----------------------------------------------------------------

    async def _start_worker(self, number: int) -> None:
        log_path = log_directory(self.broker) / f"worker-{number}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "examples.shop.worker",
            "--broker",
            self.broker,
            "--store",
            self.store_url,
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.fail_rate:
            command += ["--fail-rate", str(self.fail_rate), "--seed", str(self.seed)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the workers
            )
        self.workers.append(proc)

    def _check_workers(self) -> None:
        for number, proc in enumerate(self.workers, 1):
            if proc.returncode is not None:
                log_path = log_directory(self.broker) / f"worker-{number}.log"
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise DemoError(f"worker {number} exited with code {proc.returncode}\n{tail}")

    async def _stop_workers(self) -> None:
        for proc in self.workers:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.workers:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------------------------------
# the demo's files


def _sqlite_file(url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return None
    return Path(parts.path[1:] if parts.path.startswith("/") else parts.path)


def log_directory(broker: str) -> Path:
    """Worker logs go beside the embedded broker's file (else into ``.nerve/``)."""
    database = _sqlite_file(broker)
    return database.parent if database is not None else Path(".nerve")


SHOP_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", "".join(app.store_schema)))
NERVE_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", auth.SCHEMA)) | {
    webhooks.SEEN_TABLE
}
"""Tables nerve's HTTP edge keeps in the store (API keys, webhook ids seen): the
demo's `nerve run` serves HTTP, so its store has them after a first run."""
SHOP_WRITERS = frozenset({*app.functions, "seed_stock"})


def _holds_only_the_shop(database: Path) -> bool:
    """Is ``database`` an embedded broker or a store used by nothing but the shop?"""

    def names(conn: sqlite3.Connection, sql: str) -> set[str]:
        return {str(name) for (name,) in conn.execute(sql)}

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
            tables = names(conn, "SELECT name FROM sqlite_master WHERE type = 'table'")
            if "groups" in tables:  # the embedded broker: its consumer groups
                return names(conn, "SELECT name FROM groups") <= set(app.functions)
            if "nerve_processed" in tables:  # a store: who wrote, and which tables
                writers = names(conn, "SELECT DISTINCT function FROM nerve_processed")
                if not writers <= SHOP_WRITERS:
                    return False
            own = {
                t
                for t in tables
                if not t.startswith(("nerve_", "sqlite_")) and t not in NERVE_TABLES
            }
            return own <= SHOP_TABLES
    except sqlite3.Error:
        return False


def _files_of(database: Path) -> Iterator[Path]:
    for suffix in ("", "-wal", "-shm", "-journal"):
        yield database.with_name(database.name + suffix)


def fresh_start(urls: list[str]) -> list[Path]:
    """Delete the demo's database files (and worker logs) so each run starts empty.

    A database is deleted only if it lies in a directory named ``.nerve`` and holds
    nothing but the shop (its consumer groups, tables and processed records are the
    shop's); any other existing database raises :class:`DemoError`, untouched.
    """
    doomed: list[Path] = []
    for url in urls:
        database = _sqlite_file(url)
        if database is None or not database.exists():
            continue
        if database.resolve().parent.name != ".nerve" or not _holds_only_the_shop(database):
            raise DemoError(
                f"{database} holds something other than the shop demo, or is not in a "
                ".nerve/ directory: the demo will not delete it. Remove it yourself, or "
                "give the demo its own --broker sqlite:///<dir>/.nerve/nerve.db"
            )
        doomed += [path for path in _files_of(database) if path.exists()]
        doomed += sorted(database.parent.glob("worker-*.log"))
    removed = []
    for path in dict.fromkeys(doomed):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# entry points


def run(
    orders: int | None,
    rate: float | None,
    processes: int,
    broker: str,
    store: str | None,
    *,
    seed: int = 7,
    fail_rate: float = 0.0,
    dashboard: str | None = "",
) -> int:
    """Run the demo; returns the exit code (0: every invariant held).

    ``orders``: stop after this many orders have ended (None: run until Ctrl-C).
    ``rate``: orders per second (None: as fast as the shop keeps up). ``processes``:
    worker processes (1: run the services in this process). ``broker``/``store``:
    URLs (the store defaults to ``store.db`` beside an embedded broker).
    ``dashboard``: ``HOST:PORT`` to serve the dashboard on, ``None`` for none, ``""``
    (default) for 127.0.0.1:8000 when the demo runs until Ctrl-C (none with ``orders``).
    With several processes the services run in the workers and there is no dashboard.
    """
    console = Console()
    where: tuple[str, int] | None = None
    if dashboard == "":
        where = DASHBOARD if orders is None else None
    elif dashboard is not None:
        host, _, port_text = dashboard.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            console.print(
                f"[red]--dashboard is HOST:PORT (like 127.0.0.1:8000), got {dashboard!r}[/]"
            )
            return 2
        where = (host.strip("[]"), int(port_text))
    if processes < 1:
        console.print("[red]--processes must be at least 1[/]")
        return 2
    if orders is not None and orders < 1:
        console.print("[red]--orders must be at least 1[/]")
        return 2
    if rate is not None and rate <= 0:
        console.print("[red]--rate must be more than 0 orders per second[/]")
        return 2
    if processes > 1 and urlsplit(broker).scheme == "memory":
        console.print("[red]memory:// lives in one process: use --processes 1 with it[/]")
        return 2
    store_url = store or default_store_url(broker)
    if processes > 1 and urlsplit(store_url).scheme == "memory":
        console.print("[red]a memory:// store lives in one process: use --processes 1[/]")
        return 2
    demo = Demo(orders, rate, processes, broker, store_url, seed, fail_rate, console)
    demo.dashboard = where if processes == 1 else None
    try:
        return asyncio.run(demo.main())
    except DemoError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shop.demo", description=__doc__)
    parser.add_argument("--orders", type=int, default=None, help="stop after N orders")
    parser.add_argument("--rate", type=float, default=None, help="orders per second")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (1: inline)")
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="broker URL")
    parser.add_argument("--store", default=None, help="store URL (default: beside the broker)")
    parser.add_argument("--seed", type=int, default=7, help="which orders are generated")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="inject handler failures")
    parser.add_argument(
        "--dashboard", default="", metavar="HOST:PORT", help="serve the dashboard here"
    )
    parser.add_argument("--no-dashboard", action="store_true", help="serve no dashboard")
    args = parser.parse_args(argv)
    return run(
        args.orders,
        args.rate,
        args.processes,
        args.broker,
        args.store,
        seed=args.seed,
        fail_rate=args.fail_rate,
        dashboard=None if args.no_dashboard else args.dashboard,
    )


if __name__ == "__main__":
    raise SystemExit(main())
