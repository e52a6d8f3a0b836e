"""How ``nerve run`` serves HTTP (kept here so the CLI needs only a few lines).

- :func:`prepare` checks the options before anything starts (an open server on a
  public address, a webhook without its secret: one line of error).
- :func:`attach` binds and starts the server on a started runtime and stops it
  before the runtime drains. With ``--processes N`` the supervisor binds once
  (:meth:`HttpPlan.bind`) and every worker inherits the same socket
  (``NERVE_HTTP_FD``): all workers accept on one port.
- A busy port is an error when the address was asked for (``--http``); when it is the
  default (127.0.0.1:8000, say taken by another ``nerve run`` on this machine), the
  process runs its functions and serves no HTTP, with a warning.

Webhook sources come from ``--webhook NAME=TYPE``, their secrets from the
environment (``NERVE_WEBHOOK_SECRET_<NAME>``, space-separated while rotating), never
from argv where ``ps`` would show them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nerve.errors import ConfigError
from nerve.http.auth import KeyStore
from nerve.http.webhooks import WebhookSource

if TYPE_CHECKING:
    from nerve.runtime import Runtime

log = logging.getLogger("nerve.http")

__all__ = ["FD_ENV", "HttpPlan", "attach", "available", "key_store_path", "prepare"]

FD_ENV = "NERVE_HTTP_FD"


def key_store_path(store_url: str) -> str:
    """Keys and webhook ids live in the store's SQLite file (memory:// -> in memory)."""
    from nerve.store.sqlite import SqliteStore

    return SqliteStore(store_url).path


@dataclass
class HttpPlan:
    """What ``nerve run`` will serve. ``explicit``: the address was asked for (``--http``
    or ``NERVE_HTTP``), so a busy port is an error; the default address, when busy (say,
    another ``nerve run`` on this machine), only means this process serves no HTTP."""

    host: str
    port: int
    store_url: str
    webhooks: list[WebhookSource] = field(default_factory=list)
    explicit: bool = True
    sock: socket.socket | None = None

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2] if self.sock else (self.host, self.port)
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def bind(self) -> bool:
        """Open the listening socket (or adopt the one a supervisor handed down).
        False when the default address is busy (logged); raises ConfigError when an
        explicit one cannot be used."""
        from nerve.http.server import bind_socket

        if self.sock is not None:
            return True
        inherited = os.environ.get(FD_ENV)
        if inherited is not None:
            self.sock = socket.socket(fileno=int(inherited))
            return True
        try:
            self.sock = bind_socket(self.host, self.port)
        except ConfigError as exc:
            if self.explicit:
                raise
            log.warning("%s; this process serves no HTTP (pass --http HOST:PORT)", exc)
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _webhooks(specs: Sequence[str]) -> list[WebhookSource]:
    sources = []
    for spec in specs:
        name, sep, type_ = spec.partition("=")
        if not sep or not name or not type_:
            raise ConfigError(
                f"--webhook {spec!r}: use NAME=EVENT_TYPE (like github=github.push), with the "
                "secret in NERVE_WEBHOOK_SECRET_<NAME>"
            )
        sources.append(WebhookSource.from_env(name, type_))
    return sources


def prepare(
    listen: str, store_url: str, webhooks: Sequence[str], *, explicit: bool = True
) -> HttpPlan:
    """Check ``--http`` / ``--webhook`` (nothing is opened yet: :meth:`HttpPlan.bind`).
    Raises ConfigError saying what is wrong."""
    if not available():
        raise ConfigError(
            "serving HTTP needs the 'http' extra: pip install 'nerve[http]' (or pass --no-http)"
        )
    from nerve.http.server import check_exposure, is_loopback, parse_listen

    host, port = parse_listen(listen)
    limits_from_env()  # a bad NERVE_HTTP_* value is one line now, before anything starts
    plan = HttpPlan(host, port, store_url, _webhooks(webhooks), explicit=explicit)
    if not is_loopback(host):  # an open server may only listen on loopback
        keys = KeyStore(key_store_path(store_url))
        try:
            check_exposure(host, keys)
        finally:
            keys.close()
    return plan


async def attach(runtime: Runtime, plan: HttpPlan) -> bool:
    """Serve on a started ``runtime`` until it stops (it stops HTTP first); False
    when the default address was busy and nothing is served."""
    from nerve.http.endpoints import find_endpoints
    from nerve.http.server import HttpServer, HttpSettings, default_extra_routes

    if not plan.bind():
        return False
    settings = HttpSettings(
        host=plan.host,
        port=plan.port,
        webhooks=plan.webhooks,
        keys=KeyStore(key_store_path(plan.store_url)),
        **limits_from_env(),
    )
    server = HttpServer(
        runtime,
        settings,
        endpoints=find_endpoints(runtime.app),
        extra_routes=default_extra_routes(runtime),
        sock=plan.sock,
    )
    keys = settings.keys
    assert keys is not None

    async def close_keys() -> None:  # runs after server.stop (hooks run last added first)
        keys.close()

    runtime.on_stop.append(close_keys)
    try:
        await server.attach()
    except BaseException:
        plan.close()
        raise
    return True


def limits_from_env() -> dict[str, Any]:
    """``NERVE_HTTP_RATE`` (events/s per caller, 0 = no limit), ``NERVE_HTTP_BURST`` and
    ``NERVE_HTTP_MAX_BODY`` (bytes): the limits of ``nerve run``'s server."""
    limits: dict[str, Any] = {}
    for var, name, kind in (
        ("NERVE_HTTP_RATE", "rate", float),
        ("NERVE_HTTP_BURST", "burst", float),
        ("NERVE_HTTP_MAX_BODY", "max_body", int),
    ):
        text = os.environ.get(var)
        if text is None:
            continue
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not a number") from None
        if value < 0:
            raise ConfigError(f"{var} must be >= 0")
        limits[name] = value
    if limits.get("rate") == 0:
        limits["rate"] = None
    return limits


def available() -> bool:
    """Is the ``http`` extra (Starlette, uvicorn) installed?"""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn"))
