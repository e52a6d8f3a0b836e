"""The HTTP edge: a Starlette app over a running :class:`~nerve.Runtime`, served by uvicorn.

``nerve run`` serves it on 127.0.0.1:8000 (``--http HOST:PORT``, ``--no-http``). The
API (documented in docs/http.md and served as OpenAPI 3.1 at ``/openapi.json``):

- ``POST /events``: CloudEvents 1.0 HTTP binding (binary, structured, batched
  modes). 202 once the broker holds the events durably. With ``?reply=TYPES`` (one
  event): wait for the event answering it (request/reply), 200 with the reply or 504.
- ``POST /webhooks/{source}``: Standard Webhooks, verified, de-duplicated, published
  as the source's configured event type.
- ``GET /admin/dlq``, ``POST /admin/dlq/replay``, ``POST /admin/dlq/purge``: dead
  letters (``admin`` scope).
- the App's own request/reply endpoints (:mod:`nerve.http.endpoints`), e.g. the
  shop's ``POST /orders``.
- ``GET /healthz``, ``GET /openapi.json``.

Every error is an RFC 9457 ``application/problem+json`` document
(:mod:`nerve.http.problems`).

**Mounting other routes** (the ``extra_routes`` hook). :func:`build_app` takes
``extra_routes``: a sequence of Starlette ``Route``/``Mount`` objects added after
nerve's own routes, so another part of nerve (observability: ``/metrics``, the
dashboard, an SSE stream) or an application mounts its routes without either side
editing the other's code::

    app = build_app(runtime, settings, extra_routes=[Route("/metrics", metrics)])

Those routes get no authentication from nerve: protect them yourself (the
:class:`HttpContext` in ``request.app.state.nerve`` offers ``authenticate``).
``nerve run`` passes the routes returned by :func:`default_extra_routes`.

**Several processes.** ``nerve run --processes N`` binds the listening socket once,
in the supervisor, and hands the same socket to every worker: all N workers accept
connections on one port (the kernel spreads them), and a request/reply answered in
another worker is still seen (replies are read from the broker's event log).

Starlette and uvicorn are imported here only: ``nerve`` itself imports without the
``http`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute, Route
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "nerve's HTTP edge needs the 'http' extra: pip install 'nerve[http]'"
    ) from exc

from nerve import event as codec
from nerve.app import App
from nerve.errors import ConfigError, InvalidEvent, NerveError, PayloadTooLarge, TransportError
from nerve.event import Event
from nerve.http.auth import ApiKey, KeyStore, RateLimiter, check_scopes
from nerve.http.binding import parse_request
from nerve.http.endpoints import ReplyEndpoint
from nerve.http.openapi import openapi_document
from nerve.http.problems import PROBLEM_CONTENT_TYPE, Problem
from nerve.http.webhooks import SeenMessages, WebhookSource, verify
from nerve.runtime import Runtime
from nerve.transport.base import DeadLetterQueue

__all__ = [
    "HttpContext",
    "HttpServer",
    "HttpSettings",
    "bind_socket",
    "build_app",
    "check_exposure",
    "default_extra_routes",
]

log = logging.getLogger("nerve.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass
class HttpSettings:
    """How the HTTP edge behaves. Every default is the safe one."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body: int = 1 << 20
    """Largest request body in bytes (413 beyond; enforced while reading)."""
    rate: float | None = 1000.0
    """Events per second per caller (key, or client address without keys); None: off."""
    burst: float = 2000.0
    reply_timeout: float = 10.0
    """Default wait of ``POST /events?reply=...`` (``&timeout=`` up to ``max_reply_timeout``)."""
    max_reply_timeout: float = 60.0
    webhooks: Sequence[WebhookSource] = ()
    keys: KeyStore | None = None
    """The API keys; None: an empty in-memory store (open, so loopback only)."""
    accept_undeclared: bool = False
    """Accept event types the App does not declare (published unvalidated)."""
    shutdown_timeout: float = 5.0
    """Seconds in-flight requests get to finish when the server stops."""

    def __post_init__(self) -> None:
        if self.max_body < 1:
            raise ConfigError("max_body must be >= 1 byte")
        if self.reply_timeout <= 0 or self.max_reply_timeout < self.reply_timeout:
            raise ConfigError("reply timeouts: 0 < reply_timeout <= max_reply_timeout")
        names = [w.name for w in self.webhooks]
        if len(set(names)) != len(names):
            raise ConfigError("a webhook source is configured twice")


