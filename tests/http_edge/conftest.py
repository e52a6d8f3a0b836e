"""A small App, a runtime on the embedded broker and its HTTP edge on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field

from nerve import App, Context, Event, Runtime
from nerve.http import Endpoints
from nerve.http.auth import KeyStore
from nerve.http.server import HttpServer, HttpSettings, bind_socket
from nerve.http.webhooks import WebhookSource

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Seen:
    events: list[Event] = field(default_factory=list)

    def types(self) -> list[str]:
        return [e.type for e in self.events]


def make_app(seen: Seen) -> tuple[App, Endpoints]:
    app = App("httptest")

    @app.event("order.created", key="order_id")
    class OrderCreated(BaseModel):
        order_id: str
        amount_cents: int = Field(ge=0)

    @app.event("order.confirmed", key="order_id")
    class OrderConfirmed(BaseModel):
        order_id: str
        state: str

    @app.event("order.note")
    class OrderNote(BaseModel):
        text: str

    @app.event("push.received")
    class PushReceived(BaseModel):
        ref: str

    @app.function(consumes=OrderCreated, emits=[OrderConfirmed])
    async def confirm(order: OrderCreated, ctx: Context) -> None:
        seen.events.append(ctx.event)
        if order.amount_cents == 13:  # never answered: request/reply times out
            return
        state = "declined" if order.amount_cents % 7 == 0 else "confirmed"
        ctx.emit(OrderConfirmed(order_id=order.order_id, state=state))

    @app.function(consumes=["order.note", "push.received"])
    async def record(payload: BaseModel, ctx: Context) -> None:
        seen.events.append(ctx.event)

    endpoints = Endpoints(app)
    endpoints.reply(
        "/orders",
        publishes=OrderCreated,
        replies=[OrderConfirmed],
        respond=lambda reply: {"order_id": reply.data["order_id"], "state": reply.data["state"]},
        timeout=10.0,
    )
    return app, endpoints


@dataclass
class Edge:
    runtime: Runtime
    server: HttpServer
    client: httpx.AsyncClient
    seen: Seen
    keys: KeyStore
    broker: str

    @property
    def url(self) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}"

    async def log_size(self) -> int:
        return (await self.runtime.transport.read_log(None, 0))[0][0]  # type: ignore[attr-defined]


EdgeFactory = Callable[..., Any]


@pytest.fixture
async def edge_factory(tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    opened: list[Edge] = []

    async def make(**settings: Any) -> Edge:
        seen = Seen()
        app, endpoints = make_app(seen)
        broker = f"sqlite:///{tmp_path}/nerve.db?poll_interval=0.01"
        runtime = Runtime(app, broker=broker, store=f"sqlite:///{tmp_path}/store.db")
        await runtime.start()
        keys = KeyStore(tmp_path / "store.db")
        settings.setdefault(
            "webhooks", [WebhookSource("github", "push.received", (WEBHOOK_SECRET,))]
        )
        server = HttpServer(
            runtime,
            HttpSettings(keys=keys, **settings),
            endpoints=endpoints.routes,
            sock=bind_socket("127.0.0.1", 0),
        )
        await server.attach()
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.address[1]}", timeout=10)
        edge = Edge(runtime, server, client, seen, keys, broker)
        opened.append(edge)
        return edge

    yield make
    for edge in opened:
        await edge.client.aclose()
        await edge.runtime.stop()
        edge.keys.close()


@pytest.fixture
async def edge(edge_factory: EdgeFactory) -> Edge:
    made: Edge = await edge_factory()
    return made


class ThreadedEdge:
    """A runtime and its HTTP edge on their own event loop in a thread, for sync
    clients (schemathesis, load generators)."""

    def __init__(self, directory: Path, **settings: Any) -> None:
        import asyncio
        import threading

        self.directory = directory
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.seen = Seen()
        self.runtime: Runtime | None = None
        self.server: HttpServer | None = None
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        app, endpoints = make_app(self.seen)
        self.runtime = Runtime(
            app,
            broker=f"sqlite:///{self.directory}/nerve.db?poll_interval=0.01",
            store=f"sqlite:///{self.directory}/store.db",
        )
        await self.runtime.start()
        self.settings.setdefault(
            "webhooks", [WebhookSource("github", "push.received", (WEBHOOK_SECRET,))]
        )
        self.server = HttpServer(
            self.runtime,
            HttpSettings(**self.settings),
            endpoints=endpoints.routes,
            sock=bind_socket("127.0.0.1", 0),
        )
        await self.server.attach()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.address[1]}"

    def close(self) -> None:
        import asyncio

        assert self.runtime is not None
        asyncio.run_coroutine_threadsafe(self.runtime.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
