"""The ``nerve`` command line: run an App, publish and tail events, inspect the broker.

::

    nerve run MODULE:APP        run the App's functions (one process, or a supervised few)
    nerve publish TYPE          publish one event
    nerve tail [PATTERN]        follow published events as they happen (filters, --compact)
    nerve trace EVENT_ID        a flow's causal chain as a tree (--subject S, --correlation C)
    nerve status                backlog and counters per function
    nerve dlq list|show|replay|purge
    nerve schema list|show|diff|export|check|mode    event contracts (nerve.schema.cli)
    nerve asyncapi MODULE:APP   the AsyncAPI 3.0 document; nerve graph MODULE:APP
    nerve demo                  the shop example, end to end

The CLI is the synchronous edge of an async library: each command opens what it
needs, runs one coroutine and closes. Data goes to stdout (``--json`` where offered
makes it parseable); banners, logs and errors go to stderr. A bad argument or a
broker that cannot be used is reported as ONE line saying what is wrong and how to
fix it, with exit code 2 and no traceback. Passwords never appear in any output
(:func:`redact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import orjson
import typer
from pydantic import ValidationError
from rich.box import SIMPLE_HEAD
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from nerve import __version__
from nerve import event as codec
from nerve._urls import redact, redact_text
from nerve.app import App
from nerve.errors import NerveError, TransportError
from nerve.event import Event
from nerve.http.keys_cli import keys_cli
from nerve.observe.terminal import compact_line
from nerve.schema.cli import asyncapi_command, graph_command, schema_cli
from nerve.store import default_store_url, store_from_url
from nerve.transport import (
    DEFAULT_BROKER,
    DeadLetterEntry,
    DeadLetterQueue,
    EventLog,
    Inspectable,
    Transport,
    from_url,
)

__all__ = ["CliError", "cli", "load_app", "main", "redact", "redact_text"]

T = TypeVar("T")

EXIT_USAGE = 2
"""Exit code of a bad argument or an unusable broker (as for typer's own usage errors)."""
DEFAULT_SOURCE = "/nerve/cli"
TAIL_POLL_SECONDS = 0.2
SHUTDOWN_GRACE_SECONDS = 30.0
"""How long the supervisor waits for its workers to drain before killing them."""
RESTART_BACKOFF = (0.5, 10.0)
"""First and largest wait (seconds) before restarting a worker that died."""

log = logging.getLogger("nerve.cli")


class CliError(Exception):
    """A bad argument or an unusable broker: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------
# Redaction: no output ever shows a password


# ---------------------------------------------------------------------------------------
# Output and errors


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _fail(message: str) -> NoReturn:
    line = Text("error: ", style="bold red") + Text(_one_line(redact_text(message)))
    _stderr().print(line, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def _note(message: str, style: str = "yellow") -> None:
    _stderr().print(Text(_one_line(redact_text(message)), style=style), soft_wrap=True)


@contextlib.contextmanager
def _edge() -> Iterator[None]:
    """Turn nerve's errors and CliError into one line on stderr and exit code 2."""
    try:
        yield
    except (CliError, NerveError) as exc:
        _fail(str(exc))


def _write_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def _run_async(coro: Coroutine[Any, Any, T], *, fast: bool = False) -> T:
    """Run ``coro`` to completion on a new event loop (uvloop when ``fast`` and installed).

    ``fast`` is for the long-running server: the garbage collector is set up as
    :func:`nerve.runtime.tune_gc` says (what start-up created is frozen, young objects
    are collected every 10,000 allocations instead of 700).
    """
    if fast:
        from nerve.runtime import tune_gc

        tune_gc()
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def _when(timestamp: float, *, short: bool = False) -> str:
    if not timestamp:
        return "-"
    layout = "%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S %z"
    return datetime.fromtimestamp(timestamp).astimezone().strftime(layout)


# ---------------------------------------------------------------------------------------
# Loading an App


def _add_cwd_to_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_app(target: str) -> App:
    """Import ``MODULE:APP`` (``APP`` may be dotted) from the current directory or
    ``sys.path``; raises :class:`CliError` saying what is wrong."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(
            f"{target!r} is not MODULE:APP; name the module and the App in it, "
            "like 'examples.shop.app:app'"
        )
    _add_cwd_to_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise CliError(
                f"cannot import module {module_name!r} (from {target!r}): no module named "
                f"{exc.name!r}; run from the directory that contains it or add it to PYTHONPATH"
            ) from None
        raise CliError(f"importing {module_name!r} failed: {exc}") from None
    except NerveError as exc:
        raise CliError(f"{module_name!r} declares its App wrongly: {exc}") from None
    except Exception as exc:
        raise CliError(f"importing {module_name!r} failed: {_describe(exc)}") from None
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            apps = [n for n, v in vars(module).items() if isinstance(v, App)]
            hint = f"; it defines {', '.join(apps)}" if apps else "; it defines no nerve.App"
            raise CliError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if not isinstance(found, App):
        raise CliError(
            f"{target!r} is a {type(found).__name__}, not a nerve.App; "
            "point at the object created with nerve.App(...)"
        )
    return found


def _describe(exc: BaseException) -> str:
    """One line naming an exception and where (in user code) it was raised."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


# ---------------------------------------------------------------------------------------
# Brokers


def _transport(url: str, *, shared: str | None = None) -> Transport:
    """An unstarted transport for ``url``. With ``shared`` (what the command does), a
    broker that lives inside one process is refused: another process cannot see it."""
    transport = from_url(url)
    if shared is not None and not transport.features.shared_across_processes:
        raise CliError(
            f"{redact(url)} lives inside one process, so {shared} from another process "
            f"sees nothing; use a shared broker such as {DEFAULT_BROKER} (--broker or "
            "NERVE_BROKER)"
        )
    return transport


def _require_existing(url: str) -> None:
    """For reading commands: a sqlite broker file that does not exist is a typo (or
    nothing has run yet), not an empty broker to create."""
    if urlsplit(url).scheme.lower() != "sqlite":
        return
    from nerve.transport.sqlite import SqliteConfig

    path = SqliteConfig.from_url(url).path
    if not Path(path).exists():
        raise CliError(
            f"no broker database at {path!r}: nothing has run against {url} yet; start the "
            "functions with 'nerve run MODULE:APP', or pass the right --broker (or NERVE_BROKER)"
        )


@contextlib.asynccontextmanager
async def _connected(transport: Transport, url: str) -> AsyncIterator[Transport]:
    try:
        await transport.start()
    except TransportError as exc:
        raise CliError(f"{exc}; check --broker (or NERVE_BROKER)") from None
    except OSError as exc:
        raise CliError(f"cannot reach the broker at {redact(url)}: {exc}") from None
    try:
        yield transport
    finally:
        await transport.close()


# ---------------------------------------------------------------------------------------
# The commands

cli = typer.Typer(
    name="nerve",
    help="nerve: serverless, event-driven microservices. Run functions, publish and "
    "follow events, inspect backlogs and dead letters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
)
dlq_cli = typer.Typer(
    help="Dead letters: list, show, replay, purge.", no_args_is_help=True, add_completion=False
)
cli.add_typer(dlq_cli, name="dlq")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(schema_cli, name="schema")


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


BrokerOption = Annotated[
    str,
    typer.Option(
        "--broker",
        "-b",
        envvar="NERVE_BROKER",
        metavar="URL",
        help="Broker URL (sqlite:///path.db, memory://, ...).",
    ),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="NERVE_STORE",
        metavar="URL",
        help="Store URL (default: store.db beside the broker).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nerve {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """nerve: serverless, event-driven microservices."""


# -- run -----------------------------------------------------------------------------


@cli.command()
def run(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The App to run.")],
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
    function: Annotated[
        list[str] | None,
        typer.Option("--function", "-f", metavar="NAME", help="Run only this function."),
    ] = None,
    allow_incompatible: Annotated[
        bool,
        typer.Option(
            "--allow-incompatible",
            envvar="NERVE_ALLOW_INCOMPATIBLE",
            help="Start even if the App's event schemas break their registered "
            "compatibility (the breaks are logged and the schemas registered as forced).",
        ),
    ] = False,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            envvar="NERVE_REGISTRY",
            metavar="URL",
            help="Schema registry (default: beside the broker: schema.db next to the store, "
            "or the PostgreSQL broker's database).",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[
        int, typer.Option("--processes", "-p", min=1, help="Worker processes to supervise.")
    ] = 1,
    log_level: Annotated[LogLevel, typer.Option("--log-level")] = LogLevel.info,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            help="json: one JSON object a line (event id, type, function, attempt, trace "
            "and correlation ids); console: coloured lines; auto: console on a terminal.",
        ),
    ] = LogFormat.auto,
    http: Annotated[
        str,
        typer.Option(
            "--http",
            envvar="NERVE_HTTP",
            metavar="HOST:PORT",
            help="Serve the HTTP edge (CloudEvents, webhooks, request/reply) here.",
        ),
    ] = "127.0.0.1:8000",
    no_http: Annotated[bool, typer.Option("--no-http", help="Do not serve HTTP.")] = False,
    webhook: Annotated[
        list[str] | None,
        typer.Option(
            "--webhook",
            metavar="NAME=TYPE",
            help="Accept Standard Webhooks at /webhooks/NAME as TYPE events "
            "(secret in NERVE_WEBHOOK_SECRET_<NAME>).",
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            envvar="NERVE_MQTT",
            metavar="URL",
            help="Bridge the App's declared MQTT topics from this broker (mqtt://127.0.0.1:1883).",
        ),
    ] = None,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics/--no-metrics",
            envvar="NERVE_METRICS",
            help="Count events for /metrics and the dashboard.",
        ),
    ] = True,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            envvar="NERVE_METRICS_LISTEN",
            metavar="HOST:PORT",
            help="Also serve /metrics on this listener of its own (with --processes N, "
            "worker k on PORT+k: one scrape target per process).",
        ),
    ] = None,
) -> None:
    """Run an App's functions until Ctrl-C / SIGTERM (then drain gracefully)."""
    only = list(function or [])
    with _edge():
        app = load_app(target)
        unknown = [name for name in only if name not in app.functions]
        if unknown:
            raise CliError(
                f"{target} has no function {', '.join(map(repr, unknown))}; "
                f"its functions: {', '.join(app.functions) or 'none'}"
            )
        if not app.functions:
            raise CliError(f"{target} declares no functions; add some with @app.function(...)")
        transport = _transport(
            broker, shared="running several processes" if processes > 1 else None
        )
        store_url = store or default_store_url(broker)
        store_from_url(store_url)  # a bad store URL is refused here, before anything starts
        _setup_logging(log_level, log_format)
        plan = None if no_http else _http_plan(http, store_url, webhook or [])
        from nerve.observe.metrics import parse_listen

        listen = None if metrics_listen is None else parse_listen(metrics_listen)
        names = ", ".join(only or app.functions)
        if allow_incompatible:  # the runtime (and every worker) reads it from here
            os.environ["NERVE_ALLOW_INCOMPATIBLE"] = "1"
        if registry:  # the same (a URL may hold a password: never in argv)
            from nerve.schema.registry import registry_from_url

            registry_from_url(registry)  # a bad registry URL is refused here
            os.environ["NERVE_REGISTRY"] = registry
        if processes > 1:
            # Open both once here: a broker or store that cannot be opened is one line
            # now, not the same error from every worker.
            _run_async(_probe(transport, broker, store_url))
            _note(
                f"nerve {__version__}: supervising {processes} processes of app {app.name!r} "
                f"(functions: {names}) on {broker}, store {store_url}",
                style="bold",
            )
            if mqtt:  # workers read it from the environment (a URL may hold a password)
                os.environ["NERVE_MQTT"] = mqtt
            os.environ["NERVE_METRICS"] = "1" if metrics else "0"
            if metrics_listen:
                os.environ["NERVE_METRICS_LISTEN"] = metrics_listen
            code = _supervise(
                target, broker, store, only, processes, log_level, log_format, http=plan
            )
            raise typer.Exit(code)
        banner = (
            f"nerve {__version__}: app {app.name!r} (functions: {names}) on {broker}, "
            f"store {store_url}, pid {os.getpid()}" + (f", HTTP on {plan.address}" if plan else "")
        )
        # KeyboardInterrupt: a Ctrl-C that came before the runtime's signal handler was set.
        with contextlib.suppress(KeyboardInterrupt):
            _run_async(
                _serve(
                    app, transport, broker, store_url, only, banner, plan, mqtt,
                    metrics=metrics, metrics_listen=listen,
                ),
                fast=True,
            )  # fmt: skip
        _note("nerve: stopped", style="dim")


async def _probe(transport: Transport, broker: str, store: str) -> None:
    async with _connected(transport, broker):
        pass
    probe = store_from_url(store)
    await probe.start()
    await probe.close()


def _http_plan(listen: str, store_url: str, webhooks: list[str]) -> Any:
    """Check the HTTP options before anything starts (see nerve.http.running); None when
    the http extra is missing and HTTP was not asked for explicitly."""
    from nerve.http.running import available, prepare

    explicit = listen != "127.0.0.1:8000" or bool(webhooks)
    if not available() and not explicit:
        _note("nerve: HTTP is off (install the 'http' extra to serve it)", style="dim")
        return None
    return prepare(listen, store_url, webhooks, explicit=explicit)


async def _serve(
    app: App,
    transport: Transport,
    broker: str,
    store: str,
    only: Sequence[str],
    banner: str,
    http: Any = None,
    mqtt: str | None = None,
    *,
    metrics: bool = True,
    metrics_listen: tuple[str, int] | None = None,
) -> None:
    """``Runtime.serve()``, with the banner printed once the broker and store are open
    (so a broker that cannot be opened gets its one-line error and nothing else)."""
    from nerve.runtime import Runtime

    runtime = Runtime(
        app,
        broker=transport,
        store=store,
        only=only or None,
        metrics=metrics,
        allow_incompatible=os.environ.get("NERVE_ALLOW_INCOMPATIBLE") == "1",
        registry=os.environ.get("NERVE_REGISTRY") or None,
    )
    serving = asyncio.ensure_future(runtime.serve())
    started = asyncio.ensure_future(runtime.started.wait())
    await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if runtime.started.is_set() and (http is not None or mqtt is not None):
        try:
            # MQTT first: once /healthz answers, the declared topics are subscribed
            if mqtt is not None:
                from nerve.sources.mqtt import attach as attach_mqtt

                await attach_mqtt(runtime, mqtt)
            if http is not None:
                from nerve.http.running import attach

                if not await attach(runtime, http):  # the default port is busy
                    banner = banner.split(", HTTP on ")[0]
        except BaseException:
            runtime.request_stop()
            await serving
            raise
    stop_metrics = None
    if runtime.started.is_set() and metrics_listen is not None:
        from nerve.observe.metrics import serve_metrics

        host, port = metrics_listen
        worker = int(os.environ.get("NERVE_WORKER", "0"))  # set by the supervisor
        try:
            stop_metrics = await serve_metrics(runtime, host, port + worker)
        except BaseException:
            runtime.request_stop()
            await serving
            raise
    if runtime.started.is_set():
        # what starting created (broker clients imported on first use, the HTTP app,
        # schemas) joins what start-up froze: a full collection then walks only the
        # objects made while serving (it took ~30 ms, stalling every event meanwhile)
        from nerve.runtime import tune_gc

        tune_gc()
        _note(banner, style="bold")
    try:
        await serving
    except TransportError as exc:
        raise CliError(f"{exc}; check --broker (or NERVE_BROKER)") from None
    finally:
        if stop_metrics is not None:
            stop_metrics()


def _setup_logging(level: LogLevel, fmt: LogFormat = LogFormat.auto) -> None:
    if fmt is not LogFormat.auto:
        from nerve.observe.logs import setup_logging

        setup_logging(level.value, fmt.value)
        return
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=_stderr(), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        from nerve.observe.logs import StderrHandler

        handler = StderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.value.upper(), handlers=[handler], force=True)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For a worker (Linux): get SIGTERM if the supervisor dies, so none is orphaned."""

    def arm() -> None:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return arm


class _Supervisor:
    """Keeps ``count`` worker processes running; stops them on SIGINT/SIGTERM.

    Workers run in their own process group, so a Ctrl-C in the terminal reaches only
    the supervisor, which asks every worker to stop with SIGTERM (a graceful drain
    once a worker is running; a quiet exit while it is still starting up).
    """

    def __init__(
        self, command: list[str], env: dict[str, str], count: int, pass_fds: Sequence[int] = ()
    ) -> None:
        self.command = command
        self.pass_fds = tuple(pass_fds)
        self.env = env
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * count
        self.started_at = [0.0] * count
        self.restart_at = [0.0] * count
        self.backoff = [RESTART_BACKOFF[0]] * count
        self.stop_signal: int | None = None

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum
        for worker in list(self.workers):
            if worker is not None and worker.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.send_signal(signal.SIGTERM)

    def _spawn(self, slot: int) -> None:
        worker = subprocess.Popen(  # noqa: S603 (our own argv)
            self.command,
            env=dict(self.env, NERVE_WORKER=str(slot)),
            process_group=0,
            pass_fds=self.pass_fds,
            preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
        )
        self.workers[slot] = worker
        self.started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot + 1, worker.pid)

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for slot in range(len(self.workers)):
                self._spawn(slot)
            fatal = self._watch()
            return self._drain(fatal)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> bool:
        """Restart workers that die until a stop signal; True if one failed fatally."""
        while self.stop_signal is None:
            now = time.monotonic()
            for slot, worker in enumerate(self.workers):
                if worker is None:
                    if now >= self.restart_at[slot] and self.stop_signal is None:
                        self._spawn(slot)
                    continue
                code = worker.poll()
                if code is None:
                    continue
                if code == EXIT_USAGE:
                    log.error(
                        "worker %d (pid %d) exited with code 2 (a configuration error, see "
                        "above); stopping instead of restarting it",
                        slot + 1,
                        worker.pid,
                    )
                    self._forward(signal.SIGTERM, None)
                    return True
                if now - self.started_at[slot] > 30:
                    self.backoff[slot] = RESTART_BACKOFF[0]
                delay = self.backoff[slot]
                self.backoff[slot] = min(delay * 2, RESTART_BACKOFF[1])
                self.workers[slot] = None
                self.restart_at[slot] = now + delay
                log.warning(
                    "worker %d (pid %d) died unexpectedly (exit code %s); restarting in %.1f s",
                    slot + 1,
                    worker.pid,
                    code,
                    delay,
                )
            time.sleep(0.05)
        return False

    def _drain(self, fatal: bool) -> int:
        # Forward once more: a worker spawned while the signal arrived may have missed it.
        self._forward(self.stop_signal or signal.SIGTERM, None)
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        clean = True
        for slot, worker in enumerate(self.workers):
            if worker is None:
                continue
            try:
                code = worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker %d (pid %d) did not stop in time; killing it", slot + 1, worker.pid
                )
                worker.kill()
                code = worker.wait()
            if code not in (0, -signal.SIGINT, -signal.SIGTERM):
                clean = False
        if fatal:
            return EXIT_USAGE
        return 0 if clean else 1


def _supervise(
    target: str,
    broker: str,
    store: str | None,
    only: Sequence[str],
    processes: int,
    log_level: LogLevel,
    log_format: LogFormat = LogFormat.auto,
    http: Any = None,
) -> int:
    command = [sys.executable, "-m", "nerve", "run", target, "--processes", "1"]
    command += ["--log-level", log_level.value, "--log-format", log_format.value]
    for name in only:
        command += ["--function", name]
    # URLs travel in the environment, not in argv, where 'ps' would show credentials.
    env = dict(os.environ, NERVE_BROKER=broker)
    if store:
        env["NERVE_STORE"] = store
    else:
        env.pop("NERVE_STORE", None)
    # HTTP: the supervisor binds the socket; every worker accepts on that same socket.
    fds: tuple[int, ...] = ()
    if http is None or not http.bind():
        command.append("--no-http")
    else:
        from nerve.http.running import FD_ENV

        fds = (http.sock.fileno(),)
        env[FD_ENV] = str(fds[0])
        command += ["--http", f"{http.host}:{http.port}"]
        for source in http.webhooks:
            command += ["--webhook", f"{source.name}={source.type}"]
    try:
        return _Supervisor(command, env, processes, pass_fds=fds).run()
    finally:
        if http is not None:
            http.close()


# -- publish ---------------------------------------------------------------------------


@cli.command()
def publish(
    type: Annotated[str, typer.Argument(metavar="TYPE", help="Event type, like order.created.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", metavar="JSON", help="The event data as JSON.")
    ] = None,
    subject: Annotated[str | None, typer.Option("--subject", "-s")] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Partition (ordering) key.")
    ] = None,
    source: Annotated[str | None, typer.Option("--source", metavar="URI")] = None,
    broker: BrokerOption = DEFAULT_BROKER,
    app_target: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:APP",
            help="Validate the data against the App's declared model first.",
        ),
    ] = None,
) -> None:
    """Publish one event and print its id."""
    with _edge():
        payload: Any = None
        if data is not None:
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise CliError(
                    f"--data is not valid JSON ({exc}); quote it for the shell, like "
                    """--data '{"order_id": "o-1"}'"""
                ) from None
        if app_target is not None:
            event = _declared_event(load_app(app_target), type, payload, subject, key, source)
        else:
            event = Event(
                type=type,
                source=source or DEFAULT_SOURCE,
                subject=subject,
                data=payload,
                extensions={"partitionkey": key} if key is not None else {},
            )
        transport = _transport(broker, shared="publishing")
        _run_async(_publish(transport, broker, event))
    typer.echo(event.id)


def _declared_event(
    app: App, type_name: str, payload: Any, subject: str | None, key: str | None, source: str | None
) -> Event:
    if type_name not in app.events:
        app.event_type(type_name)  # raises DefinitionError naming the type (did you mean...)
    if not isinstance(payload, dict):
        raise CliError(
            f"--data for {type_name!r} must be a JSON object with the fields of "
            f"{app.events[type_name].model.__name__}, got {_json_kind(payload)}"
        )
    try:
        return app.make_event(payload, type=type_name, subject=subject, key=key, source=source)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '(root)'!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise CliError(f"invalid data for {type_name!r}: {problems}") from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "no data (pass --data)"
    return {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


async def _publish(transport: Transport, url: str, event: Event) -> None:
    async with _connected(transport, url):
        await transport.publish([event])


# -- tail ------------------------------------------------------------------------------


@cli.command()
def tail(
    pattern: Annotated[
        str | None,
        typer.Argument(help="Only types matching this ('order.*', 'order.>').", show_default=False),
    ] = None,
    broker: BrokerOption = DEFAULT_BROKER,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Begin with the oldest event kept.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="Stop after N events.")
    ] = None,
    as_json: JsonOption = False,
    type_: Annotated[
        str | None,
        typer.Option("--type", "-t", metavar="PATTERN", help="Only types matching this."),
    ] = None,
    subject: Annotated[
        str | None,
        typer.Option("--subject", "-s", help="Only this subject ('eu-*': by prefix)."),
    ] = None,
    function: Annotated[
        str | None,
        typer.Option(
            "--function", "-f", metavar="NAME", help="Only what this function receives (--app)."
        ),
    ] = None,
    app_target: Annotated[
        str | None,
        typer.Option("--app", metavar="MODULE:APP", help="The App declaring --function."),
    ] = None,
    compact: Annotated[bool, typer.Option("--compact", "-c", help="One short line each.")] = False,
) -> None:
    """Follow published events live (Ctrl-C to stop)."""
    from nerve.observe.terminal import tail_filter

    with _edge():
        if pattern is not None and type_ is not None:
            raise CliError("give the type pattern once: as the argument or as --type")
        subscription = None
        if function is not None:
            if app_target is None:
                raise CliError("--function needs the App that declares it: add --app MODULE:APP")
            declared = load_app(app_target).functions
            if function not in declared:
                raise CliError(
                    f"{app_target} has no function {function!r}; its functions: "
                    f"{', '.join(declared) or 'none'}"
                )
            subscription = declared[function].subscription
        keep = tail_filter(pattern or type_, subject, subscription)
        transport = _transport(broker, shared="tailing")
        with contextlib.suppress(KeyboardInterrupt):
            _run_async(_tail(transport, broker, keep, from_start, limit, as_json, compact))


async def _tail(
    transport: Transport,
    url: str,
    keep: Callable[[Event], bool] | None,
    from_start: bool,
    limit: int | None,
    as_json: bool,
    compact: bool = False,
) -> None:
    if not isinstance(transport, EventLog):
        raise CliError(f"{redact(url)}: this broker keeps no event log that 'nerve tail' can read")
    out = _stdout()
    shown = 0
    async with _connected(transport, url):
        position: int | None = 0 if from_start else None
        if position is None:
            position = (await transport.read_log(None, 1))[0][0]
        while limit is None or shown < limit:
            batch = await transport.read_log(position, 256)
            if not batch:
                await asyncio.sleep(TAIL_POLL_SECONDS)
                continue
            for seq, raw in batch:
                position = seq
                try:
                    event = codec.decode(raw)
                except NerveError as exc:
                    if keep is None and not as_json:
                        out.print(Text(f"#{seq} undecodable: {exc}", style="red"), soft_wrap=True)
                    continue
                if keep is not None and not keep(event):
                    continue
                if as_json:
                    sys.stdout.write(bytes(raw).decode("utf-8", "replace").strip() + "\n")
                    sys.stdout.flush()
                else:
                    line = compact_line(event) if compact else _tail_line(event)
                    out.print(line, no_wrap=True, overflow="ellipsis")
                shown += 1
                if limit is not None and shown >= limit:
                    break


def _tail_line(event: Event) -> Text:
    when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3] if event.time else "--:--:--"
    line = Text(when, style="dim")
    line.append("  ")
    line.append(event.type, style="bold cyan")
    where = []
    if event.subject:
        where.append(event.subject)
    if event.partitionkey:
        where.append(f"key={event.partitionkey}")
    if where:
        line.append("  " + " ".join(where), style="magenta")
    line.append(f"  …{event.id[-8:]}", style="dim")
    if event.data is not None:
        if isinstance(event.data, bytes):
            shown = f"<{len(event.data)} bytes>"
        else:
            shown = orjson.dumps(event.data).decode()
        line.append("  " + (shown if len(shown) <= 200 else shown[:199] + "…"))
    return line


# -- trace -----------------------------------------------------------------------------


@cli.command()
def trace(
    event_id: Annotated[
        str | None, typer.Argument(metavar="[EVENT_ID]", help="An event of the flow.")
    ] = None,
    subject: Annotated[
        str | None, typer.Option("--subject", "-s", help="The flows of events with this subject.")
    ] = None,
    correlation: Annotated[
        str | None, typer.Option("--correlation", "-c", metavar="ID", help="One flow by its id.")
    ] = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a flow's causal chain: every event, what each function did with it, when."""
    from nerve.observe.flow import find_flow, flow_json
    from nerve.observe.terminal import render_flows

    with _edge():
        if sum(x is not None for x in (event_id, subject, correlation)) != 1:
            raise CliError("say which flow: give an EVENT_ID, or --subject S, or --correlation ID")
        _require_existing(broker)
        transport = _transport(broker, shared="tracing")
        store_url = store or default_store_url(broker)

        async def find() -> list[Any]:
            flow_store = store_from_url(store_url)
            async with _connected(transport, broker):
                await flow_store.start()
                try:
                    return await find_flow(
                        transport,
                        flow_store,
                        event_id=event_id,
                        subject=subject,
                        correlation=correlation,
                    )
                finally:
                    await flow_store.close()

        roots = _run_async(find())
        if not roots:
            which = event_id or subject or correlation
            raise CliError(
                f"no event found for {which!r} in the broker's event log (events older than "
                "its retention are pruned); see 'nerve tail --from-start'"
            )
    if as_json:
        _write_json([flow_json(root) for root in roots])
        return
    _stdout().print(render_flows(roots, highlight=event_id))


# -- status ----------------------------------------------------------------------------


@cli.command()
def status(broker: BrokerOption = DEFAULT_BROKER, as_json: JsonOption = False) -> None:
    """Backlog, in flight, processed, retried and dead letters per function."""
    with _edge():
        _require_existing(broker)
        transport = _transport(broker, shared="reading status")
        rows = _run_async(_stats(transport, broker))
    if as_json:
        _write_json(rows)
        return
    if not rows:
        _note("no functions are declared on this broker yet; start them with 'nerve run'")
        return
    table = Table(title=f"nerve status · {redact(broker)}", title_justify="left", box=SIMPLE_HEAD)
    table.add_column("function", style="bold")
    for header in ("backlog", "in flight", "processed", "retried", "dead-lettered", "DLQ"):
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(
            row["function"],
            str(row["backlog"]),
            str(row["in_flight"]),
            str(row["processed"]),
            str(row["retried"]),
            str(row["dead_lettered"]),
            Text(str(row["dlq"]), style="red" if row["dlq"] else ""),
        )
    _stdout().print(table)


async def _stats(transport: Transport, url: str) -> list[dict[str, Any]]:
    if not isinstance(transport, Inspectable):
        raise CliError(f"{redact(url)}: this broker does not report backlogs and counters")
    async with _connected(transport, url):
        stats = await transport.stats()
    return [
        {
            "function": s.group,
            "backlog": s.backlog,
            "ready": s.ready,
            "delayed": s.delayed,
            "in_flight": s.in_flight,
            "processed": s.processed,
            "retried": s.retried,
            "dead_lettered": s.dead_lettered,
            "dlq": s.dead_letters,
        }
        for s in stats
    ]


# -- dlq -------------------------------------------------------------------------------


def _dlq_transport(url: str) -> Transport:
    _require_existing(url)
    transport = _transport(url, shared="reading dead letters")
    if not isinstance(transport, DeadLetterQueue):
        raise CliError(f"{redact(url)}: this broker has no dead-letter queue nerve can browse")
    return transport


async def _check_function(transport: Transport, function: str | None) -> None:
    """A --function that names no group on this broker is a typo: say so."""
    if function is None or not isinstance(transport, Inspectable):
        return
    groups = [s.group for s in await transport.stats()]
    if function not in groups:
        raise CliError(
            f"no function named {function!r} on this broker; "
            f"its functions: {', '.join(groups) or 'none yet'}"
        )


def _entry_json(entry: DeadLetterEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": entry.id, "function": entry.group}
    doc.update(entry.failure.to_json())
    if entry.event is not None:
        doc["event"] = orjson.loads(codec.encode(entry.event))
    else:
        doc["event"] = None
        doc["raw"] = entry.raw.decode("utf-8", "replace")
    return doc


@dlq_cli.command("list")
def dlq_list(
    function: Annotated[str | None, typer.Option("--function", "-f", metavar="NAME")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 100,
    broker: BrokerOption = DEFAULT_BROKER,
    as_json: JsonOption = False,
) -> None:
    """List dead letters (all, or one function's)."""
    with _edge():
        transport = _dlq_transport(broker)
        entries = _run_async(_dlq_entries(transport, broker, function, limit))
    if as_json:
        _write_json([_entry_json(e) for e in entries])
        return
    if not entries:
        which = f" for {function!r}" if function else ""
        _note(f"no dead letters{which}", style="green")
        return
    out = _stdout()
    wide = out.width >= 110  # on a narrow terminal the error matters more than the time
    table = Table(title=f"dead letters · {redact(broker)}", title_justify="left", box=SIMPLE_HEAD)
    for header in ("id", "function", "type", "reason", "tries", "failed at"):
        if header == "failed at" and not wide:
            continue
        justify: JustifyMethod = "right" if header in ("id", "tries") else "left"
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis")
    table.add_column("error", ratio=1, overflow="fold")
    for e in entries:
        f = e.failure
        cells: list[str | Text] = [
            e.id,
            e.group,
            e.event.type if e.event else "(undecodable)",
            f.reason,
            str(f.attempts),
        ]
        if wide:
            cells.append(_when(f.failed_at, short=True))
        cells.append(Text(_one_line(f"{f.error_type}: {f.message}")[:160], style="red"))
        table.add_row(*cells)
    out.print(table)


async def _dlq_entries(
    transport: Transport, url: str, function: str | None, limit: int
) -> list[DeadLetterEntry]:
    assert isinstance(transport, DeadLetterQueue)
    async with _connected(transport, url):
        await _check_function(transport, function)
        return await transport.dead_letters(function, limit=limit)


@dlq_cli.command("show")
def dlq_show(
    entry_id: Annotated[str, typer.Argument(metavar="ID", help="A dead letter's id.")],
    broker: BrokerOption = DEFAULT_BROKER,
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter: the event, why it failed, the traceback."""
    with _edge():
        transport = _dlq_transport(broker)
        entry = _run_async(_dlq_entry(transport, broker, entry_id))
        if entry is None:
            raise CliError(f"no dead letter with id {entry_id!r}; see 'nerve dlq list'")
    if as_json:
        _write_json(_entry_json(entry))
        return
    out = _stdout()
    f = entry.failure
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("dead letter", f"{entry.id} of function {entry.group!r}")
    grid.add_row("reason", Text(f.reason, style="red"))
    grid.add_row("error", Text(f"{f.error_type}: {f.message}"))
    grid.add_row("attempts", str(f.attempts))
    grid.add_row("first attempt", _when(f.first_attempt_at))
    grid.add_row("failed at", _when(f.failed_at))
    event = entry.event
    if event is None:
        grid.add_row("event", Text("(undecodable)", style="red"))
        grid.add_row("raw", Text(entry.raw.decode("utf-8", "replace")[:2000]))
    else:
        grid.add_row("type", event.type)
        grid.add_row("event id", event.id)
        grid.add_row("source", event.source)
        grid.add_row("time", event.time.isoformat() if event.time else "-")
        if event.subject:
            grid.add_row("subject", event.subject)
        for name, value in sorted(event.extensions.items()):
            grid.add_row(name, str(value))
        if isinstance(event.data, bytes):
            grid.add_row("data", f"<{len(event.data)} bytes>")
        else:
            grid.add_row("data", orjson.dumps(event.data, option=orjson.OPT_INDENT_2).decode())
    out.print(grid)
    if f.traceback:
        out.print(Text("traceback", style="bold"))
        out.print(Text(f.traceback.rstrip(), style="dim"))


async def _dlq_entry(transport: Transport, url: str, entry_id: str) -> DeadLetterEntry | None:
    assert isinstance(transport, DeadLetterQueue)
    async with _connected(transport, url):
        return await transport.dead_letter_entry(entry_id)


IdsArgument = Annotated[
    list[str] | None,
    typer.Argument(metavar="[ID]...", help="Dead letter ids.", show_default=False),
]
FunctionSelector = Annotated[
    str | None,
    typer.Option("--function", "-f", metavar="NAME", help="All dead letters of a function."),
]
AllSelector = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


def _selection(action: str, ids: list[str] | None, function: str | None, every: bool) -> None:
    chosen = sum((bool(ids), function is not None, every))
    if chosen == 0:
        raise CliError(
            f"say which dead letters to {action}: give their IDs (see 'nerve dlq list'), "
            f"--function NAME for one function's, or --all"
        )
    if chosen > 1:
        raise CliError(
            f"choose ONE way to select dead letters to {action}: IDs, --function NAME or --all"
        )


@dlq_cli.command("replay")
def dlq_replay(
    ids: IdsArgument = None,
    function: FunctionSelector = None,
    every: AllSelector = False,
    broker: BrokerOption = DEFAULT_BROKER,
) -> None:
    """Re-deliver dead letters to their own function (only)."""
    with _edge():
        _selection("replay", ids, function, every)
        transport = _dlq_transport(broker)
        count, kept = _run_async(_dlq_apply(transport, broker, "replay", ids, function))
    typer.echo(f"replayed {count} dead letter{'s' if count != 1 else ''}")
    if kept:
        _note(f"kept {kept}: their function is no longer declared on this broker")


@dlq_cli.command("purge")
def dlq_purge(
    ids: IdsArgument = None,
    function: FunctionSelector = None,
    every: AllSelector = False,
    broker: BrokerOption = DEFAULT_BROKER,
) -> None:
    """Delete dead letters for good."""
    with _edge():
        _selection("purge", ids, function, every)
        transport = _dlq_transport(broker)
        count, _ = _run_async(_dlq_apply(transport, broker, "purge", ids, function))
    typer.echo(f"purged {count} dead letter{'s' if count != 1 else ''}")


async def _dlq_apply(
    transport: Transport, url: str, action: str, ids: list[str] | None, function: str | None
) -> tuple[int, int]:
    """Replay or purge the selection; returns (done, kept back). Unknown ids are refused
    before anything changes."""
    assert isinstance(transport, DeadLetterQueue)
    async with _connected(transport, url):
        await _check_function(transport, function)
        if ids:
            missing = [i for i in ids if await transport.dead_letter_entry(i) is None]
            if missing:
                raise CliError(
                    f"no dead letter with id {', '.join(map(repr, missing))}; nothing was "
                    f"{action}d; see 'nerve dlq list'"
                )
            wanted = len(set(ids))
        elif isinstance(transport, Inspectable):
            wanted = sum(
                s.dead_letters
                for s in await transport.stats()
                if function is None or s.group == function
            )
        else:
            wanted = 0
        if action == "replay":
            done = await transport.replay(ids or None, group=function)
        else:
            done = await transport.purge(ids or None, group=function)
    return done, max(0, wanted - done)


# -- demo ------------------------------------------------------------------------------


@cli.command()
def demo(
    orders: Annotated[
        int | None,
        typer.Option(
            min=1, help="Orders to place (default: continuous until Ctrl-C).", show_default=False
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Orders per second (default: as fast as it goes).",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[int, typer.Option("--processes", "-p", min=1)] = 1,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
    dashboard: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="Serve the dashboard here (default: 127.0.0.1:8000 when running until "
            "Ctrl-C; none with --orders).",
            show_default=False,
        ),
    ] = None,
    no_dashboard: Annotated[
        bool, typer.Option("--no-dashboard", help="Serve no dashboard.")
    ] = False,
) -> None:
    """Run the shop example end to end (from the repository root), with its dashboard."""
    with _edge():
        if rate is not None and rate <= 0:
            raise CliError(f"--rate is orders per second and must be more than 0, got {rate}")
        _add_cwd_to_path()
        try:
            module = importlib.import_module("examples.shop.demo")
        except ModuleNotFoundError as exc:
            if exc.name in ("examples", "examples.shop", "examples.shop.demo"):
                raise CliError(
                    "the demo lives in examples/shop/ of the nerve repository: run "
                    "'nerve demo' from the repository root"
                ) from None
            raise CliError(f"the demo cannot start: {exc}") from None
        store_url = store or default_store_url(broker)
        try:
            code = module.run(
                orders=orders,
                rate=rate,
                processes=processes,
                broker=broker,
                store=store_url,
                dashboard=None if no_dashboard else (dashboard or ""),
            )
        except KeyboardInterrupt:
            code = 0
    raise typer.Exit(int(code or 0))


# Event contracts (nerve.schema.cli): the AsyncAPI document and the topology graph.
cli.command("asyncapi")(asyncapi_command)
cli.command("graph")(graph_command)


def main() -> None:
    """Console-script entry point (``nerve``, ``python -m nerve``)."""
    cli(prog_name="nerve")
