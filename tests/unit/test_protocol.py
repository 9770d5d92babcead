"""Wire messages: round trips, version tag, garbage."""
from __future__ import annotations

import msgspec
import pytest

from pd.coordinator.protocol import (
    PROTOCOL_TAG,
    Abort,
    Aborted,
    Ack,
    Done,
    Error,
    Free,
    Heartbeat,
    InstanceInfo,
    ProtocolError,
    Query,
    QueryReply,
    Ready,
    Register,
    TransferRecord,
    Wait,
    WaitTimeout,
    decode_client,
    decode_reply,
    encode,
)

CLIENT_MSGS = [
    Register("p0", "prefill", "http://127.0.0.1:8100", 1234),
    Register("p0", "prefill"),
    Heartbeat("p0"),
    Heartbeat("p0", "decode", "http://h:1", 7),
    Ready("id-1", 0, ["ns/0/aa", "ns/0/bb"], 300, n_bytes=4096, location="shm:/dev/shm/x", instance_id="p0"),
    Ready("id-1", 1, [], 0),
    Wait("id-1", 0, 2.5),
    Done("id-1", 0, True, instance_id="d0", n_chunks=2, n_bytes=4096, load_ms=1.25),
    Done("id-1", 0, False, error="checksum mismatch"),
    Abort("id-1", "client went away"),
    Abort("id-1"),
    Query(),
    Query("id-1"),
]
REPLY_MSGS = [
    Ack(),
    Ready("id-1", 0, ["k"], 32),
    WaitTimeout("id-1"),
    Aborted("id-1", "why"),
    Free("id-1", ["k1", "k2"]),
    Error("bad"),
    QueryReply(counters={"ready": 1.0, "load_ms_sum": 2.5}, instances=[]),
    QueryReply(
        counters={},
        instances=[InstanceInfo("p0", "prefill", "http://x", 9, True, 0.5)],
        transfer=TransferRecord("id-1", ready=True, done=True, ok=True, n_tokens=64, n_chunks=2, producer="p0"),
    ),
]


@pytest.mark.parametrize("msg", CLIENT_MSGS, ids=lambda m: type(m).__name__)
def test_client_round_trip(msg):
    frames = encode(msg)
    assert frames[0] == PROTOCOL_TAG and len(frames) == 2
    assert decode_client(frames) == msg


@pytest.mark.parametrize("msg", REPLY_MSGS, ids=lambda m: type(m).__name__)
def test_reply_round_trip(msg):
    assert decode_reply(encode(msg)) == msg


def test_tag_carries_version():
    assert PROTOCOL_TAG == b"pdkv/3"


@pytest.mark.parametrize("frames", [
    [b"pdkv/0", encode(Query())[1]],
    [b"", encode(Query())[1]],
    [b"http", b"GET / HTTP/1.1"],
], ids=["old-version", "empty-tag", "http"])
def test_wrong_tag(frames):
    with pytest.raises(ProtocolError, match="protocol tag"):
        decode_client(frames)
    with pytest.raises(ProtocolError, match="protocol tag"):
        decode_reply(frames)


@pytest.mark.parametrize("frames", [[], [PROTOCOL_TAG], [PROTOCOL_TAG, b"", b""]], ids=["0", "1", "3"])
def test_wrong_frame_count(frames):
    with pytest.raises(ProtocolError, match="frames"):
        decode_client(frames)


@pytest.mark.parametrize("body", [
    b"",
    b"\xc1\xff\x00garbage",
    msgspec.msgpack.encode(42),
    msgspec.msgpack.encode({"type": "nosuch"}),
    msgspec.msgpack.encode({"pd_id": "x"}),  # no type tag
    msgspec.msgpack.encode({"type": "ready", "pd_id": 1, "rank": 0, "keys": [], "n_tokens": 0}),
    msgspec.msgpack.encode({"type": "wait", "pd_id": "x"}),  # missing fields
    msgspec.msgpack.encode({"type": "query", "pd_id": "", "extra": 1}),  # unknown field
], ids=["empty", "bytes", "int", "unknown-type", "untagged", "wrong-field-type", "missing", "extra-field"])
def test_garbage_body(body):
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_client([PROTOCOL_TAG, body])


def test_direction_is_checked():
    # a reply-type message is not something a client may send, and vice versa
    for msg in (Ack(), WaitTimeout("x"), Free("x", []), Error("e"), QueryReply({}, [])):
        with pytest.raises(ProtocolError):
            decode_client(encode(msg))
    for msg in (Register("a", "b"), Wait("x", 0, 1.0), Done("x", 0, True), Abort("x"), Query()):
        with pytest.raises(ProtocolError):
            decode_reply(encode(msg))


def test_old_heartbeat_still_decodes():
    body = msgspec.msgpack.encode({"type": "heartbeat", "instance_id": "p0"})
    assert decode_client([PROTOCOL_TAG, body]) == Heartbeat("p0", "", "", 0)


@pytest.mark.parametrize("msg", [
    Abort("x" * (1 << 20), "a 1 MiB pd_id"),
    Wait("pd\n id", 0, 1.0),  # not a plain id
    Register("i" * 129, "decode"),
    Done("x", 0, False, error="e" * 5000),
    Done("x", 0, True, n_bytes=(1 << 64) - 1),
    Ready("x", 0, ["k" * 600], 1),
], ids=["pd_id-1MiB", "pd_id-chars", "instance-id-long", "error-5000", "n_bytes-2^64", "key-600"])
def test_fields_an_authorized_peer_could_bloat_are_bounded(msg):
    """Issue 18, item 6: ids are at most 128 plain characters, free text 4 KiB, keys 512 B,
    counts below 2^53 (the counters are floats): anything else is refused at decoding."""
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_client(encode(msg))