# ---------------------------------------------------------------------------------------
# Binding the listener


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: KeyStore) -> None:
    """Refuse to listen beyond loopback while no API key exists (an open server)."""
    if not is_loopback(host) and not keys.configured:
        raise ConfigError(
            f"refusing to serve HTTP on {host}: no API key is configured, so anyone who can "
            "reach that address could publish events; create one with 'nerve keys create "
            "NAME --scope TYPE_PATTERN', or serve on 127.0.0.1 (the default)"
        )


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[::1]:PORT`` -> (host, port)."""
    text = value.strip()
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        host = host or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"--http {value!r}: use HOST:PORT, like 127.0.0.1:8000")
    return host, port


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (inheritable, so a supervisor can share it with workers)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}; pick another address with "
            "--http HOST:PORT, or turn HTTP off with --no-http"
        ) from None
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------------------
# Responses


def _json(doc: Any, status: int = 200, media_type: str = "application/json") -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=media_type)


def _problem_response(problem: Problem, instance: str | None) -> Response:
    response = Response(
        orjson.dumps(problem.to_json(instance)),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
    )
    for name, value in problem.headers.items():
        response.headers[name] = value
    return response


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(endpoint: Endpoint) -> Endpoint:
    """Problems become problem+json; anything unexpected a logged 500 (no details)."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Problem as problem:
            return _problem_response(problem, request.url.path)
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.url.path)
            return _problem_response(
                Problem(500, "internal", "an unexpected error; the server log has the details"),
                request.url.path,
            )

    return run


# ---------------------------------------------------------------------------------------
# The request path


