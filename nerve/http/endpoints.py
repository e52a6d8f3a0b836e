"""HTTP endpoints an application declares (as data, like the App): request/reply
routes that turn a synchronous call into an event and answer with the event that
replies to it.

::

    http = Endpoints(app)
    http.reply(
        "/orders",
        publishes=OrderCreated,
        replies=[StockRejected, PaymentFailed, ShipmentPrepared],
        respond=lambda reply: {"order_id": reply.data["order_id"], "state": ...},
    )

``nerve run MODULE:APP`` serves every :class:`Endpoints` of the App it finds in
``MODULE``. The request body is validated against the ``publishes`` model (422 with
the errors otherwise), published, and the first reply (see
:mod:`nerve.runtime.replies`) is turned into the response by ``respond`` (default:
the reply event as structured JSON); 504 when none comes within ``timeout``.
Declaring endpoints imports no web framework.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from nerve.app import App
from nerve.errors import DefinitionError
from nerve.event import Event

__all__ = ["Endpoints", "ReplyEndpoint", "find_endpoints"]

_PATH = re.compile(r"^(/[a-z0-9_\-]+)+$")
RESERVED = ("/events", "/webhooks", "/admin", "/openapi.json", "/healthz", "/metrics")

Responder = Callable[[Event], Any]


@dataclass(frozen=True)
class ReplyEndpoint:
    """``POST path``: publish a ``publishes`` event, answer with its reply."""

    path: str
    publishes: str
    replies: tuple[str, ...]
    respond: Responder | None
    timeout: float
    description: str = ""


@dataclass
class Endpoints:
    """The HTTP endpoints of one App."""

    app: App
    routes: list[ReplyEndpoint] = field(default_factory=list)

    def reply(
        self,
        path: str,
        *,
        publishes: str | type[BaseModel],
        replies: Sequence[str | type[BaseModel]],
        respond: Responder | None = None,
        timeout: float = 10.0,
        description: str = "",
    ) -> ReplyEndpoint:
        """Declare ``POST path`` as request/reply (see the module docstring)."""
        if not _PATH.match(path):
            raise DefinitionError(
                f"endpoint path {path!r}: use /lower-case-words separated by '/', like '/orders'"
            )
        if any(path == r or path.startswith(r + "/") for r in RESERVED):
            raise DefinitionError(f"endpoint path {path!r} is taken by nerve's own HTTP API")
        if any(e.path == path for e in self.routes):
            raise DefinitionError(f"endpoint path {path!r} is declared twice")
        if not replies:
            raise DefinitionError(f"endpoint {path!r}: name the reply types (replies=[...])")
        if timeout <= 0:
            raise DefinitionError(f"endpoint {path!r}: timeout must be > 0 seconds")
        patterns = tuple(r if isinstance(r, str) else self.app.event_type(r).name for r in replies)
        endpoint = ReplyEndpoint(
            path=path,
            publishes=self.app.event_type(publishes).name,
            replies=patterns,
            respond=respond,
            timeout=timeout,
            description=description,
        )
        self.routes.append(endpoint)
        return endpoint


def find_endpoints(app: App) -> list[ReplyEndpoint]:
    """Every endpoint declared for ``app`` in the modules that define it (the module
    an App was loaded from holds its :class:`Endpoints`)."""
    found: list[ReplyEndpoint] = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or not any(v is app for v in namespace.values()):
            continue
        for value in namespace.values():
            if isinstance(value, Endpoints) and value.app is app:
                found.extend(r for r in value.routes if r not in found)
    return found
