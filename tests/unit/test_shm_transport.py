"""ShmTransport: round trips, misses, budget/eviction, cross-process, cleanup, concurrency."""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import threading
import uuid

import numpy as np
import pytest

from pd import chunk
from pd.config import TransportConfig
from pd.keys import chunk_keys, key_digest, layout_fingerprint, transfer_key
from transport.base import Transport
from transport.shm import ShmTransport, cleanup_pool, key_to_name, name_to_key, pool_dir

FP = layout_fingerprint(model="m", dtype="bf16", layers=2)


def _cfg(tmp_path, pool_mb: int = 16, name: str = "t") -> TransportConfig:
    return TransportConfig(kind="shm", pool_size_mb=pool_mb, shm_dir=str(tmp_path), name=name)


def _files(t: ShmTransport) -> list[str]:
    return sorted(os.listdir(t.path)) if os.path.isdir(t.path) else []


def _make_chunk(key: str, payload_len: int, seed: int) -> np.ndarray:
    buf = np.empty(chunk.HEADER_SIZE + payload_len, dtype=np.uint8)
    buf[chunk.HEADER_SIZE:] = np.random.default_rng(seed).integers(0, 256, payload_len, dtype=np.uint8)
    chunk.write_header(memoryview(buf), FP, key_digest(key), 16, 1, payload_len)
    return buf


@pytest.fixture
def t(tmp_path):
    tr = ShmTransport(_cfg(tmp_path))
    yield tr
    tr.close()


def test_protocol_and_location(t, tmp_path):
    assert isinstance(t, Transport)
    assert t.location == f"shm:{tmp_path}/pdkv-t"


