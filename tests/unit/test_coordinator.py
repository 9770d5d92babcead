"""The coordinator over real ZMQ sockets on 127.0.0.1: matching, expiry, freeing, aborts,
instance liveness, garbage input, the client without a coordinator, and the CLI process."""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from pd.config import CoordinatorConfig
from pd.coordinator.client import (
    AsyncCoordinatorClient,
    CoordinatorClient,
    InstanceAgent,
)
from pd.coordinator.protocol import (
    PROTOCOL_TAG,
    Abort,
    Aborted,
    Ack,
    Done,
    Error,
    Free,
    Heartbeat,
    Query,
    QueryReply,
    Ready,
    Register,
    Wait,
    WaitTimeout,
    decode_reply,
    encode,
)
from pd.coordinator.server import Coordinator

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY) if VENV_PY.exists() else sys.executable
QUIET_S = 0.3  # how long "no reply yet" is watched for


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    """A raw DEALER: send any message (or raw frames) and read replies with a timeout."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 3.0):
        if not self.sock.poll(timeout_s * 1000):
            return None
        return decode_reply(self.sock.recv_multipart())

    def req(self, msg, timeout_s: float = 3.0):
        self.send(msg)
        return self.recv(timeout_s)

    def query(self, pd_id: str = "") -> QueryReply:
        reply = self.req(Query(pd_id))
        assert isinstance(reply, QueryReply), reply
        return reply


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def start_coord():
    """Factory: a Coordinator on a free port of 127.0.0.1, served in a thread, stopped at teardown."""
    started: list[Coordinator] = []

    def start(entry_ttl_s: float = 60.0, instance_ttl_s: float = 60.0) -> Coordinator:
        # port 0: the coordinator binds a port the OS picks (free, and no race with other tests)
        cfg = CoordinatorConfig(host="127.0.0.1", port=0, entry_ttl_s=entry_ttl_s, instance_ttl_s=instance_ttl_s)
        coord = Coordinator(cfg).start_in_thread()
        started.append(coord)
        assert coord.port > 0 and coord.address == f"tcp://127.0.0.1:{coord.port}"
        return coord

    yield start
    for c in started:
        c.stop()
        assert c._thread is not None and not c._thread.is_alive(), "coordinator thread did not stop"


@pytest.fixture
def peers(ctx, start_coord):
    """Factory of raw DEALER peers connected to one coordinator (started with the given TTLs)."""
    holder: dict = {}

    def make(**ttl):
        if "coord" not in holder:
            holder["coord"] = start_coord(**ttl)
        return Peer(ctx, holder["coord"].address)

    make.holder = holder
    return make


@pytest.fixture
def agents():
    started: list[InstanceAgent] = []

    def start(address: str, instance_id: str, interval_s: float = 2.0):
        frees: queue.Queue[Free] = queue.Queue()
        agent = InstanceAgent(address, instance_id, "prefill", interval_s=interval_s, on_free=frees.put).start()
        started.append(agent)
        assert agent.wait_registered(5), "agent was never acknowledged"
        return agent, frees

    yield start
    for a in started:
        a.stop()


def ready(pd_id: str, rank: int = 0, keys=("k0", "k1"), instance_id: str = "prod-0", n_tokens: int = 48) -> Ready:
    return Ready(pd_id, rank, [f"{pd_id}/{rank}/{k}" for k in keys], n_tokens, n_bytes=1024 * len(keys),
                 location="shm:/dev/shm/test", instance_id=instance_id)


def until(cond, timeout_s: float = 5.0, step_s: float = 0.02):
    """Poll ``cond()`` until it returns something truthy (returned) or the timeout passes (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step_s)


# ---- matching ----------------------------------------------------------------------------


