"""Hostile input at the coordinator's ZMQ port, fuzzed (hypothesis) over a real socket to a real
coordinator: random frames, truncated and oversized messages, wrong field types and values,
and valid messages replayed and out of order. Each example is followed by a QUERY from the same
peer that must be answered (the coordinator still serves); nothing may reach the coordinator's
internal-error handler; every malformed message gets an Error naming what was wrong; after a
sequence, aborting its pd_ids leaves no entry or waiter behind; sockets do not leak fds."""
from __future__ import annotations

import math
import time

import msgspec
import pytest
import test_coordinator
import zmq
from fuzzing import fuzz_settings, open_fds, tried
from hypothesis import example, given
from hypothesis import strategies as st

from pd.config import CoordinatorConfig
from pd.coordinator.protocol import (
    PROTOCOL_TAG,
    Abort,
    Aborted,
    Ack,
    Done,
    Error,
    Free,
    Heartbeat,
    ProtocolError,
    Query,
    QueryReply,
    Ready,
    Register,
    Wait,
    WaitTimeout,
    decode_client,
    decode_reply,
    encode,
)
from pd.coordinator.server import Coordinator

pytestmark = pytest.mark.timeout(300)

TAGS = ("register", "heartbeat", "ready", "wait", "done", "abort", "query")
FIELDS = ("instance_id", "role", "url", "pid", "pd_id", "rank", "keys", "n_tokens", "n_bytes", "location",
          "chunks_ready", "final", "timeout_s", "have", "ok", "n_chunks", "load_ms", "error", "n_store_chunks",
          "reason")


@pytest.fixture(scope="module")
def coord():
    c = Coordinator(CoordinatorConfig(host="127.0.0.1", port=0, entry_ttl_s=30)).start_in_thread()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def ctx():
    c = zmq.Context()
    yield c
    c.term()


class Peer(test_coordinator.Peer):
    def replies_until_query(self, timeout_s: float = 10.0) -> list:
        """Send a QUERY and return every reply before its answer (the coordinator must answer)."""
        self.send(Query())
        out, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(max(1, (deadline - time.monotonic()) * 1000)):
                break
            reply = decode_reply(self.sock.recv_multipart())
            if isinstance(reply, QueryReply):
                return out
            out.append(reply)
        raise AssertionError("the coordinator did not answer a QUERY after the fuzzed input")

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture(scope="module")
def peers(coord, ctx):
    """A new peer for each example (a valid QUERY or a parked WAIT among the fuzzed input must not
    leave replies for the next one)."""
    made = []

    def new() -> Peer:
        while made:
            made.pop().close()
        made.append(Peer(ctx, coord.address))
        return made[-1]

    yield new
    while made:
        made.pop().close()


def _healthy(coord: Coordinator) -> None:
    assert coord.counters["internal_errors"] == 0, "fuzzed input reached the coordinator's internal-error path"


def _expect_error_if_malformed(frames: list[bytes], replies: list) -> None:
    try:
        decode_client(frames)
    except ProtocolError:
        errors = [r for r in replies if isinstance(r, Error)]
        assert errors and errors[0].reason, f"malformed input got {replies!r}, not an Error with a reason"


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def message_dicts(draw) -> dict:
    """A message-shaped map: a known (or unknown) type tag and fields of any name, type and value."""
    d = {"type": draw(st.sampled_from(TAGS) | st.text(max_size=10) | anything)}
    names = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), max_size=8, unique=True))
    for name in names:
        d[name] = draw(anything)
    return d


def _valid_messages() -> st.SearchStrategy:
    ids = st.text(min_size=0, max_size=12)
    keys = st.lists(st.text(max_size=24), max_size=6)
    nums = st.integers(0, 2**32)
    return st.one_of(
        st.builds(Register, ids, st.sampled_from(["prefill", "decode", "both", "proxy"]), st.text(max_size=20), nums),
        st.builds(Heartbeat, ids),
        st.builds(Ready, ids, st.integers(0, 8), keys, nums, nums, st.text(max_size=10), ids, nums, st.booleans()),
        st.builds(Wait, ids, st.integers(0, 8), st.floats(0, 0.05), nums),
        st.builds(Done, ids, st.integers(0, 8), st.booleans(), ids, nums, nums, st.floats(0, 1e6)),
        st.builds(Abort, ids, st.text(max_size=20)),
    )


