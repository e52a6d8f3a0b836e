"""Structured logs: one JSON object a line, with the event's context and trace id."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel

from nerve import App, Context, Runtime
from nerve.observe.logs import setup_logging
from nerve.observe.tracing import Tracing

ROOT = Path(__file__).resolve().parents[2]


class Ping(BaseModel):
    n: int


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    setup_logging("info", "json", stream=stream)
    yield stream
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


async def test_handler_and_runtime_records_carry_the_event_context(
    captured: io.StringIO,
) -> None:
    pings = App("pings")
    pings.event("ping")(Ping)

    @pings.function(consumes=Ping)
    async def pong(ping: Ping, ctx: Context) -> None:
        ctx.log.info("handling ping %d", ping.n)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")

    async with Runtime(pings, broker="memory://", tracing=Tracing(TracerProvider())) as rt:
        event = await rt.client.publish(Ping(n=7))
        await rt.wait_idle(timeout=10)

    records = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    handled = [r for r in records if r["message"] == "handling ping 7"]
    assert [r["attempt"] for r in handled] == [1, 2]
    trace_id = event.extensions["traceparent"].split("-")[1]  # type: ignore[union-attr]
    for record in handled:
        assert record["event_id"] == event.id
        assert record["event_type"] == "ping"
        assert record["function"] == "pong"
        assert record["correlation_id"] == event.id
        assert record["trace_id"] == trace_id
        assert record["level"] == "info" and record["logger"] == "nerve.function"
    (retry,) = [r for r in records if "retrying in" in r["message"]]
    assert retry["event_id"] == event.id and retry["attempt"] == 1
    assert retry["trace_id"] == trace_id


def test_nerve_run_refuses_an_unknown_log_format(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nerve", "run", "examples.shop.app:app", "--log-format", "yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "yaml" in proc.stderr


def test_the_console_format_names_the_event() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("info", "console", stream=stream)
        logging.getLogger("nerve.function").info(
            "hello", extra={"function": "pong", "event_id": "e-1", "event_type": "ping"}
        )
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    text = stream.getvalue()
    assert "hello" in text and "fn=pong" in text and "event=e-1" in text
    with pytest.raises(ValueError, match="yaml"):
        setup_logging("info", "yaml")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_records_go_to_stderr_as_it_is_now(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler set up while one stderr was in place keeps working after it is
    replaced and closed (a test runner's capture): no 'Logging error' traceback."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("info", fmt)
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("nerve.test").warning("still heard")
    logging.getLogger().handlers.clear()
    assert "still heard" in second.getvalue()
    assert "Logging error" not in second.getvalue()
