"""Endpoints and settings are refused when declared wrongly, with a message naming why."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from nerve import App
from nerve.errors import ConfigError, DefinitionError
from nerve.http import Endpoints
from nerve.http.server import HttpSettings, parse_listen
from nerve.http.webhooks import WebhookSource
from nerve.sources.mqtt import MqttTopics

from .conftest import WEBHOOK_SECRET


def _app() -> App:
    app = App("decl")

    @app.event("thing.asked")
    class Asked(BaseModel):
        n: int

    @app.event("thing.answered")
    class Answered(BaseModel):
        n: int

    return app


def test_endpoint_mistakes() -> None:
    app = _app()
    http = Endpoints(app)
    http.reply("/things", publishes="thing.asked", replies=["thing.answered"])
    cases = [
        ("/things", "declared twice"),
        ("/events", "taken by nerve"),
        ("/admin/x", "taken by nerve"),
        ("things", "lower-case-words"),
        ("/Things", "lower-case-words"),
    ]
    for path, message in cases:
        with pytest.raises(DefinitionError, match=message):
            http.reply(path, publishes="thing.asked", replies=["thing.answered"])
    with pytest.raises(DefinitionError, match="reply types"):
        http.reply("/other", publishes="thing.asked", replies=[])
    with pytest.raises(DefinitionError, match="not declared"):
        http.reply("/other", publishes="thing.unknown", replies=["thing.answered"])


def test_mqtt_route_mistakes() -> None:
    topics = MqttTopics(_app())
    for bad in ("a/#/b", "$SYS/x", ""):
        with pytest.raises(DefinitionError, match="topic filter"):
            topics.route(bad, type="thing.asked")
    with pytest.raises(DefinitionError, match="matches no event type"):
        topics.route("a/+", type="thing.asked", allow=["nothing.*"])


def test_settings_and_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("host:port", "1.2.3.4:70000", "x:"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_listen(bad)
    with pytest.raises(ConfigError, match="max_body"):
        HttpSettings(max_body=0)
    source = WebhookSource("github", "thing.asked", (WEBHOOK_SECRET,))
    with pytest.raises(ConfigError, match="twice"):
        HttpSettings(webhooks=[source, source])
    with pytest.raises(ConfigError, match="whsec_"):
        WebhookSource("github", "thing.asked", ("whsec_not base64!",))
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        WebhookSource("github", "thing.asked", ("whsec_AAAA",))
    with pytest.raises(ConfigError, match="a-z"):
        WebhookSource("Git Hub", "thing.asked", (WEBHOOK_SECRET,))
