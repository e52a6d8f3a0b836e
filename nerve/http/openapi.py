"""The OpenAPI 3.1 document of the HTTP edge, served at ``/openapi.json``.

Hand-written from the same facts the server uses (the App's event models, the
configured webhook sources, the declared endpoints, the limits), so it cannot drift
from what the server does; schemathesis runs against it in the test suite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nerve import __version__
from nerve.event import CONTENT_TYPE_BATCH, CONTENT_TYPE_STRUCTURED
from nerve.http.endpoints import ReplyEndpoint
from nerve.http.problems import PROBLEM_CONTENT_TYPE

if TYPE_CHECKING:
    from nerve.http.server import HttpContext

__all__ = ["openapi_document"]

_EXTENSION = {"type": ["string", "integer", "boolean"]}

CLOUDEVENT: dict[str, Any] = {
    "type": "object",
    "description": "A CloudEvents 1.0 event in the JSON format (structured mode).",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "time": {"type": "string", "format": "date-time"},
        "subject": {"type": "string"},
        "datacontenttype": {"type": "string"},
        "dataschema": {"type": "string"},
        "data": {},
        "data_base64": {"type": "string", "contentEncoding": "base64"},
        "correlationid": {
            "type": "string",
            "description": "Request/reply: replies carry the correlationid of the request "
            "(its id when it has none).",
        },
        "partitionkey": {"type": "string", "description": "Ordering key."},
    },
    "additionalProperties": _EXTENSION,
}

PROBLEM: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {"type": "object"},
            "description": "422: the validation errors (index, event_type, loc, msg, type).",
        },
    },
}

_DESCRIPTIONS = {
    "400": "Malformed request (bad JSON, bad header, bad attribute).",
    "401": "Missing, unknown or revoked API key; bad or stale webhook signature.",
    "403": "The key's scopes do not allow this.",
    "404": "No such resource.",
    "413": "The body (or a batch) is too large.",
    "415": "Not a supported CloudEvents content mode.",
    "422": "The event data does not match its declared schema.",
    "429": "Rate limited; see Retry-After.",
    "501": "Request/reply is not offered by this broker (it has no event log).",
    "503": "The broker is unavailable or the server is stopping; see Retry-After.",
    "504": "No reply arrived in time (the request event was published).",
}


def _problems(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _DESCRIPTIONS[str(code)],
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


def _ok(description: str, schema: dict[str, Any], media: str = "application/json") -> Any:
    return {"description": description, "content": {media: {"schema": schema}}}


ACCEPTED = {
    "type": "object",
    "required": ["accepted"],
    "properties": {
        "accepted": {"type": "integer"},
        "ids": {"type": "array", "items": {"type": "string"}},
        "duplicate": {"type": "boolean"},
        "id": {"type": "string"},
    },
}
SELECTION = {
    "type": "object",
    "description": "Exactly one of ids, function or all.",
    "properties": {
        "ids": {"type": "array", "items": {"type": "string"}},
        "function": {"type": "string"},
        "all": {"type": "boolean"},
    },
}


def openapi_document(ctx: HttpContext, endpoints: list[ReplyEndpoint] | None = None) -> Any:
    app = ctx.app
    schemas: dict[str, Any] = {"CloudEvent": CLOUDEVENT, "Problem": PROBLEM}
    for declared in app.events.values():
        schema = declared.model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[declared.model.__name__] = schema
    security: list[dict[str, list[str]]] = [{"apiKey": []}]
    binary_headers = [
        {
            "name": f"ce-{name}",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": f"Binary mode: the {name} attribute (percent-encoded).",
        }
        for name in ("specversion", "id", "source", "type", "subject", "time")
    ]
    paths: dict[str, Any] = {
        "/events": {
            "post": {
                "summary": "Publish CloudEvents (binary, structured or batched mode)",
                "description": "202 once the broker holds every event durably. With "
                "?reply=TYPES (one event), waits for the first event of those types carrying "
                "the request's correlationid and answers 200 with it (504 on timeout).",
                "security": security,
                "parameters": [
                    {
                        "name": "reply",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Comma-separated reply types or patterns to wait for.",
                    },
                    {
                        "name": "timeout",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "maximum": ctx.settings.max_reply_timeout,
                        },
                    },
                    *binary_headers,
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        CONTENT_TYPE_STRUCTURED: {
                            "schema": {"$ref": "#/components/schemas/CloudEvent"}
                        },
                        CONTENT_TYPE_BATCH: {
                            "schema": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/CloudEvent"},
                            }
                        },
                        "application/json": {
                            "schema": {},
                            "description": "Binary mode: the data, with ce-* headers.",
                        },
                    },
                },
                "responses": {
                    "200": _ok(
                        "The reply event (request/reply).",
                        {"$ref": "#/components/schemas/CloudEvent"},
                        CONTENT_TYPE_STRUCTURED,
                    ),
                    "202": _ok("Durably published.", ACCEPTED),
                    **_problems(400, 401, 403, 413, 415, 422, 429, 501, 503, 504),
                },
            }
        },
        "/webhooks/{source}": {
            "post": {
                "summary": "Receive a Standard Webhooks message",
                "description": "Verified (webhook-id, webhook-timestamp, webhook-signature), "
                "de-duplicated by webhook-id, published as the source's event type.",
                "parameters": [
                    {
                        "name": "source",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    *(
                        {"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
                        for h in ("webhook-id", "webhook-timestamp", "webhook-signature")
                    ),
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {
                    "200": _ok("Already accepted (duplicate webhook-id).", ACCEPTED),
                    "202": _ok("Verified and durably published.", ACCEPTED),
                    **_problems(400, 401, 404, 413, 422, 429, 503),
                },
            }
        },
        "/admin/dlq": {
            "get": {
                "summary": "List dead letters",
                "security": security,
                "parameters": [
                    {"name": "function", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": _ok("Dead letters.", {"type": "object"}),
                    **_problems(400, 401, 403, 404),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {
                    "200": _ok("Serving.", {"type": "object"}),
                    "503": _ok("Starting.", {"type": "object"}),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _ok("OpenAPI 3.1.", {"type": "object"})},
            }
        },
    }
    for action in ("replay", "purge"):
        paths[f"/admin/dlq/{action}"] = {
            "post": {
                "summary": f"{action.capitalize()} dead letters",
                "security": security,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": SELECTION}},
                },
                "responses": {
                    "200": _ok(f"How many were {action}ed.", {"type": "object"}),
                    **_problems(400, 401, 403, 404, 413, 422),
                },
            }
        }
    for endpoint in endpoints or []:
        model = app.events[endpoint.publishes].model
        paths[endpoint.path] = {
            "post": {
                "summary": endpoint.description
                or f"Publish {endpoint.publishes} and answer with its reply",
                "security": security,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                        }
                    },
                },
                "responses": {
                    "200": _ok(f"The reply ({', '.join(endpoint.replies)}).", {}),
                    **_problems(401, 403, 413, 422, 429, 501, 503, 504),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{app.name} (nerve HTTP edge)",
            "version": __version__,
            "description": "CloudEvents ingress, request/reply, webhooks and dead letters. "
            "See docs/http.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "nrv_... keys from 'nerve keys create'.",
                }
            },
        },
    }
