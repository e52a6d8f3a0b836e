"""The envelope parsers under hypothesis: malformed input (binary headers, structured
and batch bodies) always raises a documented 4xx Problem, never anything else."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve.http.binding import parse_request
from nerve.http.problems import Problem
from nerve.http.webhooks import WebhookSource, sign, verify

# -- the envelope parsers ---------------------------------------------------------------

ATTRIBUTE = st.sampled_from(
    [
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "dataschema",
        "partitionkey",
        "datacontenttype",
        "data",
        "Bad",
        "x" * 21,
        "",
        "a-b",
    ]
)
HEADER_VALUE = st.one_of(
    st.sampled_from(
        ["1.0", "0.3", "", "%", "%FF", "%E2%82", "%25", "2026-01-01T00:00:00Z", "not a time"]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=30),
)
CONTENT_TYPE = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "text/html",
        "application/octet-stream",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/cloudevents+xml",
        "APPLICATION/CLOUDEVENTS+JSON",
        "application/vnd.x+json",
        ";",
        "",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", 1]),
        "id": st.one_of(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1)),
        "source": st.text(max_size=10),
        "type": st.sampled_from(["order.created", "order.note", "x", ""]),
        "time": st.one_of(st.text(max_size=25), st.integers(-(2**63), 2**63 - 1)),
        "data": JSON,
        "data_base64": st.one_of(st.text(max_size=12), st.integers(-(2**63), 2**63 - 1)),
        "partitionkey": JSON,
        "BadExt": st.text(max_size=5),
    },
)
BODY = st.one_of(
    st.binary(max_size=200),
    JSON.map(orjson.dumps),
    DOCUMENT.map(orjson.dumps),
    st.lists(DOCUMENT, max_size=4).map(orjson.dumps),
    st.lists(JSON, max_size=3).map(orjson.dumps),
)


def _check(headers: dict[str, str], body: bytes) -> None:
    try:
        mode, events = parse_request(headers, body)
    except Problem as problem:
        assert problem.status in (400, 413, 415), problem.status
        assert problem.detail
        problem.to_json("/events")  # always serialisable
        return
    assert mode in ("binary", "structured", "batch")
    for event in events:
        assert event.specversion == "1.0" and event.id and event.source and event.type


@given(
    attributes=st.dictionaries(ATTRIBUTE, HEADER_VALUE, max_size=8),
    content_type=CONTENT_TYPE,
    body=BODY,
)
@settings(max_examples=400, deadline=None)
def test_binary_headers_never_raise_anything_but_problems(
    attributes: dict[str, str], content_type: str | None, body: bytes
) -> None:
    headers = {f"ce-{name.lower()}": value for name, value in attributes.items()}
    if content_type is not None:
        headers["content-type"] = content_type
    _check(headers, body)


@given(body=BODY, batch=st.booleans())
@settings(max_examples=400, deadline=None)
def test_structured_and_batch_bodies_never_raise_anything_but_problems(
    body: bytes, batch: bool
) -> None:
    content_type = "application/cloudevents-batch+json" if batch else "application/cloudevents+json"
    _check({"content-type": content_type}, body)


def test_a_valid_binary_event_round_trips() -> None:
    from nerve.event import Event
    from nerve.http.binding import binary_headers

    event = Event(
        type="order.note",
        source='/s p%c"é',
        subject="ü ß",
        data={"text": "x"},
        extensions={"partitionkey": "k 1", "flag": True, "n": 3},
    )
    mode, (parsed,) = parse_request(binary_headers(event), orjson.dumps(event.data))
    assert mode == "binary"
    assert (parsed.id, parsed.source, parsed.subject, parsed.time) == (
        event.id,
        event.source,
        event.subject,
        event.time,
    )
    assert parsed.extensions == {"partitionkey": "k 1", "flag": "true", "n": "3"}


# -- Standard Webhooks verification ---------------------------------------------------

SOURCE = WebhookSource("fuzz", "push.received", ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",))
WEBHOOK_HEADER = st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"])


@given(
    headers=st.dictionaries(
        WEBHOOK_HEADER,
        st.one_of(
            st.text(max_size=40),
            st.sampled_from(["v1,", "v1,AAAA", "v1,!!", "v2,abc", "1700000000", "9" * 20]),
        ),
    ),
    body=st.binary(max_size=64),
)
@settings(max_examples=300, deadline=None)
def test_webhook_verification_refuses_with_400_or_401_only(
    headers: dict[str, str], body: bytes
) -> None:
    try:
        verify(SOURCE, headers, body, now=1_700_000_000)
    except Problem as problem:
        assert problem.status in (400, 401)
    else:  # only a correct signature can get here
        stamp = int(headers["webhook-timestamp"])
        expected = sign(SOURCE.secrets[0], headers["webhook-id"], stamp, body)
        assert expected in headers["webhook-signature"].split()
