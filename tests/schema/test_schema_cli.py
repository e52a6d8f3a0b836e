"""``nerve schema``, ``nerve asyncapi`` and ``nerve graph`` through the real CLI:
a deliberately broken change fails ``nerve schema check`` (exit 1) against an exported
folder and against the registry a running App filled."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from nerve.cli import cli, load_app
from nerve.runtime import Runtime

V1 = '''
from pydantic import BaseModel
from nerve import App

app = App("orders")

@app.event("order.created", key="order_id")
class OrderCreated(BaseModel):
    """An order was placed."""
    order_id: str
    amount_cents: int

@app.event("order.paid")
class OrderPaid(BaseModel):
    order_id: str

@app.function("order.created", emits=["order.paid"])
async def pay(order, ctx):
    ctx.emit(OrderPaid(order_id=order.order_id))
'''

COMPATIBLE = V1.replace(
    "    amount_cents: int\n", "    amount_cents: int\n    coupon: str | None = None\n"
)
BROKEN = V1.replace("    amount_cents: int\n", "    amount_cents: str\n")
V2_WITH_UPCASTER = (
    BROKEN.replace(
        '@app.event("order.created", key="order_id")',
        '@app.event("order.created", key="order_id", version=2)',
    )
    + """
@app.upcaster("order.created", 1, 2)
def to_text(data):
    return {**data, "amount_cents": str(data["amount_cents"])}