def test_ready_then_wait_answers_at_once(peers):
    prod, cons = peers(), peers()
    r = ready("pd-a")
    assert isinstance(prod.req(r), Ack)
    t0 = time.monotonic()
    got = cons.req(Wait("pd-a", 0, 10.0))
    assert time.monotonic() - t0 < 1.0
    assert isinstance(got, Ready)
    assert (got.pd_id, got.rank, got.keys, got.n_tokens, got.location, got.instance_id) == (
        "pd-a", 0, r.keys, r.n_tokens, r.location, "prod-0")
    q = cons.query("pd-a")
    assert q.counters["ready"] == 1 and q.counters["waits"] == 1 and q.counters["wait_hits_immediate"] == 1
    assert q.transfer is not None and q.transfer.ready and q.transfer.producer == "prod-0"
    assert q.transfer.n_tokens == 48


def test_wait_then_ready_answers_the_parked_waiter(peers):
    prod, cons = peers(), peers()
    cons.send(Wait("pd-b", 0, 10.0))
    assert cons.recv(QUIET_S) is None, "a WAIT without READY must park, not be answered"
    r = ready("pd-b", keys=("x",))
    assert isinstance(prod.req(r), Ack)
    got = cons.recv(3.0)
    assert isinstance(got, Ready) and got.pd_id == "pd-b" and got.keys == r.keys
    q = cons.query("pd-b")
    assert q.counters["wait_hits_immediate"] == 0 and q.counters["wait_timeouts"] == 0
    assert q.transfer.wait_ms >= QUIET_S * 1000 * 0.8  # it waited at least as long as we watched


def test_entries_and_waiters_gauges_go_back_to_zero(peers):
    prod, cons = peers(), peers()
    cons.send(Wait("pd-g", 0, 10.0))
    assert cons.recv(QUIET_S) is None
    q = prod.query()
    assert (q.counters["entries"], q.counters["waiters"]) == (0, 1)
    assert isinstance(prod.req(ready("pd-g")), Ack) and isinstance(cons.recv(3.0), Ready)
    assert isinstance(prod.req(ready("pd-h")), Ack)
    q = prod.query()
    assert (q.counters["entries"], q.counters["waiters"]) == (2, 0)  # held until DONE (or expiry)
    for pd_id in ("pd-g", "pd-h"):
        assert isinstance(cons.req(Done(pd_id, 0, ok=True)), Ack)
    assert prod.query().counters["entries"] == 0


def test_two_waiters_for_one_pd_id_are_both_answered(peers):
    prod, w1, w2 = peers(), peers(), peers()
    w1.send(Wait("pd-c", 0, 10.0))
    w2.send(Wait("pd-c", 0, 10.0))
    assert w1.recv(QUIET_S) is None and w2.recv(0.05) is None
    assert isinstance(prod.req(ready("pd-c")), Ack)
    for w in (w1, w2):
        got = w.recv(3.0)
        assert isinstance(got, Ready) and got.pd_id == "pd-c"


def test_ranks_are_matched_separately(peers):
    prod, w0, w1 = peers(), peers(), peers()
    w1.send(Wait("pd-d", 1, 10.0))
    assert isinstance(prod.req(ready("pd-d", rank=0, keys=("r0",))), Ack)
    assert w1.recv(QUIET_S) is None, "a rank-0 READY must not answer a rank-1 waiter"
    got0 = w0.req(Wait("pd-d", 0, 10.0))
    assert isinstance(got0, Ready) and got0.rank == 0 and got0.keys == ["pd-d/0/r0"]
    assert isinstance(prod.req(ready("pd-d", rank=1, keys=("r1",))), Ack)
    got1 = w1.recv(3.0)
    assert isinstance(got1, Ready) and got1.rank == 1 and got1.keys == ["pd-d/1/r1"]
    # other pd_ids are not matched either
    other = w0.req(Wait("pd-d-other", 0, 0.2))
    assert isinstance(other, WaitTimeout) and other.pd_id == "pd-d-other"


