"""ShmTransport: round trips, misses, arena/eviction, zero-copy views, cross-process, crashes,
cleanup, concurrency."""
from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from pd.connector import chunk
from pd.connector.keys import chunk_keys, key_digest, layout_fingerprint, transfer_key
from transport import Transport, ZeroCopyTransport, make_transport, shm_maps
from transport import arena as arena_mod
from transport.config import TransportConfig
from transport.shm import ShmTransport
from transport.shm_index import cleanup_pool, key_to_name, name_to_key, pool_dir

FP = layout_fingerprint(model="m", dtype="bf16", layers=2)
MB = 1 << 20
HDR = arena_mod.HEADER
SPAWN = mp.get_context("spawn")


def _cfg(tmp_path, pool_mb: int = 16, name: str = "t") -> TransportConfig:
    return TransportConfig(kind="shm", pool_size_mb=pool_mb, shm_dir=str(tmp_path), name=name)


def _files(t: ShmTransport) -> list[str]:
    return sorted(os.listdir(t.path)) if os.path.isdir(t.path) else []


def _links(t: ShmTransport) -> list[str]:
    return [n for n in _files(t) if not n.startswith(".")]


def _arenas(t: ShmTransport) -> list[str]:
    return [n for n in _files(t) if n.startswith(".arena-")]


def _make_chunk(key: str, payload_len: int, seed: int) -> np.ndarray:
    buf = np.empty(chunk.HEADER_SIZE + payload_len, dtype=np.uint8)
    buf[chunk.HEADER_SIZE:] = np.random.default_rng(seed).integers(0, 256, payload_len, dtype=np.uint8)
    chunk.write_header(memoryview(buf), FP, key_digest(key), 16, 1, payload_len)
    return buf


def _run(target, *args, timeout: float = 60) -> int:
    p = SPAWN.Process(target=target, args=args)
    p.start()
    p.join(timeout)
    return p.exitcode


@pytest.fixture
def t(tmp_path):
    tr = ShmTransport(_cfg(tmp_path))
    yield tr
    tr.close()


def test_protocol_and_location(t, tmp_path):
    assert isinstance(t, Transport) and isinstance(t, ZeroCopyTransport)
    assert t.location == f"shm:{tmp_path}/pdkv-t"
    made = make_transport(_cfg(tmp_path), pin_cuda=False)
    assert isinstance(made, ShmTransport) and not made.pin_cuda
    made.close()