"""
)


def nerve(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, source in (
        ("orders_v1", V1),
        ("orders_ok", COMPATIBLE),
        ("orders_broken", BROKEN),
        ("orders_v2", V2_WITH_UPCASTER),
    ):
        (tmp_path / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for var in ("NERVE_BROKER", "NERVE_STORE", "NERVE_REGISTRY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_check_against_an_exported_folder(project: Path) -> None:
    exported = nerve("schema", "export", "contracts", "--app", "orders_v1:app")
    assert exported.exit_code == 0, exported.output
    assert "wrote 2 schema(s) of 2 event type(s)" in exported.stderr
    written = json.loads((project / "contracts" / "order.created" / "1.json").read_text())
    assert written["required"] == ["order_id", "amount_cents"]
    index = json.loads((project / "contracts" / "schemas.json").read_text())
    assert index["order.created"] == {"compatibility": "BACKWARD", "versions": [1]}

    same = nerve("schema", "check", "orders_v1:app", "--against", "contracts")
    assert same.exit_code == 0, same.output
    assert "ok  order.created v1  (unchanged)" in same.stdout

    compatible = nerve("schema", "check", "orders_ok:app", "--against", "contracts")
    assert compatible.exit_code == 0, compatible.output
    assert "ok  order.created v1  (changed)" in compatible.stdout

    broken = nerve("schema", "check", "orders_broken:app", "--against", "contracts")
    assert broken.exit_code == 1, broken.output
    assert "BREAKING  order.created v1  (changed)" in broken.stdout
    assert "/amount_cents  [type-narrowed, backward, conflicts with version 1]" in broken.stdout
    assert '- ["integer"]' in broken.stdout and '+ ["string"]' in broken.stdout
    assert "1 breaking change(s) against contracts" in broken.stdout

    as_json = nerve("schema", "check", "orders_broken:app", "--against", "contracts", "--json")
    assert as_json.exit_code == 1
    [finding] = next(r for r in json.loads(as_json.stdout) if r["type"] == "order.created")[
        "findings"
    ]
    assert (finding["path"], finding["rule"], finding["version"]) == (
        "/amount_cents",
        "type-narrowed",
        1,
    )

    # a new version with an upcaster: old events are taken care of
    upgraded = nerve("schema", "check", "orders_v2:app", "--against", "contracts")
    assert upgraded.exit_code == 0, upgraded.output
    assert "ok  order.created v2  (new)" in upgraded.stdout

    # the team tightens the mode in the index: FULL also needs old readers to read v2
    index["order.created"]["compatibility"] = "FULL"
    (project / "contracts" / "schemas.json").write_text(json.dumps(index))
    full = nerve("schema", "check", "orders_v2:app", "--against", "contracts")
    assert full.exit_code == 1, full.output
    assert "[type-narrowed, forward, conflicts with version 1]" in full.stdout


def test_check_list_show_diff_against_the_registry_a_runtime_filled(project: Path) -> None:
    broker = f"sqlite:///{project / 'n.db'}"

    async def run_once(target: str) -> None:
        async with Runtime(load_app(target), broker=broker):
            pass

    asyncio.run(run_once("orders_v1:app"))
    asyncio.run(run_once("orders_v2:app"))  # v2 registered beside v1
    listed = nerve("schema", "list", "--broker", broker, "--json")
    assert listed.exit_code == 0, listed.output
    assert {r["type"]: r["versions"] for r in json.loads(listed.stdout)} == {
        "order.created": [1, 2],
        "order.paid": [1],
    }
    table = nerve("schema", "list", "--broker", broker)
    assert "order.created  1, 2      BACKWARD" in table.stdout

    shown = nerve("schema", "show", "order.created", "--version", "1", "--broker", broker)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["properties"]["amount_cents"]["type"] == "integer"
    missing = nerve("schema", "show", "order.creatd", "--broker", broker)
    assert missing.exit_code == 2
    assert "no schema for event type 'order.creatd'; did you mean 'order.created'?" in (
        missing.stderr
    )
    no_version = nerve("schema", "show", "order.created", "-v", "9", "--broker", broker)
    assert "'order.created' has no version 9; versions: 1, 2" in no_version.stderr

    diffed = nerve("schema", "diff", "order.created", "1", "2", "--broker", broker)
    assert diffed.exit_code == 0, diffed.output
    assert (
        '-      "type": "integer"' in diffed.stdout and '+      "type": "string"' in diffed.stdout
    )
    assert "BACKWARD (v2 reads data written as v1): BROKEN" in diffed.stdout
    assert "FORWARD (v1 reads data written as v2): BROKEN" in diffed.stdout

    ok = nerve("schema", "check", "orders_v2:app", "--broker", broker)
    assert ok.exit_code == 0, ok.output
    broken = nerve(
        "schema", "check", "orders_broken:app", "--against", "registry", "--broker", broker
    )
    assert broken.exit_code == 1, broken.output
    assert "/amount_cents  [type-narrowed" in broken.stdout

    assert nerve("schema", "mode", "order.created", "--broker", broker).stdout.strip() == "BACKWARD"
    assert (
        nerve("schema", "mode", "order.created", "NONE", "--broker", broker).stdout.strip()
        == "NONE"
    )
    relaxed = nerve("schema", "check", "orders_broken:app", "--broker", broker)
    assert relaxed.exit_code == 0, relaxed.output


def test_one_line_errors(project: Path) -> None:
    nothing = nerve("schema", "list")
    assert nothing.exit_code == 2
    assert nothing.stderr.startswith("error: no schema registry at '.nerve/schema.db'")
    assert len(nothing.stderr.strip().splitlines()) == 1
    bad_app = nerve("schema", "check", "nowhere:app")
    assert bad_app.exit_code == 2 and "cannot import module 'nowhere'" in bad_app.stderr
    bad_dir = nerve("schema", "check", "orders_v1:app", "--against", "missing")
    assert bad_dir.exit_code == 2 and "no such folder" in bad_dir.stderr
    bad_mode = nerve("schema", "check", "orders_v1:app", "--mode", "sideways")
    assert bad_mode.exit_code == 2 and "use one of BACKWARD" in bad_mode.stderr
    bad_registry = nerve("schema", "list", "--registry", "redis://127.0.0.1/0")
    assert (
        bad_registry.exit_code == 2 and "registry URL 'redis://127.0.0.1/0'" in bad_registry.stderr
    )
    (project / "contracts" / "order.created").mkdir(parents=True)
    (project / "contracts" / "order.created" / "1.json").write_text("{nope")
    bad_json = nerve("schema", "check", "orders_v1:app", "--against", "contracts")
    assert bad_json.exit_code == 2 and "is not valid JSON" in bad_json.stderr


def test_asyncapi_command(project: Path) -> None:
    out = nerve("asyncapi", "orders_v1:app", "--broker", "amqp://guest:pw@127.0.0.1:5672/")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["asyncapi"] == "3.0.0" and set(doc["channels"]) == {"order.created", "order.paid"}
    assert doc["servers"]["nerve"]["protocol"] == "amqp" and "pw" not in out.stdout
    written = nerve("asyncapi", "orders_v1:app", "-o", "api.json")
    assert written.exit_code == 0 and json.loads((project / "api.json").read_text())["info"]


def test_graph_command_draws_the_shop_like_the_seed_diagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])
    out = nerve("graph", "examples.shop.app:app")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0] == "flowchart LR"
    for edge in (
        "p_clients -->|produces| e_order_created",
        "e_order_created -->|delivers| f_inventory",
        "f_inventory -->|emits| e_stock_reserved",
        "e_stock_reserved -->|delivers| f_payments",
        "f_payments -->|emits| e_payment_succeeded",
        "e_payment_succeeded -->|delivers| f_shipping",
        "f_shipping -->|emits| e_shipment_prepared",
        "e_payment_failed -->|delivers| f_inventory",
        "e_shipment_prepared -->|delivers| f_notifications",
    ):
        assert f"    {edge}" in lines, edge
    as_json = json.loads(nerve("graph", "examples.shop.app:app", "--format", "json").stdout)
    kinds = {n["id"]: n["kind"] for n in as_json["nodes"]}
    assert kinds["function:inventory"] == "function" and kinds["event:order.created"] == "event"
    dot = nerve("graph", "examples.shop.app:app", "-f", "dot")
    assert dot.stdout.startswith('digraph "shop" {')
    if shutil.which("dot") is None:
        pytest.skip("Graphviz 'dot' is not installed (apt-get install graphviz): DOT not rendered")
    rendered = subprocess.run(
        ["dot", "-Tsvg"], input=dot.stdout, capture_output=True, text=True, timeout=30
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "<svg" in rendered.stdout and "order.created" in rendered.stdout


@pytest.mark.slow
def test_nerve_run_refuses_a_breaking_change_unless_allowed(project: Path) -> None:
    broker = f"sqlite:///{project / 'n.db'}"

    async def register_v1() -> None:
        async with Runtime(load_app("orders_v1:app"), broker=broker):
            pass

    asyncio.run(register_v1())
    env = {**os.environ, "NERVE_BROKER": broker, "PYTHONPATH": str(project)}
    env.pop("NERVE_ALLOW_INCOMPATIBLE", None)
    command = [sys.executable, "-m", "nerve", "run", "orders_broken:app", "--no-http"]
    refused = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: version 1 of 'order.created' breaks BACKWARD compatibility")
    assert "nerve run --allow-incompatible" in last
    assert "/amount_cents  [type-narrowed, backward, conflicts with version 1]" in refused.stderr

    with subprocess.Popen(
        [*command, "--allow-incompatible"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as allowed:
        assert allowed.stderr is not None
        seen = ""
        try:
            deadline = time.monotonic() + 60
            while "app 'orders'" not in seen and time.monotonic() < deadline:
                line = allowed.stderr.readline()
                if not line and allowed.poll() is not None:
                    break
                seen += line
        finally:
            allowed.send_signal(signal.SIGTERM)
            seen += allowed.communicate(timeout=30)[1]
    assert "app 'orders'" in seen, seen  # the banner: it started
    assert "although it is incompatible" in seen
    assert allowed.returncode == 0, seen


@pytest.mark.slow
def test_nerve_run_uses_the_registry_it_is_given(project: Path) -> None:
    registry = f"sqlite:///{project / 'shared' / 'registry.db'}"

    async def register_v1() -> None:
        async with Runtime(load_app("orders_v1:app"), broker="memory://", registry=registry):
            pass

    asyncio.run(register_v1())
    bad = nerve("run", "orders_v1:app", "--no-http", "--registry", "bogus://x")
    assert bad.exit_code == 2 and "registry URL 'bogus://x'" in bad.stderr
    env = {**os.environ, "PYTHONPATH": str(project)}
    for var in ("NERVE_ALLOW_INCOMPATIBLE", "NERVE_REGISTRY"):
        env.pop(var, None)
    broker = f"sqlite:///{project / 'elsewhere' / 'n.db'}"  # its own schema.db is empty
    command = [sys.executable, "-m", "nerve", "run", "orders_broken:app", "--no-http"]
    refused = subprocess.run(
        [*command, "--broker", broker, "--registry", registry],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "breaks BACKWARD compatibility" in refused.stderr.strip().splitlines()[-1]
