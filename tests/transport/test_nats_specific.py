"""NATS JetStream specifics beyond the conformance suite: URL options, connection
errors, and interoperability with plain NATS clients (CloudEvents NATS binding)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg

from nerve import event as codec
from nerve.app import Subscription
from nerve.errors import BrokerUnavailable, ConfigError, TransportError
from nerve.event import Event
from nerve.transport.nats import NatsConfig, NatsTransport, _ack_meta, _Client, _header_lines

from .adapter_nats import HOST, PORT, make_url


def test_url_options_are_parsed_into_one_config() -> None:
    config = NatsConfig.from_url(
        "nats://u:pw@example.com:4223?stream=shop&visibility_timeout=5&max_age=60"
    )
    assert (config.host, config.port, config.stream) == ("example.com", 4223, "shop")
    assert (config.visibility_timeout, config.max_age) == (5.0, 60.0)
    assert config.server == "nats://u:pw@example.com:4223"
    assert NatsConfig.from_url("nats://localhost").stream == "nerve"


@pytest.mark.parametrize(
    "url",
    [
        "nats://u:secret@h?colour=blue",
        "nats://u:secret@h?stream=has.dot",
        "nats://u:secret@h?visibility_timeout=soon",
        "nats://u:secret@h?visibility_timeout=0",
        "nats://u:secret@h?max_payload=10",
    ],
)
def test_bad_options_are_config_errors_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        NatsConfig.from_url(url)
    assert "secret" not in str(caught.value)


async def test_an_unreachable_server_is_broker_unavailable_quickly() -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = NatsTransport(f"nats://user:secret@127.0.0.1:{port}?stream=x")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        await transport.start()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "secret" not in message
    assert "\n" not in message


async def test_a_binary_mode_cloudevent_from_a_plain_nats_client_is_received(
    tmp_path: Path,
) -> None:
    import nats

    url = make_url(tmp_path)
    stream = NatsConfig.from_url(url).stream
    transport = NatsTransport(url)
    await transport.start()
    try:
        sub = Subscription("g", ("order.>",))
        await transport.declare([sub])
        consumer = transport.consumer(sub)
        nc = await nats.connect(f"nats://{HOST}:{PORT}")
        try:
            js = nc.jetstream()
            headers = {
                "ce-specversion": "1.0",
                "ce-id": "evt-1",
                "ce-source": "/plain-client",
                "ce-type": "order.created",
                "ce-time": "2024-05-17T12:30:45Z",
                "ce-partitionkey": "A-1",
                "content-type": "application/json",
            }
            await js.publish(
                f"{stream}.ev.order.created", orjson.dumps({"order_id": "A-1"}), headers=headers
            )
            structured = Event(type="order.paid", source="/plain-client", data={"n": 2})
            await js.publish(f"{stream}.ev.order.paid", codec.encode(structured))
        finally:
            await nc.close()
        got: list = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            got.extend(await consumer.fetch(10, 1.0))
        by_type = {d.event.type: d for d in got}
        binary = by_type["order.created"].event
        assert (binary.id, binary.source, binary.partitionkey) == ("evt-1", "/plain-client", "A-1")
        assert binary.data == {"order_id": "A-1"}
        assert binary.datacontenttype == "application/json"
        assert by_type["order.created"].raw == codec.encode(binary)
        assert by_type["order.paid"].event == structured
        for delivery in got:
            await delivery.ack()
    finally:
        await transport.close()


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.nerve.g_x.3.17.5.1700000000123456789.0",
        "$JS.ACK._.ABC.nerve.g_x.3.17.5.1700000000123456789.0.xyz",
        "$JS.ACK.dom.ABC.nerve.g_x.1.2.3.1700000000000000000.9",
    ],
)
def test_reply_metadata_is_read_as_nats_py_reads_it(reply: str) -> None:
    """The adapter reads a message's ack subject itself (once per message, without
    nats-py's objects); it must agree with ``Msg.metadata`` on both subject forms."""
    meta = Msg(None, subject="s", reply=reply).metadata  # type: ignore[arg-type]
    got = _ack_meta(reply)
    assert got is not None
    assert got[:2] == (meta.num_delivered, meta.sequence.stream)
    assert abs(got[2] / 1e9 - meta.timestamp.timestamp()) < 1e-6
    assert _ack_meta("_INBOX.abc.1") is None and _ack_meta("") is None