def test_wait_times_out_in_about_its_timeout(peers):
    cons = peers()
    t0 = time.monotonic()
    got = cons.req(Wait("pd-e", 0, 0.5), timeout_s=5.0)
    elapsed = time.monotonic() - t0
    assert isinstance(got, WaitTimeout) and got.pd_id == "pd-e"
    assert 0.45 <= elapsed < 2.0, elapsed
    assert cons.query().counters["wait_timeouts"] == 1
    # the client's wait() returns the same, bounded by timeout + its margin
    client = CoordinatorClient(peers.holder["coord"].address, timeout_s=2.0)
    try:
        t0 = time.monotonic()
        got = client.wait("pd-e2", 0, 0.3)
        assert isinstance(got, WaitTimeout) and got.pd_id == "pd-e2"
        assert 0.25 <= time.monotonic() - t0 < 2.0
    finally:
        client.close()


# ---- expiry, DONE, freeing ----------------------------------------------------------------


def test_unconsumed_ready_expires_and_is_freed_through_the_producer_agent(peers, agents):
    cons = peers(entry_ttl_s=0.6)
    agent, frees = agents(peers.holder["coord"].address, "prod-0")
    client = CoordinatorClient(peers.holder["coord"].address, timeout_s=2.0)
    try:
        r = ready("pd-x", keys=("a", "b"))
        t0 = time.monotonic()
        assert client.ready(r) is True
        assert isinstance(cons.req(Wait("pd-x", 0, 1.0)), Ready)  # present before its TTL
        free = frees.get(timeout=5.0)
        elapsed = time.monotonic() - t0
    finally:
        client.close()
    assert isinstance(free, Free) and free.pd_id == "pd-x" and sorted(free.keys) == sorted(r.keys)
    assert 0.5 <= elapsed < 4.0, elapsed
    q = cons.query("pd-x")
    assert q.counters["expired"] == 1 and q.counters["freed_keys"] == 2
    assert q.transfer.error == "expired unconsumed" and not q.transfer.done
    got = cons.req(Wait("pd-x", 0, 0.2))
    assert isinstance(got, WaitTimeout), "an expired entry must no longer answer WAITs"
    assert until(lambda: agent.freed == 2, 2.0)
    assert frees.empty()


def test_done_ok_updates_counters_and_record_and_frees_nothing(peers, agents):
    cons = peers(entry_ttl_s=0.6)
    _, frees = agents(peers.holder["coord"].address, "prod-0")
    prod = peers()
    assert isinstance(prod.req(ready("pd-ok", keys=("a", "b", "c"), n_tokens=100)), Ack)
    assert isinstance(cons.req(Wait("pd-ok", 0, 5.0)), Ready)
    done = Done("pd-ok", 0, True, instance_id="dec-0", n_chunks=3, n_bytes=12288, load_ms=2.5)
    assert isinstance(cons.req(done), Ack)
    q = cons.query("pd-ok")
    c = q.counters
    assert (c["done_ok"], c["done_failed"], c["chunks_loaded"], c["bytes_loaded"]) == (1, 0, 3, 12288)
    assert c["load_ms_sum"] == pytest.approx(2.5)
    t = q.transfer
    assert t is not None and t.pd_id == "pd-ok"
    assert (t.ready, t.done, t.ok, t.n_tokens, t.n_chunks, t.n_bytes) == (True, True, True, 100, 3, 12288)
    assert (t.producer, t.consumer, t.error) == ("prod-0", "dec-0", "")
    assert t.load_ms == pytest.approx(2.5)
    # consumed: it does not expire (no Free) after its TTL
    time.sleep(1.0)
    assert frees.empty()
    assert cons.query().counters["expired"] == 0
    # a second DONE adds up
    assert isinstance(cons.req(Done("pd-ok2", 0, True, n_chunks=2, n_bytes=100)), Ack)
    c = cons.query().counters
    assert (c["done_ok"], c["chunks_loaded"], c["bytes_loaded"]) == (2, 5, 12388)


