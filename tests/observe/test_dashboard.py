"""The dashboard, end to end: a real ``nerve run`` of the shop serving it, driven by
Debian's Chromium through Playwright (never a downloaded browser).

Screenshots land in ``tests/observe/artifacts/`` (ignored by git; CI keeps them).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from examples.shop import load
from examples.shop.app import app
from nerve import event as codec
from nerve.store.sqlite import SqliteStore

from .conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

TOTAL = "Number(document.querySelector('[data-testid=total-processed]').textContent)"
NOTE = "document.querySelector('[data-testid=dlq-note]').textContent"

pytestmark = pytest.mark.slow


def _require_browser() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "the playwright package is not installed (pip install '.[dev]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (Debian package 'chromium'; run scripts/ci-deps)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _in_thread(work: Callable[[], Any]) -> None:
    """Run async set-up outside Playwright's own event loop."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]


class Shop:
    """``nerve run examples.shop.app:app`` on a fresh broker file, HTTP on a free port."""

    def __init__(self, directory: Path) -> None:
        self.broker = f"sqlite:///{directory}/nerve.db"
        self.store = f"sqlite:///{directory}/store.db"
        self.base = f"http://127.0.0.1:{_free_port()}"
        self.log = directory / "nerve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        host_port = self.base.removeprefix("http://")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nerve",
                    "run",
                    "examples.shop.app:app",
                    "--broker",
                    self.broker,
                    "--http",
                    host_port,
                    "--log-format",
                    "json",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"nerve run did not come up: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def seed(self, stock: dict[str, int]) -> None:
        async def seed() -> None:
            store = SqliteStore(self.store)
            await store.start(app.store_schema)
            try:
                await load.seed_stock(store, stock)
            finally:
                await store.close()

        _in_thread(seed)

    def order(self, payload: dict[str, Any]) -> str:
        event = app.make_event(payload, type="order.created")
        response = httpx.post(
            f"{self.base}/events",
            content=codec.encode(event),
            headers={"content-type": "application/cloudevents+json"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        return event.id

    def processed(self, function: str, event_id: str) -> bool:
        import sqlite3

        path = self.store.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            row = conn.execute(
                "SELECT 1 FROM nerve_processed WHERE function = ? AND event_id = ?",
                (function, event_id),
            ).fetchone()
        return row is not None


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    running = Shop(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_dashboard_topology_live_counters_and_dlq_replay(shop: Shop) -> None:
    sync_playwright = _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    orders = list(load.generate(seed=5, count=60))
    shop.seed(load.initial_stock(60))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{shop.base}/")

            # 1. the shop's topology: 5 functions, 7 event types, their edges
            page.wait_for_selector("[data-testid=fn-inventory]")
            assert page.text_content("[data-testid=app-name]") == "shop"
            nodes = page.evaluate("window.nerve.graph.nodes().map(n => n.id()).sort()")
            assert [n for n in nodes if n.startswith("fn:")] == [
                "fn:inventory",
                "fn:notifications",
                "fn:orders",
                "fn:payments",
                "fn:shipping",
            ]
            assert len([n for n in nodes if n.startswith("type:")]) == len(app.events)
            edges = page.evaluate("window.nerve.graph.edges().map(e => e.id())")
            assert "order.created->inventory" in edges and "payments->payment.failed" in edges
            page.screenshot(path=str(ARTIFACTS / "dashboard-topology.png"), full_page=True)

            # 2. live counters move while orders are placed
            def total() -> int:
                return int(page.text_content("[data-testid=total-processed]") or "0")

            before = total()
            for order in orders[:30]:
                shop.order(order.model_dump(mode="json"))
            page.wait_for_function(f"{TOTAL} >= {before + 30}", timeout=30_000)
            middle = total()
            for order in orders[30:]:
                shop.order(order.model_dump(mode="json"))
            # edges show live rates while events flow through them
            page.wait_for_function(
                "window.nerve.graph.edges().some(e => e.data('label'))", timeout=30_000
            )
            page.wait_for_function(f"{TOTAL} > {middle}", timeout=30_000)
            assert total() > middle > before
            page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)
            inventory = page.text_content("[data-testid=fn-nums-inventory]") or ""
            assert re.search(r"processed \d+", inventory)

            # the live event stream shows new events as they are published
            page.click("[data-testid=tab-events]")
            page.wait_for_selector("#event-rows tr")
            probe = shop.order(
                {
                    "order_id": "probe",
                    "customer_id": "c-9",
                    "lines": [{"sku": "sku-kettle", "qty": 1}],
                    "amount_cents": 1,
                }
            )
            page.wait_for_selector(f"#event-rows tr[data-id='{probe}']", timeout=15_000)

            # 3. a poisoned order lands in the DLQ view...
            poison = shop.order(
                {
                    "order_id": "poison",
                    "customer_id": "c-1",
                    "lines": [{"sku": "sku-unknown", "qty": 1}],
                    "amount_cents": 5,
                }
            )
            page.click("[data-testid=tab-dlq]")
            row = page.locator("#dlq-rows tr", has_text="sku-unknown")
            deadline = time.monotonic() + 20
            while row.count() == 0:
                assert time.monotonic() < deadline, "the poisoned order never reached the DLQ view"
                page.click("#dlq-refresh")
                page.wait_for_timeout(300)
            assert "inventory" in (row.first.text_content() or "")
            assert "dead-letter" in (row.first.text_content() or "")
            row.first.click()
            page.wait_for_selector("[data-testid=dlq-detail]:not(:empty)")
            detail = page.text_content("[data-testid=dlq-detail]") or ""
            assert poison in detail and "Traceback" in detail
            page.screenshot(path=str(ARTIFACTS / "dashboard-dlq.png"), full_page=True)

            # ...and, once the SKU exists, the replay button sends it back through inventory
            assert not shop.processed("inventory", poison)
            shop.seed({"sku-unknown": 3})
            row.first.locator("input[type=checkbox]").check()
            page.click("[data-testid=dlq-replay]")
            page.wait_for_function(f"{NOTE}.startsWith('replayed 1')")
            deadline = time.monotonic() + 20
            while not shop.processed("inventory", poison):
                assert time.monotonic() < deadline, "the replayed event was not handled"
                time.sleep(0.1)
            page.click("#dlq-refresh")
            page.wait_for_timeout(300)
            assert page.locator("#dlq-rows tr", has_text="sku-unknown").count() == 0

            # purge: another poisoned order, selected and deleted for good (after a confirm)
            doomed = shop.order(
                {
                    "order_id": "doomed",
                    "customer_id": "c-2",
                    "lines": [{"sku": "sku-nowhere", "qty": 1}],
                    "amount_cents": 5,
                }
            )
            row = page.locator("#dlq-rows tr", has_text="sku-nowhere")
            deadline = time.monotonic() + 20
            while row.count() == 0:
                assert time.monotonic() < deadline, "the second poisoned order never arrived"
                page.click("#dlq-refresh")
                page.wait_for_timeout(300)
            page.once("dialog", lambda dialog: dialog.accept())
            row.first.locator("input[type=checkbox]").check()
            page.click("[data-testid=dlq-purge]")
            page.wait_for_function(f"{NOTE}.startsWith('purged 1')")
            assert page.locator("#dlq-rows tr", has_text="sku-nowhere").count() == 0
            assert not shop.processed("inventory", doomed)

            # 4. the flow search shows the poisoned order's causal chain as a timeline
            page.fill("[data-testid=search-text]", poison)
            page.select_option("[data-testid=search-kind]", "id")
            page.click("#search button[type=submit]")
            page.wait_for_selector("[data-testid=flow-step]")
            flow = page.text_content("[data-testid=flow-result]") or ""
            assert "order.created" in flow and "stock.reserved" in flow
            assert "inventory processed" in flow
            page.screenshot(path=str(ARTIFACTS / "dashboard-flow.png"), full_page=True)
            assert errors == [], errors
        finally:
            browser.close()
    # nerve run --log-format json: one JSON object a line, with the event's context
    records = [
        orjson.loads(line) for line in shop.log.read_text().splitlines() if line.startswith("{")
    ]
    dead = [r for r in records if "dead-lettered" in r["message"]]
    assert dead and dead[0]["event_id"] == poison and dead[0]["function"] == "inventory"
    assert dead[0]["correlation_id"] == poison and dead[0]["level"] == "warning"
