"""The CloudEvents 1.0 HTTP protocol binding: HTTP request -> events (pure, no I/O).

Three content modes, chosen as the binding says (section 3):

- **structured**: ``Content-Type: application/cloudevents+json``; the body is one
  event in the JSON event format.
- **batched**: ``Content-Type: application/cloudevents-batch+json``; the body is a
  JSON array of such events.
- **binary**: any other content type with a ``ce-specversion`` header. Each context
  attribute is a ``ce-<name>`` header whose value is percent-encoded (UTF-8); the
  ``Content-Type`` header is the ``datacontenttype`` and the body is the data. JSON
  data (``application/json``, ``*+json``) is parsed; ``text/*`` becomes a string;
  anything else stays bytes.

Every malformed input raises :class:`~nerve.http.problems.Problem` with the status
the HTTP API documents (400 malformed, 415 unsupported media type), never anything
else: the fuzz tests in ``tests/http/`` hold this.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

import orjson

from nerve import event as codec
from nerve.errors import InvalidEvent
from nerve.event import Event
from nerve.http.problems import Problem

__all__ = [
    "MAX_BATCH",
    "binary_headers",
    "media_type",
    "parse_binary",
    "parse_request",
]

MAX_BATCH = 1000
"""Most events one batched request may carry."""

_CE_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# Characters the binding says a sender MUST percent-encode (section 3.1.3.2).
_MUST_ENCODE = re.compile(r'[^\x21-\x7e]|[ "%]')


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _invalid(exc: InvalidEvent, where: str = "") -> Problem:
    return Problem(
        400,
        "invalid-event",
        f"{where}attribute {exc.attribute!r}: {exc.reason}",
        extra={"attribute": exc.attribute},
    )


def parse_request(headers: Mapping[str, str], body: bytes) -> tuple[str, list[Event]]:
    """The events of one HTTP request, and its mode (``binary``, ``structured``,
    ``batch``). ``headers`` must have lower-case names (as ASGI gives them)."""
    content_type = headers.get("content-type")
    media = media_type(content_type)
    if media == codec.CONTENT_TYPE_STRUCTURED:
        return "structured", [_parse_structured(body)]
    if media == codec.CONTENT_TYPE_BATCH:
        return "batch", _parse_batch(body)
    if media.startswith("application/cloudevents"):
        raise Problem(
            415,
            "unsupported-event-format",
            f"event format {media!r} is not supported; send application/cloudevents+json "
            "(structured), application/cloudevents-batch+json (batch), or binary mode",
        )
    if "ce-specversion" in headers:
        return "binary", [parse_binary(headers, body)]
    raise Problem(
        415,
        "not-a-cloudevent",
        f"Content-Type {content_type or '(none)'!r} with no ce-specversion header is not a "
        "CloudEvent: send binary mode (ce-specversion, ce-id, ce-source, ce-type headers and "
        "the data as the body) or structured mode (Content-Type: application/cloudevents+json)",
    )


def _loads(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "malformed-json", f"{what} is not valid JSON: {exc}") from None


def _parse_structured(body: bytes, where: str = "") -> Event:
    doc = _loads(body, "the body") if not where else body
    return _from_document(doc, where)


def _from_document(doc: Any, where: str = "") -> Event:
    if not isinstance(doc, dict):
        raise Problem(400, "malformed-event", f"{where}a structured event must be a JSON object")
    try:
        return codec.decode(orjson.dumps(doc)) if "data_base64" in doc else _from_dict(doc)
    except InvalidEvent as exc:
        raise _invalid(exc, where) from None


def _from_dict(doc: dict[str, Any]) -> Event:
    for name, value in doc.items():
        if name in ("data", "data_base64"):
            continue
        if not isinstance(value, str | int | bool) and value is not None:
            raise InvalidEvent(name, f"must be a string, an integer or a boolean, got {value!r}")
    return codec.from_attributes(doc, doc.get("data"))


def _parse_batch(body: bytes) -> list[Event]:
    docs = _loads(body, "the batch")
    if not isinstance(docs, list):
        raise Problem(400, "malformed-batch", "a batch must be a JSON array of events")
    if len(docs) > MAX_BATCH:
        raise Problem(
            413,
            "batch-too-large",
            f"a batch may carry at most {MAX_BATCH} events, this one has {len(docs)}; split it",
        )
    return [_from_document(doc, f"batch[{i}]: ") for i, doc in enumerate(docs)]


def _header_value(name: str, raw: str) -> str:
    try:
        return unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise Problem(
            400,
            "malformed-header",
            f"header ce-{name}: percent-encoded bytes are not valid UTF-8",
        ) from None


def parse_binary(headers: Mapping[str, str], body: bytes) -> Event:
    """One binary-mode event from ``ce-*`` headers and the body."""
    attributes: dict[str, Any] = {}
    for key, raw in headers.items():
        if not key.startswith("ce-"):
            continue
        name = key[3:]
        if not _CE_NAME.match(name):
            raise Problem(
                400,
                "malformed-header",
                f"header {key!r}: attribute names are 1-20 characters of a-z and 0-9",
            )
        if name in ("data", "data_base64", "datacontenttype"):
            raise Problem(
                400,
                "malformed-header",
                f"header {key!r} is not allowed in binary mode (the body is the data and "
                "Content-Type is its datacontenttype)",
            )
        attributes[name] = _header_value(name, raw)
    content_type = headers.get("content-type")
    if content_type:
        attributes["datacontenttype"] = content_type
    media = media_type(content_type)
    data: Any
    if not body:
        data = None
    elif _is_json(media) or not media:
        data = _loads(body, "the body (JSON data)")
        if not media:
            attributes["datacontenttype"] = codec.CONTENT_TYPE_JSON
    elif media.startswith("text/"):
        try:
            data = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Problem(400, "malformed-data", "text data is not valid UTF-8") from None
    else:
        data = bytes(body)
    try:
        return codec.from_attributes(attributes, data)
    except InvalidEvent as exc:
        raise _invalid(exc) from None


def _encode_header(value: str) -> str:
    return _MUST_ENCODE.sub(
        lambda m: "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8")), value
    )


def binary_headers(event: Event) -> dict[str, str]:
    """The ``ce-*`` headers (and Content-Type) of ``event`` in binary mode (for
    clients, replies and tests)."""
    headers: dict[str, str] = {}
    for name, value in codec.to_attributes(event).items():
        if name == "datacontenttype":
            headers["content-type"] = str(value)
            continue
        if name == "time":
            text = value.isoformat().replace("+00:00", "Z")
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        headers[f"ce-{name}"] = _encode_header(text)
    return headers


def iter_types(events: Iterable[Event]) -> list[str]:
    return sorted({e.type for e in events})