@dataclass
class HttpContext:
    """What the endpoints share: the runtime, the settings, keys, limits, dedup."""

    runtime: Runtime
    settings: HttpSettings
    keys: KeyStore
    seen: SeenMessages
    limiter: RateLimiter | None
    webhooks: dict[str, WebhookSource] = field(default_factory=dict)

    @property
    def app(self) -> App:
        return self.runtime.app

    def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key; None when no key is configured at all (open, loopback).
        Raises 401 for a missing, unknown or revoked key."""
        header = request.headers.get("authorization")
        if not self.keys.configured:
            return None
        if not header:
            raise Problem(
                401,
                "unauthenticated",
                "this server requires an API key: send 'Authorization: Bearer nrv_...'",
                headers={"WWW-Authenticate": 'Bearer realm="nerve"'},
            )
        scheme, _, presented = header.partition(" ")
        key = self.keys.authenticate(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise Problem(
                401,
                "invalid-key",
                "the API key is unknown, malformed or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="nerve", error="invalid_token"'},
            )
        return key

    def authorize_publish(self, key: ApiKey | None, types: Sequence[str]) -> None:
        if key is None:
            return
        refused = sorted({t for t in types if not key.may_publish(t)})
        if refused:
            raise Problem(
                403,
                "scope",
                f"key {key.id} ({key.name}) may not publish {', '.join(refused)}; its scopes: "
                f"{', '.join(key.scopes)}",
            )

    def authorize_admin(self, key: ApiKey | None) -> None:
        if key is not None and not key.admin:
            raise Problem(403, "scope", f"key {key.id} ({key.name}) lacks the 'admin' scope")

    def limit(self, request: Request, key: ApiKey | None, cost: int) -> None:
        if self.limiter is None or cost == 0:
            return
        caller = key.id if key is not None else (request.client.host if request.client else "")
        wait = self.limiter.take(caller, cost)
        if wait:
            if math.isinf(wait):
                raise Problem(
                    429,
                    "rate-limited",
                    f"{cost} events is more than the burst of {self.limiter.burst:g} this "
                    "caller may send at once; split the batch",
                    headers={"Retry-After": "1"},
                )
            raise Problem(
                429,
                "rate-limited",
                f"over {self.limiter.rate:g} events/s (bursts of {self.limiter.burst:g}); "
                f"retry in {wait:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it grows past ``max_body``."""
        limit = self.settings.max_body
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Problem(400, "malformed-header", "Content-Length is not a number")
            if int(declared) > limit:
                raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def validate(self, events: Sequence[Event]) -> list[Event]:
        """Check each event's data against its declared model (422 listing every
        error); sets the partition key from the type's declared key when absent."""
        checked: list[Event] = []
        errors: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            declared = self.app.declared_for(event)  # the dataschema's version, or the latest
            if declared is None:
                if not self.settings.accept_undeclared:
                    errors.append(
                        {
                            "index": index,
                            "event_type": event.type,
                            "loc": ["type"],
                            "msg": f"event type {event.type!r} is not declared by app "
                            f"{self.app.name!r}",
                            "type": "undeclared_type",
                        }
                    )
                checked.append(event)
                continue
            try:
                model = declared.model.model_validate(event.data)
            except ValidationError as exc:
                for error in exc.errors(include_url=False, include_input=False):
                    errors.append(
                        {
                            "index": index,
                            "event_type": event.type,
                            "loc": ["data", *error["loc"]],
                            "msg": error["msg"],
                            "type": error["type"],
                        }
                    )
                continue
            if event.partitionkey is None and declared.key is not None:
                partition = declared.key_of(model)
                if partition is not None:
                    event = event.with_extensions(partitionkey=partition)
            checked.append(event)
        if errors:
            raise Problem(
                422,
                "schema",
                f"{len(errors)} validation error(s); see 'errors'",
                errors=errors[:100],
            )
        return checked

    async def publish(self, events: Sequence[Event]) -> None:
        try:
            # the client's path: traced and counted like every publish (data already checked)
            await self.runtime.client.publish_events(events)
        except PayloadTooLarge as exc:
            raise Problem(413, "payload-too-large", str(exc)) from None
        except InvalidEvent as exc:  # e.g. an integer JSON cannot carry (over 64 bits)
            raise Problem(422, "unencodable", str(exc)) from None
        except TransportError as exc:
            log.warning("publish failed: %s", exc)
            raise Problem(
                503,
                "broker-unavailable",
                "the broker did not take the events; retry later",
                headers={"Retry-After": "1"},
            ) from None

    async def request_reply(
        self, request: Request, event: Event, patterns: Sequence[str], timeout: float
    ) -> Event:
        """Publish ``event`` and wait for its reply; a caller that hangs up stops the
        wait at once (its waiter is removed, nothing is left behind)."""
        waiting = asyncio.ensure_future(
            self.runtime.client.replies.request(
                event, patterns, timeout, lambda e: self.publish([e])
            )
        )
        hung_up = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiting, hung_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung_up.cancel()
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
        if waiting.cancelled():
            raise Problem(400, "hung-up", "the caller went away before the reply")
        try:
            return waiting.result()
        except TimeoutError:
            raise Problem(
                504,
                "no-reply",
                f"no {' | '.join(patterns)} event answered event {event.id} within "
                f"{timeout:g} s (it was published and will still be handled)",
                extra={"event_id": event.id},
            ) from None
        except ConfigError as exc:  # a broker without an event log
            raise Problem(501, "no-request-reply", str(exc)) from None
        except TransportError as exc:
            log.warning("request/reply failed: %s", exc)
            raise Problem(
                503,
                "broker-unavailable",
                "the broker's event log could not be read; retry later",
                headers={"Retry-After": "1"},
            ) from None
        except NerveError as exc:
            raise Problem(503, "stopping", str(exc), headers={"Retry-After": "1"}) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _too_large(size: int, limit: int) -> Problem:
    return Problem(
        413,
        "body-too-large",
        f"the body is over {limit} bytes (at least {size}); send smaller batches, or store "
        "large payloads elsewhere and send a reference",
    )


