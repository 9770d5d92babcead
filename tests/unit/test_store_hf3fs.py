"""Hf3fsStore against tests.doubles.usrbio_emulator (a test double of hf3fs_fuse.io over local files).

No real 3FS cluster is involved: these tests check the store's logic (slabs, index log, slot
headers, batching, queue, errors), not 3FS itself."""
from __future__ import annotations

import errno
import os
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import round_trip

from common.config import ConfigError, load
from store import KVStore, make_store
from store.config import Hf3fsConfig, StoreConfig
from store.hf3fs import MISSING_MODULE, Hf3fsStore
from store.hf3fs_peers import View
from tests.doubles import usrbio_emulator as emu

# this host's writer directories (<host>.w<k>, store/hf3fs.py)
W0, W1 = (re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) + f".w{k}" for k in (0, 1))

NS = "model-0123456789abcdef"


@pytest.fixture
def mount(tmp_path) -> Path:
    mp = tmp_path / "3fs"
    mp.mkdir()
    emu.emulate_mount(str(mp))
    yield mp
    emu.FAULT = None
    emu.forget_mounts()


def _cfg(mount: Path, **kw) -> StoreConfig:
    kw.setdefault("size_gb", 0.01)
    h = Hf3fsConfig(mount_point=str(mount), iov_size_mb=100, io_threads=2,
                    base_paths=kw.pop("base_paths", ["kv"]))
    return StoreConfig(backend="hf3fs", hf3fs=h, **kw)


def _open(mount: Path, writer: bool = True, **kw) -> Hf3fsStore:
    return Hf3fsStore(_cfg(mount, **kw), io=emu, writer=writer)


def _key(i: int) -> str:
    return f"{NS}/0/{i:032x}"


def _data(i: int, n: int = 100_000) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


@pytest.fixture
def store(mount):
    s = _open(mount)
    yield s
    s.close()


def test_round_trip_layout_and_resources(mount):
    s = _open(mount)
    assert isinstance(s, KVStore)
    sizes = round_trip(s, _key, _data)
    u = s.usage()
    assert u["files"] == 5 and u["writes"] == 5 and u["hits"] == 5 and u["write_errors"] == 0
    d = mount / "kv" / "dev0" / W0
    data_files = sorted(d.glob("data-*.bin"))
    assert len(data_files) == 1 and (d / "index.log").is_file()  # one big file, not one per chunk
    assert sum(f.stat().st_size for f in data_files) <= s.budget
    assert len(os.listdir(mount / "3fs-virt" / "iovs")) == 1  # one iovec, made once
    # batched reads
    outs = [np.zeros(n, dtype=np.uint8) for n in sizes]
    assert s.get_many([_key(i) for i in range(5)], outs) == sizes
    s.close()
    assert os.listdir(mount / "3fs-virt" / "iovs") == []  # the symlink goes with the iovec
    assert not emu._REGISTERED  # every data file deregistered


def test_miss_and_too_small_buffer(store):
    out = np.zeros(100, dtype=np.uint8)
    assert store.get(_key(1), out) == 0
    assert store.put(_key(2), _data(2, 1000)) and store.flush(5)
    assert store.get(_key(2), out) == 0
    assert store.usage()["misses"] == 2 and store.usage()["corrupt"] == 0
    assert store.get(_key(2), np.zeros(1000, dtype=np.uint8)) == 1000
    with pytest.raises(ValueError):
        store.get(_key(2), b"x" * 2000)


def test_duplicate_and_delete(store):
    for i in range(3):
        assert store.put(_key(i), _data(i))
    store.flush(5)
    assert store.put(_key(0), _data(0)) and store.usage()["duplicates"] == 1
    assert store.delete([_key(0), _key(1), _key(9)]) == 2
    assert store.contains([_key(0)]) == 0 and store.contains([_key(2)]) == 1
    assert store.usage()["files"] == 1


