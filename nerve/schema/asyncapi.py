"""An AsyncAPI 3.0 document of an App: what it receives and sends, and in what shape.

- One **channel** per event type; its address is the type name (the subject, routing
  key or topic the transports derive from it), its messages the type's versions.
- One **message** per (type, version): the payload is the JSON Schema of the model;
  the headers are the CloudEvents context attributes nerve sets (``type`` and
  ``dataschema`` pinned to the message's type and version, ``partitionkey``,
  ``traceparent``, ``correlationid``, ``causationid``); in structured mode they travel
  in the JSON envelope, in binary mode as protocol headers, as each broker binding says.
- One **operation** per function and type: ``receive`` for what it consumes, ``send``
  for what it emits; event types no function emits get a ``send`` operation of the
  App's clients (``Client.publish``, the HTTP edge).
- The **server** comes from the broker URL (credentials never appear).

Pydantic writes JSON Schema 2020-12; an AsyncAPI 3.0 Schema Object is a superset of
draft-07. The few differences are rewritten: ``$defs`` move to
``components/schemas`` (references follow), ``prefixItems`` becomes draft-07 tuple
``items``, and an OpenAPI-style ``discriminator`` object becomes its property name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from nerve.app import App

__all__ = ["ASYNCAPI_VERSION", "build_asyncapi", "server_for"]

ASYNCAPI_VERSION = "3.0.0"

_PROTOCOLS = {
    "amqp": "amqp",
    "amqps": "amqps",
    "nats": "nats",
    "tls": "nats",
    "redis": "redis",
    "rediss": "redis",
    "kafka": "kafka",
    "kafka+ssl": "kafka-secure",
    "sqs": "sqs",
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "memory": "memory",
    "mqtt": "mqtt",
}


def server_for(broker_url: str) -> dict[str, Any]:
    """The AsyncAPI Server Object of a broker URL, without credentials or options."""
    parts = urlsplit(broker_url)
    scheme = parts.scheme.lower()
    protocol = _PROTOCOLS.get(scheme, scheme or "unknown")
    host = parts.hostname or "localhost"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    server: dict[str, Any] = {
        "host": host,
        "protocol": protocol,
        "description": f"nerve's {scheme or 'default'} transport",
    }
    if scheme == "sqlite":
        server["pathname"] = parts.path or "/"
        server["description"] = "the embedded broker: one SQLite file on this machine"
    elif scheme == "memory":
        server["description"] = "the in-process broker (tests): one process only"
    elif parts.path and parts.path != "/":
        server["pathname"] = parts.path
    return server


_CLOUDEVENTS_HEADERS: dict[str, Any] = {
    "specversion": {"type": "string", "const": "1.0", "description": "CloudEvents version."},
    "id": {"type": "string", "description": "Unique per event (a UUIDv7)."},
    "source": {"type": "string", "format": "uri-reference", "description": "Who produced it."},
    "time": {"type": "string", "format": "date-time", "description": "When it happened."},
    "subject": {"type": "string", "description": "What it is about, within the source."},
    "datacontenttype": {"type": "string", "const": "application/json"},
    "partitionkey": {
        "type": "string",
        "description": "Ordering key: events with one key are handled in publish order.",
    },
    "traceparent": {"type": "string", "description": "W3C trace context."},
    "correlationid": {
        "type": "string",
        "description": "The id of the event that started this flow.",
    },
    "causationid": {"type": "string", "description": "The id of the event that caused this one."},
}


def _headers(type_name: str, dataschema: str) -> dict[str, Any]:
    properties = dict(_CLOUDEVENTS_HEADERS)
    properties["type"] = {"type": "string", "const": type_name}
    properties["dataschema"] = {"type": "string", "const": dataschema}
    return {
        "type": "object",
        "description": "CloudEvents 1.0 context attributes (structured mode: in the JSON "
        "envelope; binary mode: protocol headers per the broker's binding).",
        "properties": properties,
        "required": ["specversion", "id", "source", "type"],
    }


class _Schemas:
    """Collects ``$defs`` into components/schemas: one name per distinct definition
    (two models with a ``Line`` of different shapes get ``Line`` and ``Line_2``)."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def add(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        defs: dict[str, Any] = dict(schema.get("$defs", {}))
        renames = {name: name for name in defs}
        converted: dict[str, Any] = {}
        for _ in range(len(defs) + 1):  # references between defs follow the renames
            converted = {name: _convert(body, renames) for name, body in defs.items()}
            chosen: dict[str, str] = {}
            for name, body in converted.items():
                target, n = name, 2
                while target in self.components and self.components[target] != body:
                    target, n = f"{name}_{n}", n + 1
                chosen[name] = target
            if chosen == renames:
                break
            renames = chosen
        for name, body in converted.items():
            self.components[renames[name]] = body
        top = {k: v for k, v in schema.items() if k != "$defs"}
        return dict(_convert(top, renames))


