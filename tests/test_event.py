"""The Event envelope, UUIDv7 ids and the structured-mode JSON codec."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nerve.errors import DecodeError, InvalidEvent
from nerve.event import (
    Event,
    decode,
    decode_batch,
    encode,
    encode_batch,
    from_attributes,
    to_attributes,
    uuid7,
)


def make(**changes: Any) -> Event:
    fields: dict[str, Any] = {"type": "order.created", "source": "/shop", "data": {"n": 1}}
    fields.update(changes)
    return Event(**fields)


# ---------------------------------------------------------------------------------------
# Immutability and copies


def test_event_attributes_cannot_be_assigned() -> None:
    event = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.type = "order.cancelled"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.id = "other"  # type: ignore[misc]
    assert event.type == "order.created"


def test_extensions_are_a_read_only_copy() -> None:
    given_exts: dict[str, Any] = {"partitionkey": "k1"}
    event = make(extensions=given_exts)
    given_exts["partitionkey"] = "changed"
    given_exts["extra"] = "x"
    assert dict(event.extensions) == {"partitionkey": "k1"}
    with pytest.raises(TypeError):
        event.extensions["partitionkey"] = "k2"  # type: ignore[index]
    assert event.partitionkey == "k1"


def test_evolve_returns_a_new_validated_copy() -> None:
    event = make(subject="a")
    changed = event.evolve(subject="b", data={"n": 2})
    assert changed is not event
    assert (changed.subject, changed.data) == ("b", {"n": 2})
    assert (event.subject, event.data) == ("a", {"n": 1})
    assert changed.id == event.id and changed.time == event.time
    with pytest.raises(InvalidEvent) as info:
        event.evolve(type="")
    assert info.value.attribute == "type"
    with pytest.raises(InvalidEvent) as info:
        event.evolve(time=datetime(2024, 1, 1))  # naive
    assert info.value.attribute == "time"


def test_with_extensions_sets_and_removes_in_a_copy() -> None:
    event = make(extensions={"partitionkey": "k1", "tenant": "acme"})
    changed = event.with_extensions(traceparent="00-abc-def-01", tenant=None, retries=3)
    assert dict(changed.extensions) == {
        "partitionkey": "k1",
        "traceparent": "00-abc-def-01",
        "retries": 3,
    }
    assert changed.traceparent == "00-abc-def-01"
    assert dict(event.extensions) == {"partitionkey": "k1", "tenant": "acme"}
    assert event.traceparent is None
    with pytest.raises(InvalidEvent) as info:
        event.with_extensions(**{"Bad": "x"})
    assert info.value.attribute == "Bad"
    # the copy is the event with those extensions, every other field as it was
    assert changed == event.evolve(extensions=changed.extensions)
    assert type(changed.extensions).__name__ == "mappingproxy"
    with pytest.raises(InvalidEvent) as info:
        event.with_extensions(ratio=0.5)  # type: ignore[arg-type]
    assert info.value.attribute == "ratio"
    with pytest.raises(InvalidEvent):
        event.with_extensions(source="x")  # a context attribute, not an extension


def test_constructor_defaults_and_a_subclass_that_inherits_it() -> None:
    untimed = Event(type="t.x", source="/s", time=None)  # None: no time, not the default
    assert untimed.time is None and uuid.UUID(untimed.id).version == 7
    assert dict(untimed.extensions) == {} and untimed.datacontenttype == "application/json"
    with pytest.raises(InvalidEvent) as info:
        Event(type="t.x", source="/s", id=None)  # type: ignore[arg-type]
    assert info.value.attribute == "id"

    class Tagged(Event):  # not a dataclass: Event's own __init__
        __slots__ = ()

        def tag(self) -> str:
            return self.type.upper()

    tagged = Tagged(type="t.x", source="/s", extensions={"k": "v"})
    assert type(tagged) is Tagged and tagged.tag() == "T.X"
    assert dict(tagged.extensions) == {"k": "v"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        tagged.subject = "x"  # type: ignore[misc]
    with pytest.raises(InvalidEvent):
        Tagged(type="", source="/s")


def test_with_extensions_copies_are_frozen_events_of_the_same_class() -> None:
    event = make(subject="s1", extensions={"tenant": "acme"})
    changed = event.with_extensions(tenant="beta")
    assert type(changed) is Event
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.subject = "s2"  # type: ignore[misc]
    assert changed == event.evolve(extensions={"tenant": "beta"})

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Audited(Event):
        auditor: str = "nobody"

    audited = Audited(type="t.x", source="/s", auditor="ann", extensions={"tenant": "acme"})
    copy = audited.with_extensions(tenant=None, region="eu")
    assert type(copy) is Audited
    assert copy.auditor == "ann" and copy.id == audited.id and copy.time == audited.time
    assert dict(copy.extensions) == {"region": "eu"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.auditor = "bob"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Defaults and UUIDv7


def test_defaults() -> None:
    before = datetime.now(UTC)
    event = Event(type="t", source="/s")
    after = datetime.now(UTC)
    assert event.specversion == "1.0"
    assert event.time is not None and event.time.tzinfo is not None
    assert event.time.utcoffset() == timedelta(0)
    assert before <= event.time <= after
    assert event.datacontenttype == "application/json"
    assert event.subject is None and event.dataschema is None and event.data is None
    assert dict(event.extensions) == {}
    assert event.partitionkey is None
    parsed = uuid.UUID(event.id)
    assert parsed.version == 7
    assert Event(type="t", source="/s").id != event.id


def test_uuid7_layout_and_timestamp() -> None:
    now_ms = datetime.now(UTC).timestamp() * 1000
    text = uuid7()
    value = uuid.UUID(text)
    assert str(value) == text  # the canonical form: lowercase, hyphens at 8-4-4-4-12
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert (value.int >> 76) & 0xF == 7
    assert (value.int >> 62) & 0b11 == 0b10
    assert abs((value.int >> 80) - now_ms) < 5_000  # the first 48 bits are Unix ms


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_uuid7_randomness_is_not_shared_with_a_forked_child() -> None:
    uuid7()  # the parent has drawn random bytes for more ids than this one
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(write, uuid7().encode())
        os._exit(0)
    os.close(write)
    mine = uuid7()
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert uuid.UUID(child).version == 7
    assert child[-12:] != mine[-12:]  # the random tails: the same had the child reused them


def test_uuid7_sorts_in_creation_order_even_within_one_millisecond() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert [p.int for p in parsed] == sorted(p.int for p in parsed)
    assert all(p.version == 7 and p.variant == uuid.RFC_4122 for p in parsed)
    per_ms: dict[int, int] = {}
    for p in parsed:
        per_ms[p.int >> 80] = per_ms.get(p.int >> 80, 0) + 1
    assert max(per_ms.values()) > 1, "expected several ids in one millisecond"


def test_event_ids_sort_in_creation_order() -> None:
    ids = [Event(type="t", source="/s").id for _ in range(2_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("changes", "attribute"),
    [
        ({"id": ""}, "id"),
        ({"id": 7}, "id"),
        ({"source": ""}, "source"),
        ({"source": None}, "source"),
        ({"type": ""}, "type"),
        ({"type": b"order.created"}, "type"),
        ({"specversion": "0.3"}, "specversion"),
        ({"specversion": "1"}, "specversion"),
        ({"time": datetime(2024, 5, 1, 12, 0)}, "time"),
        ({"time": "2024-05-01T12:00:00Z"}, "time"),
        ({"subject": 5}, "subject"),
        ({"datacontenttype": 1}, "datacontenttype"),
        ({"dataschema": ["x"]}, "dataschema"),
        ({"extensions": {"Tenant": "x"}}, "Tenant"),
        ({"extensions": {"a" * 21: "x"}}, "a" * 21),
        ({"extensions": {"": "x"}}, ""),
        ({"extensions": {"my-ext": "x"}}, "my-ext"),
        ({"extensions": {"data": "x"}}, "data"),
        ({"extensions": {"id": "x"}}, "id"),
        ({"extensions": {"subject": "x"}}, "subject"),
        ({"extensions": {"ok": 1.5}}, "ok"),
        ({"extensions": {"ok": None}}, "ok"),
        ({"extensions": {"ok": ["a"]}}, "ok"),
        ({"extensions": {"ok": {"a": 1}}}, "ok"),
    ],
)
def test_invalid_envelopes_name_the_attribute(changes: dict[str, Any], attribute: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        make(**changes)
    assert info.value.attribute == attribute
    assert repr(attribute) in str(info.value)
    assert not isinstance(info.value, DecodeError)


def test_valid_extension_names_and_values() -> None:
    event = make(extensions={"a" * 20: "x", "n0": 0, "flag": True, "z9": "", "partitionkey": "k"})
    assert event.extensions["a" * 20] == "x"
    assert event.extensions["flag"] is True


def test_required_attributes_missing_from_attributes() -> None:
    for missing in ("specversion", "id", "source", "type"):
        attrs = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
        del attrs[missing]
        with pytest.raises(InvalidEvent) as info:
            from_attributes(attrs)
        assert info.value.attribute == missing


def test_non_utc_offsets_are_kept() -> None:
    plus_two = timezone(timedelta(hours=2))
    event = make(time=datetime(2024, 5, 1, 14, 0, tzinfo=plus_two))
    back = decode(encode(event))
    assert back.time == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert back.time is not None and back.time.utcoffset() == timedelta(hours=2)


# ---------------------------------------------------------------------------------------
# Structured JSON codec


def test_round_trip_with_json_data_and_extensions() -> None:
    event = make(
        subject="order-42",
        dataschema="https://example.com/order.json",
        data={"id": 42, "lines": [{"sku": "a", "qty": 2}], "note": "é ✓", "paid": None},
        extensions={
            "partitionkey": "customer-7",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "priority": 3,
            "vip": False,
        },
    )
    raw = encode(event)
    doc = json.loads(raw)
    assert doc["data"] == event.data
    assert doc["partitionkey"] == "customer-7"
    assert doc["priority"] == 3 and doc["vip"] is False
    assert doc["time"].endswith("Z")
    assert "data_base64" not in doc
    back = decode(raw)
    assert back == event
    assert back.partitionkey == "customer-7"
    assert back.traceparent == event.traceparent
    assert back.time == event.time


def test_round_trip_with_bytes_data_uses_data_base64() -> None:
    payload = bytes(range(256))
    event = make(data=payload, datacontenttype="application/octet-stream")
    doc = json.loads(encode(event))
    assert "data" not in doc
    assert base64.b64decode(doc["data_base64"]) == payload
    back = decode(encode(event))
    assert back.data == payload and isinstance(back.data, bytes)
    assert back == event


def test_absent_optional_attributes_stay_absent() -> None:
    event = Event(type="t", source="/s", id="1", time=None, datacontenttype=None)
    doc = json.loads(encode(event))
    assert doc == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    back = decode(encode(event))
    assert back.time is None and back.datacontenttype is None and back.subject is None
    assert back.dataschema is None and back.data is None
    assert to_attributes(back) == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    default_doc = json.loads(encode(Event(type="t", source="/s")))
    assert set(default_doc) == {"specversion", "id", "source", "type", "time", "datacontenttype"}


def test_decode_accepts_str_bytearray_and_memoryview() -> None:
    event = make()
    raw = encode(event)
    assert decode(raw.decode()) == event
    assert decode(bytearray(raw)) == event
    assert decode(memoryview(raw)) == event


def test_unserialisable_data_is_refused() -> None:
    with pytest.raises(InvalidEvent) as info:
        encode(make(data={"when": object()}))
    assert info.value.attribute == "data"


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1",
        "source": "/s",
        "type": "t",
        "time": "2024-05-01T12:00:00Z",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


@pytest.mark.parametrize(
    ("raw", "attribute"),
    [
        (b"not json at all", "(envelope)"),
        (b"", "(envelope)"),
        (b"\xff\xfe{", "(envelope)"),
        (b"[1, 2]", "(envelope)"),
        (b'"an event"', "(envelope)"),
        (b"42", "(envelope)"),
        (b"null", "(envelope)"),
        (orjson.dumps(_doc(data={"a": 1}, data_base64="AAE=")), "data"),
        (orjson.dumps(_doc(data_base64="@@not base64@@")), "data_base64"),
        (orjson.dumps(_doc(data_base64=123)), "data_base64"),
        (orjson.dumps(_doc(time="yesterday")), "time"),
        (orjson.dumps(_doc(time="2024-05-01T12:00:00")), "time"),
        (orjson.dumps(_doc(time=1714564800)), "time"),
        (orjson.dumps(_doc(id=...)), "id"),
        (orjson.dumps(_doc(source=...)), "source"),
        (orjson.dumps(_doc(type=...)), "type"),
        (orjson.dumps(_doc(specversion=...)), "specversion"),
        (orjson.dumps(_doc(specversion="0.3")), "specversion"),
        (orjson.dumps(_doc(id=12)), "id"),
        (orjson.dumps(_doc(Tenant="x")), "Tenant"),
        (orjson.dumps(_doc(rate=1.5)), "rate"),
        (orjson.dumps(_doc(tags=["a"])), "tags"),
    ],
)
def test_decode_errors_carry_raw_and_attribute(raw: bytes, attribute: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert info.value.raw == raw
    assert info.value.attribute == attribute
    assert isinstance(info.value, InvalidEvent)


def test_batch_round_trip() -> None:
    events = [make(data={"n": i}, extensions={"partitionkey": f"k{i % 3}"}) for i in range(5)] + [
        make(data=b"\x00\x01", datacontenttype="application/octet-stream")
    ]
    raw = encode_batch(events)
    assert isinstance(json.loads(raw), list) and len(json.loads(raw)) == 6
    assert decode_batch(raw) == events
    assert decode_batch(raw.decode()) == events
    assert decode_batch(encode_batch([])) == []


@pytest.mark.parametrize(
    ("raw", "attribute"),
    [
        (b"{not json", "(batch)"),
        (orjson.dumps(_doc()), "(batch)"),
        (orjson.dumps([_doc(), "x"]), "(envelope)"),
        (orjson.dumps([_doc(), _doc(type="")]), "type"),
    ],
)
def test_decode_batch_errors(raw: bytes, attribute: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_batch(raw)
    assert info.value.attribute == attribute
    assert info.value.raw == raw


# ---------------------------------------------------------------------------------------
# Interoperability with the official CloudEvents SDK (cloudevents 2.x, core API)


def test_sdk_structured_event_decodes_with_nerve() -> None:
    when = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    sdk_event = CloudEvent(
        {
            "type": "com.example.order.created",
            "source": "https://example.com/shop",
            "id": "A234-1234-1234",
            "time": when,
            "subject": "order-42",
            "datacontenttype": "application/json",
            "dataschema": "https://example.com/schema.json",
            "partitionkey": "customer-7",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tenant": "acme",
        },
        {"id": 42, "lines": [{"sku": "a", "qty": 2}], "total": 9.5},
    )
    raw = JSONFormat().write(sdk_event)
    event = decode(raw)
    assert event.specversion == "1.0"
    assert event.id == "A234-1234-1234"
    assert event.type == "com.example.order.created"
    assert event.source == "https://example.com/shop"
    assert event.subject == "order-42"
    assert event.time == when
    assert event.datacontenttype == "application/json"
    assert event.dataschema == "https://example.com/schema.json"
    assert event.partitionkey == "customer-7"
    assert event.traceparent == sdk_event.get_extension("traceparent")
    assert dict(event.extensions) == {
        "partitionkey": "customer-7",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tenant": "acme",
    }
    assert event.data == sdk_event.get_data()


def test_sdk_binary_data_decodes_with_nerve() -> None:
    payload = b"\x00\x01binary\xff"
    sdk_event = CloudEvent(
        {"type": "t", "source": "/s", "datacontenttype": "application/octet-stream"}, payload
    )
    event = decode(JSONFormat().write(sdk_event))
    assert event.data == payload
    assert event.id == sdk_event.get_id()
    assert event.time == sdk_event.get_time()


def test_nerve_event_is_parsed_by_the_sdk() -> None:
    event = make(
        subject="order-42",
        dataschema="https://example.com/schema.json",
        data={"id": 42, "nested": {"ok": True}, "items": [1, 2, 3]},
        extensions={
            "partitionkey": "customer-7",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "causationid": "c1",
            "priority": 2,
        },
    )
    sdk_event = JSONFormat().read(CloudEvent, encode(event))
    assert sdk_event.get_specversion() == "1.0"
    assert sdk_event.get_id() == event.id
    assert sdk_event.get_type() == event.type
    assert sdk_event.get_source() == event.source
    assert sdk_event.get_subject() == event.subject
    assert sdk_event.get_time() == event.time
    assert sdk_event.get_datacontenttype() == event.datacontenttype
    assert sdk_event.get_dataschema() == event.dataschema
    for name, value in event.extensions.items():
        assert sdk_event.get_extension(name) == value
    assert sdk_event.get_data() == event.data


def test_nerve_binary_event_is_parsed_by_the_sdk() -> None:
    payload = bytes(range(50))
    event = make(data=payload, datacontenttype="application/octet-stream")
    sdk_event = JSONFormat().read(None, encode(event))
    assert sdk_event.get_data() == payload
    assert sdk_event.get_id() == event.id


# ---------------------------------------------------------------------------------------
# Property: encode/decode round-trips every valid event

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)
_reserved = {
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
}
_ext_names = st.from_regex(r"\A[a-z0-9]{1,20}\Z").filter(lambda n: n not in _reserved)
_ext_values = (
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.booleans()
)
_times = st.none() | st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_id=_text,
    source=_text,
    event_type=_text,
    subject=st.none() | _text,
    time=_times,
    data=_json | st.binary(max_size=64),
    extensions=st.dictionaries(_ext_names, _ext_values, max_size=5),
)
def test_encode_decode_round_trips_any_valid_event(
    event_id: str,
    source: str,
    event_type: str,
    subject: str | None,
    time: datetime | None,
    data: Any,
    extensions: dict[str, Any],
) -> None:
    event = Event(
        id=event_id,
        source=source,
        type=event_type,
        subject=subject,
        time=time,
        data=data,
        extensions=extensions,
    )
    back = decode(encode(event))
    assert back == event
    assert back.data == data
    assert isinstance(back.data, bytes) == isinstance(data, bytes)
    assert back.time == time
    assert dict(back.extensions) == extensions
    for name, value in extensions.items():
        assert type(back.extensions[name]) is type(value)


def test_spec_example_with_non_json_data_decodes() -> None:
    raw = (
        b'{"specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",'
        b' "id": "B234-1234-1234", "time": "2018-04-05T17:31:00Z",'
        b' "comexampleextension1": "value", "comexampleothervalue": 5,'
        b' "datacontenttype": "application/xml", "data": "<much wow=\\"xml\\"/>"}'
    )
    event = decode(raw)
    assert event.data == '<much wow="xml"/>'
    assert event.time == datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
    assert dict(event.extensions) == {"comexampleextension1": "value", "comexampleothervalue": 5}
    assert decode(encode(event)) == event


def test_null_attributes_are_treated_as_unset() -> None:
    """CloudEvents JSON format 2.2: a null attribute MUST be treated as unset."""
    raw = orjson.dumps(_doc(subject=None, dataschema=None, unsetextension=None, data={"a": 1}))
    event = decode(raw)
    assert event.subject is None and event.dataschema is None
    assert "unsetextension" not in event.extensions
    assert event.data == {"a": 1}


def test_decoded_extensions_keep_the_documents_order_and_are_each_checked() -> None:
    raw = orjson.dumps(_doc(zeta="z", alpha=1, skipped=None, mid=True))
    assert list(decode(raw).extensions.items()) == [("zeta", "z"), ("alpha", 1), ("mid", True)]
    bad = orjson.dumps(_doc(zeta="z", alpha=1, Tenant="x"))
    with pytest.raises(DecodeError) as info:
        decode(bad)
    assert info.value.attribute == "Tenant"


def test_extensions_given_as_a_mapping_proxy_are_copied() -> None:
    from types import MappingProxyType

    underlying: dict[str, Any] = {"tenant": "acme"}
    event = make(extensions=MappingProxyType(underlying))
    underlying["tenant"] = "changed"
    underlying["Bad Name"] = 1.5
    assert dict(event.extensions) == {"tenant": "acme"}


@given(
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=12),
    st.sets(st.text(max_size=5), max_size=5),
)
def test_the_c_extension_picker_keeps_the_documents_order(
    attributes: dict[str, int], extra: set[str]
) -> None:
    from nerve._native import speedups

    if speedups is None:
        if os.environ.get("CI") and os.environ.get("NERVE_SPEEDUPS") != "0":
            pytest.fail("nerve._speedups was not built (see hatch_build.py)")
        pytest.skip("nerve._speedups was not built or is switched off")
    assert speedups.extension_names(extra, attributes) == list(
        filter(extra.__contains__, attributes)
    )


def _c_speedups() -> Any:
    from nerve._native import speedups

    if speedups is None:
        if os.environ.get("CI") and os.environ.get("NERVE_SPEEDUPS") != "0":
            pytest.fail("nerve._speedups was not built (see hatch_build.py)")
        pytest.skip("nerve._speedups was not built or is switched off")
    return speedups


def _python_built(attributes: dict[str, Any], data: Any) -> Event | BaseException:
    """What from_attributes gives without its C fast path: the event, or the error."""
    from nerve import event as codec

    fast, codec._plain_event = codec._plain_event, None
    try:
        return codec.from_attributes(attributes, data)
    except InvalidEvent as exc:
        return exc
    finally:
        codec._plain_event = fast


def _fields(event: Event) -> tuple[Any, ...]:
    names = [f.name for f in dataclasses.fields(event) if f.name != "extensions"]
    return (type(event), *(getattr(event, n) for n in names), list(event.extensions.items()))


def test_the_c_decoder_builds_plain_events_and_leaves_the_rest_to_python() -> None:
    """The common event (string attributes, an extension name seen before) is built in
    C, the same as Python builds it; an unseen extension name, a time without offset, a
    non-string value are left to Python (None), which checks and refuses them."""
    speedups = _c_speedups()
    from nerve import event as codec

    doc = _doc(subject="s", dataschema="nerve:schema/t/1", partitionkey="k", data={"a": 1})
    expected = _python_built(doc, doc["data"])  # (checks the name 'partitionkey' once)
    built = speedups.plain_event(doc, doc["data"])
    assert built is not None and codec._plain_event is speedups.plain_event
    assert _fields(built) == _fields(expected)  # type: ignore[arg-type]
    assert built.time == datetime(2024, 5, 1, 12, tzinfo=UTC)
    for odd in (
        _doc(neverseenbefore="x"),  # Python checks the name first
        _doc(time="2024-05-01T12:00:00"),  # no offset: refused
        _doc(partitionkey=7),  # an int extension: Python checks it
        _doc(subject=3),  # refused
        _doc(id=""),  # refused
        _doc(specversion="0.3"),  # refused
        {**_doc(), 7: "x"},  # a key that is not a string: refused, in Python
    ):
        assert speedups.plain_event(odd, None) is None, odd


_TEXTS = st.sampled_from(["", "x", "/s", "nerve:schema/t/1", "2024-05-01T12:00:00Z"])
_VALUES = st.one_of(
    st.none(), _TEXTS, st.integers(-2, 2), st.booleans(), st.floats(allow_nan=False)
)
_TIMES = st.one_of(
    _VALUES,
    st.sampled_from(
        ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00+02:00", "2024-05-01T12:00:00", "soon"]
    ),
)


_PLAIN = {
    "specversion": "1.0",
    "id": "e1",
    "source": "/s",
    "type": "t",
    "time": "2024-05-01T12:00:00Z",
    "subject": "s",
    "datacontenttype": "application/json",
    "dataschema": "nerve:schema/t/1",
    "partitionkey": "k",
}


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sets(st.sampled_from(sorted(_PLAIN)), max_size=3),
    st.dictionaries(
        st.sampled_from([*_PLAIN, "data", "tenant", "seq", "Bad", "x" * 21]), _TIMES, max_size=3
    ),
    _VALUES,
    st.sampled_from(
        ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00+02:00", "2024-05-01T12:00:00", "soon", 5]
    ),
)
def test_the_c_decoder_builds_what_python_builds(
    removed: set[str], changed: dict[str, Any], data: Any, when: Any
) -> None:
    """Whatever the attributes (a plain event's, some removed, some changed to other
    values, extensions added), the C fast path either leaves them to Python (None) or
    builds exactly the event Python builds (same class, fields and extensions in the
    same order); it never builds one that Python refuses."""
    speedups = _c_speedups()
    attributes = {k: v for k, v in _PLAIN.items() if k not in removed} | {"time": when}
    attributes |= changed
    expected = _python_built(attributes, data)  # first: it checks new extension names
    built = speedups.plain_event(attributes, data)
    if built is not None:
        assert isinstance(expected, Event), (attributes, expected)
        assert _fields(built) == _fields(expected)


def _python_decoded(raw: bytes) -> Event | tuple[str, str]:
    """What decode gives without its C fast paths: the event, or the error's fields."""
    from nerve import event as codec

    fast = codec._decode_document, codec._plain_event
    codec._decode_document = codec._plain_event = None
    try:
        return decode(raw)
    except DecodeError as exc:
        return (exc.attribute, exc.reason)
    finally:
        codec._decode_document, codec._plain_event = fast


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sets(st.sampled_from(sorted(_PLAIN)), max_size=2),
    st.dictionaries(st.sampled_from([*_PLAIN, "tenant", "Bad"]), _TIMES, max_size=2),
    st.sampled_from(["data", "data_base64", "both", "none"]),
    st.sampled_from(["object", "array", "text", "not json"]),
)
def test_decode_in_c_gives_what_decode_in_python_gives(
    removed: set[str], changed: dict[str, Any], body: str, shape: str
) -> None:
    """Whatever the bytes (a plain event's document, attributes removed or changed, data
    as JSON, base64, both or none, a document that is not an object, not JSON at all),
    decode with its C path returns the same event, or refuses with the same error, as
    decode in pure Python."""
    _c_speedups()
    doc: Any = {k: v for k, v in _PLAIN.items() if k not in removed} | changed
    if body in ("data", "both"):
        doc["data"] = {"n": 1}
    if body in ("data_base64", "both"):
        doc["data_base64"] = base64.b64encode(b"\x00\x01").decode()
    raw = {
        "object": lambda: orjson.dumps(doc),
        "array": lambda: orjson.dumps([doc]),
        "text": lambda: b'"an event"',
        "not json": lambda: b"{not json",
    }[shape]()
    expected = _python_decoded(raw)  # first: it checks new extension names
    try:
        got: Event | tuple[str, str] = decode(raw)
    except DecodeError as exc:
        got = (exc.attribute, exc.reason)
    if isinstance(expected, Event):
        assert isinstance(got, Event), (raw, got)
        assert _fields(got) == _fields(expected)
    else:
        assert got == expected


def test_decode_of_a_plain_document_is_built_in_c() -> None:
    """The common case never reaches the Python decoder (what the parity test above
    cannot see: both paths give the same event)."""
    speedups = _c_speedups()
    from nerve import event as codec

    raw = orjson.dumps(_doc(subject="s", data={"a": 1}))
    built = speedups.decode_document(raw)
    assert isinstance(built, Event) and built.data == {"a": 1} and built.subject == "s"
    assert codec._decode_document is speedups.decode_document
    assert speedups.decode_document(b"{not json") is None
    assert speedups.decode_document(bytearray(raw)) is None  # exact bytes only
    assert speedups.decode_document(b"[1]") == [1]  # parsed: Python refuses it