def test_done_failed_frees_the_producers_chunks(peers, agents):
    cons = peers()
    _, frees = agents(peers.holder["coord"].address, "prod-0")
    r = ready("pd-bad", keys=("a", "b"))
    assert isinstance(cons.req(r), Ack)
    assert frees.empty()
    assert isinstance(cons.req(Done("pd-bad", 0, False, instance_id="dec-0", error="checksum mismatch")), Ack)
    free = frees.get(timeout=3.0)
    assert free.pd_id == "pd-bad" and sorted(free.keys) == sorted(r.keys)
    q = cons.query("pd-bad")
    assert q.counters["done_failed"] == 1 and q.counters["done_ok"] == 0 and q.counters["freed_keys"] == 2
    assert q.transfer.done and not q.transfer.ok and q.transfer.error == "checksum mismatch"
    # the entry is gone
    assert isinstance(cons.req(Wait("pd-bad", 0, 0.2)), WaitTimeout)


def test_failed_done_before_ready_frees_the_late_ready(peers, agents):
    cons = peers()
    _, frees = agents(peers.holder["coord"].address, "prod-0")
    assert isinstance(cons.req(Done("pd-late", 0, False, error="gave up")), Ack)
    r = ready("pd-late")
    assert isinstance(cons.req(r), Ack)
    free = frees.get(timeout=3.0)
    assert free.pd_id == "pd-late" and sorted(free.keys) == sorted(r.keys)
    assert isinstance(cons.req(Wait("pd-late", 0, 0.2)), WaitTimeout), "the late READY must not be stored"


def test_ok_done_before_the_final_ready_frees_the_late_ready(peers, agents):
    """A synchronous load reads the published chunks before the prefill's final READY comes:
    that READY adds no entry (nobody would read it) and its chunks are freed."""
    cons = peers()
    coord = peers.holder["coord"]
    _, frees = agents(coord.address, "prod-0")
    first = ready("pd-sync", keys=("k0",))
    first.final, first.chunks_ready = False, 1
    assert isinstance(cons.req(first), Ack)
    assert isinstance(cons.req(Done("pd-sync", 0, True, n_chunks=2, n_bytes=10)), Ack)
    r = ready("pd-sync", keys=("k1",))
    assert isinstance(cons.req(r), Ack)
    free = frees.get(timeout=3.0)
    assert free.pd_id == "pd-sync" and free.keys == r.keys
    assert isinstance(cons.req(Wait("pd-sync", 0, 0.2)), WaitTimeout)
    q = cons.query("pd-sync")
    assert q.transfer.done and q.transfer.ok and q.counters["entries"] == 0
    sp = q.transfer.spans  # the spans are made again with the final READY in: the tail is 0
    assert sp["tail"] == 0 and sp["transfer"] == pytest.approx(sp["ready_first_to_final"], abs=0.01)


def test_repeated_ready_frees_only_keys_no_longer_named(peers, agents):
    cons = peers()
    _, frees = agents(peers.holder["coord"].address, "prod-0")
    assert isinstance(cons.req(ready("pd-rep", keys=("a", "b"))), Ack)
    assert isinstance(cons.req(ready("pd-rep", keys=("b", "c"))), Ack)
    free = frees.get(timeout=3.0)
    assert free.keys == ["pd-rep/0/a"]
    got = cons.req(Wait("pd-rep", 0, 1.0))
    assert isinstance(got, Ready) and got.keys == ["pd-rep/0/b", "pd-rep/0/c"]


# ---- abort ----------------------------------------------------------------------------------