def _slot_offset(s: Hf3fsStore, key: str) -> tuple[Path, int]:
    e = s._index[key]
    f, sl = divmod(e.slab, s.slabs_per_file)
    return Path(s.path) / f"data-{f:04d}.bin", sl * s.slab_size + e.slot * e.cls


@pytest.mark.parametrize("where", ["payload", "header", "zeroed"])
def test_corrupt_slot_is_a_miss(store, where):
    store.put(_key(1), _data(1))
    store.flush(5)
    f, off = _slot_offset(store, _key(1))
    with open(f, "r+b") as fh:
        if where == "zeroed":  # a torn write: nothing of the slot made it
            fh.seek(off)
            fh.write(bytes(4096))
        else:
            pos = off + (5000 if where == "payload" else 10)
            fh.seek(pos)
            b = fh.read(1)
            fh.seek(pos)
            fh.write(bytes([b[0] ^ 0x40]))
    out = np.zeros(100_000, dtype=np.uint8)
    assert store.get(_key(1), out) == 0
    u = store.usage()
    assert u["corrupt"] == 1 and u["files"] == 0 and store.contains([_key(1)]) == 0
    assert store.put(_key(1), _data(1)) and store.flush(5)  # the slot is reusable
    assert store.get(_key(1), out) == 100_000 and np.array_equal(out, _data(1))


def test_stale_slot_of_another_key_is_a_miss(store):
    store.put(_key(1), _data(1))
    store.put(_key(2), _data(2))
    store.flush(5)
    f1, o1 = _slot_offset(store, _key(1))
    f2, o2 = _slot_offset(store, _key(2))
    raw = f2.read_bytes()[o2:o2 + 100_000 + 64]
    with open(f1, "r+b") as fh:  # key 2's (valid) slot where key 1 should be
        fh.seek(o1)
        fh.write(raw)
    out = np.zeros(100_000, dtype=np.uint8)
    assert store.get(_key(1), out) == 0 and store.usage()["corrupt"] == 1
    assert store.get(_key(2), out) == 100_000


def test_restart_finds_chunks(mount):
    s = _open(mount)
    for i in range(5):
        s.put(_key(i), _data(i))
    s.flush(5)
    s.delete([_key(4)])
    s.close()
    with open(mount / "kv" / "dev0" / W0 / "index.log", "ab") as fh:
        fh.write(b"PK3L\x01 torn tail of a crashed append")
    s2 = _open(mount)
    u = s2.usage()
    assert u["files"] == 4 and u["recovered"] == 4
    assert sorted(s2.keys()) == sorted(_key(i) for i in range(4))
    out = np.zeros(100_000, dtype=np.uint8)
    for i in range(4):
        assert s2.get(_key(i), out) == 100_000 and np.array_equal(out, _data(i))
    assert s2.get(_key(4), out) == 0
    # new values go to free slots, not over recovered ones
    assert s2.put(_key(5), _data(5)) and s2.flush(5)
    for i in (0, 5):
        assert s2.get(_key(i), out) == 100_000 and np.array_equal(out, _data(i))
    s2.close()


def test_layout_change_starts_empty(mount):
    s = _open(mount)
    s.put(_key(1), _data(1))
    s.flush(5)
    s.close()
    s2 = _open(mount, size_gb=0.002)  # another slab size: the old index is not trusted
    assert s2.usage()["files"] == 0
    s2.close()


def test_writers_get_their_own_directories_and_read_each_other(store, mount, monkeypatch):
    monkeypatch.setattr("store.hf3fs_peers.MISS_RESCAN_S", 0.0)  # look for new writers on every miss
    assert store.put(_key(1), _data(1)) and store.flush(10)
    s2 = _open(mount)
    out = np.zeros(100_000, dtype=np.uint8)
    try:
        assert store.path.endswith(W0) and s2.path.endswith(W1)
        assert s2.get(_key(1), out) == 100_000 and np.array_equal(out, _data(1))
        assert s2.usage()["peer_hits"] == 1 and s2.usage()["files"] == 0  # not copied
        assert s2.put(_key(2), _data(2)) and s2.flush(10)
        assert store.contains([_key(1), _key(2), _key(3)]) == 2  # the peer's new value, no reopen
        assert store.get(_key(2), out) == 100_000 and np.array_equal(out, _data(2))
        assert sorted(store.keys()) == sorted([_key(1), _key(2)])
    finally:
        s2.close()
    s3 = _open(mount)  # w1 is free again: a restarted writer takes it back with its index
    try:
        assert s3.path.endswith(W1) and s3.usage()["files"] == 1
    finally:
        s3.close()


