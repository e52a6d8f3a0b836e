"""Request/reply: a synchronous caller waits for the event that answers its event."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from examples.shop import app as shop
from examples.shop.load import seed_stock
from nerve import Runtime
from nerve.event import Event, decode
from nerve.http.binding import binary_headers
from nerve.http.endpoints import find_endpoints
from nerve.http.server import HttpServer, HttpSettings, bind_socket

from .conftest import Edge, EdgeFactory

ROOT = Path(__file__).resolve().parents[2]


def _order(order_id: str, amount: int) -> Event:
    return Event(
        type="order.created", source="/t", data={"order_id": order_id, "amount_cents": amount}
    )


async def test_events_endpoint_waits_for_the_reply(edge: Edge) -> None:
    event = _order("o-1", 100)
    response = await edge.client.post(
        "/events",
        params={"reply": "order.confirmed", "timeout": "5"},
        headers=binary_headers(event),
        content=orjson.dumps(event.data),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/cloudevents+json"
    reply = decode(response.content)
    assert reply.type == "order.confirmed"
    assert reply.extensions["correlationid"] == event.id
    assert reply.extensions["causationid"] == event.id
    assert reply.data == {"order_id": "o-1", "state": "confirmed"}
    assert edge.runtime.client.replies.pending == 0


async def test_declared_endpoint_answers_with_the_outcome(edge: Edge) -> None:
    confirmed = await edge.client.post("/orders", json={"order_id": "o-2", "amount_cents": 10})
    declined = await edge.client.post("/orders", json={"order_id": "o-3", "amount_cents": 14})
    assert confirmed.json() == {"order_id": "o-2", "state": "confirmed"}
    assert declined.json() == {"order_id": "o-3", "state": "declined"}
    invalid = await edge.client.post("/orders", json={"order_id": "o-4", "amount_cents": -1})
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["loc"] == ["amount_cents"]
    assert edge.runtime.client.replies.pending == 0


async def test_timeout_is_504_and_leaks_no_waiter(edge: Edge) -> None:
    event = _order("o-13", 13)  # the function never answers amount 13
    started = time.monotonic()
    response = await edge.client.post(
        "/events",
        params={"reply": "order.confirmed", "timeout": "0.3"},
        headers=binary_headers(event),
        content=orjson.dumps(event.data),
    )
    assert response.status_code == 504
    assert response.json()["event_id"] == event.id
    assert time.monotonic() - started < 3
    assert edge.runtime.client.replies.pending == 0
    await edge.runtime.wait_idle()
    assert [e.id for e in edge.seen.events] == [event.id]  # published, handled anyway


async def test_cancelled_callers_leak_no_waiter(edge: Edge) -> None:
    """Callers that hang up (client timeout) and many concurrent requests: once all are
    done, nothing waits and the log reader stops."""
    replies = edge.runtime.client.replies
    slow = [
        asyncio.ensure_future(
            edge.client.post(
                "/events",
                params={"reply": "order.confirmed", "timeout": "30"},
                headers=binary_headers(e := _order(f"slow-{i}", 13)),
                content=orjson.dumps(e.data),
            )
        )
        for i in range(5)
    ]
    fast = [
        edge.client.post("/orders", json={"order_id": f"f-{i}", "amount_cents": i + 100})
        for i in range(20)
    ]
    answers = await asyncio.gather(*fast)
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers]
    assert replies.pending == 5
    for task in slow:
        task.cancel()  # the HTTP client hangs up
    await asyncio.gather(*slow, return_exceptions=True)
    deadline = time.monotonic() + 5
    while replies.pending and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert replies.pending == 0
    # with nothing waiting, the reader stops after its linger
    deadline = time.monotonic() + replies.linger + 2
    while replies._reader is not None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert replies._reader is None


async def test_request_without_reply_types_or_with_bad_timeout_is_400(edge: Edge) -> None:
    event = _order("o-9", 1)
    for params in ({"reply": ""}, {"reply": "a..b"}, {"reply": "x", "timeout": "999"}):
        response = await edge.client.post(
            "/events",
            params=params,
            headers=binary_headers(event),
            content=orjson.dumps(event.data),
        )
        assert response.status_code == 400, (params, response.text)


@pytest.mark.slow
async def test_reply_produced_by_another_process(edge_factory: EdgeFactory, tmp_path: Path) -> None:
    """The function runs in another `nerve run` process: this process serves HTTP only
    and still sees the reply (it reads the broker's event log)."""
    edge = await edge_factory()
    await edge.runtime.stop()  # keep the files; run only the HTTP edge here
    runtime = Runtime(
        edge.runtime.app, broker=edge.broker, store=f"sqlite:///{tmp_path}/s2.db", only=["record"]
    )
    await runtime.start()
    server = HttpServer(
        runtime,
        HttpSettings(),
        endpoints=edge.server.asgi.state.endpoints,
        sock=bind_socket("127.0.0.1", 0),
    )
    await server.attach()
    env = dict(os.environ, PYTHONPATH=str(ROOT), NERVE_BROKER=edge.broker)
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(  # noqa: ASYNC220
        [
            sys.executable,
            "-m",
            "nerve",
            "run",
            "tests.http_edge.reply_app:app",
            "-f",
            "confirm",
            "--no-http",
        ],
        env=env,
        cwd=tmp_path,
        stderr=worker_log,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.address[1]}") as client:
            response = await client.post(
                "/orders", json={"order_id": "x-1", "amount_cents": 21}, timeout=30
            )
        assert response.status_code == 200, response.text
        assert response.json() == {"order_id": "x-1", "state": "declined"}
        assert runtime.client.replies.pending == 0
    finally:
        worker.terminate()
        worker.wait(timeout=20)
        worker_log.close()
        await runtime.stop()


@pytest.mark.slow
async def test_shop_post_orders_answers_each_outcome(tmp_path: Path) -> None:
    runtime = Runtime(shop.app, broker=f"sqlite:///{tmp_path}/nerve.db?poll_interval=0.01")
    await runtime.start()
    await seed_stock(runtime.store, {"apple": 5, "pear": 1})
    server = HttpServer(
        runtime,
        HttpSettings(),
        endpoints=find_endpoints(shop.app),
        sock=bind_socket("127.0.0.1", 0),
    )
    await server.attach()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.address[1]}") as client:

            async def order(oid: str, sku: str, qty: int, amount: int) -> httpx.Response:
                return await client.post(
                    "/orders",
                    json={
                        "order_id": oid,
                        "customer_id": "c1",
                        "lines": [{"sku": sku, "qty": qty}],
                        "amount_cents": amount,
                    },
                    timeout=20,
                )

            shipped, declined, short = await asyncio.gather(
                order("A", "apple", 1, 100), order("B", "apple", 1, 700), order("C", "pear", 3, 10)
            )
        assert shipped.json() == {"order_id": "A", "state": shop.SHIPPED_PENDING}
        assert declined.json() == {"order_id": "B", "state": shop.PAYMENT_DECLINED}
        assert short.json() == {"order_id": "C", "state": shop.OUT_OF_STOCK}
        await runtime.wait_idle()  # the reply came first; the orders table follows
        states = {
            r["order_id"]: r["state"] for r in await runtime.store.query("SELECT * FROM orders")
        }
        assert states == {
            "A": shop.SHIPPED_PENDING,
            "B": shop.PAYMENT_DECLINED,
            "C": shop.OUT_OF_STOCK,
        }
    finally:
        await runtime.stop()


async def test_stopping_lets_in_flight_requests_finish(edge: Edge) -> None:
    """The runtime stops HTTP first: a request in flight gets its answer (here the 504 of
    its own timeout, within the grace period), then the listener is gone."""
    event = _order("o-stop", 13)
    in_flight = asyncio.ensure_future(
        edge.client.post(
            "/events",
            params={"reply": "order.confirmed", "timeout": "1"},
            headers=binary_headers(event),
            content=orjson.dumps(event.data),
        )
    )
    deadline = time.monotonic() + 5
    while not edge.runtime.client.replies.pending and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    url = edge.url
    await edge.runtime.stop()
    response = await in_flight
    assert response.status_code == 504
    async with httpx.AsyncClient() as late:
        with pytest.raises(httpx.ConnectError):
            await late.post(url + "/events")