def test_abort_releases_waiters_and_frees_late_ready(peers, agents):
    w0, w1, other, ctl = peers(), peers(), peers(), peers()
    _, frees = agents(peers.holder["coord"].address, "prod-0")
    w0.send(Wait("pd-ab", 0, 10.0))
    w1.send(Wait("pd-ab", 1, 10.0))
    other.send(Wait("pd-not-aborted", 0, 10.0))
    assert w0.recv(QUIET_S) is None
    t0 = time.monotonic()
    assert isinstance(ctl.req(Abort("pd-ab", "client went away")), Ack)
    for w in (w0, w1):
        got = w.recv(2.0)
        assert isinstance(got, Aborted) and got.pd_id == "pd-ab" and got.reason == "client went away"
    assert time.monotonic() - t0 < 2.0
    assert other.recv(0.1) is None, "waiters of other pd_ids stay parked"
    # a late READY is freed at once, not stored
    r = ready("pd-ab", keys=("a", "b"))
    assert isinstance(ctl.req(r), Ack)
    free = frees.get(timeout=3.0)
    assert free.pd_id == "pd-ab" and sorted(free.keys) == sorted(r.keys)
    # a WAIT after the abort is answered Aborted (and not with the late READY)
    got = ctl.req(Wait("pd-ab", 0, 5.0), timeout_s=2.0)
    assert isinstance(got, Aborted) and got.reason == "client went away"
    q = ctl.query("pd-ab")
    assert q.counters["aborts"] == 1 and q.counters["freed_keys"] == 2
    assert q.transfer.error.startswith("aborted")


def test_abort_frees_a_stored_ready(peers, agents):
    ctl = peers()
    _, frees = agents(peers.holder["coord"].address, "prod-0")
    r = ready("pd-ab2", keys=("z",))
    assert isinstance(ctl.req(r), Ack)
    assert isinstance(ctl.req(Abort("pd-ab2")), Ack)
    free = frees.get(timeout=3.0)
    assert free.pd_id == "pd-ab2" and free.keys == r.keys
    assert isinstance(ctl.req(Wait("pd-ab2", 0, 1.0)), Aborted)


# ---- instances ------------------------------------------------------------------------------


def test_instances_go_down_without_heartbeats_and_come_back(peers, agents):
    ttl = 0.8
    p, d = peers(instance_ttl_s=ttl), peers()
    agents(peers.holder["coord"].address, "a0", interval_s=0.1)  # heartbeats on its own
    assert isinstance(p.req(Register("p0", "prefill", "http://127.0.0.1:8100", 111)), Ack)
    assert isinstance(d.req(Register("d0", "decode", "http://127.0.0.1:8200", 222)), Ack)

    def by_id():
        return {i.instance_id: i for i in p.query().instances}

    inst = by_id()
    assert set(inst) == {"p0", "d0", "a0"}
    assert all(i.alive for i in inst.values())
    assert (inst["p0"].role, inst["p0"].url, inst["p0"].pid) == ("prefill", "http://127.0.0.1:8100", 111)
    assert (inst["d0"].role, inst["d0"].pid) == ("decode", 222)
    assert p.query().counters["instances_alive"] == 3

    inst = until(lambda: (lambda m: m if not m["p0"].alive and not m["d0"].alive else None)(by_id()), 5.0)
    assert inst, "instances without heartbeats were never marked down"
    assert inst["p0"].last_seen_s >= ttl
    assert inst["a0"].alive, "an agent heartbeating every 0.1s must stay alive"
    assert p.query().counters["instances_alive"] == 1

    assert isinstance(p.req(Heartbeat("p0")), Ack)
    inst = by_id()
    assert inst["p0"].alive and not inst["d0"].alive
    assert inst["p0"].role == "prefill" and inst["p0"].last_seen_s < ttl
    assert p.query().counters["instances_alive"] == 2
    # a heartbeat from an unknown instance registers it
    assert isinstance(d.req(Heartbeat("n0", "decode", "http://x", 5)), Ack)
    assert by_id()["n0"].alive and by_id()["n0"].role == "decode"


# ---- garbage --------------------------------------------------------------------------------