def test_key_names_are_flat_and_injective():
    keys = ["xfer/abc/ns-1/0/ff00", "xfer+abc/ns-1/0/ff00", "xfer%2Fabc", "a/b", "a+b", "a%2Fb",
            ".hidden", "..", "ü/é", "x" * 400, "x" * 399 + "y"]
    names = [key_to_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    for k, n in zip(keys, names):
        assert "/" not in n and not n.startswith(".") and len(n) <= 200
        if len(k) < 150:
            assert name_to_key(n) == k


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
    assert t.delete(["d/1", "d/3"]) == 1
    assert t.exists(["d/1", "d/2"]) == [False, True]
    assert t.get(["d/1"], [bytearray(10)]) == [0]
    assert t.stats["deletes"] == 1


def test_no_temp_files_and_overwrite(t):
    for i in range(5):
        assert t.put([f"o/{i}", "o/same"], [bytes([i]) * 100, bytes([i]) * (100 + i)]) == [True, True]
    names = _files(t)
    assert not [n for n in names if n.startswith(".")]
    assert len(names) == 6
    out = bytearray(200)
    assert t.get(["o/same"], [out]) == [104] and out[:104] == bytes([4]) * 104
    assert t.used_bytes() == 5 * 100 + 104


def test_eviction_oldest_first(tmp_path):
    prod = ShmTransport(_cfg(tmp_path, pool_mb=1))
    cons = ShmTransport(_cfg(tmp_path, pool_mb=1))
    mb = 1 << 20
    chunk_ = np.ones(mb // 4, dtype=np.uint8)  # 4 fit in the budget
    keys = [f"e/{i}" for i in range(6)]
    assert prod.put(keys, [chunk_] * 6) == [True] * 6
    assert prod.stats["evictions"] == 2
    assert cons.exists(keys) == [False, False, True, True, True, True]
    out = np.zeros(mb // 4, dtype=np.uint8)
    assert cons.get(keys[:1], [out]) == [0]
    # a consumer deletes what it read: the producer reclaims that space before evicting
    assert cons.get(keys[2:3], [out]) == [mb // 4] and cons.delete(keys[2:3]) == 1
    assert prod.put(["e/new"], [chunk_]) == [True]
    assert prod.stats["evictions"] == 2 and prod.stats["reclaimed"] == 1
    assert cons.exists(keys[3:] + ["e/new"]) == [True] * 4
    assert prod.used_bytes() <= mb
    prod.close()
    assert _files(prod) == []


def test_too_large_is_refused(tmp_path):
    t = ShmTransport(_cfg(tmp_path, pool_mb=1))
    assert t.put(["ok", "big"], [b"z" * 10, np.zeros((1 << 20) + 1, np.uint8)]) == [True, False]
    assert t.stats["dropped"] == 1 and t.stats["puts"] == 1
    assert t.exists(["ok", "big"]) == [True, False]  # the refused chunk evicted nothing
    assert t.stats["evictions"] == 0
    t.close()


def test_os_error_on_put_is_a_drop(t, monkeypatch):
    real_write = os.write

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    assert t.put(["full/1"], [b"abc"]) == [False]
    monkeypatch.setattr(os, "write", real_write)
    assert t.stats["put_errors"] == 1 and t.stats["dropped"] == 1
    assert _files(t) == [] and t.used_bytes() == 0
    assert t.put(["full/1"], [b"abc"]) == [True]


def test_pool_dir_removed_under_us(t, tmp_path):
    cleanup_pool(_cfg(tmp_path))
    assert not os.path.exists(t.path)
    assert t.get(["gone"], [bytearray(4)]) == [0]
    assert t.put(["again"], [b"data"]) == [True]  # the directory is recreated


def test_close_and_cleanup_leave_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    a, b = ShmTransport(cfg), ShmTransport(cfg)
    a.put(["c/a1", "c/a2"], [b"1", b"2"])
    b.put(["c/b1"], [b"3"])
    a.close()
    assert _files(a) == [key_to_name("c/b1")]  # close only removes its own chunks
    cleanup_pool(cfg)
    assert not os.path.exists(pool_dir(cfg))
    b.close()  # files already gone: no error


def _child_put(cfg: TransportConfig, keys: list[str], seed: int) -> None:
    t = ShmTransport(cfg)
    bufs = [np.random.default_rng(seed + i).integers(0, 256, 50_000, dtype=np.uint8) for i in range(len(keys))]
    ok = t.put(keys, bufs)
    os._exit(0 if all(ok) else 3)  # leave the chunks for the parent (no close)


def test_cross_process(tmp_path):
    cfg = _cfg(tmp_path)
    keys = [f"xfer/{uuid.uuid4().hex}/ns/0/{i:032x}" for i in range(4)]
    p = mp.get_context("spawn").Process(target=_child_put, args=(cfg, keys, 42))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    t = ShmTransport(cfg)
    outs = [np.zeros(50_000, np.uint8) for _ in keys]
    assert t.get(keys, outs) == [50_000] * 4
    for i, o in enumerate(outs):
        assert np.array_equal(o, np.random.default_rng(42 + i).integers(0, 256, 50_000, dtype=np.uint8))
    assert t.delete(keys) == 4
    assert _files(t) == []


def test_read_survives_unlink(t):
    """An open reader keeps its data although the file is unlinked (the eviction race)."""
    t.put(["r/1"], [b"q" * 4096])
    fd = os.open(os.path.join(t.path, key_to_name("r/1")), os.O_RDONLY)
    try:
        t.delete(["r/1"])
        assert os.read(fd, 8192) == b"q" * 4096
    finally:
        os.close(fd)


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
                assert t.put([key], [val]) == [True]
                n = t.get([key], [out])[0]
                # it may have been evicted by another thread, but never torn
                assert n == 0 or (n == 16_384 and np.array_equal(out, val))
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
    names = _files(t)
    assert not [n for n in names if n.startswith(".")]
    assert len(names) * 16_384 <= 2 << 20
    assert len(names) == n_threads * per - t.stats["evictions"]
    t.close()
    assert _files(t) == []


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


def _bench_args(*argv: str):
    import argparse

    from transport import bench

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
    assert "| 64K |" in out and "| 1M |" in out and "memcpy GB/s" in out
    assert os.listdir(tmp_path) == []  # the pool directory is gone
    assert bench.parse_size("4M") == 4 << 20
    with pytest.raises(ValueError):
        bench.parse_size("1X")
