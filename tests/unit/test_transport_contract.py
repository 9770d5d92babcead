"""The same behavioural tests for every transport: shm, mooncake and infinistore.

A new transport is added by listing it in ``BACKENDS`` (and a ``Backend.cfg`` branch). mooncake
runs against a real ``mooncake_master`` started for this module on free ports (TCP, P2P
handshake); infinistore against the real InfiniStore server and client in TCP mode (the server
with the libibverbs test double where there is no RDMA device: see tests/doubles/verbs). Each is
skipped with the reason when it is not installed (scripts/setup.sh installs both).
Transport-specific behaviour (shm's arena and eviction, mooncake's master going away,
infinistore's server going away) lives in test_shm_transport.py, test_mooncake_transport.py and
test_infinistore_transport.py.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import uuid

import numpy as np
import pytest

from pd.connector import chunk
from pd.connector.keys import chunk_keys, key_digest, layout_fingerprint, transfer_key
from transport import Transport, ZeroCopyTransport, make_transport
from transport.config import InfinistoreConfig, MooncakeConfig, TransportConfig

FP = layout_fingerprint(model="m", dtype="bf16", layers=2)
MB = 1 << 20
SPAWN = mp.get_context("spawn")
BACKENDS = ["shm", "mooncake", "infinistore"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def mooncake_installed() -> str:
    """'' when the Mooncake Store module and master are usable here, else why not."""
    try:
        from transport.mooncake_client import import_store
        from transport.mooncake_master import master_binary

        import_store()
    except Exception as e:  # noqa: BLE001 - the reason of the skip
        return str(e)
    return "" if master_binary() else "mooncake_master not found"


def close_all(transports: list) -> None:
    """Close transports in parallel (a Mooncake client takes 1-2 s to leave the pool)."""
    threads = [threading.Thread(target=t.close) for t in transports]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)


@pytest.fixture(scope="module")
def mooncake_master():
    """A real mooncake_master on free ports for this module's tests: (its MooncakeConfig, a list
    of transports to close before it stops)."""
    why = mooncake_installed()
    if why:
        pytest.skip(f"Mooncake Store not installed ({why}); scripts/setup.sh installs it")
    from transport.mooncake_master import run_master

    rpc, metrics, meta = free_ports(3)
    m = MooncakeConfig(master=f"127.0.0.1:{rpc}", metrics_port=metrics, metadata_port=meta, start_master=True,
                       global_segment_size_mb=32, local_buffer_size_mb=4, op_timeout_s=5)
    p = run_master(m)
    later: list = []
    yield m, later
    close_all(later)
    p.kill()
    p.wait(10)


@pytest.fixture(scope="module")
def infinistore_server(tmp_path_factory):
    """The real InfiniStore server on free ports, TCP mode, for this module's tests: (its
    InfinistoreConfig, a list of transports to close before it stops)."""
    from transport.infinistore_server import (
        VERBS_DOUBLE,
        rdma_devices,
        run_server,
        unavailable,
    )

    why = unavailable()
    if why:
        pytest.skip(f"InfiniStore not usable here ({why}); scripts/setup.sh installs it")

    service, manage = free_ports(2)
    c = InfinistoreConfig(url=f"infinistore://127.0.0.1:{service}", connection_type="tcp", start_server=True,
                          server_prealloc_gb=1, server_manage_port=manage, staging_mb=8, max_value_mb=2,
                          op_timeout_s=10, server_libibverbs="" if rdma_devices() else str(VERBS_DOUBLE))
    log = open(tmp_path_factory.mktemp("infinistore") / "server.log", "w")
    p = run_server(c, log)
    later: list = []
    yield c, later
    close_all(later)
    p.kill()
    p.wait(10)
    log.close()


class Backend:
    """Opens transports of one kind. mooncake, infinistore: one shared transport per size limit
    (with fresh counters for each test), closed at the module's end: a Mooncake client holds the
    interpreter for 1-2 s while it leaves the pool."""

    def __init__(self, name: str, root: str, server: tuple | None) -> None:
        self.name, self.root = name, root
        self.server, self._later = server or (None, [])

    def cfg(self, limit_mb: int = 8) -> TransportConfig:
        """A config whose largest value is about ``limit_mb`` MiB (shm: the arena; mooncake,
        infinistore: the staging region)."""
        import dataclasses

        if self.name == "shm":
            return TransportConfig(kind="shm", pool_size_mb=limit_mb, shm_dir=self.root, name="c")
        if self.name == "infinistore":
            return TransportConfig(kind="infinistore", infinistore=dataclasses.replace(
                self.server, staging_mb=limit_mb, max_value_mb=min(limit_mb, self.server.max_value_mb)))
        return TransportConfig(kind="mooncake",
                               mooncake=dataclasses.replace(self.server, local_buffer_size_mb=limit_mb))

    def open(self, limit_mb: int = 8, fresh: bool = False):
        """A transport to use in this test (shm: close it; mooncake: the module closes it)."""
        if self.name == "shm" or fresh:
            return make_transport(self.cfg(limit_mb))
        shared = _SHARED.setdefault(id(self._later), {})
        if limit_mb not in shared:
            shared[limit_mb] = make_transport(self.cfg(limit_mb))
            self._later.append(shared[limit_mb])
        t = shared[limit_mb]
        for key in t.stats:
            t.stats[key] = 0
        assert t.used_bytes() == 0, "a test left slots reserved or acquired"
        return t


_SHARED: dict = {}


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    server = {"mooncake": "mooncake_master", "infinistore": "infinistore_server"}.get(request.param)
    return Backend(request.param, str(tmp_path), request.getfixturevalue(server) if server else None)


@pytest.fixture
def t(backend):
    tr = backend.open()
    yield tr
    if backend.name == "shm":
        tr.close()


@pytest.fixture
def k():
    """Key maker unique to the test (mooncake's pool outlives each test)."""
    tag = uuid.uuid4().hex[:8]
    return lambda name: f"ct/{tag}/{name}"


def _chunk(key: str, payload_len: int, seed: int) -> np.ndarray:
    buf = np.empty(chunk.HEADER_SIZE + payload_len, dtype=np.uint8)
    buf[chunk.HEADER_SIZE:] = np.random.default_rng(seed).integers(0, 256, payload_len, dtype=np.uint8)
    chunk.write_header(memoryview(buf), FP, key_digest(key), 16, 1, payload_len)
    return buf


def _data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_protocol_and_location(t, backend):
    assert isinstance(t, Transport) and isinstance(t, ZeroCopyTransport)
    assert t.location.startswith(backend.name + ":")
    for key in ("gets", "get_hits", "get_misses", "get_bytes", "puts", "put_bytes", "dropped", "deletes"):
        assert t.stats[key] == 0


def test_round_trip_real_chunks(t, k):
    keys = [transfer_key(f"req-{uuid.uuid4().hex}", c) for c in chunk_keys("m-abc", 0, list(range(100)), 16)]
    bufs = [_chunk(key, 1000 + 4096 * i, i) for i, key in enumerate(keys)]
    assert t.put(keys, bufs) == [True] * len(keys)
    outs = [np.zeros(chunk.HEADER_SIZE + 30_000, dtype=np.uint8) for _ in keys]
    got = t.get(keys, outs)
    assert got == [b.nbytes for b in bufs]
    for key, b, o, n in zip(keys, bufs, outs, got):
        n_tokens, n_blocks, payload = chunk.verify(memoryview(o)[:n], FP, key_digest(key), n - chunk.HEADER_SIZE)
        assert (n_tokens, n_blocks) == (16, 1) and bytes(payload) == b[chunk.HEADER_SIZE:].tobytes()
        assert not o[n:].any()  # nothing past the value
    with pytest.raises(chunk.ChunkError):  # a chunk read under another key fails verification
        chunk.verify(memoryview(outs[0])[: got[0]], FP, key_digest(keys[1]))
    assert t.stats["puts"] == len(keys) and t.stats["get_hits"] == len(keys)
    assert t.stats["put_bytes"] == t.stats["get_bytes"] == sum(got)


def test_buffer_types(t, k):
    a = np.arange(1000, dtype=np.float32)
    assert t.put([k("f32"), k("bytes")], [a, b"hello world"]) == [True, True]
    out, raw = np.zeros(1000, dtype=np.float32), bytearray(64)
    assert t.get([k("f32"), k("bytes")], [out, memoryview(raw)]) == [4000, 11]
    assert np.array_equal(out, a) and bytes(raw[:11]) == b"hello world"


def test_miss_and_too_small_write_nothing(t, k):
    assert t.put([k("a")], [np.full(1000, 7, dtype=np.uint8)]) == [True]
    small, big = np.zeros(999, dtype=np.uint8), np.zeros(2000, dtype=np.uint8)
    assert t.get([k("a"), k("missing")], [small, big]) == [0, 0]
    assert not small.any() and not big.any()  # no partial read
    assert t.get([k("a")], [big]) == [1000] and (big[:1000] == 7).all() and not big[1000:].any()
    assert t.stats["get_misses"] == 2 and t.stats["get_hits"] == 1
    assert t.get([], []) == [] and t.put([], []) == [] and t.exists([]) == [] and t.delete([]) == 0


def test_exists_delete(t, k):
    assert t.put([k("1"), k("2")], [b"x" * 10, b"y" * 10]) == [True, True]
    assert t.exists([k("1"), k("2"), k("3")]) == [True, True, False]
    assert t.get([k("1")], [bytearray(10)]) == [10]  # a reader just read it (mooncake: a live lease)
    assert t.delete([k("1"), k("3")]) == 1
    assert t.exists([k("1"), k("2")]) == [False, True]
    assert t.get([k("1")], [bytearray(10)]) == [0]
    assert t.delete([k("1")]) == 0 and t.stats["deletes"] == 1


def test_overwrite_and_duplicates_in_a_batch(t, k):
    for i in range(3):  # last write wins, whatever the sizes
        assert t.put([k("same")], [bytes([i]) * (100 + 50 * i)]) == [True]
    out = bytearray(400)
    assert t.get([k("same")], [out]) == [200] and out[:200] == bytes([2]) * 200
    assert t.put([k("dup"), k("other"), k("dup")], [b"a" * 10, b"o", b"b" * 20]) == [True] * 3
    assert t.get([k("dup"), k("other")], [out, bytearray(1)]) == [20, 1] and out[:20] == b"b" * 20


def test_a_batch_larger_than_the_staging_memory(backend, k):
    t = backend.open(limit_mb=2)
    vals = [_data(i, 700_000) for i in range(6)]  # 4.2 MB through 2 MiB: several rounds/evictions
    keys = [k(str(i)) for i in range(6)]
    ok = t.put(keys, vals)
    assert ok.count(True) >= 2
    outs = [np.zeros(700_000, np.uint8) for _ in keys]
    got = t.get(keys, outs)
    for g, v, o in zip(got, vals, outs):
        assert g == 0 or (g == 700_000 and np.array_equal(o, v))  # a value or a miss, never other bytes
    if backend.name != "shm":  # the pool holds them all; only staging was small
        assert ok == [True] * 6 and got == [700_000] * 6


def test_thousands_of_keys_in_one_batch(t, k):
    keys = [k(f"many/{i}") for i in range(1500)]  # mooncake: more than one engine call (1024 keys each)
    vals = [np.full(512, i % 251, np.uint8) for i in range(1500)]
    assert t.put(keys, vals) == [True] * 1500
    outs = [np.zeros(512, np.uint8) for _ in keys]
    assert t.get(keys, outs) == [512] * 1500
    assert all((o == i % 251).all() for i, o in enumerate(outs))
    assert t.exists(keys) == [True] * 1500 and t.delete(keys) == 1500


def test_a_value_too_large_is_dropped(backend, k):
    t = backend.open(limit_mb=1)
    assert t.put([k("ok"), k("big")], [b"z" * 10, np.zeros(2 * MB, np.uint8)]) == [True, False]
    assert t.stats["dropped"] == 1 and t.stats["puts"] == 1
    assert t.exists([k("ok"), k("big")]) == [True, False]
    assert t.reserve([k("big2")], [2 * MB]) == [None] and t.stats["dropped"] == 2
    out = bytearray(20)
    assert t.get([k("ok")], [out]) == [10]


def test_zero_copy_round_trip(t, k):
    keys = [k(f"zc/{i}") for i in range(3)]
    vals = [_data(i, 5000 + 1000 * i) for i in range(3)]
    slots = t.reserve(keys, [v.nbytes for v in vals])
    for s, v in zip(slots, vals):
        assert isinstance(s.view, memoryview) and s.view.nbytes == s.size == v.nbytes and not s.view.readonly
        s.view[:] = v.data
    assert t.exists(keys) == [False] * 3  # invisible until committed
    assert t.commit(slots, [True, False, True]) == [True, False, True]
    assert t.exists(keys) == [True, False, True]
    reads = t.acquire(keys + [k("nope")])
    assert reads[1] is None and reads[3] is None
    for r, v in ((reads[0], vals[0]), (reads[2], vals[2])):
        assert r.size == v.nbytes and bytes(r.view) == v.tobytes()
    assert t.release(reads) == [True, False, True, False]
    assert t.release(reads) == [False] * 4  # a second release is a no-op
    with pytest.raises(ValueError, match="not a pending slot"):
        t.commit(slots)
    assert t.commit([None]) == [False]
    out = bytearray(5000)
    assert t.get(keys[:1], [out]) == [5000] and bytes(out) == vals[0].tobytes()


def test_bad_input(t, backend, k):
    with pytest.raises(ValueError, match="2 keys but 1 buffers"):
        t.put([k("a"), k("b")], [b"x"])
    with pytest.raises(ValueError, match="1 keys but 2 buffers"):
        t.get([k("a")], [bytearray(1), bytearray(1)])
    with pytest.raises(ValueError, match="reserve: 1 keys but 0 sizes"):
        t.reserve([k("a")], [])
    with pytest.raises(ValueError, match="negative"):
        t.reserve([k("a")], [-1])
    with pytest.raises(TypeError, match="read-only"):
        t.get([k("a")], [b"immutable"])
    slots = t.reserve([k("a")], [3])
    with pytest.raises(ValueError, match="1 slots but 2 ok"):
        t.commit(slots, [True, True])
    other = backend.open(limit_mb=2)  # another instance
    with pytest.raises(ValueError, match="not a pending slot"):
        other.commit(slots)
    assert t.commit(slots, [False]) == [False]
    if backend.name == "shm":
        other.close()


def test_concurrent_puts_and_gets(t, k):
    n_threads, per, size = 4, 25, 16_384
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            out = np.zeros(size, np.uint8)
            for i in range(per):
                key, val = k(f"{w}/{i}"), np.full(size, (w * per + i) % 251, np.uint8)
                if i % 2:
                    assert t.put([key], [val]) == [True]
                else:
                    s = t.reserve([key], [size])
                    s[0].view[:] = val.data
                    assert t.commit(s) == [True]
                n = t.get([key], [out])[0]
                assert n == 0 or (n == size and np.array_equal(out, val))  # maybe evicted, never torn
                r = t.acquire([k(f"{(w + 1) % n_threads}/{i}")])[0]
                if r is not None:
                    data = bytes(r.view)
                    if t.release([r]) == [True]:
                        assert data == data[:1] * size
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert t.stats["puts"] == n_threads * per


def _child_put_and_hold(cfg, keys, seed, ready, done) -> None:
    t = make_transport(cfg)
    ok = t.put(keys, [_data(seed + i, 50_000) for i in range(len(keys))])
    ready.set()
    done.wait(60)  # mooncake: the values live in this process's segment while it is in the pool
    os._exit(0 if all(ok) else 3)


def _child_get_check_delete(cfg, keys, seed) -> None:
    t = make_transport(cfg)
    outs = [np.zeros(60_000, np.uint8) for _ in keys]
    got = t.get(keys, outs)
    good = got == [50_000] * len(keys) and all(
        np.array_equal(o[:50_000], _data(seed + i, 50_000)) for i, o in enumerate(outs))
    os._exit(0 if good and t.delete(keys) == len(keys) else 3)


def test_another_process_reads_what_one_put(t, backend, k):
    cfg = backend.cfg()
    keys = [k(f"xp/{i}") for i in range(4)]
    ready, done = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_child_put_and_hold, args=(cfg, keys, 42, ready, done))
    p.start()
    try:
        assert ready.wait(60)
        outs = [np.zeros(50_000, np.uint8) for _ in keys]
        assert t.get(keys, outs) == [50_000] * 4
        for i, o in enumerate(outs):
            assert np.array_equal(o, _data(42 + i, 50_000))
        assert t.delete(keys) == 4 and t.exists(keys) == [False] * 4
    finally:
        done.set()
        p.join(30)
    assert p.exitcode == 0
    # and the other way round: this process puts, a child reads, checks and deletes
    keys2 = [k(f"px/{i}") for i in range(3)]
    assert t.put(keys2, [_data(7 + i, 50_000) for i in range(3)]) == [True] * 3
    p = SPAWN.Process(target=_child_get_check_delete, args=(cfg, keys2, 7))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and t.exists(keys2) == [False] * 3


def test_close(backend, k):
    t = backend.open(fresh=True)
    assert t.put([k("c")], [b"1"]) == [True]
    t.close()
    t.close()  # twice: no error
    assert t.put([k("late")], [b"4"]) == [False]
    assert t.get([k("c")], [bytearray(1)]) == [0]
    assert t.reserve([k("r")], [10]) == [None] and t.acquire([k("c")]) == [None]
    assert t.exists([k("c")]) == [False] and t.delete([k("c")]) == 0