def _ctx(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.nerve
    return ctx


def _reply_patterns(request: Request) -> tuple[list[str], float] | None:
    reply = request.query_params.get("reply")
    if reply is None:
        return None
    settings = _ctx(request).settings
    patterns = [p.strip() for p in reply.split(",") if p.strip()]
    try:
        check_scopes(patterns)
    except ConfigError:
        raise Problem(
            400,
            "malformed-query",
            "reply= takes comma-separated event types or patterns, like "
            "'payment.failed,shipment.prepared' or 'order.>'",
        ) from None
    text = request.query_params.get("timeout")
    timeout = settings.reply_timeout
    if text is not None:
        try:
            timeout = float(text)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= settings.max_reply_timeout:
            raise Problem(
                400,
                "malformed-query",
                f"timeout= is seconds, over 0 and at most {settings.max_reply_timeout:g}",
            )
    return patterns, timeout


# -- endpoints ---------------------------------------------------------------------------


async def post_events(request: Request) -> Response:
    ctx = _ctx(request)
    key = ctx.authenticate(request)
    reply = _reply_patterns(request)
    body = await ctx.read_body(request)
    _mode, events = parse_request(request.headers, body)
    ctx.authorize_publish(key, [e.type for e in events])
    events = ctx.validate(events)
    ctx.limit(request, key, len(events))
    if reply is not None:
        if len(events) != 1:
            raise Problem(400, "malformed-query", "reply= waits for one event: do not batch")
        patterns, timeout = reply
        answer = await ctx.request_reply(request, events[0], patterns, timeout)
        return Response(
            codec.encode(answer), status_code=200, media_type=codec.CONTENT_TYPE_STRUCTURED
        )
    await ctx.publish(events)
    return _json({"accepted": len(events), "ids": [e.id for e in events]}, 202)


async def post_webhook(request: Request) -> Response:
    ctx = _ctx(request)
    name = request.path_params["source"]
    source = ctx.webhooks.get(name)
    if source is None:
        raise Problem(404, "unknown-webhook-source", f"no webhook source named {name!r}")
    body = await ctx.read_body(request)
    msg_id, timestamp = verify(source, request.headers, body)
    if await ctx.seen.seen(name, msg_id):
        return _json({"accepted": 0, "duplicate": True, "id": msg_id}, 200)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "malformed-json", f"the webhook payload is not JSON: {exc}") from None
    try:
        event = codec.from_attributes(
            {
                "specversion": "1.0",
                "id": msg_id,
                "source": f"/webhooks/{name}",
                "type": source.type,
                "time": _utc(timestamp),
                "datacontenttype": codec.CONTENT_TYPE_JSON,
            },
            data,
        )
    except NerveError as exc:
        raise Problem(400, "malformed-webhook", str(exc)) from None
    (event,) = ctx.validate([event])
    ctx.limit(request, None, 1)
    await ctx.publish([event])
    await ctx.seen.record(name, msg_id)
    return _json({"accepted": 1, "duplicate": False, "id": msg_id}, 202)