@fuzz_settings(300)
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4),
       tag_first=st.booleans())
@example(frames=[b""], tag_first=False)
@example(frames=[b"\xc1"], tag_first=True)  # msgpack's never-used byte
@example(frames=[b"pdkv/1", b"\x80"], tag_first=False)  # another protocol version
def test_random_frames_get_an_error_and_the_coordinator_still_answers(coord, peers, frames, tag_first):
    peer = peers()
    if tag_first:
        frames = [PROTOCOL_TAG, *frames]
    tried("coordinator")
    peer.sock.send_multipart(frames)
    replies = peer.replies_until_query()
    _expect_error_if_malformed(frames, replies)
    _healthy(coord)


@fuzz_settings(300)
@given(d=message_dicts())
@example(d={"type": "ready", "pd_id": "x", "rank": 0, "keys": ["k"], "n_tokens": -1})
@example(d={"type": "done", "pd_id": "x", "rank": 0, "ok": False, "load_ms": math.nan})
@example(d={"type": "done", "pd_id": "x", "rank": 0, "ok": True, "n_chunks": -5})
@example(d={"type": "wait", "pd_id": "x", "rank": -1, "timeout_s": math.inf})
@example(d={"type": "register", "instance_id": "i", "role": "root"})
def test_wrong_field_names_types_and_values_are_refused(coord, peers, d):
    peer = peers()
    tried("coordinator")
    frames = [PROTOCOL_TAG, msgspec.msgpack.encode(d)]
    before = coord.counters["load_ms_sum"]
    peer.sock.send_multipart(frames)
    replies = peer.replies_until_query()
    _expect_error_if_malformed(frames, replies)
    assert math.isfinite(coord.counters["load_ms_sum"]) and coord.counters["load_ms_sum"] >= before
    _healthy(coord)


@pytest.mark.parametrize("d, field", [
    ({"type": "ready", "pd_id": "x", "rank": 0, "keys": ["k"], "n_tokens": -1}, "n_tokens"),
    ({"type": "done", "pd_id": "x", "rank": 0, "ok": False, "load_ms": math.nan}, "load_ms"),
    ({"type": "done", "pd_id": "x", "rank": 0, "ok": True, "n_chunks": -5}, "n_chunks"),
    ({"type": "wait", "pd_id": "x", "rank": -1, "timeout_s": 1.0}, "rank"),
    ({"type": "wait", "pd_id": "x", "rank": 0, "timeout_s": math.inf}, "timeout_s"),
    ({"type": "register", "instance_id": "i", "role": "root"}, "role"),
])
def test_values_out_of_range_get_an_error_naming_the_field(coord, peers, d, field):
    """Found by the fuzzer: a DONE with load_ms NaN made the coordinator's load_ms_sum NaN for
    good, and negative counts, ranks and unknown roles were taken as they came."""
    peer = peers()
    before = dict(coord.counters)
    peer.sock.send_multipart([PROTOCOL_TAG, msgspec.msgpack.encode(d)])
    replies = peer.replies_until_query()
    assert len(replies) == 1 and isinstance(replies[0], Error) and f"$.{field}" in replies[0].reason, replies
    assert coord.counters["load_ms_sum"] == before["load_ms_sum"]
    assert coord.counters["done_ok"] + coord.counters["done_failed"] == before["done_ok"] + before["done_failed"]