GARBAGE = {
    "random bytes, one frame": [os.urandom(64)],
    "empty frame": [b""],
    "wrong protocol tag": [b"pdkv/999", msgspec.msgpack.encode({"type": "query", "pd_id": ""})],
    "three frames": [PROTOCOL_TAG, msgspec.msgpack.encode({"type": "query"}), b"extra"],
    "random bytes after the tag": [PROTOCOL_TAG, os.urandom(64)],
    "msgpack of a wrong shape": [PROTOCOL_TAG, msgspec.msgpack.encode([1, 2, 3])],
    "wrong field type": [PROTOCOL_TAG, msgspec.msgpack.encode({"type": "wait", "pd_id": 5, "rank": "x",
                                                                "timeout_s": 1})],
    "missing field": [PROTOCOL_TAG, msgspec.msgpack.encode({"type": "ready", "pd_id": "p"})],
    "unknown field": [PROTOCOL_TAG, msgspec.msgpack.encode({"type": "query", "pd_id": "", "bogus": 1})],
    "unknown type": [PROTOCOL_TAG, msgspec.msgpack.encode({"type": "explode"})],
    "a reply sent as a request (Ack)": encode(Ack()),
    "a reply sent as a request (Free)": encode(Free("p", ["k"])),
}


def test_garbage_gets_error_replies_and_the_coordinator_lives(peers):
    good, bad = peers(), peers()
    good.send(Wait("pd-g", 0, 10.0))  # parked before the garbage; must survive it
    assert good.recv(0.1) is None
    base = good.query().counters["malformed"]
    assert base == 0
    for name, frames in GARBAGE.items():
        bad.send_raw(frames)
        reply = bad.recv(3.0)
        assert isinstance(reply, Error), f"{name}: {reply!r}"
        assert reply.reason, name
    c = good.query().counters
    assert c["malformed"] == len(GARBAGE)
    assert c["internal_errors"] == 0
    # the same peer keeps working, and state from before the garbage is intact
    assert isinstance(bad.req(ready("pd-g")), Ack)
    got = good.recv(3.0)
    assert isinstance(got, Ready) and got.pd_id == "pd-g"
    assert isinstance(bad.query(), QueryReply)


def test_wrong_tag_error_names_the_versions(peers):
    bad = peers()
    bad.send_raw([b"pdkv/999", encode(Query())[1]])
    reply = bad.recv(3.0)
    assert isinstance(reply, Error) and "pdkv/999" in reply.reason and PROTOCOL_TAG.decode() in reply.reason


# ---- the client without (or with a slow) coordinator -----------------------------------------


def test_client_with_coordinator_down_returns_quickly_and_never_raises():
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    client = CoordinatorClient(address, timeout_s=0.3)
    try:
        calls = [
            (lambda: client.query(), None),
            (lambda: client.query("pd"), None),
            (lambda: client.ready(ready("pd")), False),
            (lambda: client.register("i0", "prefill"), False),
            (lambda: client.heartbeat("i0"), False),
            (lambda: client.done(Done("pd", 0, True)), False),
            (lambda: client.abort("pd", "x"), False),
        ]
        for fn, expected in calls:
            t0 = time.monotonic()
            assert fn() is expected
            assert time.monotonic() - t0 < 0.3 + 2.0
        t0 = time.monotonic()
        got = client.wait("pd", 0, 0.4)
        assert isinstance(got, WaitTimeout) and got.pd_id == "pd"
        assert 0.35 <= time.monotonic() - t0 < 0.4 + 2.0
    finally:
        client.close()
    assert client.query() is None  # closed: at once


def test_client_after_the_coordinator_stopped(start_coord):
    coord = start_coord()
    client = CoordinatorClient(coord.address, timeout_s=0.3)
    try:
        assert isinstance(client.query(), QueryReply)
        coord.stop()
        t0 = time.monotonic()
        assert client.query() is None
        assert client.ready(ready("pd")) is False
        assert isinstance(client.wait("pd", 0, 0.2), WaitTimeout)
        assert time.monotonic() - t0 < 3 * (0.3 + 2.0)
    finally:
        client.close()


