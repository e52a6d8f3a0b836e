"""The observability routes of ``nerve run``'s HTTP server: ``/metrics`` and the dashboard.

:func:`routes` returns Starlette routes that the HTTP edge mounts (its
``extra_routes`` hook, through :func:`nerve.observe.http_routes`):

==============================  =================================================
``GET /metrics``                Prometheus text exposition (this process's runtime)
``GET /``                       the dashboard (static files from ``static/``)
``GET /api/overview``           the App: functions, event types, topology graph
``GET /api/stats``              counters, latency quantiles, backlog, concurrency
``GET /api/events``             a page of logged events, newest first (filters)
``GET /api/stream``             new events as Server-Sent Events (filters)
``GET /api/flow``               the causal chain of ``?id=``, ``?subject=`` or
                                ``?correlation=``
``GET /api/dlq``, ``/api/dlq/{id}``  dead letters, with the event (admin scope)
==============================  =================================================

Replaying and purging dead letters use the HTTP edge's own ``POST /admin/dlq/replay``
and ``/admin/dlq/purge`` (admin scope). When the server has API keys, every ``/api``
route needs one (``Authorization: Bearer ...``); the dashboard asks for it once and
keeps it in the browser's local storage. Every list is bounded (``limit`` at most
500), so the pages stay fast with any number of events in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from nerve import event as codec
from nerve.app import App, matches_pattern
from nerve.errors import NerveError
from nerve.event import Event
from nerve.observe.flow import (
    attribute_text,
    find_flow,
    flow_json,
    json_position,
    search_events,
)
from nerve.transport.base import DeadLetterQueue, EventLog, Inspectable

if TYPE_CHECKING:
    from nerve.runtime import Runtime

__all__ = ["routes", "topology"]

STATIC = Path(__file__).parent / "static"
STREAM_POLL = 0.25
"""Seconds between two reads of the event log by a live stream."""
STREAM_MAX_PER_SECOND = 200
"""A live stream sends at most this many events a second (and says how many it skipped)."""
MAX_PAGE = 500

Endpoint = Callable[[Request], Awaitable[Response]]


def _json(doc: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(doc, default=str), status_code=status, media_type="application/json"
    )


def _problem(status: int, slug: str, detail: str) -> Response:
    from nerve.http.problems import PROBLEM_CONTENT_TYPE, Problem

    doc = Problem(status, slug, detail).to_json(None)
    return Response(orjson.dumps(doc), status_code=status, media_type=PROBLEM_CONTENT_TYPE)


def _guard(endpoint: Endpoint, *, admin: bool = False) -> Endpoint:
    """Authenticate (when the server has keys; ``admin``: require the admin scope);
    problems become problem+json."""
    from nerve.http.problems import Problem

    async def run(request: Request) -> Response:
        try:
            ctx = getattr(request.app.state, "nerve", None)
            if ctx is not None:
                key = ctx.authenticate(request)
                if admin:
                    ctx.authorize_admin(key)
            return await endpoint(request)
        except Problem as problem:
            return Response(
                orjson.dumps(problem.to_json(request.url.path)),
                status_code=problem.status,
                media_type="application/problem+json",
                headers=problem.headers,
            )
        except NerveError as exc:
            return _problem(400, "nerve", str(exc))

    return run


def topology(app: App) -> dict[str, Any]:
    """The App's topology (:func:`nerve.schema.graph.build_graph`) as the dashboard
    draws it: nodes ``type:<name>``, ``fn:<name>``, ``producer:clients``; edges
    ``<type>-><function>`` (consumes), ``<function>-><type>`` (emits) and
    ``clients-><type>`` (published from outside), named so live rates find them."""
    from nerve.schema.graph import build_graph

    graph = build_graph(app)
    prefix = {"event": "type:", "function": "fn:", "producer": "producer:"}

    def node_id(graph_id: str) -> tuple[str, str]:
        kind, _, name = graph_id.partition(":")
        return prefix.get(kind, f"{kind}:") + name, name

    nodes = []
    for node in graph.nodes:
        nodes.append(
            {
                "id": node_id(node.id)[0],
                "kind": node.kind,
                "label": node.label,
                "description": node.description,
            }
        )
    edges = []
    for edge in graph.edges:
        source, source_name = node_id(edge.source)
        target, target_name = node_id(edge.target)
        if edge.kind == "consumes":
            edge_id, function, type_name = f"{source_name}->{target_name}", target_name, source_name
        elif edge.kind == "emits":
            edge_id, function, type_name = f"{source_name}->{target_name}", source_name, target_name
        else:
            edge_id, function, type_name = f"{source_name}->{target_name}", "", target_name
        edges.append(
            {
                "id": edge_id,
                "source": source,
                "target": target,
                "kind": edge.kind,
                "function": function,
                "type": type_name,
            }
        )
    return {"nodes": nodes, "edges": edges}


def _quantiles(buckets: Any) -> dict[str, float | None]:
    return {f"p{int(q * 100)}": buckets.quantile(q) for q in (0.5, 0.9, 0.99)}


async def _stats(runtime: Runtime) -> dict[str, Any]:
    metrics = runtime.metrics
    backlog: dict[str, int] = {}
    dlq: dict[str, int] = {}
    if isinstance(runtime.transport, Inspectable):
        for s in await runtime.transport.stats():
            backlog[s.group] = s.backlog
            dlq[s.group] = s.dead_letters
    functions: dict[str, Any] = {}
    for name, runner in runtime.runners.items():
        doc: dict[str, Any] = {
            "received": runner.stats.received,
            "processed": runner.stats.processed,
            "failed": runner.stats.failed,
            "retried": runner.stats.retried,
            "dead_lettered": runner.stats.dead_lettered,
            "cold_starts": runner.stats.cold_starts,
            "in_flight": runner.in_flight,
            "active": runner._gate.active,
            "limit": runner.limit,
            "backlog": backlog.get(name, 0),
            "dlq": dlq.get(name, 0),
        }
        fm = metrics.functions.get(name) if metrics is not None else None
        if fm is not None:
            doc["by_type"] = {
                "processed": fm.processed,
                "failed": fm.failed,
                "published": fm.published,
            }
            doc["duration"] = _quantiles(fm.duration)
            doc["latency"] = _quantiles(fm.latency)
            # raw buckets: the dashboard computes percentiles over a recent window
            doc["duration_hist"] = {"bounds": fm.duration.bounds, "counts": fm.duration.counts}
            doc["latency_hist"] = {"bounds": fm.latency.bounds, "counts": fm.latency.counts}
        functions[name] = doc
    published = dict(metrics.client.published) if metrics is not None else {}
    return {"time": time.time(), "functions": functions, "client_published": published}


def _filters(request: Request, app: App) -> tuple[list[str], str | None]:
    """Event types and subject selected by ``?type=`` (a type or pattern),
    ``?function=`` (the types it consumes) and ``?subject=``."""
    from nerve.http.problems import Problem

    params = request.query_params
    types = list(app.events)
    pattern = params.get("type") or None
    if pattern is not None:
        types = [t for t in types if matches_pattern(pattern, t)]
        if not types and pattern not in app.events:
            types = [pattern]  # an undeclared type can still be in the log
    function = params.get("function") or None
    if function is not None:
        fn = app.functions.get(function)
        if fn is None:
            raise Problem(404, "unknown-function", f"no function named {function!r}")
        types = [t for t in types if any(matches_pattern(p, t) for p in fn.subscription.patterns)]
    if pattern is None and function is None:
        types = []  # no type filter: every type, declared or not
    return types, params.get("subject") or None


def _limit(request: Request, default: int = 100) -> int:
    from nerve.http.problems import Problem

    text = request.query_params.get("limit", str(default))
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise Problem(400, "malformed-query", f"limit= is a number from 1 to {MAX_PAGE}")
    return int(text)


def _summary(position: int, published: float, event: Event) -> dict[str, Any]:
    data = event.data
    if isinstance(data, bytes):
        shown: Any = f"<{len(data)} bytes>"
    else:
        text = orjson.dumps(data).decode()
        shown = text if len(text) <= 400 else text[:399] + "…"
    return {
        "position": json_position(position),
        "published_at": published or None,
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "subject": event.subject,
        "time": event.time.timestamp() if event.time else None,
        "key": event.partitionkey,
        "correlation": str(event.extensions.get("correlationid") or event.id),
        "causation": event.extensions.get("causationid"),
        "data": shown,
    }


def routes(runtime: Runtime) -> list[BaseRoute]:
    """The observability routes for ``runtime`` (see the module docstring)."""
    app = runtime.app
    transport = runtime.transport

    async def metrics(request: Request) -> Response:
        if runtime.metrics is None:
            return _problem(404, "no-metrics", "this runtime keeps no metrics (metrics=False)")
        with contextlib.suppress(NerveError):  # the broker is unreachable: serve the rest
            await runtime.metrics.refresh_backlog()
        return Response(
            runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def index(request: Request) -> Response:
        page = STATIC / "index.html"
        if not page.exists():
            return _problem(404, "no-dashboard", "the dashboard is not built: run dashboard/build")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    async def overview(request: Request) -> Response:
        return _json(
            {
                "app": app.name,
                "functions": {
                    f.name: {
                        "consumes": list(f.subscription.patterns),
                        "emits": sorted(f.emits),
                        "concurrency": f.concurrency,
                        "description": f.description,
                    }
                    for f in app.functions.values()
                },
                "events": sorted(app.events),
                "topology": topology(app),
                "features": {
                    "event_log": isinstance(transport, EventLog),
                    "dlq": isinstance(transport, DeadLetterQueue),
                    "tracing": runtime.tracing is not None,
                },
            }
        )

    async def stats(request: Request) -> Response:
        return _json(await _stats(runtime))

    async def events(request: Request) -> Response:
        types, subject = _filters(request, app)
        before_text = request.query_params.get("before")
        before = int(before_text) if before_text and before_text.isdigit() else None
        contains = [attribute_text("subject", subject)] if subject else []
        rows = await search_events(
            transport, contains=contains, types=types, before=before, limit=_limit(request)
        )
        return _json({"events": [_summary(*row) for row in rows]})

    async def stream(request: Request) -> Response:
        if not isinstance(transport, EventLog):
            return _problem(404, "no-event-log", "this broker keeps no event log to stream")
        types, subject = _filters(request, app)
        wanted = set(types)
        log = transport

        async def lines() -> AsyncIterator[bytes]:
            position = (await log.read_log(None, 1))[0][0]
            yield b"retry: 2000\n\n"
            # ends when the browser goes away or the runtime stops (so a shutdown does
            # not wait for open dashboards)
            while runtime.started.is_set() and not await request.is_disconnected():
                batch = await log.read_log(position, 1000)
                sent = skipped = 0
                for seq, raw in batch:
                    position = seq
                    try:
                        event = codec.decode(raw)
                    except NerveError:
                        continue
                    if wanted and event.type not in wanted:
                        continue
                    if subject is not None and event.subject != subject:
                        continue
                    if sent >= STREAM_MAX_PER_SECOND * STREAM_POLL:
                        skipped += 1
                        continue
                    sent += 1
                    body = orjson.dumps(_summary(seq, 0.0, event))
                    yield b"event: event\ndata: " + body + b"\n\n"
                if skipped:
                    yield b"event: skipped\ndata: " + str(skipped).encode() + b"\n\n"
                if not batch:
                    yield b": keep-alive\n\n"
                await asyncio.sleep(STREAM_POLL)

        return StreamingResponse(
            lines(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def flow(request: Request) -> Response:
        from nerve.http.problems import Problem

        params = request.query_params
        chosen = {k: params.get(k) or None for k in ("id", "subject", "correlation")}
        if sum(v is not None for v in chosen.values()) != 1:
            raise Problem(400, "malformed-query", "give exactly one of id=, subject=, correlation=")
        roots = await find_flow(
            transport,
            runtime.store,
            event_id=chosen["id"],
            subject=chosen["subject"],
            correlation=chosen["correlation"],
        )
        return _json({"flows": [flow_json(root) for root in roots]})

    def _dlq() -> DeadLetterQueue:
        from nerve.http.problems import Problem

        if not isinstance(transport, DeadLetterQueue):
            raise Problem(404, "no-dlq", "this broker offers no dead letter queue")
        return transport

    def _entry(entry: Any, full: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": entry.id, "function": entry.group}
        doc["failure"] = entry.failure.to_json()
        if not full:
            doc["failure"].pop("traceback", None)
        if entry.event is not None:
            doc["event"] = _summary(0, 0.0, entry.event)
            if full:
                doc["event"]["data"] = (
                    None if isinstance(entry.event.data, bytes) else entry.event.data
                )
                doc["event"]["extensions"] = dict(entry.event.extensions)
        else:
            doc["event"] = None
            doc["raw"] = entry.raw.decode("utf-8", "replace")[:4000]
        return doc

    async def dlq_list(request: Request) -> Response:
        from nerve.http.problems import Problem

        function = request.query_params.get("function") or None
        if function is not None and function not in app.functions:
            raise Problem(404, "unknown-function", f"no function named {function!r}")
        entries = await _dlq().dead_letters(function, limit=_limit(request))
        return _json({"entries": [_entry(e, full=False) for e in entries]})

    async def dlq_entry(request: Request) -> Response:
        from nerve.http.problems import Problem

        entry = await _dlq().dead_letter_entry(request.path_params["entry"])
        if entry is None:
            raise Problem(404, "unknown-dead-letter", "no such dead letter (replayed or purged?)")
        return _json(_entry(entry, full=True))

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/api/overview", _guard(overview), methods=["GET"]),
        Route("/api/stats", _guard(stats), methods=["GET"]),
        Route("/api/events", _guard(events), methods=["GET"]),
        Route("/api/stream", _guard(stream), methods=["GET"]),
        Route("/api/flow", _guard(flow), methods=["GET"]),
        Route("/api/dlq", _guard(dlq_list, admin=True), methods=["GET"]),
        Route("/api/dlq/{entry}", _guard(dlq_entry, admin=True), methods=["GET"]),
        Mount("/assets", app=StaticFiles(directory=STATIC / "assets", check_dir=False)),
    ]