@fuzz_settings(150)
@given(msg=_valid_messages(), cut=st.integers(0, 10_000))
def test_truncated_messages_are_refused(coord, peers, msg, cut):
    peer = peers()
    body = encode(msg)[1]
    frames = [PROTOCOL_TAG, body[: cut % max(1, len(body))]]
    tried("coordinator")
    peer.sock.send_multipart(frames)
    replies = peer.replies_until_query()
    _expect_error_if_malformed(frames, replies)
    _healthy(coord)


def test_huge_messages_do_not_take_the_coordinator_down(coord, ctx, peers):
    """A 100 MB frame is refused at the socket (no reply: the sender is disconnected; before the
    limit the coordinator read it whole into memory), a READY of 65,536 keys is handled, one of
    100,000 refused with an Error (issue 18: bounded fields), and the coordinator goes on
    answering everyone."""
    peer = peers()
    big = Peer(ctx, coord.address)
    try:
        big.sock.send_multipart([PROTOCOL_TAG, b"\x00" * (100 << 20)])
        assert not big.sock.poll(2000), "a 100 MB message was read and answered"
        many = Ready("huge", 0, [f"k{i}" for i in range(1 << 16)], 1, instance_id="nobody")  # the most allowed
        too_many = Ready("huge2", 0, [f"k{i}" for i in range(100_000)], 1, instance_id="nobody")
        tried("coordinator", 3)
        peer.send(many)
        peer.send(too_many)
        peer.send(Abort("huge", "test"))
        assert [type(r).__name__ for r in peer.replies_until_query(30)] == ["Ack", "Error", "Ack"]
    finally:
        big.close()
    assert ("huge", 0) not in coord.state.entries
    _healthy(coord)


def test_a_second_producer_for_one_pd_id_is_refused_and_frees_only_its_own_chunks(coord, ctx):
    """Found by the fuzzer: a READY for a pd_id another instance had begun streaming was merged
    into it, so at ABORT the first producer's keys were sent to the second (the first never freed
    them) and a WAIT got keys of two producers under one location."""
    p0, p1, c = (Peer(ctx, coord.address) for _ in range(3))
    try:
        p0.send(Register("conflict-p0", "prefill"))
        p1.send(Register("conflict-p1", "prefill"))
        assert [type(r) for r in p0.replies_until_query() + p1.replies_until_query()] == [Ack, Ack]
        p0.send(Ready("conflict", 0, ["conflict/0/p0/0"], 64, instance_id="conflict-p0", chunks_ready=1,
                      final=False))
        assert [type(r) for r in p0.replies_until_query()] == [Ack]
        before = coord.counters["ready_conflicts"]
        p1.send(Ready("conflict", 0, ["conflict/0/p1/0"], 64, instance_id="conflict-p1", final=True))
        assert p1.replies_until_query() == [Ack(), Free("conflict", ["conflict/0/p1/0"])]
        assert coord.counters["ready_conflicts"] == before + 1
        c.send(Wait("conflict", 0, 0.0))
        got = c.replies_until_query()
        assert len(got) == 1 and got[0].keys == ["conflict/0/p0/0"] and got[0].instance_id == "conflict-p0"
        c.send(Abort("conflict"))
        c.replies_until_query()
        assert p0.replies_until_query() == [Free("conflict", ["conflict/0/p0/0"])]
        assert p1.replies_until_query() == []
    finally:
        for p in (p0, p1, c):
            p.close()


# ---- valid messages, replayed and out of order ------------------------------------------

PDS = ("pa", "pb", "pc")