def test_key_names_are_flat_and_injective():
    keys = ["xfer/abc/ns-1/0/ff00", "xfer+abc/ns-1/0/ff00", "xfer%2Fabc", "a/b", "a+b", "a%2Fb",
            ".hidden", "..", "ü/é", "x" * 400, "x" * 399 + "y", ".arena-1-0123abcd", ".tmp-x"]
    names = [key_to_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    for k, n in zip(keys, names):
        assert "/" not in n and not n.startswith(".") and len(n) <= 200
        if len(k) < 150:
            assert name_to_key(n) == k
    assert name_to_key(".arena-1-0123abcd") is None and name_to_key(".tmp-ab-1") is None


def test_round_trip_real_chunks(t):
    keys = [transfer_key("req-1", k) for k in chunk_keys("m-abc", 0, list(range(100)), 16)]
    bufs = [_make_chunk(k, 1000 + 64 * i, i) for i, k in enumerate(keys)]
    assert t.put(keys, bufs) == [True] * len(keys)
    outs = [np.zeros(chunk.HEADER_SIZE + 4096, dtype=np.uint8) for _ in keys]
    got = t.get(keys, outs)
    assert got == [b.nbytes for b in bufs]
    for k, b, o, n in zip(keys, bufs, outs, got):
        n_tokens, n_blocks, payload = chunk.verify(memoryview(o)[:n], FP, key_digest(k), n - chunk.HEADER_SIZE)
        assert (n_tokens, n_blocks) == (16, 1)
        assert bytes(payload) == b[chunk.HEADER_SIZE:].tobytes()
    # a chunk read under another key fails verification (so it would be a miss)
    with pytest.raises(chunk.ChunkError):
        chunk.verify(memoryview(outs[0])[: got[0]], FP, key_digest(keys[1]))
    assert t.stats["puts"] == len(keys) and t.stats["get_hits"] == len(keys)
    assert t.stats["put_bytes"] == t.stats["get_bytes"] == sum(got)


def test_buffer_types(t):
    a = np.arange(1000, dtype=np.float32)  # non-byte numpy dtype
    t.put(["k/f32", "k/bytes"], [a, b"hello world"])
    out = np.zeros(1000, dtype=np.float32)
    raw = bytearray(64)
    assert t.get(["k/f32", "k/bytes"], [out, memoryview(raw)]) == [4000, 11]
    assert np.array_equal(out, a) and bytes(raw[:11]) == b"hello world"


def test_miss_and_too_small(t):
    t.put(["a/1"], [np.full(1000, 7, dtype=np.uint8)])
    small = np.zeros(999, dtype=np.uint8)
    big = np.zeros(2000, dtype=np.uint8)
    assert t.get(["a/1", "a/missing"], [small, big]) == [0, 0]
    assert not small.any() and not big.any()  # nothing partial was written
    assert t.get(["a/1"], [big]) == [1000]
    assert t.stats["get_misses"] == 2 and t.stats["get_hits"] == 1


def test_exists_delete(t):
    t.put(["d/1", "d/2"], [b"x" * 10, b"y" * 10])
    assert t.exists(["d/1", "d/2", "d/3"]) == [True, True, False]
    used = t.used_bytes()
    assert t.delete(["d/1", "d/3"]) == 1
    assert t.exists(["d/1", "d/2"]) == [False, True]
    assert t.get(["d/1"], [bytearray(10)]) == [0]
    assert t.stats["deletes"] == 1
    assert t.used_bytes() == used - 4096  # the producer's own delete frees the slot at once


def test_no_temp_files_and_overwrite(t):
    for i in range(5):
        assert t.put([f"o/{i}", "o/same"], [bytes([i]) * 100, bytes([i]) * (100 + i)]) == [True, True]
    names = _files(t)
    assert not [n for n in names if n.startswith(".tmp")]
    assert len(_links(t)) == 6 and len(_arenas(t)) == 1
    out = bytearray(200)
    assert t.get(["o/same"], [out]) == [104] and out[:104] == bytes([4]) * 104
    assert t.used_bytes() == 6 * 4096  # one page per small slot; overwritten slots were freed


def test_eviction_oldest_first(tmp_path):
    prod = ShmTransport(_cfg(tmp_path, pool_mb=1))
    cons = ShmTransport(_cfg(tmp_path, pool_mb=1))
    value = np.ones(MB // 4 - HDR, dtype=np.uint8)  # 4 slots fill the 1 MiB arena
    keys = [f"e/{i}" for i in range(6)]
    assert prod.put(keys, [value] * 6) == [True] * 6
    assert prod.stats["evictions"] == 2
    assert cons.exists(keys) == [False, False, True, True, True, True]
    out = np.zeros(value.nbytes, dtype=np.uint8)
    assert cons.get(keys[:1], [out]) == [0]
    # a consumer deletes what it read: the producer reclaims that space before evicting
    assert cons.get(keys[2:3], [out]) == [value.nbytes] and cons.delete(keys[2:3]) == 1
    assert prod.put(["e/new"], [value]) == [True]
    assert prod.stats["evictions"] == 2 and prod.stats["reclaimed"] == 1
    assert cons.exists(keys[3:] + ["e/new"]) == [True] * 4
    assert prod.used_bytes() <= MB
    prod.close()
    assert _files(prod) == [] and cons.exists(keys) == [False] * 6
    cons.close()


def test_too_large_is_refused(tmp_path, caplog):
    t = ShmTransport(_cfg(tmp_path, pool_mb=1))
    assert t.put(["ok", "big"], [b"z" * 10, np.zeros(MB - HDR + 1, np.uint8)]) == [True, False]
    assert t.stats["dropped"] == 1 and t.stats["puts"] == 1
    assert t.exists(["ok", "big"]) == [True, False]  # the refused value evicted nothing
    assert t.stats["evictions"] == 0
    assert "too large" in caplog.text
    assert t.put(["fits"], [np.zeros(MB - HDR, np.uint8)]) == [True]  # exactly the arena
    assert t.exists(["ok", "fits"]) == [False, True]
    t.close()


def test_bad_input(t, tmp_path):
    with pytest.raises(ValueError, match="2 keys but 1 buffers"):
        t.put(["a", "b"], [b"x"])
    with pytest.raises(ValueError, match="1 keys but 2 buffers"):
        t.get(["a"], [bytearray(1), bytearray(1)])
    with pytest.raises(ValueError, match="reserve: 1 keys but 0 sizes"):
        t.reserve(["a"], [])
    with pytest.raises(ValueError, match="negative"):
        t.reserve(["a"], [-1])
    with pytest.raises(TypeError, match="read-only"):
        t.get(["a"], [b"immutable"])
    slots = t.reserve(["a"], [3])
    with pytest.raises(ValueError, match="1 slots but 2 ok"):
        t.commit(slots, [True, True])
    other = ShmTransport(_cfg(tmp_path))
    with pytest.raises(ValueError, match="not a pending slot"):
        other.commit(slots)
    assert t.commit(slots, [True]) == [True]
    with pytest.raises(ValueError, match="not a pending slot"):
        t.commit(slots)  # twice
    assert t.commit([None]) == [False] and t.release([None]) == [False]
    reads = t.acquire(["a"])
    assert t.release(reads) == [True] and t.release(reads) == [False]  # a second release is a no-op
    assert t.stats["put_errors"] == 0 and t.used_bytes() == 4096
    other.close()


def test_os_error_on_publish_is_a_drop(t, monkeypatch):
    real_symlink = os.symlink

    def enospc(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "symlink", enospc)
    assert t.put(["full/1"], [b"abc"]) == [False]
    monkeypatch.setattr(os, "symlink", real_symlink)
    assert t.stats["put_errors"] == 1 and t.stats["dropped"] == 1
    assert _links(t) == [] and t.used_bytes() == 0  # the slot was given back
    assert t.put(["full/1"], [b"abc"]) == [True]


def test_no_room_for_the_arena_is_a_drop(tmp_path, monkeypatch, caplog):
    def enospc(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    t = ShmTransport(_cfg(tmp_path))
    assert t.put(["a"], [b"x"]) == [False] and t.reserve(["b"], [1]) == [None]
    assert t.stats["dropped"] == 2 and t.stats["put_errors"] == 1  # one attempt, then a pause
    assert "cannot create a 16 MiB arena" in caplog.text and _files(t) == []
    t.close()


def test_pool_dir_removed_under_us(t, tmp_path):
    t.put(["before"], [b"data"])
    cleanup_pool(_cfg(tmp_path))
    assert not os.path.exists(t.path)
    assert t.get(["gone", "before"], [bytearray(4), bytearray(4)]) == [0, 0]
    assert t.put(["again"], [b"data"]) == [True]  # a new arena in a new directory
    out = bytearray(4)
    assert t.get(["again"], [out]) == [4] and out == b"data"
    assert t.stats["arenas"] == 2 and len(_arenas(t)) == 1


def test_close_and_cleanup_leave_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    a, b = ShmTransport(cfg), ShmTransport(cfg)
    a.put(["c/a1", "c/a2"], [b"1", b"2"])
    b.put(["c/b1"], [b"3"])
    a.close()
    assert _links(a) == [key_to_name("c/b1")] and len(_arenas(a)) == 1  # only its own
    assert a.put(["c/late"], [b"4"]) == [False] and a.get(["c/b1"], [bytearray(1)]) == [0]
    cleanup_pool(cfg)
    assert not os.path.exists(pool_dir(cfg))
    b.close()  # files already gone: no error


def test_consumer_holds_no_arena(tmp_path):
    prod, cons = ShmTransport(_cfg(tmp_path)), ShmTransport(_cfg(tmp_path))
    prod.put(["x"], [b"abc"])
    assert cons.get(["x"], [bytearray(3)]) == [3] and cons.delete(["x"]) == 1
    assert cons.arena_bytes == 0 and cons.used_bytes() == 0 and len(_arenas(prod)) == 1
    prod.close()
    cons.close()


def test_uncommitted_is_invisible_and_abort_frees(t):
    slots = t.reserve(["z/1", "z/2"], [5000, 10])
    assert all(isinstance(s.view, memoryview) and s.view.nbytes == s.size for s in slots)
    slots[0].view[:] = b"\x07" * 5000
    slots[1].view[:] = b"0123456789"
    assert t.exists(["z/1", "z/2"]) == [False, False] and t.acquire(["z/1"]) == [None]
    assert t.used_bytes() == 2 * 4096 + 4096
    assert t.commit(slots, [True, False]) == [True, False]
    assert t.exists(["z/1", "z/2"]) == [True, False]
    assert t.used_bytes() == 2 * 4096 and t.stats["aborted"] == 1 and t.stats["dropped"] == 0
    out = bytearray(5000)
    assert t.get(["z/1"], [out]) == [5000] and out == b"\x07" * 5000


def test_reserved_slots_are_never_evicted(tmp_path):
    t = ShmTransport(_cfg(tmp_path, pool_mb=1))
    held = t.reserve(["held"], [MB // 2])
    # put goes value by value: "b" evicts "a" (never "held")
    assert t.put(["a", "b"], [np.ones(MB // 4, np.uint8)] * 2) == [True, True]
    assert t.stats["evictions"] == 1 and t.exists(["a", "b"]) == [False, True]
    # reserve holds its whole batch: the second slot cannot evict the first
    c, d = t.reserve(["c", "d"], [MB // 4] * 2)
    assert c is not None and d is None
    assert t.exists(["b"]) == [False] and t.stats["evictions"] == 2  # "b" made room for "c"
    assert t.put(["e"], [np.ones(MB // 4, np.uint8)]) == [False]  # only reserved slots left
    assert t.stats["dropped"] == 2 and t.stats["evictions"] == 2
    held[0].view[:] = b"\x01" * (MB // 2)
    assert t.commit(held + [c, d], [True, False, True]) == [True, False, False]
    assert t.exists(["held", "c"]) == [True, False] and t.stats["aborted"] == 1
    t.close()


def test_zero_copy_round_trip(t):
    keys = [f"zc/{i}" for i in range(3)]
    slots = t.reserve(keys, [1000, 4096, 100_000])
    for i, s in enumerate(slots):
        arr = np.frombuffer(s.view, np.uint8)  # an array made of the view, as a worker would
        arr[:] = i + 1
        del arr
    assert t.commit(slots) == [True, True, True]
    reads = t.acquire(keys + ["zc/missing"])
    assert reads[3] is None and [r.size for r in reads[:3]] == [1000, 4096, 100_000]
    for i, r in enumerate(reads[:3]):
        assert not r.view.readonly and r.view.format == "B" and r.view.ndim == 1
        assert np.all(np.frombuffer(r.view, np.uint8) == i + 1)
    assert t.release(reads) == [True, True, True, False]
    assert t.stats["get_hits"] == 3 and t.stats["get_misses"] == 1


def test_release_false_when_evicted_or_overwritten(tmp_path):
    prod, cons = ShmTransport(_cfg(tmp_path, pool_mb=1)), ShmTransport(_cfg(tmp_path, pool_mb=1))
    quarter = MB // 4 - HDR  # 4 slots fill the arena
    assert prod.put(["r/0", "r/1"], [np.full(quarter, 1, np.uint8), np.full(quarter, 2, np.uint8)]) == [True] * 2
    reads = cons.acquire(["r/0", "r/1"])
    assert all(reads)
    # the producer never waits for readers: r/1 is overwritten (its old slot freed and reused),
    # then r/0 is evicted and its bytes reused
    assert prod.put(["r/1"], [np.full(100, 3, np.uint8)]) == [True]
    assert prod.put([f"r/x{i}" for i in range(3)], [np.full(quarter, 9, np.uint8)] * 3) == [True] * 3
    assert prod.stats["evictions"] == 1
    assert np.all(np.frombuffer(reads[0].view, np.uint8) == 9)  # what a late reader would see
    assert np.all(np.frombuffer(reads[1].view, np.uint8) == 9)
    assert cons.release(reads) == [False, False]
    assert cons.stats["read_races"] == 2
    out = np.zeros(quarter, np.uint8)
    assert cons.get(["r/0", "r/1"], [out, out]) == [0, 100]
    prod.close()
    cons.close()


def test_held_read_survives_delete_and_close(tmp_path):
    prod, cons = ShmTransport(_cfg(tmp_path)), ShmTransport(_cfg(tmp_path))
    prod.put(["h/1"], [b"q" * 4096])
    reads = cons.acquire(["h/1"])
    arr = np.frombuffer(reads[0].view, np.uint8)  # kept past release: must not break close
    assert cons.delete(["h/1"]) == 1
    assert bytes(reads[0].view) == b"q" * 4096  # a delete marks; the bytes stay until reused
    prod.close()
    cons.close()  # never raises with reads outstanding
    assert bytes(reads[0].view) == b"q" * 4096  # still mapped: the hold keeps it
    assert cons.release(reads) == [True]
    assert int(arr[0]) == ord("q")  # the array keeps the memory mapped after the unmap request
    del arr


def _child_zero_copy_put(cfg, keys, size, seed):
    t = ShmTransport(cfg)
    slots = t.reserve(keys, [size] * len(keys))
    for i, s in enumerate(slots):
        s.view[:] = np.random.default_rng(seed + i).integers(0, 256, size, dtype=np.uint8).data
    ok = t.commit(slots)
    os._exit(0 if all(ok) else 3)  # leave the arena for the parent (no close)


def _child_acquire_check_delete(cfg, keys, size, seed):
    t = ShmTransport(cfg)
    reads = t.acquire(keys)
    good = all(r is not None and bytes(r.view) == bytes(
        np.random.default_rng(seed + i).integers(0, 256, size, dtype=np.uint8)) for i, r in enumerate(reads))
    ok = t.release(reads)
    t.delete(keys)
    t.close()
    os._exit(0 if good and all(ok) and t.arena_bytes == 0 else 3)


def test_zero_copy_across_processes(tmp_path):
    cfg = _cfg(tmp_path)
    keys = [f"xp/{uuid.uuid4().hex}/{i}" for i in range(4)]
    assert _run(_child_zero_copy_put, cfg, keys, 50_000, 42) == 0
    t = ShmTransport(cfg)
    reads = t.acquire(keys)
    for i, r in enumerate(reads):
        assert bytes(r.view) == bytes(np.random.default_rng(42 + i).integers(0, 256, 50_000, dtype=np.uint8))
    assert t.release(reads) == [True] * 4
    # and the other way round: this process produces, a child reads, checks and deletes
    slots = t.reserve(keys, [50_000] * 4)
    for i, s in enumerate(slots):
        s.view[:] = np.random.default_rng(7 + i).integers(0, 256, 50_000, dtype=np.uint8).data
    assert t.commit(slots) == [True] * 4
    assert _run(_child_acquire_check_delete, cfg, keys, 50_000, 7) == 0
    assert t.exists(keys) == [False] * 4
    t.close()


def _child_delete(cfg, keys):
    t = ShmTransport(cfg)
    n = t.delete(keys)
    t.close()
    os._exit(0 if n == len(keys) else 3)


def test_delete_from_another_process_frees_space(tmp_path):
    cfg = _cfg(tmp_path, pool_mb=1)
    prod = ShmTransport(cfg)
    value = np.ones(MB // 4 - HDR, np.uint8)
    keys = [f"df/{i}" for i in range(4)]
    assert prod.put(keys, [value] * 4) == [True] * 4 and prod.used_bytes() == MB
    assert _run(_child_delete, cfg, keys[1:3]) == 0
    assert prod.put(["df/a", "df/b"], [value] * 2) == [True, True]
    assert prod.stats["evictions"] == 0 and prod.stats["reclaimed"] == 2
    assert prod.exists(keys + ["df/a", "df/b"]) == [True, False, False, True, True, True]
    prod.close()


def _child_put(cfg: TransportConfig, keys: list[str], seed: int) -> None:
    t = ShmTransport(cfg)
    bufs = [np.random.default_rng(seed + i).integers(0, 256, 50_000, dtype=np.uint8) for i in range(len(keys))]
    ok = t.put(keys, bufs)
    os._exit(0 if all(ok) else 3)  # leave the chunks for the parent (no close)


def test_cross_process(tmp_path):
    cfg = _cfg(tmp_path)
    keys = [f"xfer/{uuid.uuid4().hex}/ns/0/{i:032x}" for i in range(4)]
    assert _run(_child_put, cfg, keys, 42) == 0
    t = ShmTransport(cfg)
    outs = [np.zeros(50_000, np.uint8) for _ in keys]
    assert t.get(keys, outs) == [50_000] * 4
    for i, o in enumerate(outs):
        assert np.array_equal(o, np.random.default_rng(42 + i).integers(0, 256, 50_000, dtype=np.uint8))
    assert t.delete(keys) == 4
    assert _links(t) == [] and len(_arenas(t)) == 1  # the dead producer's arena: cleanup_pool's job
    t.close()


def _child_overwriter(cfg, key, size, ready):
    t = ShmTransport(cfg)
    i = 0
    while True:  # until SIGKILLed: overwrite `key` with uniform values, half of them zero-copy
        i += 1
        if i % 2:
            s = t.reserve([key], [size])
            np.frombuffer(s[0].view, np.uint8)[:] = i % 251
            t.commit(s)
        else:
            t.put([key], [np.full(size, i % 251, np.uint8)])
        if i == 5:
            ready.set()


def test_sigkilled_writer_never_exposes_a_torn_value(tmp_path):
    cfg = _cfg(tmp_path, pool_mb=1)  # 3 slots: the writer reuses slots readers are reading
    size = 300_000
    ready = SPAWN.Event()
    p = SPAWN.Process(target=_child_overwriter, args=(cfg, "torn/k", size, ready))
    p.start()
    try:
        assert ready.wait(60)
        t = ShmTransport(cfg)
        out = np.zeros(size, np.uint8)
        hits = 0
        t_end = time.monotonic() + 1.5
        killed = False
        while time.monotonic() < t_end:
            if not killed and time.monotonic() > t_end - 0.75:
                os.kill(p.pid, signal.SIGKILL)
                killed = True
            n = t.get(["torn/k"], [out])[0]
            if n:
                assert n == size and np.all(out == out[0]), "torn value"
                hits += 1
            r = t.acquire(["torn/k"])[0]
            if r is not None:
                first = np.frombuffer(r.view, np.uint8).copy()
                if t.release([r])[0]:
                    assert np.all(first == first[0]), "torn value"
                    hits += 1
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        assert hits > 0
        assert t.stats["read_races"] + t.stats["get_misses"] > 0  # the race was exercised
        # after the kill the last committed value stays readable and whole
        assert t.get(["torn/k"], [out]) == [size] and np.all(out == out[0])
        t.close()
    finally:
        if p.is_alive():
            p.kill()
        cleanup_pool(cfg)


def test_arena_is_made_and_faulted_once(tmp_path):
    # on tmpfs, as deployed (a disk file's pages may fault again after writeback)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    cfg = TransportConfig(kind="shm", pool_size_mb=4, shm_dir=root, name=f"test-{uuid.uuid4().hex[:8]}")
    t = ShmTransport(cfg)
    assert t.arena_bytes == 0 and _arenas(t) == []
    t.put(["f/first"], [b"x"])
    (name,) = _arenas(t)
    st = os.stat(os.path.join(t.path, name))
    assert st.st_size == 4 * MB and st.st_blocks * 512 >= 4 * MB  # allocated up front
    src = [np.full(s, 3, np.uint8) for s in (100_000, 300_000, 700_000, 1_000_000)]
    out = np.zeros(MB, np.uint8)
    t.get(["f/first"], [out])
    flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(100):  # ~50 MiB through a 4 MiB arena: evictions reuse the same pages
        t.put([f"f/{i}"], [src[i % 4]])
        assert t.get([f"f/{i}"], [out]) == [src[i % 4].nbytes]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
    assert faults < 2000, faults  # the ~12,000 pages copied in and out were already mapped
    assert t.stats["evictions"] > 50 and t.stats["arenas"] == 1
    assert _arenas(t) == [name] and os.stat(os.path.join(t.path, name)).st_size == st.st_size
    assert t.arena_bytes == 4 * MB and t.used_bytes() <= 4 * MB
    t.close()
    cleanup_pool(cfg)


def test_concurrent_puts_and_gets(tmp_path):
    t = ShmTransport(_cfg(tmp_path, pool_mb=2))
    n_threads, per = 4, 40
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            out = np.zeros(16_384, np.uint8)
            for i in range(per):
                key = f"c/{w}/{i}"
                val = np.full(16_384, (w * per + i) % 251, np.uint8)
                if i % 2:
                    assert t.put([key], [val]) == [True]
                else:
                    s = t.reserve([key], [16_384])
                    s[0].view[:] = val.data
                    assert t.commit(s) == [True]
                n = t.get([key], [out])[0]
                # it may have been evicted by another thread, but never torn
                assert n == 0 or (n == 16_384 and np.array_equal(out, val))
                r = t.acquire([f"c/{(w + 1) % n_threads}/{i}"])[0]
                if r is not None:
                    data = bytes(r.view)
                    if t.release([r]) == [True]:  # a False release means: do not use the data
                        assert data == data[:1] * 16_384
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert t.stats["puts"] == n_threads * per
    assert t.used_bytes() <= 2 << 20
    names = _links(t)
    assert len(names) * (16_384 + 4096) <= 2 << 20
    assert len(names) == n_threads * per - t.stats["evictions"] - t.stats["reclaimed"]
    t.close()
    assert _files(t) == []


def test_two_instances_overwrite_one_key(tmp_path):
    a, b = ShmTransport(_cfg(tmp_path)), ShmTransport(_cfg(tmp_path))
    assert a._uid != b._uid
    errors: list[BaseException] = []

    def writer(tr, v):
        try:
            for _ in range(50):
                assert tr.put(["same"], [bytes([v]) * 5000]) == [True]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ths = [threading.Thread(target=writer, args=(tr, v)) for tr, v in ((a, 1), (b, 2))]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert not errors
    out = bytearray(5000)
    assert a.get(["same"], [out]) == [5000] and out in (b"\x01" * 5000, b"\x02" * 5000)
    assert not [n for n in _files(a) if n.startswith(".tmp")]
    a.close()
    b.close()


def test_pin_cuda_without_cuda_goes_on_unpinned(tmp_path, caplog):
    t = make_transport(_cfg(tmp_path), pin_cuda=True)
    with caplog.at_level(logging.WARNING, logger="transport.shm"):
        assert t.put(["p/1", "p/2"], [b"a", b"b"]) == [True, True]
        assert t.get(["p/1"], [bytearray(1)]) == [1]
    assert caplog.text.count("cannot pin") == 1
    t.close()


def test_stale_arena_mappings_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_maps, "SWEEP_S", 0.0)
    prod, cons = ShmTransport(_cfg(tmp_path)), ShmTransport(_cfg(tmp_path))
    prod.put(["s/1"], [b"abc"])
    assert cons.get(["s/1"], [bytearray(3)]) == [3] and len(cons._maps.maps) == 1
    prod.close()
    assert cons.get(["s/1"], [bytearray(3)]) == [0] and cons._maps.maps == {}
    cons.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_real_dev_shm():
    cfg = TransportConfig(kind="shm", pool_size_mb=4, shm_dir="/dev/shm", name=f"test-{uuid.uuid4().hex[:8]}")
    t = ShmTransport(cfg)
    try:
        data = np.arange(1 << 18, dtype=np.uint8)
        assert t.put(["real/1"], [data]) == [True]
        out = np.zeros_like(data)
        assert t.get(["real/1"], [out]) == [data.nbytes] and np.array_equal(out, data)
    finally:
        t.close()
        cleanup_pool(cfg)
    assert not os.path.exists(pool_dir(cfg))


def test_first_fit_allocator():
    ff = arena_mod.FirstFit(10 * 4096)
    a, b, c = ff.alloc(4096), ff.alloc(2 * 4096), ff.alloc(4096)
    assert (a, b, c) == (0, 4096, 3 * 4096) and ff.free_bytes == 6 * 4096
    ff.free(b, 2 * 4096)
    assert ff.alloc(3 * 4096) == 4 * 4096  # first fit: the 2-page hole is too small
    assert ff.alloc(2 * 4096) == 4096
    ff.free(a, 4096)
    ff.free(4096, 2 * 4096)
    ff.free(c, 4096)  # coalesces with both neighbours
    assert ff.ranges() == [(0, 4 * 4096), (7 * 4096, 10 * 4096)]
    with pytest.raises(ValueError, match="double free"):
        ff.free(0, 4096)
    assert arena_mod.slot_bytes(0) == 4096 and arena_mod.slot_bytes(4096 - HDR + 1) == 8192


def _bench_args(*argv: str):
    import argparse

    from launch.bench import transport as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return bench, p.parse_args(list(argv))


def test_bench_unknown_transport(caplog):
    bench, args = _bench_args("--transport", "tcp")
    assert bench.run(args) == 2
    assert "allowed: shm" in caplog.text and "not built yet" in caplog.text


def test_bench_tiny_run(tmp_path, capsys):
    bench, args = _bench_args("--sizes", "64K,1M", "--total-mb", "2", "--iters", "1",
                              "--shm-dir", str(tmp_path))
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "| 64K |" in out and "| 1M |" in out and "memcpy GB/s" in out and "zc put GB/s" in out
    assert os.listdir(tmp_path) == []  # the pool directory is gone
    assert bench.parse_size("4M") == 4 << 20
    with pytest.raises(ValueError):
        bench.parse_size("1X")


# ---- issue 18, item 3: a pool re-made after it disappeared is checked like the first one ------

@pytest.mark.parametrize("plant", ["symlink", "mode-0755", "file"])
def test_a_pool_replaced_under_a_running_producer_is_refused_not_written(tmp_path, plant, caplog):
    t = ShmTransport(_cfg(tmp_path, pool_mb=4))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        assert t.put(["a"], [b"x" * 100]) == [True]
        cleanup_pool(_cfg(tmp_path))  # the pool disappears (another deployment's clean stop, ...)
        if plant == "symlink":  # someone puts a symlink where the pool was
            os.symlink(elsewhere, t.path)
        elif plant == "mode-0755":
            os.mkdir(t.path, 0o755)
            os.chmod(t.path, 0o755)
        else:
            open(t.path, "w").close()
        with caplog.at_level(logging.ERROR, logger="transport.shm_owner"):
            assert t.put(["b"], [b"y" * 100]) == [False]
        assert list(elsewhere.iterdir()) == []  # nothing written where the symlink points
        assert any("shm pool" in r.getMessage() and ("symlink" in r.getMessage() or "0700" in r.getMessage()
                   or "not a directory" in r.getMessage()) for r in caplog.records)
    finally:
        t.close()
