"""The Event: an immutable CloudEvents 1.0 envelope, and its structured-mode JSON codec.

An :class:`Event` never changes once created. What happens to it in transit (attempt
number, lease, receive time) belongs to a ``Delivery`` that wraps it.

Structured mode (``application/cloudevents+json``) is the wire format of the embedded
broker and the default everywhere; binary-mode bindings (attributes as protocol
headers) live in the transports that need them and reuse :func:`from_attributes`.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time as _time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

from nerve._native import speedups as _speedups
from nerve.errors import DecodeError, InvalidEvent

__all__ = [
    "CONTENT_TYPE_BATCH",
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_STRUCTURED",
    "Event",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "from_attributes",
    "to_attributes",
    "uuid7",
]

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_STRUCTURED = "application/cloudevents+json"
CONTENT_TYPE_BATCH = "application/cloudevents-batch+json"

#: Context attributes defined by the CloudEvents 1.0 core spec (everything else is an extension).
CORE_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema"}
)
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_RESERVED = CORE_ATTRIBUTES | {"data", "data_base64"}
_REQUIRED = ("specversion", "id", "source", "type")

ExtensionValue = str | int | bool


# ---------------------------------------------------------------------------------------
# UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness; monotonic within a process.

_uuid_lock = threading.Lock()
_last_ms = 0
_last_seq = 0
_entropy = b""
"""Random bytes from ``os.urandom``, drawn 8 at a time (one system call a few hundred
ids instead of two an id); emptied in a forked child, which must not repeat them."""
_taken = 0
_ENTROPY_CHUNK = 4096


def _forget_entropy() -> None:
    global _entropy, _taken
    _entropy, _taken = b"", 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_entropy)


def uuid7() -> str:
    """A new UUIDv7 string: sorts by creation time, unique without coordination."""
    global _last_ms, _last_seq, _entropy, _taken, _ms_text
    ms = _time.time_ns() // 1_000_000
    with _uuid_lock:
        at = _taken
        if at + 8 > len(_entropy):
            _entropy, at = os.urandom(_ENTROPY_CHUNK), 0
        _taken = at + 8
        bits = int.from_bytes(_entropy[at : at + 8])
        if ms <= _last_ms:
            ms = _last_ms
            _last_seq = (_last_seq + 1) & 0xFFF
            if _last_seq == 0:  # 4096 ids in one millisecond: borrow the next one
                ms += 1
        else:
            _last_seq = bits >> 53  # 11 random bits: room to count up within the ms
        _last_ms = ms
        seq = _last_seq
    # as str(uuid.UUID(int=...)); the millisecond's part is written once a millisecond
    # (one tuple, read once: another thread may replace it meanwhile)
    cached = _ms_text
    if cached[0] != ms:
        h = ms.to_bytes(6).hex()
        cached = _ms_text = (ms, f"{h[:8]}-{h[8:]}-")
    t = ((0x7000 | seq) << 64 | (0b10 << 62) | (bits & 0x3FFF_FFFF_FFFF_FFFF)).to_bytes(10).hex()
    return f"{cached[1]}{t[:4]}-{t[4:8]}-{t[8:]}"


_ms_text = (-1, "")


def _now() -> datetime:
    return datetime.now(UTC)


def _frozen(mapping: Mapping[str, ExtensionValue] | None) -> Mapping[str, ExtensionValue]:
    return MappingProxyType(dict(mapping) if mapping else {})


# ---------------------------------------------------------------------------------------


_DEFAULT: Any = object()
"""A parameter not given: ``id`` and ``time`` are then made (None is a value of its own:
an explicit ``time=None`` means no time, ``id=None`` is refused)."""


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class Event:
    """A CloudEvents 1.0 event. Immutable: use :meth:`evolve` to derive a changed copy.

    ``data`` is any JSON value, or ``bytes`` for binary payloads (sent as
    ``data_base64`` in structured JSON). ``extensions`` holds extension attributes
    (names of 1-20 characters ``[a-z0-9]``; values ``str``, ``int`` or ``bool``),
    among them nerve's ``partitionkey`` (ordering key), ``traceparent``,
    ``causationid`` and ``correlationid``.
    """

    type: str
    source: str
    id: str = field(default_factory=uuid7)
    specversion: str = "1.0"
    time: datetime | None = field(default_factory=_now)
    subject: str | None = None
    datacontenttype: str | None = CONTENT_TYPE_JSON
    dataschema: str | None = None
    data: Any = None
    extensions: Mapping[str, ExtensionValue] = field(default_factory=lambda: _frozen(None))

    def __init__(
        self,
        *,
        type: str,
        source: str,
        id: str = _DEFAULT,
        specversion: str = "1.0",
        time: datetime | None = _DEFAULT,
        subject: str | None = None,
        datacontenttype: str | None = CONTENT_TYPE_JSON,
        dataschema: str | None = None,
        data: Any = None,
        extensions: Mapping[str, ExtensionValue] | None = None,
    ) -> None:
        """The dataclass's own ``__init__`` would set each field with
        ``object.__setattr__`` (past the frozen guard), ten calls at about 1.5k
        instructions each; an ``Event`` is filled as a :class:`_Building` instead (the
        same slots, plain stores) and validated by :meth:`__post_init__`."""
        if id is _DEFAULT:
            id = uuid7()
        if time is _DEFAULT:
            time = _now()
        cls = self.__class__
        if cls is Event:
            _set(self, "__class__", _Building)
            built: Any = self
            built.type = type
            built.source = source
            built.id = id
            built.specversion = specversion
            built.time = time
            built.subject = subject
            built.datacontenttype = datacontenttype
            built.dataschema = dataschema
            built.data = data
            built.extensions = extensions
            built.__class__ = Event
        else:  # a subclass that inherits this __init__: its own layout
            for name, value in (
                ("type", type),
                ("source", source),
                ("id", id),
                ("specversion", specversion),
                ("time", time),
                ("subject", subject),
                ("datacontenttype", datacontenttype),
                ("dataschema", dataschema),
                ("data", data),
                ("extensions", extensions),
            ):
                _set(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.specversion != "1.0":
            raise InvalidEvent("specversion", f"must be '1.0', got {self.specversion!r}")
        if not (
            type(self.id) is str
            and self.id
            and type(self.source) is str
            and self.source
            and type(self.type) is str
            and self.type
        ):
            for name in ("id", "source", "type"):
                value = getattr(self, name)
                if not isinstance(value, str) or not value:
                    raise InvalidEvent(
                        name, f"is required and must be a non-empty string, got {value!r}"
                    )
        for name in ("subject", "datacontenttype", "dataschema"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidEvent(name, f"must be a string, got {type(value).__name__}")
        if self.time is not None:
            if not isinstance(self.time, datetime):
                raise InvalidEvent("time", f"must be a datetime, got {type(self.time).__name__}")
            if self.time.tzinfo is None:
                raise InvalidEvent("time", "must be timezone-aware (RFC 3339 needs an offset)")
        # always a private copy: a caller's dict (or a proxy of one) must not change us
        object.__setattr__(self, "extensions", _frozen(self.extensions))
        for name, value in self.extensions.items():
            _check_extension(name, value)

    # -- convenient views ------------------------------------------------------------

    @property
    def partitionkey(self) -> str | None:
        """The ordering key: events with the same key are handled in publish order."""
        value = self.extensions.get("partitionkey")
        return None if value is None else str(value)

    @property
    def traceparent(self) -> str | None:
        value = self.extensions.get("traceparent")
        return None if value is None else str(value)

    def evolve(self, **changes: Any) -> Event:
        """A copy with ``changes`` applied (and validated). The original is untouched."""
        return replace(self, **changes)

    def with_extensions(self, **values: ExtensionValue | None) -> Event:
        """A copy with extension attributes set (``None`` removes one).

        Only the new values are checked: the other fields were when this event was
        made, and it cannot have changed since (a traced publish adds ``traceparent``
        to every event: ``replace`` checked every field again, half of the
        producer's tracing cost; and ten ``object.__setattr__`` calls past the frozen
        guard cost three times the rest of it)."""
        merged = dict(self.extensions)
        for name, value in values.items():
            if value is None:
                merged.pop(name, None)
            else:
                _check_extension(name, value)
                merged[name] = value
        cls = type(self)
        if cls is Event:  # plain stores into the same layout (see _Building): 4x cheaper
            built = _Building()
            built.type = self.type
            built.source = self.source
            built.id = self.id
            built.specversion = self.specversion
            built.time = self.time
            built.subject = self.subject
            built.datacontenttype = self.datacontenttype
            built.dataschema = self.dataschema
            built.data = self.data
            built.extensions = MappingProxyType(merged)
            built.__class__ = Event  # type: ignore[assignment]
            return built  # type: ignore[return-value]
        copy = _new(cls)  # a subclass: its own fields too, past the frozen guard
        for name in _fields_of(cls):
            _set(copy, name, getattr(self, name))
        _set(copy, "extensions", MappingProxyType(merged))
        return copy


_new = object.__new__
_set = object.__setattr__  # how a frozen dataclass sets its own fields
_extension_names: Callable[[set[str], dict[str, Any]], list[str]] | None = (
    None if _speedups is None else _speedups.extension_names
)
_plain_event: Callable[[Mapping[str, Any], Any], Event | None] | None = None
"""``_speedups.plain_event`` once it knows :class:`Event`, what is reserved and the
extension names checked (registered below, after ``_checked_names``)."""
_decode_document: Callable[[bytes], object] | None = None
"""``_speedups.decode_document``: :func:`decode` of plain bytes in C (the event, else the
parsed document or None for the Python code to finish)."""


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields_of(cls: type[Event]) -> tuple[str, ...]:
    """The fields of an event class but ``extensions``."""
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = tuple(f.name for f in fields(cls) if f.name != "extensions")
    return found


_checked_names: set[str] = set()


def _check_extension(name: str, value: object) -> None:
    if not isinstance(value, (str, int)):  # bool is an int
        raise InvalidEvent(
            name, f"extension values must be str, int or bool, got {type(value).__name__}"
        )
    if name in _checked_names:
        return
    if not isinstance(name, str) or not _EXTENSION_NAME.match(name):
        raise InvalidEvent(
            str(name), "extension attribute names must be 1-20 characters of a-z and 0-9"
        )
    if name in _RESERVED:
        raise InvalidEvent(name, "is a core attribute and cannot be used as an extension")
    if len(_checked_names) < 1024:
        _checked_names.add(name)


# ---------------------------------------------------------------------------------------
# Attribute dictionaries (shared by the structured codec and by binary-mode bindings)


def to_attributes(event: Event) -> dict[str, Any]:
    """The event's context attributes as a flat dict (no data), absent ones omitted."""
    attrs: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
    }
    if event.time is not None:
        attrs["time"] = event.time
    if event.subject is not None:
        attrs["subject"] = event.subject
    if event.datacontenttype is not None:
        attrs["datacontenttype"] = event.datacontenttype
    if event.dataschema is not None:
        attrs["dataschema"] = event.dataschema
    attrs.update(event.extensions)
    return attrs