async def test_pipelined_publish_confirms_every_message_and_reports_refusals(
    tmp_path: Path,
) -> None:
    """Publishes are pipelined (one ack subscription, a window of 256 awaited together):
    600 events over three windows are all stored once, a re-publish of the same ids is
    deduplicated by the server, and a publish no stream takes is a clear error, not a
    silent success or a hang."""
    import nats

    url = make_url(tmp_path)
    stream = NatsConfig.from_url(url).stream
    transport = NatsTransport(url)
    await transport.start()
    try:
        await transport.declare([Subscription("g", ("order.>",))])
        events = [Event(type="order.created", source="/t", data={"n": n}) for n in range(600)]
        await transport.publish(events)
        await transport.publish(events[:10])  # same ids: JetStream's de-duplication
        nc = await nats.connect(f"nats://{HOST}:{PORT}")
        try:
            js = nc.jetstream()
            assert (await js.stream_info(stream)).state.messages == 600
            await js.delete_stream(stream)
        finally:
            await nc.close()
        started = time.monotonic()
        with pytest.raises(TransportError, match="no JetStream stream"):
            await transport.publish(events[:3])
        assert time.monotonic() - started < 5
    finally:
        await transport.close()


_HEADER_BYTES = st.binary(max_size=12).filter(lambda b: b"\r\n" not in b) | st.sampled_from(
    [b"Nats-Msg-Id", b"Content-Type", b" Spaced Name", b"Tab\tName", b"\x1cSep", b"Caf\xc3\xa9"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            _HEADER_BYTES, st.sampled_from([b":", b": ", b":\t", b""]), st.binary(max_size=16)
        ),
        max_size=6,
    )
)
def test_the_faster_header_parser_gives_what_nats_py_gives(
    lines: list[tuple[bytes, bytes, bytes]],
) -> None:
    raw = b"".join(name + sep + value.replace(b"\r\n", b"") + b"\r\n" for name, sep, value in lines)
    raw += b"\r\n"
    expected = Client._parse_header_lines(raw)
    assert _Client._parse_header_lines(raw) == expected  # C where the speedups are built
    assert _header_lines(raw) == expected  # its Python twin
    assert _Client._parse_header_lines(raw[:-2]) == Client._parse_header_lines(raw[:-2])


async def test_nats_py_still_parses_headers_through_the_faster_parser() -> None:
    """The override is a hook of nats-py's (a private static method): if a release stops
    calling it, this fails rather than the speed-up silently disappearing."""
    calls: list[bytes] = []
    original = _Client._parse_header_lines

    class Spy(_Client):
        @staticmethod
        def _parse_header_lines(raw: bytes) -> dict[str, str]:
            calls.append(raw)
            return original(raw)

    headers = await Spy()._process_headers(b"NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n")
    assert headers == {"Nats-Msg-Id": "abc"} and len(calls) == 1


def test_the_c_header_parser_is_the_one_nats_py_calls() -> None:
    """Where the C speedups are built, nats-py parses headers in C (what the parity test
    above compares with nats-py's own parser), and refuses what is not bytes."""
    from nerve._native import speedups

    if speedups is None:
        pytest.skip("nerve._speedups was not built or is switched off")
    assert _Client._parse_header_lines is speedups.nats_headers
    raw = b"Nats-Msg-Id: abc\r\nContent-Type:application/cloudevents+json\r\n\r\n"
    assert _Client._parse_header_lines(raw) == {
        "Nats-Msg-Id": "abc",
        "Content-Type": "application/cloudevents+json",
    }
    with pytest.raises(TypeError):
        _Client._parse_header_lines("Nats-Msg-Id: abc")  # type: ignore[arg-type]
