"""How ``nerve run`` serves HTTP (kept here so the CLI needs only a few lines).

- :func:`prepare` checks the options and binds the listening socket BEFORE the
  runtime starts (a busy port or an open server on a public address is one line of
  error, and nothing has started). With ``--processes N`` the supervisor calls it
  once and every worker inherits the same socket (``NERVE_HTTP_FD``): all workers
  accept on one port.
- :func:`attach` starts the server on a started runtime and stops it before the
  runtime drains.

Webhook sources come from ``--webhook NAME=TYPE``, their secrets from the
environment (``NERVE_WEBHOOK_SECRET_<NAME>``, space-separated while rotating), never
from argv where ``ps`` would show them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nerve.errors import ConfigError
from nerve.http.auth import KeyStore
from nerve.http.webhooks import WebhookSource

if TYPE_CHECKING:
    from nerve.runtime import Runtime

__all__ = ["FD_ENV", "HttpPlan", "attach", "available", "key_store_path", "prepare"]

FD_ENV = "NERVE_HTTP_FD"


def key_store_path(store_url: str) -> str:
    """Keys and webhook ids live in the store's SQLite file (memory:// -> in memory)."""
    from nerve.store.sqlite import SqliteStore

    return SqliteStore(store_url).path


@dataclass
class HttpPlan:
    host: str
    port: int
    store_url: str
    webhooks: list[WebhookSource] = field(default_factory=list)
    sock: socket.socket | None = None

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2] if self.sock else (self.host, self.port)
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


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


def prepare(listen: str, store_url: str, webhooks: Sequence[str], *, bind: bool) -> HttpPlan:
    """Check ``--http`` / ``--webhook`` and (``bind``) open the socket, or adopt the one
    a supervisor handed down. Raises ConfigError saying what is wrong."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(
            "serving HTTP needs the 'http' extra: pip install 'nerve[http]' (or pass --no-http)"
        ) from None
    from nerve.http.server import bind_socket, check_exposure, parse_listen

    host, port = parse_listen(listen)
    plan = HttpPlan(host, port, store_url, _webhooks(webhooks))
    keys = KeyStore(key_store_path(store_url))
    try:
        check_exposure(host, keys)
    finally:
        keys.close()
    inherited = os.environ.get(FD_ENV)
    if inherited is not None:
        plan.sock = socket.socket(fileno=int(inherited))
    elif bind:
        plan.sock = bind_socket(host, port)
    return plan


async def attach(runtime: Runtime, plan: HttpPlan) -> None:
    """Serve on a started ``runtime`` until it stops (it stops HTTP first)."""
    from nerve.http.endpoints import find_endpoints
    from nerve.http.server import HttpServer, HttpSettings, default_extra_routes

    settings = HttpSettings(
        host=plan.host,
        port=plan.port,
        webhooks=plan.webhooks,
        keys=KeyStore(key_store_path(plan.store_url)),
    )
    server = HttpServer(
        runtime,
        settings,
        endpoints=find_endpoints(runtime.app),
        extra_routes=default_extra_routes(runtime),
        sock=plan.sock,
    )
    await server.attach()


def available() -> bool:
    """Is the ``http`` extra (Starlette, uvicorn) installed?"""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn"))