_fromisoformat = datetime.fromisoformat

if _speedups is not None:
    _speedups.register_event(Event)
    _speedups.register_decoding(_RESERVED, _checked_names, _fromisoformat, orjson.loads)
    _plain_event = _speedups.plain_event
    _decode_document = _speedups.decode_document


def _parse_time(value: object) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent("time", f"is not an RFC 3339 timestamp: {value!r}") from None
    else:
        raise InvalidEvent("time", f"must be an RFC 3339 string, got {type(value).__name__}")
    if parsed.tzinfo is None:
        raise InvalidEvent("time", f"needs a UTC offset or 'Z': {value!r}")
    return parsed


def _refuse_core(attributes: Mapping[str, Any]) -> None:
    """Raise the error :class:`Event` would raise for bad required attributes (if any)."""
    for name in _REQUIRED:
        if attributes.get(name) is None:
            raise InvalidEvent(name, "is required but missing")
    if attributes["specversion"] != "1.0":
        raise InvalidEvent("specversion", f"must be '1.0', got {attributes['specversion']!r}")
    for name in ("id", "source", "type"):
        value = attributes[name]
        if not isinstance(value, str) or not value:
            raise InvalidEvent(name, f"is required and must be a non-empty string, got {value!r}")


class _Building:
    """An :class:`Event` under construction: the same slots, plain attribute stores.

    ``from_attributes`` fills one and then makes it an ``Event`` (``__class__``
    assignment: the layouts are identical). Ten ``object.__setattr__`` calls past the
    frozen dataclass's guard cost about five times as much, once per received event.
    """

    __slots__ = Event.__slots__
    type: Any  # checked to be non-empty strings before they are set
    source: Any
    id: Any
    specversion: str
    time: datetime | None
    subject: str | None
    datacontenttype: str | None
    dataschema: str | None
    data: Any
    extensions: Mapping[str, ExtensionValue]