def test_late_reply_never_answers_a_later_call(peers):
    prod = peers()
    address = peers.holder["coord"].address
    client = CoordinatorClient(address, timeout_s=2.0)
    try:
        # A WAIT whose client-side deadline is shorter than the coordinator's: no answer in time.
        assert client.call(Wait("pd-late-reply", 0, 10.0), timeout_s=0.2) is None
        # The READY now reaches the coordinator, which answers the (abandoned) waiter.
        assert isinstance(prod.req(ready("pd-late-reply")), Ack)
        # The next call must get its own answer, not that late Ready.
        q = client.query("pd-late-reply")
        assert isinstance(q, QueryReply), q
        assert q.transfer is not None and q.transfer.pd_id == "pd-late-reply"
        assert isinstance(client.call(Abort("pd-other")), Ack)
    finally:
        client.close()


def test_late_reply_from_a_slow_server_is_dropped(ctx):
    """A fake coordinator answers the first request only after the client gave up on it."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = CoordinatorClient(f"tcp://127.0.0.1:{port}", timeout_s=0.3)
    try:
        assert client.query("first") is None  # not answered in time
        assert router.poll(2000)
        ident, *_ = router.recv_multipart()
        router.send_multipart([ident, *encode(QueryReply(counters={"answer": 1.0}, instances=[]))])  # late
        time.sleep(0.1)  # let it reach the client's (old) socket if that were still open

        result: queue.Queue = queue.Queue()
        th = threading.Thread(target=lambda: result.put(client.query("second")), daemon=True)
        th.start()
        assert router.poll(2000)
        ident2, *_ = router.recv_multipart()
        router.send_multipart([ident2, *encode(QueryReply(counters={"answer": 2.0}, instances=[]))])
        th.join(3)
        got = result.get(timeout=1)
        assert isinstance(got, QueryReply) and got.counters == {"answer": 2.0}
    finally:
        client.close()


def test_async_client_up_and_down(start_coord):
    coord = start_coord()

    async def up():
        client = AsyncCoordinatorClient(coord.address, timeout_s=2.0)
        try:
            assert await client.abort("pd-async", "gone") is True
            q = await client.query("pd-async")
            assert isinstance(q, QueryReply) and q.counters["aborts"] == 1
            assert q.transfer is not None and q.transfer.error == "aborted: gone"
        finally:
            client.close()
        assert await client.query() is None  # closed

    async def down():
        client = AsyncCoordinatorClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3)
        try:
            t0 = time.monotonic()
            assert await client.query() is None
            assert await client.abort("pd") is False
            assert time.monotonic() - t0 < 2 * (0.3 + 2.0)
        finally:
            client.close()

    asyncio.run(up())
    asyncio.run(down())


# ---- CLI process ----------------------------------------------------------------------------


def test_cli_port_in_use_exits_2_with_one_line():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run([PYTHON, "-m", "launch.cli", "coordinator", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert len(lines) == 1, out
    assert str(port) in lines[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_coordinator_exits_0_on_signal(sig):
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "launch.cli", "coordinator", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = CoordinatorClient(f"tcp://127.0.0.1:{port}", timeout_s=0.3)
    try:
        up = until(lambda: proc.poll() is not None or client.query() is not None, 15.0, 0.05)
        assert up and proc.poll() is None, f"coordinator did not come up: {proc.poll()}"
        proc.send_signal(sig)
        t0 = time.monotonic()
        try:
            rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"coordinator did not exit within 5s of {sig.name}")
        assert rc == 0, proc.stderr.read()
        assert time.monotonic() - t0 < 5
        err = proc.stderr.read()
        assert "Traceback" not in err
        assert str(port) in err  # it logged where it listened
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
