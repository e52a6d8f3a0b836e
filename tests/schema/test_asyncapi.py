"""The AsyncAPI 3.0 document: its shape, the vendored AsyncAPI 3.0.0 JSON Schema, and
the official parser (``@asyncapi/parser`` on Node.js) with zero errors for the shop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import jsonschema
import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field

from examples.shop.app import app as shop
from nerve import App, Context
from nerve.schema.asyncapi import build_asyncapi, server_for

HERE = Path(__file__).parent / "asyncapi"
SPEC = json.loads((HERE / "asyncapi-3.0.0.schema.json").read_text())


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool = True


class Line(BaseModel):
    sku: str


class AdoptedV1(BaseModel):
    """A pet found a home."""

    model_config = ConfigDict(extra="forbid")
    pet: Cat | Dog = Field(discriminator="kind")
    at: tuple[int, str]
    lines: list[Line] = []


class OtherLine(BaseModel):
    qty: int


class AdoptedV2(BaseModel):
    pet: Cat | Dog = Field(discriminator="kind")
    at: tuple[int, str]
    note: str | None = None
    other: list[OtherLine] = []


def edge_app() -> App:
    """Versions, a discriminated union, a tuple, two different 'Line'-like models."""
    app = App("pets")
    app.event("pet.adopted")(AdoptedV1)
    app.event("pet.adopted", version=2)(AdoptedV2)

    @app.event("pet.welcomed")
    class Welcomed(BaseModel):
        name: str

    @app.function("pet.*", emits=["pet.welcomed"])
    async def welcome(event: Any, ctx: Context) -> None:
        pass

    return app


def test_shop_document_shape() -> None:
    doc = build_asyncapi(shop, broker="nats://alice:s3cret@127.0.0.1:4222")
    assert doc["asyncapi"] == "3.0.0"
    assert "s3cret" not in orjson.dumps(doc).decode() and "alice" not in json.dumps(doc)
    assert doc["servers"]["nerve"] == {
        "host": "127.0.0.1:4222",
        "protocol": "nats",
        "description": "nerve's nats transport",
    }
    assert set(doc["channels"]) == set(shop.events)
    ops = doc["operations"]
    assert ops["inventory.receive.order.created"]["action"] == "receive"
    assert ops["inventory.send.stock.reserved"]["action"] == "send"
    assert ops["clients.send.order.created"]["action"] == "send"  # entry point
    assert "clients.send.stock.reserved" not in ops  # emitted by a function
    receive = {k for k, v in ops.items() if v["action"] == "receive"}
    expected = {
        f"{f.name}.receive.{t}" for f in shop.functions.values() for t in f.subscription.patterns
    }
    assert receive == expected
    message = doc["components"]["messages"]["order.created.v1"]
    assert message["payload"]["properties"]["lines"]["items"] == {
        "$ref": "#/components/schemas/OrderLine"
    }
    assert message["headers"]["properties"]["dataschema"]["const"] == (
        "nerve:schema/order.created/1"
    )
    assert message["headers"]["properties"]["type"]["const"] == "order.created"
    assert "#/$defs/" not in json.dumps(doc)


def test_versions_unions_tuples_and_name_clashes() -> None:
    doc = build_asyncapi(edge_app())
    assert "servers" not in doc
    channel = doc["channels"]["pet.adopted"]
    assert list(channel["messages"]) == ["pet.adopted.v1", "pet.adopted.v2"]
    assert doc["operations"]["welcome.receive.pet.adopted"]["messages"] == [
        {"$ref": "#/channels/pet.adopted/messages/pet.adopted.v1"},
        {"$ref": "#/channels/pet.adopted/messages/pet.adopted.v2"},
    ]
    v1 = doc["components"]["messages"]["pet.adopted.v1"]["payload"]
    assert v1["properties"]["pet"]["discriminator"] == "kind"
    assert v1["properties"]["at"]["items"] == [{"type": "integer"}, {"type": "string"}]
    assert v1["additionalProperties"] is False
    assert set(doc["components"]["schemas"]) >= {"Cat", "Dog", "Line", "OtherLine"}


def test_servers_from_broker_urls() -> None:
    assert server_for("sqlite:///.nerve/nerve.db") == {
        "host": "localhost",
        "protocol": "sqlite",
        "description": "the embedded broker: one SQLite file on this machine",
        "pathname": "/.nerve/nerve.db",
    }
    assert server_for("amqp://guest:guest@127.0.0.1:5672/")["protocol"] == "amqp"
    assert server_for("redis://127.0.0.1:6379/0")["pathname"] == "/0"
    assert server_for("postgresql://u@db:5432/test")["host"] == "db:5432"


@pytest.mark.parametrize("make", [lambda: shop, edge_app], ids=["shop", "edge"])
def test_documents_validate_against_the_asyncapi_3_json_schema(make: Any) -> None:
    doc = json.loads(orjson.dumps(build_asyncapi(make(), broker="sqlite:///.nerve/nerve.db")))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in jsonschema.Draft7Validator(SPEC).iter_errors(doc)
    ]
    assert errors == []


def _parser() -> Path:
    """node with @asyncapi/parser installed (from the pinned lock file) in HERE."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = (
            "Node.js and npm are needed for the AsyncAPI parser test (apt-get install nodejs npm)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if not (HERE / "node_modules" / "@asyncapi" / "parser").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed: {done.stderr[-2000:]}"
    return Path(node)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_official_asyncapi_parser_reports_no_errors(tmp_path: Path) -> None:
    node = _parser()
    files = []
    for name, app in (("shop", shop), ("edge", edge_app())):
        path = tmp_path / f"{name}.json"
        path.write_bytes(orjson.dumps(build_asyncapi(app, broker="nats://127.0.0.1:4222")))
        files.append(str(path))
    broken = build_asyncapi(shop)
    del broken["operations"]["payments.receive.stock.reserved"]["action"]
    (tmp_path / "broken.json").write_bytes(orjson.dumps(broken))
    files.append(str(tmp_path / "broken.json"))
    done = subprocess.run(
        [str(node), str(HERE / "validate.mjs"), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *results, refused = json.loads(done.stdout)
    assert len(results) == 2
    assert any(d["severity"] == 0 for d in refused["diagnostics"]), refused  # not vacuous
    for result in results:
        problems = [d for d in result["diagnostics"] if d["severity"] <= 1]  # errors, warnings
        assert result["parsed"], result
        assert problems == [], (result["file"], problems)


def test_a_broken_document_is_caught_by_the_schema() -> None:
    """The schema check is not vacuous: an operation without its action fails it."""
    doc = json.loads(orjson.dumps(build_asyncapi(shop)))
    del doc["operations"]["payments.receive.stock.reserved"]["action"]
    assert list(jsonschema.Draft7Validator(SPEC).iter_errors(doc))