def _utc(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _dlq(ctx: HttpContext) -> DeadLetterQueue:
    transport = ctx.runtime.transport
    if not isinstance(transport, DeadLetterQueue):
        raise Problem(404, "no-dlq", f"{type(transport).__name__} offers no dead letter queue")
    return transport


async def get_dlq(request: Request) -> Response:
    ctx = _ctx(request)
    ctx.authorize_admin(ctx.authenticate(request))
    function = request.query_params.get("function") or None
    text = request.query_params.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise Problem(400, "malformed-query", "limit= is a number from 1 to 1000")
    if function is not None and function not in ctx.app.functions:
        raise Problem(404, "unknown-function", f"no function named {function!r}")
    entries = await _dlq(ctx).dead_letters(function, limit=int(text))
    return _json(
        {
            "entries": [
                {
                    "id": e.id,
                    "function": e.group,
                    "event_id": e.event.id if e.event else None,
                    "event_type": e.event.type if e.event else None,
                    "failure": e.failure.to_json(),
                }
                for e in entries
            ]
        }
    )


class _Selection(BaseModel):
    ids: list[str] | None = None
    function: str | None = None
    all: bool = False


async def _selection(request: Request) -> _Selection:
    ctx = _ctx(request)
    body = await ctx.read_body(request)
    try:
        chosen = _Selection.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise Problem(
            422,
            "schema",
            "the body is {'ids': [...]} or {'function': NAME} or {'all': true}",
            errors=[
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ],
        ) from None
    if sum((chosen.ids is not None, chosen.function is not None, chosen.all)) != 1:
        raise Problem(
            400, "malformed-selection", "choose exactly one of 'ids', 'function' or 'all': true"
        )
    if chosen.function is not None and chosen.function not in ctx.app.functions:
        raise Problem(404, "unknown-function", f"no function named {chosen.function!r}")
    return chosen


async def post_dlq_replay(request: Request) -> Response:
    ctx = _ctx(request)
    ctx.authorize_admin(ctx.authenticate(request))
    chosen = await _selection(request)
    count = await _dlq(ctx).replay(chosen.ids, group=chosen.function)
    return _json({"replayed": count})


async def post_dlq_purge(request: Request) -> Response:
    ctx = _ctx(request)
    ctx.authorize_admin(ctx.authenticate(request))
    chosen = await _selection(request)
    count = await _dlq(ctx).purge(chosen.ids, group=chosen.function)
    return _json({"purged": count})


async def get_health(request: Request) -> Response:
    ctx = _ctx(request)
    started = ctx.runtime.started.is_set()
    return _json({"status": "ok" if started else "starting"}, 200 if started else 503)


async def get_openapi(request: Request) -> Response:
    document: bytes = request.app.state.openapi
    return Response(document, media_type="application/json")


def _reply_route(endpoint: ReplyEndpoint) -> Route:
    async def handle(request: Request) -> Response:
        ctx = _ctx(request)
        key = ctx.authenticate(request)
        ctx.authorize_publish(key, [endpoint.publishes])
        body = await ctx.read_body(request)
        declared = ctx.app.events[endpoint.publishes]
        try:
            payload = declared.model.model_validate_json(body)
        except ValidationError as exc:
            raise Problem(
                422,
                "schema",
                f"the body is not a valid {endpoint.publishes!r}: {exc.error_count()} error(s)",
                errors=[
                    {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False, include_input=False)
                ],
            ) from None
        ctx.limit(request, key, 1)
        event = ctx.app.make_event(payload, type=endpoint.publishes, source=f"/http{endpoint.path}")
        answer = await ctx.request_reply(request, event, endpoint.replies, endpoint.timeout)
        if endpoint.respond is None:
            return Response(codec.encode(answer), media_type=codec.CONTENT_TYPE_STRUCTURED)
        return _json(endpoint.respond(answer))

    return Route(endpoint.path, _guarded(handle), methods=["POST"])


# ---------------------------------------------------------------------------------------
# The app


def build_app(
    runtime: Runtime,
    settings: HttpSettings | None = None,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    endpoints: Sequence[ReplyEndpoint] = (),
) -> Starlette:
    """The Starlette app of the HTTP edge (see the module docstring)."""
    settings = settings or HttpSettings()
    keys = settings.keys or KeyStore(":memory:")
    ctx = HttpContext(
        runtime=runtime,
        settings=settings,
        keys=keys,
        seen=SeenMessages(keys.path),
        limiter=RateLimiter(settings.rate, settings.burst) if settings.rate else None,
        webhooks={w.name: w for w in settings.webhooks},
    )
    for source in settings.webhooks:
        if source.type not in runtime.app.events and not settings.accept_undeclared:
            raise ConfigError(
                f"webhook source {source.name!r} publishes {source.type!r}, which app "
                f"{runtime.app.name!r} does not declare; declare it with @app.event(...)"
            )
    for endpoint in endpoints:
        if endpoint.publishes not in runtime.app.events:
            raise ConfigError(f"endpoint {endpoint.path}: {endpoint.publishes!r} is not declared")
    routes: list[BaseRoute] = [
        Route("/events", _guarded(post_events), methods=["POST"]),
        Route("/webhooks/{source}", _guarded(post_webhook), methods=["POST"]),
        Route("/admin/dlq", _guarded(get_dlq), methods=["GET"]),
        Route("/admin/dlq/replay", _guarded(post_dlq_replay), methods=["POST"]),
        Route("/admin/dlq/purge", _guarded(post_dlq_purge), methods=["POST"]),
        Route("/healthz", _guarded(get_health), methods=["GET"]),
        Route("/openapi.json", _guarded(get_openapi), methods=["GET"]),
        *(_reply_route(e) for e in endpoints),
        *extra_routes,
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http")
        problem = Problem(exc.status_code, slug, str(exc.detail), headers=dict(exc.headers or {}))
        return _problem_response(problem, request.url.path)

    asgi = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    asgi.state.nerve = ctx
    asgi.state.endpoints = list(endpoints)
    asgi.state.openapi = orjson.dumps(openapi_document(ctx, list(endpoints)))
    return asgi


def default_extra_routes(runtime: Runtime) -> list[BaseRoute]:
    """Routes other parts of nerve contribute to ``nerve run``'s server: the
    observability routes when ``nerve.observe`` offers ``http_routes(runtime)``."""
    try:
        from nerve import observe  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return []
    contribute = getattr(observe, "http_routes", None)
    if contribute is None:
        return []
    routes: list[BaseRoute] = list(contribute(runtime))
    return routes


# ---------------------------------------------------------------------------------------
# Serving


class _Server:
    """uvicorn's Server without its signal handling (the Runtime owns the signals)."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self.server = Quiet(config)


class HttpServer:
    """Serves :func:`build_app` with uvicorn inside a running :class:`Runtime`.

    ``await start()`` returns once the socket accepts connections; ``await stop()``
    stops accepting, lets in-flight requests finish (``settings.shutdown_timeout``),
    and returns. :meth:`attach` starts it and stops it before the runtime drains.
    """

    def __init__(
        self,
        runtime: Runtime,
        settings: HttpSettings | None = None,
        *,
        extra_routes: Sequence[BaseRoute] = (),
        endpoints: Sequence[ReplyEndpoint] = (),
        sock: socket.socket | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings or HttpSettings()
        self.asgi = build_app(
            runtime, self.settings, extra_routes=extra_routes, endpoints=endpoints
        )
        self.sock = sock
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def context(self) -> HttpContext:
        ctx: HttpContext = self.asgi.state.nerve
        return ctx

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually listened on (port 0 picks a free one)."""
        if self.sock is None:
            return self.settings.host, self.settings.port
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        import uvicorn

        check_exposure(self.address[0] if self.sock else self.settings.host, self.context.keys)
        if self.sock is None:
            self.sock = bind_socket(self.settings.host, self.settings.port)
        config = uvicorn.Config(
            self.asgi,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(self.settings.shutdown_timeout)),
        )
        self._server = _Server(config).server
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]), name="nerve:http")
        while not self._server.started:
            if self._task.done():
                await self._task
                raise ConfigError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self.context.seen.close()

    async def attach(self) -> None:
        """Start, and stop before the runtime drains (``runtime.on_stop``)."""
        await self.start()
        self.runtime.on_stop.append(self.stop)


@contextlib.asynccontextmanager
async def serving(
    runtime: Runtime, settings: HttpSettings | None = None, **kwargs: Any
) -> AsyncIterator[HttpServer]:
    """``async with serving(runtime, settings) as server:`` (for tests and embedding)."""
    server = HttpServer(runtime, settings, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
