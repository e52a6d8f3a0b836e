"""MQTT source: subscribe MQTT topics and publish their messages as CloudEvents.

Declare which topics carry which event type, beside the App (as data, no I/O)::

    topics = MqttTopics(app)
    topics.route("sensors/+/reading", type=SensorReading)

and run it with ``nerve run MODULE:APP --mqtt mqtt://127.0.0.1:1883`` (or
:class:`MqttSource` in code). A message becomes an event in one of three ways, in
this order (the CloudEvents MQTT protocol binding):

- **MQTT 5 binary mode**: the message has a ``specversion`` user property. Each
  context attribute is a user property; the Content Type property is the
  ``datacontenttype``; the payload is the data.
- **structured mode**: Content Type ``application/cloudevents+json`` (or a JSON
  object payload with ``specversion``): the payload is the whole event.
- **plain payload**: anything else is the data (JSON) of an event of the route's
  ``type``, with ``source`` ``/mqtt/<topic>``, ``subject`` the topic and a new id.

Events are validated against the App's models and published durably in batches.
A message that is not valid (bad JSON, a schema violation, a type the route does not
allow) is logged with the topic and counted in :attr:`MqttSource.rejected`, then
dropped: MQTT has no way to refuse it to the sender.

Several nerve processes share the topics through an MQTT 5 shared subscription
(``$share/<group>/<filter>``): each message reaches one of them. Delivery from the
MQTT broker is QoS 1, but the MQTT client acknowledges a message on receipt, before
nerve has published it: a crash in that window loses the message (at-most-once at
that hop). Devices that need more should publish CloudEvents over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ValidationError

from nerve import event as codec
from nerve.app import App, matches_pattern
from nerve.errors import ConfigError, DefinitionError, InvalidEvent, NerveError
from nerve.event import Event
from nerve.transport.base import Transport

if TYPE_CHECKING:
    from nerve.runtime import Runtime

__all__ = ["MqttRoute", "MqttSource", "MqttTopics", "attach", "find_topics", "to_event"]

log = logging.getLogger("nerve.mqtt")

BATCH = 256


@dataclass(frozen=True)
class MqttRoute:
    """Messages on ``topic`` (an MQTT filter, ``+`` and ``#`` wildcards) become events
    of ``type`` (plain payloads); CloudEvents on it must have a type in ``allow``."""

    topic: str
    type: str
    allow: tuple[str, ...]

    def matches(self, topic: str) -> bool:
        return topic_matches(self.topic, topic)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    want = pattern.split("/")
    have = topic.split("/")
    for i, part in enumerate(want):
        if part == "#":
            return True
        if i >= len(have) or (part != "+" and part != have[i]):
            return False
    return len(want) == len(have)


@dataclass
class MqttTopics:
    """The MQTT topics of one App (declarations only)."""

    app: App
    routes: list[MqttRoute] = field(default_factory=list)

    def route(
        self,
        topic: str,
        *,
        type: str | type[BaseModel],
        allow: Sequence[str] = (),
    ) -> MqttRoute:
        """Messages on ``topic`` become ``type`` events; CloudEvents sent there may be
        of ``type`` or of the types/patterns in ``allow``."""
        if not topic or "#" in topic[:-1] or topic.startswith("$"):
            raise DefinitionError(
                f"MQTT topic filter {topic!r}: use levels separated by '/', '+' for one "
                "level and '#' only at the end (like 'sensors/+/reading')"
            )
        name = self.app.event_type(type).name
        for pattern in allow:
            if not any(matches_pattern(pattern, t) for t in self.app.events):
                raise DefinitionError(f"MQTT route {topic!r}: {pattern!r} matches no event type")
        route = MqttRoute(topic, name, (name, *allow))
        self.routes.append(route)
        return route


def find_topics(app: App) -> list[MqttRoute]:
    """The MQTT routes declared for ``app`` in the modules that define it."""
    found: list[MqttRoute] = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or not any(v is app for v in namespace.values()):
            continue
        for value in namespace.values():
            if isinstance(value, MqttTopics) and value.app is app:
                found.extend(r for r in value.routes if r not in found)
    return found


def _user_properties(properties: Any) -> dict[str, str]:
    pairs = getattr(properties, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


def to_event(route: MqttRoute, topic: str, payload: bytes, properties: Any = None) -> Event:
    """One MQTT message as an event (see the module docstring). Raises
    :class:`InvalidEvent` naming what is wrong."""
    user = _user_properties(properties)
    content_type = getattr(properties, "ContentType", None)
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if "specversion" in user:
        attributes: dict[str, Any] = dict(user)
        if content_type:
            attributes["datacontenttype"] = content_type
        if not payload:
            data: Any = None
        elif not media or media == "application/json" or media.endswith("+json"):
            data = _json(payload)
        elif media.startswith("text/"):
            data = payload.decode("utf-8", "strict")
        else:
            data = payload
        event = codec.from_attributes(attributes, data)
    elif media == codec.CONTENT_TYPE_STRUCTURED or (
        payload[:1] == b"{" and b'"specversion"' in payload
    ):
        event = codec.decode(payload)
    else:
        event = Event(
            type=route.type,
            source=f"/mqtt/{topic}",
            subject=topic,
            data=_json(payload),
        )
    if not any(matches_pattern(p, event.type) for p in route.allow):
        raise InvalidEvent("type", f"{event.type!r} may not be sent on {route.topic!r}")
    return event


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("data", f"the payload is not JSON: {exc}") from None


@dataclass
class _Config:
    host: str
    port: int
    username: str | None
    password: str | None
    group: str

    @classmethod
    def from_url(cls, url: str, default_group: str) -> _Config:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp"):
            raise ConfigError(
                f"MQTT URL {url!r}: use mqtt://HOST:PORT (like mqtt://127.0.0.1:1883)"
            )
        try:
            port = parts.port or 1883
        except ValueError:
            raise ConfigError(f"MQTT URL {url!r}: the port is not a number") from None
        group = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get(
            "group", default_group
        )
        return cls(parts.hostname or "127.0.0.1", port, parts.username, parts.password, group)


class MqttSource:
    """Subscribes ``routes`` on the MQTT broker at ``url`` and publishes the messages
    as events of ``app`` through ``transport``."""

    def __init__(
        self,
        app: App,
        transport: Transport,
        routes: Sequence[MqttRoute],
        url: str = "mqtt://127.0.0.1:1883",
    ) -> None:
        if not routes:
            raise ConfigError(
                f"app {app.name!r} declares no MQTT topics; declare them with "
                "MqttTopics(app).route('sensors/+/reading', type=...)"
            )
        self.app = app
        self.transport = transport
        self.routes = list(routes)
        self.config = _Config.from_url(url, f"nerve-{app.name}")
        self.published = 0
        self.rejected = 0
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nerve:mqtt")
        waiter = asyncio.ensure_future(self.subscribed.wait())
        await asyncio.wait({waiter, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done():
            await self._task  # raises the connection error
        if not self.subscribed.is_set():
            raise ConfigError(
                f"MQTT broker at {self.config.host}:{self.config.port} did not accept the "
                "subscription within 10 s"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        import aiomqtt
        from paho.mqtt.subscribeoptions import SubscribeOptions

        backoff = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self.config.host,
                    self.config.port,
                    username=self.config.username,
                    password=self.config.password,
                    protocol=aiomqtt.ProtocolVersion.V5,
                ) as client:
                    for route in self.routes:
                        await client.subscribe(
                            f"$share/{self.config.group}/{route.topic}",
                            options=SubscribeOptions(qos=1),
                        )
                    self.subscribed.set()
                    backoff = 0.5
                    await self._pump(client)
            except aiomqtt.MqttError as exc:
                if not self.subscribed.is_set():
                    raise ConfigError(
                        f"cannot use the MQTT broker at {self.config.host}:{self.config.port}: "
                        f"{exc}"
                    ) from None
                log.warning("MQTT connection lost (%s); reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _pump(self, client: Any) -> None:
        messages = client.messages
        while True:
            first = await anext(messages)
            batch = [first]
            while len(batch) < BATCH and len(messages) > 0:
                batch.append(await anext(messages))
            events = [e for e in (self._convert(m) for m in batch) if e is not None]
            if events:
                await self._publish(events)

    def _convert(self, message: Any) -> Event | None:
        topic = str(message.topic)
        route = next((r for r in self.routes if r.matches(topic)), None)
        if route is None:
            return None
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            event = to_event(route, topic, payload, message.properties)
            declared = self.app.declared_for(event)
            if declared is None:
                raise InvalidEvent("type", f"{event.type!r} is not declared")
            model = declared.model.model_validate(event.data)
            if event.partitionkey is None and declared.key is not None:
                key = declared.key_of(model)
                if key is not None:
                    event = event.with_extensions(partitionkey=key)
            return event
        except (InvalidEvent, ValidationError, UnicodeDecodeError) as exc:
            self.rejected += 1
            log.warning("dropped an MQTT message on %s: %s", topic, _one_line(exc))
            return None

    async def _publish(self, events: list[Event]) -> None:
        backoff = 0.2
        while True:
            try:
                await self.transport.publish(events)
                self.published += len(events)
                return
            except NerveError as exc:
                log.warning("publishing MQTT messages failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


async def attach(runtime: Runtime, url: str) -> MqttSource:
    """Bridge the App's declared topics into a started ``runtime`` (``nerve run
    --mqtt URL``); stopped before the runtime drains."""
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        raise ConfigError("--mqtt needs the 'mqtt' extra: pip install 'nerve[mqtt]'") from None
    source = MqttSource(runtime.app, runtime.transport, find_topics(runtime.app), url)
    await source.start()
    runtime.on_stop.append(source.stop)
    log.info(
        "MQTT: %d topic filter(s) from %s:%d",
        len(source.routes),
        source.config.host,
        source.config.port,
    )
    return source
