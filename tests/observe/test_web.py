"""The dashboard's API over a log of 100,000 events: every answer is bounded and quick."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from nerve import App, Context, Runtime
from nerve.event import Event
from nerve.http.server import build_app
from nerve.observe import http_routes
from nerve.transport.sqlite import SqliteTransport

EVENTS = 100_000


class Tick(BaseModel):
    n: int


def ticks_app() -> App:
    app = App("ticks")
    app.event("tick.sent")(Tick)

    @app.function(consumes=Tick)
    async def count(tick: Tick, ctx: Context) -> None:
        return None

    return app


@pytest.mark.slow
async def test_api_stays_fast_with_100k_events_in_the_log(tmp_path: Path) -> None:
    broker = f"sqlite:///{tmp_path}/nerve.db?synchronous=OFF"
    filler = SqliteTransport(broker)
    await filler.start()
    try:  # no group is declared yet: the events go to the log only
        for start in range(0, EVENTS, 5000):
            await filler.publish(
                [
                    Event(
                        type="tick.sent",
                        source="/t",
                        subject=f"s-{n}",
                        data={"n": n},
                        extensions={"correlationid": f"c-{n // 10}"},
                    )
                    for n in range(start, start + 5000)
                ]
            )
    finally:
        await filler.close()
    async with Runtime(ticks_app(), broker=broker, metrics=True, tracing=False) as rt:
        asgi = build_app(rt, extra_routes=http_routes(rt))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://nerve"
        ) as http:

            async def timed(url: str) -> tuple[float, httpx.Response]:
                started = time.perf_counter()
                response = await http.get(url)
                assert response.status_code == 200, response.text
                return time.perf_counter() - started, response

            took, page = await timed("/api/events?limit=100")
            events = page.json()["events"]
            assert len(events) == 100 and events[0]["data"] == '{"n":99999}'
            assert took < 1.0
            took, older = await timed(f"/api/events?limit=100&before={events[-1]['position']}")
            assert older.json()["events"][0]["data"] == '{"n":99899}' and took < 1.0
            took, by_type = await timed("/api/events?limit=500&type=tick.*")
            assert len(by_type.json()["events"]) == 500 and took < 1.0
            took, by_subject = await timed("/api/events?limit=10&subject=s-12345")
            assert [e["subject"] for e in by_subject.json()["events"]] == ["s-12345"]
            assert took < 3.0  # a scan of the log's bodies
            took, flow = await timed("/api/flow?correlation=c-4321")
            flows = flow.json()["flows"]
            assert sorted(f["data"]["n"] for f in flows) == list(range(43210, 43220))
            assert took < 3.0
            took, _ = await timed("/api/stats")
            assert took < 1.0
            response = await http.get("/api/events?limit=5000")
            assert response.status_code == 400  # pages are bounded


async def test_api_needs_a_key_when_the_server_has_keys_and_admin_for_dead_letters() -> None:
    from nerve.http.auth import KeyStore
    from nerve.http.server import HttpSettings

    keys = KeyStore(":memory:")
    _, reader = keys.create("dashboard viewer", ["tick.sent"])
    _, admin = keys.create("operator", ["admin"])
    async with Runtime(ticks_app(), broker="memory://", metrics=True, tracing=False) as rt:
        asgi = build_app(rt, HttpSettings(keys=keys), extra_routes=http_routes(rt))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://nerve"
        ) as http:
            anonymous = await http.get("/api/stats")
            assert anonymous.status_code == 401
            assert anonymous.headers["content-type"] == "application/problem+json"
            bad = await http.get("/api/stats", headers={"Authorization": "Bearer nrv_x_y"})
            assert bad.status_code == 401
            as_reader = {"Authorization": f"Bearer {reader}"}
            assert (await http.get("/api/stats", headers=as_reader)).status_code == 200
            assert (await http.get("/api/overview", headers=as_reader)).status_code == 200
            refused = await http.get("/api/dlq", headers=as_reader)
            assert refused.status_code == 403 and "admin" in refused.json()["detail"]
            as_admin = {"Authorization": f"Bearer {admin}"}
            assert (await http.get("/api/dlq", headers=as_admin)).json() == {"entries": []}
            missing = await http.get("/api/dlq/42", headers=as_admin)
            assert missing.status_code == 404
            # Prometheus scrapes without a key; keep /metrics on a private address
            assert (await http.get("/metrics")).status_code == 200
            wrong = await http.get("/api/flow?id=a&subject=b", headers=as_reader)
            assert wrong.status_code == 400 and "exactly one" in wrong.json()["detail"]
    keys.close()


async def test_the_live_stream_sends_new_matching_events_and_ends_when_the_runtime_stops(
    tmp_path: Path,
) -> None:
    import asyncio

    import orjson

    rt = Runtime(ticks_app(), broker=f"sqlite:///{tmp_path}/nerve.db", tracing=False)
    await rt.start()
    try:
        asgi = build_app(rt, extra_routes=http_routes(rt))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://nerve"
        ) as http:
            old = await rt.client.publish(Tick(n=1), subject="before")
            stream = asyncio.create_task(http.get("/api/stream?subject=wanted"))
            await asyncio.sleep(0.5)  # the stream starts at the log's end
            await rt.client.publish(Tick(n=2), subject="other")
            wanted = await rt.client.publish(Tick(n=3), subject="wanted")
            await asyncio.sleep(0.6)
            await rt.stop()
            response = await asyncio.wait_for(stream, 5)
    finally:
        await rt.stop()
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f.startswith("event: event")]
    sent = [orjson.loads(f.split("data: ", 1)[1]) for f in frames]
    assert [e["id"] for e in sent] == [wanted.id]
    assert sent[0]["subject"] == "wanted" and old.id not in response.text


def test_log_positions_past_what_json_numbers_hold_travel_as_strings() -> None:
    """kafka:// packs an offset per partition into one log position (over 2**64 with a
    few partitions): orjson refuses such integers and browsers round them, so the
    dashboard's event summaries carry them as strings, and smaller ones as numbers."""
    import orjson

    from nerve.event import Event
    from nerve.observe.web import _summary

    event = Event(type="order.created", source="/t", data={"n": 1})
    big = (5 << 96) | (7 << 48) | 9
    assert orjson.loads(orjson.dumps(_summary(big, 0.0, event)))["position"] == str(big)
    assert orjson.loads(orjson.dumps(_summary(41, 0.0, event)))["position"] == 41