@st.composite
def sequences(draw) -> list[tuple]:
    """Steps ``(actor, message)`` over three pd_ids: producers p0/p1 publish, consumer c waits and
    reports, anyone aborts; any step may be replayed and they come in any order."""
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        pd = draw(st.sampled_from(PDS))
        rank = draw(st.integers(0, 1))
        kind = draw(st.sampled_from(["ready", "wait", "done", "abort", "heartbeat", "replay"]))
        if kind == "replay" and steps:
            steps.append(steps[draw(st.integers(0, len(steps) - 1))])
        elif kind == "ready":
            prod = draw(st.sampled_from(["p0", "p1"]))
            n = draw(st.integers(0, 3))
            keys = [f"{pd}/{rank}/{prod}/{i}" for i in range(n)]
            steps.append((prod, Ready(pd, rank, keys, 64 * n, location="shm:x", instance_id=prod,
                                      chunks_ready=draw(st.integers(0, 3)), final=draw(st.booleans()))))
        elif kind == "wait":
            steps.append(("c", Wait(pd, rank, draw(st.sampled_from([0.0, 0.01, 0.05])), draw(st.integers(0, 3)))))
        elif kind == "done":
            steps.append(("c", Done(pd, rank, draw(st.booleans()), instance_id="c")))
        elif kind == "abort":
            steps.append((draw(st.sampled_from(["c", "p0"])), Abort(pd, "fuzz")))
        else:  # from its own socket: one that claims another's id takes its FREEs (issue 9, item 4)
            prod = draw(st.sampled_from(["p0", "p1"]))
            steps.append((prod, Heartbeat(prod)))
    return steps


@fuzz_settings(100)
@given(steps=sequences())
def test_replayed_and_reordered_messages_never_cross_requests_or_leak(coord, ctx, steps):
    run = f"r{time.monotonic_ns()}-"  # pd_ids of this example only
    peers = {name: Peer(ctx, coord.address) for name in ("p0", "p1", "c")}
    try:
        for name in ("p0", "p1"):
            peers[name].send(Register(run + name, "prefill"))
        for actor, msg in steps:
            msg = msgspec.structs.replace(msg, pd_id=run + msg.pd_id) if hasattr(msg, "pd_id") else msg
            if isinstance(msg, (Ready, Heartbeat, Done)) and msg.instance_id:
                msg = msgspec.structs.replace(msg, instance_id=run + msg.instance_id)
            if isinstance(msg, Ready):
                msg = msgspec.structs.replace(msg, keys=[run + k for k in msg.keys])
            peers[actor].send(msg)
        tried("coordinator", len(steps) + 2)
        time.sleep(0.06)  # parked WAITs time out
        for pd in PDS:
            peers["c"].send(Abort(run + pd, "end of example"))
        replies = {name: p.replies_until_query() for name, p in peers.items()}
        for name, got in replies.items():
            for r in got:
                assert not isinstance(r, Error), f"{name} got {r!r} for a valid message"
                if isinstance(r, (Ready, WaitTimeout, Aborted)):
                    assert name == "c" and r.pd_id.startswith(run)
                if isinstance(r, Ready):  # a WAIT's answer: only that request's keys
                    assert all(k.startswith(f"{r.pd_id}/{r.rank}/") for k in r.keys), r
                if isinstance(r, Free):  # only to the producer that published them
                    assert all(k.startswith(f"{r.pd_id}/") and k.split("/")[2] == name for k in r.keys), (name, r)
        assert not [k for k in list(coord.state.entries) if k[0].startswith(run)], "entries left after ABORT"
        assert not [k for k in list(coord.state.waiters) if k[0].startswith(run)], "waiters left after ABORT"
    finally:
        for p in peers.values():
            p.close()
    _healthy(coord)


def test_peers_coming_and_going_leak_no_fds(coord, ctx):
    """200 peers that each send garbage and a valid message, then disconnect: fds back to where
    they were (the coordinator runs in this process)."""
    warm = Peer(ctx, coord.address)
    warm.replies_until_query()
    warm.close()
    time.sleep(0.2)
    before = open_fds()
    for i in range(200):
        p = Peer(ctx, coord.address)
        p.sock.send_multipart([b"garbage", b"\xff" * i])
        p.send(Heartbeat(f"fd-{i}"))
        p.replies_until_query()
        p.close()
    tried("coordinator", 600)
    deadline = time.monotonic() + 5
    while open_fds() > before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds() <= before + 2, f"fds {before} -> {open_fds()} after 200 peers"
    _healthy(coord)