def test_reader_follows_the_writer_and_writes_nothing(store, mount):
    r = _open(mount, writer=False)
    out = np.zeros(100_000, dtype=np.uint8)
    try:
        assert r.put(_key(9), _data(9)) is False
        assert r.usage()["read_only"] == 1 and r.usage()["dropped"] == 1
        assert [p.name for p in (mount / "kv" / "dev0").iterdir()] == [W0]  # claimed nothing
        for i in range(4):
            assert store.put(_key(i), _data(i))
        assert store.flush(10)
        assert r.contains([_key(i) for i in range(5)]) == 4
        for i in range(4):
            assert r.get(_key(i), out) == 100_000 and np.array_equal(out, _data(i))
        store.delete([_key(0)])
        assert r.get(_key(0), out) == 0
        store._log.rewrite(list(store._index.items()))  # a compaction: a new log generation
        assert store.put(_key(4), _data(4)) and store.flush(10)
        assert r.contains([_key(i) for i in range(1, 6)]) == 4
        assert r.get(_key(4), out) == 100_000 and np.array_equal(out, _data(4))
    finally:
        r.close()


def test_stale_peer_entry_is_a_miss_never_another_value(mount, monkeypatch):
    w = _open(mount, size_gb=0.002)  # 7 slabs of 256 KiB: 14 values of 100 kB
    r = _open(mount, writer=False)
    out = np.zeros(100_000, dtype=np.uint8)
    try:
        for i in range(14):
            assert w.put(_key(i), _data(i))
        assert w.flush(10)
        assert r.contains([_key(i) for i in range(14)]) == 14
        monkeypatch.setattr(View, "refresh", lambda self: None)  # the reader's view goes stale
        for i in range(14, 28):  # evicts 0..13 and writes into their slots
            assert w.put(_key(i), _data(i))
        assert w.flush(10) and w.usage()["evictions"] >= 13
        got = [r.get(_key(i), out) and np.array_equal(out, _data(i)) for i in range(14)]
        assert all(g in (0, True) for g in got)  # a miss or its own bytes, nothing else
        assert got.count(0) >= 13 and r.usage()["peer_corrupt"] >= 13
    finally:
        r.close()
        w.close()


def test_budget_and_lru_eviction(mount):
    s = _open(mount, size_gb=0.002)  # 2 MB: 7 slabs of 256 KiB
    assert s.slab_size == 256 << 10 and s.n_slabs == 7
    for i in range(30):
        assert s.put(_key(i), _data(i, 100_000))  # 128 KiB slots: 14 fit
        if i == 13:
            s.flush(5)
            out = np.zeros(100_000, dtype=np.uint8)
            assert s.get(_key(0), out) == 100_000  # key 0 becomes the most recently used
        if i == 14:
            s.flush(5)  # the first eviction took key 1, the least recently used, not key 0
            assert s.contains([_key(0)]) == 1 and s.contains([_key(1)]) == 0
        if i % 3 == 2:
            s.flush(5)
    s.flush(5)
    u = s.usage()
    data = sum(f.stat().st_size for f in Path(s.path).glob("data-*.bin"))
    assert data <= 2_000_000 and u["bytes"] <= 2_000_000
    assert u["files"] == 14 and u["evictions"] == 16 and u["write_errors"] == 0
    assert s.keys() == [_key(i) for i in range(16, 30)]  # the 14 most recent
    assert not s.put(_key(99), np.zeros(300_000, dtype=np.uint8))  # larger than a slab
    assert s.usage()["too_large"] == 1
    s.close()


