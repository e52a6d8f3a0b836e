"""POST /events: the CloudEvents HTTP binding, end to end on a real server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from nerve.event import Event, encode, encode_batch
from nerve.http.binding import binary_headers

from .conftest import Edge, EdgeFactory

PROBLEM = "application/problem+json"


def _sdk_event(i: int, **extra: object) -> CloudEvent:
    return CloudEvent(
        {
            "type": "order.created",
            "source": "https://partner.example/shop",
            "id": f"sdk-{i}",
            "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            "subject": "ordér 42 %",
            "datacontenttype": "application/json",
            "tenant": "acme corp",
            **extra,
        },
        {"order_id": f"o-{i}", "amount_cents": 100 + i},
    )


async def test_binary_mode_is_published_and_processed(edge: Edge) -> None:
    event = Event(type="order.note", source="/test", data={"text": "héllo wörld"})
    response = await edge.client.post(
        "/events", headers=binary_headers(event), content=orjson.dumps(event.data)
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 1, "ids": [event.id]}
    await edge.runtime.wait_idle()
    assert [e.id for e in edge.seen.events] == [event.id]
    assert edge.seen.events[0].data == {"text": "héllo wörld"}


async def test_official_sdk_binary_and_structured_modes_interoperate(edge: Edge) -> None:
    binary = to_binary(_sdk_event(1), JSONFormat())
    structured = to_structured(_sdk_event(2), JSONFormat())
    for message in (binary, structured):
        response = await edge.client.post("/events", headers=message.headers, content=message.body)
        assert response.status_code == 202, response.text
    await edge.runtime.wait_idle()
    by_id = {e.id: e for e in edge.seen.events}
    assert set(by_id) == {"sdk-1", "sdk-2"}
    for i in (1, 2):
        got = by_id[f"sdk-{i}"]
        assert got.type == "order.created"
        assert got.source == "https://partner.example/shop"
        assert got.subject == "ordér 42 %"  # percent-encoded in binary mode, decoded back
        assert got.time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert got.extensions["tenant"] == "acme corp"
        assert got.data == {"order_id": f"o-{i}", "amount_cents": 100 + i}
        # the partition key comes from the declared key when the sender set none
        assert got.partitionkey == f"o-{i}"


async def test_batch_mode_publishes_every_event(edge: Edge) -> None:
    events = [Event(type="order.note", source="/t", data={"text": str(i)}) for i in range(5)]
    sdk_docs = [orjson.loads(JSONFormat().write(_sdk_event(i))) for i in range(3)]
    body = orjson.dumps([*orjson.loads(encode_batch(events)), *sdk_docs])
    response = await edge.client.post(
        "/events", headers={"content-type": "application/cloudevents-batch+json"}, content=body
    )
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 8
    await edge.runtime.wait_idle()
    assert len(edge.seen.events) == 8


async def test_malformed_requests_are_400_and_publish_nothing(edge: Edge) -> None:
    before = await edge.log_size()
    structured = {"content-type": "application/cloudevents+json"}
    cases: list[tuple[dict[str, str], bytes, str]] = [
        (structured, b"{not json", "malformed-json"),
        (structured, b"[1]", "malformed-event"),
        (structured, orjson.dumps({"specversion": "1.0", "id": "x", "source": "/s"}), "invalid"),
        (
            structured,
            orjson.dumps({"specversion": "0.3", "id": "x", "source": "/s", "type": "t"}),
            "invalid",
        ),
        (
            {
                "ce-specversion": "1.0",
                "ce-id": "1",
                "ce-source": "/s",
                "ce-type": "order.note",
                "content-type": "application/json",
            },
            b"{oops",
            "malformed-json",
        ),
        (
            {
                "ce-specversion": "1.0",
                "ce-id": "1",
                "ce-source": "/s",
                "ce-type": "order.note",
                "ce-subject": "%FF%FE",
                "content-type": "application/json",
            },
            b"{}",
            "malformed-header",
        ),
        (
            {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s"},
            b"{}",
            "invalid-event",
        ),
        (
            {"content-type": "application/cloudevents-batch+json"},
            b'{"not": "an array"}',
            "malformed-batch",
        ),
    ]
    for headers, body, slug in cases:
        response = await edge.client.post("/events", headers=headers, content=body)
        assert response.status_code == 400, (headers, body, response.text)
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["status"] == 400
        assert problem["type"].startswith("urn:nerve:problem:" + slug.split("-")[0])
        assert problem["detail"]
    assert await edge.log_size() == before


async def test_unsupported_media_types_are_415(edge: Edge) -> None:
    for headers in (
        {"content-type": "application/json"},  # no ce-specversion: not a CloudEvent
        {"content-type": "text/plain"},
        {"content-type": "application/cloudevents+avro"},
    ):
        response = await edge.client.post("/events", headers=headers, content=b"{}")
        assert response.status_code == 415, response.text
        assert response.headers["content-type"] == PROBLEM


async def test_schema_violations_are_422_with_the_errors(edge: Edge) -> None:
    before = await edge.log_size()
    bad = [
        Event(type="order.created", source="/t", data={"order_id": "o1", "amount_cents": -5}),
        Event(type="order.note", source="/t", data={"text": "fine"}),
        Event(type="order.created", source="/t", data={"amount_cents": 3}),
        Event(type="no.such.type", source="/t", data={}),
    ]
    response = await edge.client.post(
        "/events",
        headers={"content-type": "application/cloudevents-batch+json"},
        content=encode_batch(bad),
    )
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    where = {(e["index"], tuple(e["loc"])) for e in errors}
    assert (0, ("data", "amount_cents")) in where
    assert (2, ("data", "order_id")) in where
    assert (3, ("type",)) in where
    assert not any(e["index"] == 1 for e in errors)
    assert await edge.log_size() == before  # all or nothing


async def test_body_limit_is_enforced_while_reading(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(max_body=1024)
    before = await edge.log_size()
    big = Event(type="order.note", source="/t", data={"text": "x" * 2000})
    response = await edge.client.post(
        "/events", headers={"content-type": "application/cloudevents+json"}, content=encode(big)
    )
    assert response.status_code == 413
    # A chunked body that never ends: the 413 must come while the client is still
    # sending (the server stops reading at the limit), not after the body.
    host, port = edge.server.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + b"800\r\n" + b"x" * 0x800 + b"\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    assert await edge.log_size() == before


async def test_rate_limit_is_429_with_retry_after(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(rate=1.0, burst=3.0)
    event = lambda: Event(type="order.note", source="/t", data={"text": "x"})  # noqa: E731
    codes = []
    for _ in range(5):
        e = event()
        response = await edge.client.post(
            "/events", headers=binary_headers(e), content=b'{"text":"x"}'
        )
        codes.append(response.status_code)
    assert codes[:3] == [202, 202, 202]
    assert codes[3:] == [429, 429]
    assert response.headers["retry-after"] == "1"
    assert response.json()["status"] == 429
    await edge.runtime.wait_idle()
    assert len(edge.seen.events) == 3


async def test_unknown_paths_methods_and_oversized_batches_are_problems(
    edge_factory: EdgeFactory,
) -> None:
    edge = await edge_factory(rate=100.0, burst=5.0)
    missing = await edge.client.get("/nope")
    assert (missing.status_code, missing.headers["content-type"]) == (404, PROBLEM)
    wrong = await edge.client.get("/events")
    assert (wrong.status_code, wrong.headers["content-type"]) == (405, PROBLEM)
    batch = [Event(type="order.note", source="/t", data={"text": str(i)}) for i in range(6)]
    response = await edge.client.post(
        "/events",
        headers={"content-type": "application/cloudevents-batch+json"},
        content=encode_batch(batch),
    )
    assert response.status_code == 429
    assert "split the batch" in response.json()["detail"]
    too_many = orjson.dumps([{} for _ in range(1001)])
    response = await edge.client.post(
        "/events", headers={"content-type": "application/cloudevents-batch+json"}, content=too_many
    )
    assert response.status_code == 413
    assert response.json()["type"] == "urn:nerve:problem:batch-too-large"
