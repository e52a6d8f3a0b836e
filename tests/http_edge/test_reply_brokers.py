"""Request/reply on the real distributed brokers that have an event log, with the
function in one runtime (its own broker connection, as another process would have)
and the waiting caller in another; and a clear refusal where there is no log."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from nerve import Runtime
from nerve.errors import ConfigError

from .conftest import Seen, make_app


def _url(broker: str, directory: Path) -> str:
    # the conformance suite's adapter specs: fresh, isolated, cleaned up after the session
    importlib.import_module("transport.conftest")  # it imports every adapter first
    module = importlib.import_module(f"transport.adapter_{broker}")
    url: str = module.make_url(directory)
    return url


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["postgres", "redis", "nats", "kafka"])
async def test_reply_across_connections(broker: str, tmp_path: Path) -> None:
    url = _url(broker, tmp_path)
    app, _ = make_app(Seen())
    worker = Runtime(app, broker=url, store=f"sqlite:///{tmp_path}/w.db", only=["confirm"])
    caller = Runtime(app, broker=url, store=f"sqlite:///{tmp_path}/c.db", only=["record"])
    await worker.start()
    await caller.start()
    try:
        for i, (amount, state) in enumerate([(10, "confirmed"), (14, "declined")]):
            reply = await caller.client.request(
                {"order_id": f"{broker}-{i}", "amount_cents": amount},
                type="order.created",
                replies=["order.confirmed"],
                timeout=20,
            )
            assert reply.data == {"order_id": f"{broker}-{i}", "state": state}
        with pytest.raises(TimeoutError):
            await caller.client.request(
                {"order_id": "never", "amount_cents": 13},
                type="order.created",
                replies=["order.confirmed"],
                timeout=0.5,
            )
        assert caller.client.replies.pending == 0
    finally:
        await caller.stop()
        await worker.stop()


@pytest.mark.slow
async def test_no_event_log_is_a_clear_error(tmp_path: Path) -> None:
    url = _url("rabbitmq", tmp_path)
    app, _ = make_app(Seen())
    runtime = Runtime(app, broker=url, store=f"sqlite:///{tmp_path}/s.db", only=["record"])
    await runtime.start()
    try:
        with pytest.raises(ConfigError, match="event log"):
            await runtime.client.request(
                {"order_id": "x", "amount_cents": 1},
                type="order.created",
                replies=["order.confirmed"],
                timeout=1,
            )
        assert runtime.client.replies.pending == 0
    finally:
        await runtime.stop()