def test_a_new_size_class_evicts_one_slab_not_the_store(mount):
    """A value of a size class without a slab empties the slab of the least recently used value
    (evicting LRU values until some slab happened to empty took up to the whole store); where the
    least recently used value has the new value's size it alone goes; and a size's slab goes back
    to another once its values are the oldest."""
    s = _open(mount, size_gb=0.002)  # 7 slabs of 256 KiB, 2 slots of 128 KiB each
    out = np.zeros(100_000, dtype=np.uint8)
    try:
        for i in range(14):
            assert s.put(_key(i), _data(i))
        assert s.flush(5) and s.usage()["evictions"] == 0
        slab_of = {k: e.slab for k, e in s._index.items()}
        partner = next(k for k in slab_of if k != _key(0) and slab_of[k] == slab_of[_key(0)])
        others = sorted((k for k in slab_of if k not in (_key(0), partner)), key=slab_of.get)
        for k in others[0::2] + others[1::2] + [partner]:  # LRU: key 0, one of each other slab, ...
            assert s.get(k, out) == 100_000
        assert s.put(_key(50), _data(50, 20_000))  # 32 KiB slots: no slab of that class
        assert s.flush(5)
        assert s.usage()["evictions"] == 2  # key 0 and its partner; before: 8 (key 0, one of each, ...)
        assert s.contains([_key(50)]) == 1 and s.contains([_key(0)]) == 0 and s.contains([partner]) == 0
        assert len(s.keys()) == 13
        assert s.put(_key(51), _data(51, 20_000)) and s.put(_key(52), _data(52))  # a free slot; LRU of 128 KiB
        assert s.flush(5) and s.usage()["evictions"] == 3
        assert s.contains([_key(50)]) == 1 and s.contains([_key(51)]) == 1 and len(s.keys()) == 14
        assert s.get(_key(50), np.zeros(20_000, dtype=np.uint8)) == 20_000
        for i in range(12):  # the 11 older 128 KiB values go one by one, then the 32 KiB slab whole
            assert s.put(_key(60 + i), _data(60 + i))
            assert s.flush(5)
        assert s.usage()["evictions"] == 3 + 11 + 2
        assert s.contains([_key(50)]) == 0 and s.contains([_key(51)]) == 0 and s.contains([_key(52)]) == 1
        assert len(s.keys()) == 13  # all 128 KiB again: 7 slabs of 2 slots, one still free
    finally:
        s.close()


def test_contains_prefix(store):
    for i in (0, 1, 3):
        store.put(_key(i), _data(i, 1000))
    keys = [_key(i) for i in range(5)]
    assert store.contains(keys) == 2
    store.flush(5)
    assert store.contains(keys) == 2 and store.contains(keys[3:]) == 1
    assert store.contains([]) == 0 and store.contains([_key(9)] + keys) == 0


def test_enospc_write_is_dropped_and_counted(store):
    calls = {"n": 0}

    def full(fd, off, length, read):
        if not read:
            calls["n"] += 1
            if calls["n"] == 1:
                return errno.ENOSPC
        return None

    emu.FAULT = full
    assert store.put(_key(1), _data(1))
    assert store.flush(5)
    u = store.usage()
    assert u["write_errors"] == 1 and u["files"] == 0 and u["bytes"] == 0
    out = np.zeros(100_000, dtype=np.uint8)
    assert store.get(_key(1), out) == 0 and store.contains([_key(1)]) == 0
    assert store.put(_key(2), _data(2)) and store.flush(5)
    assert store.get(_key(2), out) == 100_000 and np.array_equal(out, _data(2))


def test_read_error_is_a_miss(store):
    store.put(_key(1), _data(1))
    store.flush(5)
    emu.FAULT = lambda fd, off, n, read: errno.EIO if read else None
    out = np.zeros(100_000, dtype=np.uint8)
    assert store.get(_key(1), out) == 0 and store.usage()["read_errors"] == 1
    emu.FAULT = None
    assert store.get(_key(1), out) == 100_000  # still indexed: the value was not lost


