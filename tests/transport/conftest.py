"""The adapter registry of the transport conformance suite.

Every broker adapter is one :class:`AdapterSpec` line in :data:`ADAPTERS`; every test
in ``test_conformance.py`` runs against each of them, unchanged. A test that needs a
guarantee an adapter declares it does not give (``transport.features``) skips with
``"<adapter> declares no <feature>: ..."``, so the report shows what each adapter
lacks instead of passing silently.

Fixtures:

- ``adapter``: the :class:`AdapterSpec` under test (parametrised).
- ``brokers``: a factory, ``brokers.new(visibility_timeout=0.5)`` gives a fresh
  :class:`Broker` (its own database file / in-process broker) with those options.
- ``broker``: a fresh broker with the adapter's default options.
- ``transport``: a started transport connected to ``broker``.
- ``connect``: ``await connect()`` opens one more started transport on ``broker``
  (for sqlite a second connection to the same file; for memory the same object,
  since an in-process broker lives in one object).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest

from nerve.transport import DeadLetterQueue, EventLog, Inspectable, Transport, from_url
from nerve.transport.base import Features


@dataclass(frozen=True)
class AdapterSpec:
    """How the suite reaches one broker.

    ``make_url(directory)`` returns the URL of a fresh, empty broker whose files (if
    any) live in ``directory``. ``restartable``: a transport can be closed and a new
    one opened on the same broker with its data intact (needed for durability tests).
    ``shared_instance``: a "second connection" to the broker is the same object (an
    in-process broker), not a new connection. ``restart_server``: stops and starts the
    real server this adapter talks to (``tests/transport/restarts.py``), for the test of
    reconnecting mid-stream; None where there is no server to restart.
    ``scale``: a multiplier for the event counts of the suite's bulk tests (the batch of
    500, work sharing over 200; see :func:`scaled`), for a test server whose cost per
    message grows with the queue (moto for ``sqs``). 1.0 runs them as written; every
    assertion stays the same. It is printed in the features table.
    """

    name: str
    make_url: Callable[[Path], str]
    restartable: bool
    shared_instance: bool = False
    restart_server: Callable[[], None] | None = None
    scale: float = 1.0

    def scaled(self, count: int) -> int:
        """``count`` events times ``scale`` (at least 20, and never more than ``count``)."""
        return min(count, max(20, round(count * self.scale)))

    def url(self, directory: Path, **options: float | int | str) -> str:
        """The broker URL with URL options (``visibility_timeout=0.5``) appended."""
        base = self.make_url(directory)
        if not options:
            return base
        joiner = "&" if "?" in base else "?"
        return base + joiner + urlencode(options)


def require_server(name: str, host: str, port: int) -> None:
    """Skip when a real server is not listening (a laptop without it), but FAIL under
    ``CI``, where every server must be there. Call it from an adapter's ``make_url``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = (
            f"{name} is not reachable on {host}:{port} ({exc}); start it with "
            "'bash scripts/services'"
        )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _discover() -> list[AdapterSpec]:
    """The built-in adapters, then one ``SPEC`` from each ``adapter_<broker>.py`` beside
    this file (a new broker = its transport module plus one such file)."""
    specs = [
        AdapterSpec("memory", lambda d: "memory://", restartable=False, shared_instance=True),
        AdapterSpec("sqlite", lambda d: f"sqlite:///{d / 'broker.db'}", restartable=True),
    ]
    for path in sorted(Path(__file__).parent.glob("adapter_*.py")):
        package = __name__.rpartition(".")[0]  # however pytest named this package
        module = importlib.import_module(f"{package}.{path.stem}" if package else path.stem)
        specs.append(module.SPEC)
    return specs


ADAPTERS: list[AdapterSpec] = _discover()

# adapters the session actually ran, for the features table printed at the end
_USED: dict[str, AdapterSpec] = {}


class Broker:
    """One broker under test; ``connect()`` opens a started transport on it."""

    def __init__(self, spec: AdapterSpec, url: str) -> None:
        self.spec = spec
        self.url = url
        self._open: list[Transport] = []
        self._shared: Transport | None = None

    async def connect(self) -> Transport:
        if self.spec.shared_instance and self._shared is not None:
            return self._shared
        transport = from_url(self.url)
        await transport.start()
        self._open.append(transport)
        if self.spec.shared_instance:
            self._shared = transport
        return transport

    async def close_all(self) -> None:
        for transport in reversed(self._open):
            with contextlib.suppress(Exception):
                await transport.close()
        self._open.clear()
        self._shared = None


@dataclass
class Brokers:
    spec: AdapterSpec
    root: Path
    made: list[Broker] = field(default_factory=list)

    def new(self, **options: float | int | str) -> Broker:
        directory = self.root / f"broker{len(self.made)}"
        directory.mkdir(parents=True, exist_ok=True)
        broker = Broker(self.spec, self.spec.url(directory, **options))
        self.made.append(broker)
        return broker


@pytest.fixture(params=ADAPTERS, ids=lambda spec: spec.name)
def adapter(request: pytest.FixtureRequest) -> AdapterSpec:
    spec: AdapterSpec = request.param
    _USED[spec.name] = spec
    return spec


@pytest.fixture
async def brokers(adapter: AdapterSpec, tmp_path: Path) -> AsyncIterator[Brokers]:
    made = Brokers(adapter, tmp_path)
    yield made
    for broker in made.made:
        await broker.close_all()


@pytest.fixture
def broker(brokers: Brokers) -> Broker:
    return brokers.new()


@pytest.fixture
async def transport(broker: Broker) -> Transport:
    return await broker.connect()


@pytest.fixture
def connect(broker: Broker) -> Callable[[], Awaitable[Transport]]:
    return broker.connect


# -- the features table -----------------------------------------------------------------

_FEATURE_COLUMNS = (
    "durable",
    "shared_across_processes",
    "key_ordering",
    "dead_letter_queue",
    "lease_expiry",
    "fenced_settlement",
)


def _features_row(spec: AdapterSpec) -> list[str]:
    try:
        transport = from_url(spec.make_url(Path("/nonexistent-unstarted")))
    except BaseException as exc:  # a server check that skipped or failed
        return [spec.name, f"(not reachable: {str(exc).splitlines()[0][:60]})"]
    features: Features = transport.features
    row = [spec.name]
    row += ["yes" if getattr(features, name) else "NO" for name in _FEATURE_COLUMNS]
    row.append(str(features.max_payload))
    row += [
        "yes" if isinstance(transport, protocol) else "NO"
        for protocol in (DeadLetterQueue, Inspectable, EventLog)
    ]
    row.append("yes" if spec.restartable else "NO")
    row.append(f"{spec.scale:g}")
    return row


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _USED:
        return
    header = [
        "adapter",
        *_FEATURE_COLUMNS,
        "max_payload",
        "DeadLetterQueue",
        "Inspectable",
        "EventLog",
        "restartable",
        "scale",
    ]
    rows = [header] + [_features_row(spec) for spec in _USED.values()]
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    terminalreporter.section("transport features (declared by each adapter)")
    for n, row in enumerate(rows):
        terminalreporter.write_line(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )
        if n == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