def from_attributes(attributes: Mapping[str, Any], data: Any = None) -> Event:
    """Build an event from context attributes (as a binding receives them) and data.

    Checks exactly what :class:`Event` checks, with the same errors, but builds the
    event directly: this is the receive path of every transport, run once per event
    (in C, ``_speedups.plain_event``, when the attributes are plain: a dict of strings
    whose extension names were checked before; anything else is built here).
    """
    if _plain_event is not None:
        built = _plain_event(attributes, data)
        if built is not None:
            return built
    get = attributes.get
    event_id, source, type_ = get("id"), get("source"), get("type")
    if not (
        type(event_id) is str
        and event_id
        and type(source) is str
        and source
        and type(type_) is str
        and type_
        and get("specversion") == "1.0"
    ):
        _refuse_core(attributes)
    time_value = get("time")
    subject, content_type, schema = get("subject"), get("datacontenttype"), get("dataschema")
    if not (
        (subject is None or type(subject) is str)
        and (content_type is None or type(content_type) is str)
        and (schema is None or type(schema) is str)
    ):
        for name, value in (
            ("subject", subject),
            ("datacontenttype", content_type),
            ("dataschema", schema),
        ):
            if value is not None and not isinstance(value, str):
                raise InvalidEvent(name, f"must be a string, got {type(value).__name__}")
    extensions: dict[str, ExtensionValue] = {}
    extra = attributes.keys() - _RESERVED  # (a set difference in C; usually one or two)
    if extra:
        # only the extensions are looked at, in the document's order (one needs no
        # ordering; more are picked out of the document by a filter, a loop in C);
        # CloudEvents JSON format 2.2: a null attribute is treated as unset
        if len(extra) == 1:
            names: Iterable[str] = extra
        elif _extension_names is not None and type(attributes) is dict:
            names = _extension_names(extra, attributes)  # the same, in C (a third of it)
        else:
            names = filter(extra.__contains__, attributes)
        for name in names:
            value = attributes[name]
            if value is not None:
                if type(value) is not str or name not in _checked_names:
                    _check_extension(name, value)
                extensions[name] = value
    event = _Building()
    event.type = type_
    event.source = source
    event.id = event_id
    event.specversion = "1.0"
    if type(time_value) is str:  # the usual case, inline: this runs for every event
        try:
            when: datetime | None = _fromisoformat(time_value)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            _parse_time(time_value)  # raises the error that says what is wrong
        event.time = when
    else:
        event.time = None if time_value is None else _parse_time(time_value)
    event.subject = subject
    event.datacontenttype = content_type
    event.dataschema = schema
    event.data = data
    event.extensions = MappingProxyType(extensions)
    event.__class__ = Event  # type: ignore[assignment]
    return event  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Structured-mode JSON codec