def test_concurrent_puts_and_gets(mount):
    s = _open(mount, size_gb=0.004)
    errors: list[str] = []

    def writer(lo):
        for i in range(lo, lo + 20):
            s.put(_key(i), _data(i, 50_000))

    def reader():
        out = np.zeros(50_000, dtype=np.uint8)
        for _ in range(200):
            for i in range(40):
                n = s.get(_key(i), out)
                if n and not np.array_equal(out, _data(i, 50_000)):
                    errors.append(f"key {i}: wrong bytes")

    ts = [threading.Thread(target=writer, args=(0,)), threading.Thread(target=writer, args=(20,)),
          threading.Thread(target=reader)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert s.flush(10) and not errors
    s.close()


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,allowed", [
    ("iov_size_mb", 50, "100..2048"),
    ("ior_entries", 2000, "128..1024"),
    ("io_threads", 1, "2..16"),
    ("io_depth", 200, "-128..128"),
])
def test_config_ranges(key, value, allowed):
    with pytest.raises(ConfigError, match=f"store.hf3fs.{key}: {value} is out of range; allowed {allowed}"):
        load(StoreConfig, {"backend": "hf3fs", "hf3fs": {key: value}}, "store.")
    cfg = load(StoreConfig, {"backend": "hf3fs", "hf3fs": {"iov_size_mb": 100, "base_paths": ["a"]}})
    assert cfg.hf3fs.iov_size_mb == 100 and cfg.hf3fs.ior_entries == 256 and cfg.hf3fs.io_depth == 0


def test_missing_module_message(mount, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_hf3fs(name, *a, **kw):
        if name.startswith("hf3fs_fuse") or name.startswith("hf3fs_py_usrbio"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_hf3fs)
    with pytest.raises(ValueError) as ei:
        make_store(_cfg(mount))
    assert str(ei.value) == MISSING_MODULE
    assert "hf3fs_py_usrbio" in MISSING_MODULE and "backend local" in MISSING_MODULE


def test_bad_hf3fs_configuration(mount, tmp_path):
    with pytest.raises(ValueError, match="io_depth"):
        Hf3fsStore(StoreConfig(backend="hf3fs", hf3fs=Hf3fsConfig(mount_point=str(mount), io_depth=8)), io=emu)
    with pytest.raises(ValueError, match="not on a 3FS mount"):
        Hf3fsStore(StoreConfig(backend="hf3fs", hf3fs=Hf3fsConfig(base_paths=[str(tmp_path / "x")])), io=emu)
    with pytest.raises(ValueError, match="1 MiB"):
        _open(mount, size_gb=0.001)
    # mount point found from an absolute base path
    s = Hf3fsStore(StoreConfig(backend="hf3fs", size_gb=0.01, paths=[f"file://{mount}/p"],
                               hf3fs=Hf3fsConfig(iov_size_mb=100, io_threads=2)), io=emu)
    assert s.mount_point == str(mount) and s.path == str(mount / "p" / "dev0" / W0)
    s.close()


def test_value_larger_than_a_writer_area_is_written_in_pieces(mount):
    s = _open(mount, size_gb=0.15)  # 100 MB iovec, 2 writers: 25 MB write areas, 32 MiB slabs
    try:
        assert s.write_area < 30_000_000 < s.max_value
        big = _data(7, 30_000_000)
        assert s.put(_key(7), big) and s.put(_key(8), _data(8)) and s.flush(30)
        out = np.zeros(30_000_000, dtype=np.uint8)
        assert s.get(_key(7), out) == 30_000_000 and np.array_equal(out, big)
        assert s.usage()["write_errors"] == 0 and s.usage()["writes"] == 2
    finally:
        s.close()
    s = _open(mount, size_gb=0.15)  # and it is whole after a restart
    try:
        out = np.zeros(30_000_000, dtype=np.uint8)
        assert s.get(_key(7), out) == 30_000_000 and np.array_equal(out, _data(7, 30_000_000))
    finally:
        s.close()