def _convert(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, list):
        return [_convert(v, renames) for v in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
            name = value.removeprefix("#/$defs/")
            out[key] = f"#/components/schemas/{renames.get(name, name)}"
        elif key == "discriminator" and isinstance(value, Mapping):
            out[key] = str(value.get("propertyName", ""))
        elif key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(
            value, Mapping
        ):
            out[key] = {k: _convert(v, renames) for k, v in value.items()}
        else:
            out[key] = _convert(value, renames)
    if "prefixItems" in out:  # 2020-12 tuple -> draft-07 tuple
        out["additionalItems"] = out.pop("items", True)
        out["items"] = out.pop("prefixItems")
    return out


def _message_id(type_name: str, version: int) -> str:
    return f"{type_name}.v{version}"


def build_asyncapi(
    app: App,
    *,
    broker: str | None = None,
    version: str = "1.0.0",
    description: str | None = None,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``app`` (a plain dict, ready for JSON or YAML)."""
    schemas = _Schemas()
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    for name in sorted(app.versions):
        channel_messages: dict[str, Any] = {}
        for v, declared in sorted(app.versions[name].items()):
            mid = _message_id(name, v)
            message: dict[str, Any] = {
                "name": name,
                "title": f"{name} (version {v})",
                "contentType": "application/json",
                "headers": _headers(name, declared.dataschema),
                "payload": schemas.add(declared.json_schema()),
                "correlationId": {
                    "description": "Events of one flow share a correlationid.",
                    "location": "$message.header#/correlationid",
                },
            }
            summary = declared.description.strip().splitlines()
            if summary:
                message["summary"] = summary[0]
            messages[mid] = message
            channel_messages[mid] = {"$ref": f"#/components/messages/{mid}"}
        latest = app.events[name]
        channels[name] = {
            "address": name,
            "title": name,
            "messages": channel_messages,
        }
        if latest.description.strip():
            channels[name]["description"] = latest.description.strip()
    operations: dict[str, Any] = {}

    def operation(op_id: str, action: str, type_name: str, summary: str) -> None:
        refs = [
            {"$ref": f"#/channels/{type_name}/messages/{mid}"}
            for mid in channels[type_name]["messages"]
        ]
        operations[op_id] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{type_name}"},
            "summary": summary,
            "messages": refs,
        }

    from nerve.app import matches_pattern

    emitted = {t for f in app.functions.values() for t in f.emits}
    for name in sorted(app.events):
        if name not in emitted:
            operation(
                f"clients.send.{name}",
                "send",
                name,
                f"Clients of {app.name} publish {name} (Client.publish, the HTTP edge).",
            )
    for fn in app.functions.values():
        consumed = sorted(
            n for n in app.events if any(matches_pattern(p, n) for p in fn.subscription.patterns)
        )
        for name in consumed:
            operation(f"{fn.name}.receive.{name}", "receive", name, f"{fn.name} handles {name}.")
        for name in sorted(fn.emits):
            operation(f"{fn.name}.send.{name}", "send", name, f"{fn.name} emits {name}.")
    info: dict[str, Any] = {"title": app.name, "version": version}
    info["description"] = description or (
        f"The events of the nerve app {app.name!r} (source {app.source}): "
        "CloudEvents 1.0 with JSON data, one channel per event type."
    )
    doc: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": "application/json",
    }
    if broker is not None:
        from nerve._urls import redact

        doc["servers"] = {"nerve": server_for(redact(broker))}
    doc["channels"] = channels
    doc["operations"] = operations
    doc["components"] = {"schemas": schemas.components, "messages": messages}
    return doc