_DUMP_OPTIONS = orjson.OPT_UTC_Z


def _is_json_content(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media.startswith("text/")


def _structured(event: Event) -> dict[str, Any]:
    doc = to_attributes(event)
    data = event.data
    if isinstance(data, bytes | bytearray | memoryview):
        doc["data_base64"] = base64.b64encode(bytes(data)).decode("ascii")
    elif data is not None:
        doc["data"] = data
    return doc


def encode(event: Event) -> bytes:
    """Encode one event as structured-mode CloudEvents JSON."""
    try:
        return orjson.dumps(_structured(event), option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise InvalidEvent("data", f"is not JSON-serialisable: {exc}") from None


def encode_batch(events: Iterable[Event]) -> bytes:
    """Encode events as a JSON array (``application/cloudevents-batch+json``)."""
    try:
        return orjson.dumps([_structured(e) for e in events], option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise InvalidEvent("data", f"is not JSON-serialisable: {exc}") from None


def _from_document(doc: object, raw: bytes) -> Event:
    if not isinstance(doc, dict):
        raise DecodeError("(envelope)", "a structured event must be a JSON object", raw)
    if "data" in doc and "data_base64" in doc:
        raise DecodeError("data", "an event cannot carry both 'data' and 'data_base64'", raw)
    data: Any = doc.get("data")
    if "data_base64" in doc:
        encoded = doc["data_base64"]
        if not isinstance(encoded, str):
            raise DecodeError("data_base64", "must be a base64 string", raw)
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise DecodeError("data_base64", "is not valid base64", raw) from None
    try:
        return from_attributes(doc, data)
    except DecodeError:
        raise
    except InvalidEvent as exc:
        raise DecodeError(exc.attribute, exc.reason, raw) from None


def decode(raw: bytes | bytearray | memoryview | str) -> Event:
    """Decode one structured-mode CloudEvents JSON document.

    Raises :class:`DecodeError` (carrying the raw bytes) for anything that is not a
    valid event, naming the attribute at fault.
    """
    if _decode_document is not None and type(raw) is bytes:  # every transport's case
        parsed = _decode_document(raw)
        if isinstance(parsed, Event):
            return parsed
        if parsed is not None:  # parsed, but not plain: checked (or refused) here
            return _from_document(parsed, raw)
    raw_bytes = raw.encode() if isinstance(raw, str) else bytes(raw)
    try:
        doc = orjson.loads(raw_bytes)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("(envelope)", f"not valid JSON: {exc}", raw_bytes) from None
    return _from_document(doc, raw_bytes)


def decode_batch(raw: bytes | str) -> list[Event]:
    """Decode a ``application/cloudevents-batch+json`` array of structured events."""
    raw_bytes = raw.encode() if isinstance(raw, str) else bytes(raw)
    try:
        docs = orjson.loads(raw_bytes)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("(batch)", f"not valid JSON: {exc}", raw_bytes) from None
    if not isinstance(docs, list):
        raise DecodeError("(batch)", "a batch must be a JSON array of events", raw_bytes)
    return [_from_document(doc, raw_bytes) for doc in docs]
