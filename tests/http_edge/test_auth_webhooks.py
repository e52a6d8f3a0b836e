"""Every refusal path of the HTTP edge: each is refused, and nothing reaches the broker."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from nerve.errors import ConfigError
from nerve.event import Event
from nerve.http.auth import RECHECK_EVERY, KeyStore
from nerve.http.binding import binary_headers
from nerve.http.server import bind_socket, check_exposure
from nerve.http.webhooks import sign

from .conftest import WEBHOOK_SECRET, Edge

NOTE = b'{"text": "hi"}'


def _note() -> tuple[dict[str, str], bytes]:
    return binary_headers(Event(type="order.note", source="/t", data={"text": "hi"})), NOTE


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _post(edge: Edge, key: str | None) -> httpx.Response:
    headers, body = _note()
    if key is not None:
        headers |= _bearer(key)
    return await edge.client.post("/events", headers=headers, content=body)


async def test_keys_deny_by_default_and_scope_publishing(edge: Edge) -> None:
    # no key configured yet: open (the server is on loopback)
    assert (await _post(edge, None)).status_code == 202
    _, notes = edge.keys.create("notes-writer", ["order.note"])
    _, orders = edge.keys.create("orders", ["order.*"])
    _, admin = edge.keys.create("ops", ["admin"])
    before = await edge.log_size()

    missing = await _post(edge, None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["type"] == "urn:nerve:problem:unauthenticated"

    wrong = await _post(edge, notes[:-2] + "xx")
    assert wrong.status_code == 401
    assert (await _post(edge, "nrv_garbage")).status_code == 401
    basic = await edge.client.post(
        "/events", headers=_note()[0] | {"authorization": "Basic dXNlcjpwYXNz"}, content=NOTE
    )
    assert basic.status_code == 401

    # order.* covers order.note; admin-only keys publish nothing
    assert (await _post(edge, orders)).status_code == 202
    scoped = await _post(edge, admin)
    assert scoped.status_code == 403
    assert "may not publish order.note" in scoped.json()["detail"]
    created = Event(type="order.created", source="/t", data={"order_id": "o", "amount_cents": 1})
    refused = await edge.client.post(
        "/events",
        headers=binary_headers(created) | _bearer(notes),
        content=orjson.dumps(created.data),
    )
    assert refused.status_code == 403
    assert await edge.log_size() == before + 1  # only the orders key's event got in

    # revoked: refused from the next request on (the store is re-read when it changes)
    assert (await _post(edge, notes)).status_code == 202
    other = KeyStore(edge.keys.path)  # as `nerve keys revoke` does, from another process
    assert other.revoke(notes)
    other.close()
    await asyncio.sleep(RECHECK_EVERY * 1.5)  # another process's change is seen within this
    before = await edge.log_size()
    revoked = await _post(edge, notes)
    assert revoked.status_code == 401
    assert await edge.log_size() == before


async def test_admin_endpoints_need_the_admin_scope(edge: Edge) -> None:
    _, writer = edge.keys.create("writer", [">"])
    _, admin = edge.keys.create("ops", ["admin"])
    assert (await edge.client.get("/admin/dlq")).status_code == 401
    assert (await edge.client.get("/admin/dlq", headers=_bearer(writer))).status_code == 403
    listed = await edge.client.get("/admin/dlq", headers=_bearer(admin))
    assert listed.status_code == 200
    assert listed.json() == {"entries": []}
    replay = await edge.client.post("/admin/dlq/replay", headers=_bearer(admin), json={"all": True})
    assert replay.json() == {"replayed": 0}
    bad = await edge.client.post("/admin/dlq/purge", headers=_bearer(admin), json={})
    assert bad.status_code == 400


def test_keys_are_stored_hashed_and_scopes_checked(tmp_path: object) -> None:
    store = KeyStore(":memory:")
    key, secret = store.create("ci", ["order.>", "admin"])
    assert secret.startswith(f"nrv_{key.id}_")
    rows = store._conn.execute("SELECT * FROM http_keys").fetchall()
    assert secret.split("_")[-1] not in repr(rows)
    assert store.authenticate(secret) == key
    with pytest.raises(ConfigError, match="scope"):
        store.create("bad", ["order.>.x"])
    with pytest.raises(ConfigError, match="at least one scope"):
        store.create("none", [])


def test_no_key_means_loopback_only() -> None:
    empty = KeyStore(":memory:")
    check_exposure("127.0.0.1", empty)
    check_exposure("::1", empty)
    with pytest.raises(ConfigError, match=r"refusing to serve HTTP on 0\.0\.0\.0"):
        check_exposure("0.0.0.0", empty)
    empty.create("k", ["admin"])
    check_exposure("0.0.0.0", empty)
    with pytest.raises(ConfigError, match="cannot listen"):
        taken = bind_socket("127.0.0.1", 0)
        try:
            bind_socket("127.0.0.1", taken.getsockname()[1])
        finally:
            taken.close()


# -- webhooks -------------------------------------------------------------------------


def _signed(body: bytes, msg_id: str, *, at: float | None = None, secret: str = WEBHOOK_SECRET):
    stamp = int(time.time() if at is None else at)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, msg_id, stamp, body),
        "content-type": "application/json",
    }


async def test_webhook_verified_deduplicated_and_published(edge: Edge) -> None:
    body = b'{"ref": "refs/heads/main"}'
    first = await edge.client.post("/webhooks/github", headers=_signed(body, "msg_1"), content=body)
    assert first.status_code == 202, first.text
    # a retry of the same message (a new timestamp, a new signature) is not published again
    again = await edge.client.post("/webhooks/github", headers=_signed(body, "msg_1"), content=body)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    await edge.runtime.wait_idle()
    assert [(e.id, e.source, e.type) for e in edge.seen.events] == [
        ("msg_1", "/webhooks/github", "push.received")
    ]


async def test_webhook_key_rotation_accepts_any_listed_signature(edge: Edge) -> None:
    body = b'{"ref": "x"}'
    headers = _signed(body, "msg_rot")
    old = sign("whsec_" + "A" * 32, "msg_rot", int(headers["webhook-timestamp"]), body)
    headers["webhook-signature"] = f"{old} v2,ignored {headers['webhook-signature']}"
    response = await edge.client.post("/webhooks/github", headers=headers, content=body)
    assert response.status_code == 202, response.text


async def test_webhook_refusals_publish_nothing(edge: Edge) -> None:
    body = b'{"ref": "x"}'
    before = await edge.log_size()
    bad_sig = _signed(body, "m1", secret="whsec_" + "B" * 32)
    # well past the 300 s tolerance: a stamp is whole seconds (int() takes up to 1 s off
    # a future one) and the requests before it take time (301 s once passed as 299.9)
    stale = _signed(body, "m2", at=time.time() - 330)
    future = _signed(body, "m3", at=time.time() + 330)
    tampered = _signed(body, "m4")
    unsigned = {"content-type": "application/json"}
    cases = [
        (bad_sig, body, 401, "webhook-bad-signature"),
        (stale, body, 401, "webhook-stale"),
        (future, body, 401, "webhook-stale"),
        (tampered, b'{"ref": "y"}', 401, "webhook-bad-signature"),
        (unsigned, body, 401, "webhook-unsigned"),
    ]
    for headers, content, status, slug in cases:
        response = await edge.client.post("/webhooks/github", headers=headers, content=content)
        assert response.status_code == status, response.text
        assert response.json()["type"] == f"urn:nerve:problem:{slug}"
    unknown = await edge.client.post("/webhooks/gitlab", headers=_signed(body, "m5"), content=body)
    assert unknown.status_code == 404
    # a verified payload that breaks the type's schema is 422, and not recorded as seen
    wrong = b'{"no_ref": 1}'
    invalid = await edge.client.post(
        "/webhooks/github", headers=_signed(wrong, "m6"), content=wrong
    )
    assert invalid.status_code == 422
    assert await edge.log_size() == before
    # replay after success: refused as a duplicate, nothing published
    ok = await edge.client.post("/webhooks/github", headers=_signed(body, "m7"), content=body)
    assert ok.status_code == 202
    replayed = await edge.client.post("/webhooks/github", headers=_signed(body, "m7"), content=body)
    assert replayed.status_code == 200
    assert await edge.log_size() == before + 1


async def test_webhook_dedup_survives_a_restart(edge_factory: object) -> None:
    body = b'{"ref": "x"}'
    first = await edge_factory()  # type: ignore[operator]
    ok = await first.client.post("/webhooks/github", headers=_signed(body, "m9"), content=body)
    assert ok.status_code == 202
    await first.server.stop()
    second = await edge_factory()  # type: ignore[operator]  # same files, new server
    again = await second.client.post("/webhooks/github", headers=_signed(body, "m9"), content=body)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
