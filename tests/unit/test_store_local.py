"""LocalStore: real files on the local disk (ext4), no mocks of the filesystem except ENOSPC
and an O_DIRECT refusal."""
from __future__ import annotations

import errno
import importlib.util
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import round_trip

from store import KVStore, fileio, local, local_files, local_format, make_store
from store.config import StoreConfig
from store.local import LocalStore
from store.local_files import ChunkFiles
from store.local_format import MAGIC, TMP_PREFIX, key_to_relpath

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NS = "model-0123456789abcdef"


def _writer_module():
    spec = importlib.util.spec_from_file_location("store_crash_writer", HERE / "store_crash_writer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def disk(tmp_path) -> Path:
    """A directory on a real disk filesystem (not tmpfs), as the store is meant to use."""
    out = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True)
    base = tmp_path if "tmpfs" not in out.stdout else ROOT / ".pytest-store" / tmp_path.name
    base.mkdir(parents=True, exist_ok=True)
    return base


def _cfg(*paths, **kw) -> StoreConfig:
    kw.setdefault("size_gb", 0.1)
    return StoreConfig(backend="local", paths=[str(p) for p in paths], **kw)


def _key(i: int, ns: str = NS, rank: int = 0) -> str:
    return f"{ns}/{rank}/{i:032x}"


def _data(i: int, n: int = 100_000) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(disk):
    s = LocalStore(_cfg(disk))
    yield s
    s.close()


class _Gate:
    """Holds the store's write threads until released (to observe the queue)."""

    def __init__(self, monkeypatch):
        self.event = threading.Event()
        real = ChunkFiles.write

        def slow(files_self, item, full):
            self.event.wait(10)
            return real(files_self, item, full)

        monkeypatch.setattr(ChunkFiles, "write", slow)


# -- basics -----------------------------------------------------------------------------
@pytest.mark.parametrize("o_direct", [False, True])
def test_round_trip(disk, o_direct):
    s = LocalStore(_cfg(disk, o_direct=o_direct))
    assert isinstance(s, KVStore)
    sizes = round_trip(s, _key, _data)
    u = s.usage()
    assert u["files"] == len(sizes) and u["writes"] == len(sizes) and u["hits"] == len(sizes)
    assert u["odirect_fallbacks"] == 0 and u["o_direct"] == o_direct
    files = _files(disk)
    assert len(files) == len(sizes) and u["bytes"] == sum(f.stat().st_size for f in files)
    assert all(f.read_bytes()[:8] == MAGIC for f in files)
    if o_direct:
        assert all(f.stat().st_size % 4096 == 0 for f in files)
    # one sub-directory per namespace+rank, file = hexhash.kv
    assert (disk / f"{NS}+0" / f"{0:032x}.kv").is_file()
    s.close()


def test_odirect_refused_falls_back_once(disk, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    s = LocalStore(_cfg(disk, o_direct=True))
    for i in range(3):
        assert s.put(_key(i), _data(i))
    assert s.flush(10)
    out = np.zeros(100_000, dtype=np.uint8)
    for i in range(3):
        assert s.get(_key(i), out) == 100_000 and np.array_equal(out, _data(i))
    assert s.usage()["odirect_fallbacks"] == 1 and s.usage()["o_direct"] is False
    s.close()


def test_miss_and_too_small_buffer(store):
    out = np.zeros(100, dtype=np.uint8)
    assert store.get(_key(1), out) == 0
    assert store.put(_key(2), _data(2, 1000)) and store.flush(5)
    assert store.get(_key(2), out) == 0  # stored value longer than the buffer: a miss
    assert store.usage()["misses"] == 2 and store.usage()["corrupt"] == 0
    big = np.zeros(1000, dtype=np.uint8)
    assert store.get(_key(2), big) == 1000  # still there, not deleted
    with pytest.raises(ValueError):
        store.get(_key(2), b"x" * 2000)  # read-only destination


def test_duplicate_put_is_skipped(store):
    assert store.put(_key(1), _data(1)) and store.flush(5)
    assert store.put(_key(1), _data(1)) and store.flush(5)
    assert store.usage()["duplicates"] == 1 and store.usage()["writes"] == 1


def test_delete(store):
    for i in range(3):
        store.put(_key(i), _data(i))
    store.flush(5)
    assert store.delete([_key(0), _key(1), _key(9)]) == 2
    assert store.contains([_key(0)]) == 0 and store.contains([_key(2)]) == 1
    u = store.usage()
    assert u["files"] == 1 and u["deletes"] == 2


# -- integrity ---------------------------------------------------------------------------
def _stored_file(s: LocalStore, key: str) -> Path:
    return Path(s.path) / key_to_relpath(key)


@pytest.mark.parametrize("o_direct", [False, True])
def test_corrupt_file_is_a_miss_and_deleted(disk, o_direct):
    s = LocalStore(_cfg(disk, o_direct=o_direct))
    s.put(_key(1), _data(1))
    s.flush(5)
    f = _stored_file(s, _key(1))
    raw = bytearray(f.read_bytes())
    raw[5000] ^= 0x40  # one bit of the payload
    f.write_bytes(raw)
    out = np.zeros(100_000, dtype=np.uint8)
    assert s.get(_key(1), out) == 0
    assert not f.exists() and s.usage()["corrupt"] == 1
    assert s.contains([_key(1)]) == 0 and s.usage()["files"] == 0 and s.usage()["bytes"] == 0
    s.close()


def test_truncated_and_mismatched_files_are_misses(store):
    for i in range(3):
        store.put(_key(i), _data(i))
    store.flush(5)
    f0, f1, f2 = (_stored_file(store, _key(i)) for i in range(3))
    with open(f0, "r+b") as fh:
        fh.truncate(f0.stat().st_size - 100)
    f2.write_bytes(f1.read_bytes())  # another key's (valid) chunk under key 2's name
    f1.write_bytes(b"")
    out = np.zeros(100_000, dtype=np.uint8)
    assert [store.get(_key(i), out) for i in range(3)] == [0, 0, 0]
    assert not f0.exists() and not f1.exists() and not f2.exists()
    assert store.usage()["corrupt"] == 3


# -- restart -----------------------------------------------------------------------------
def test_restart_finds_chunks_and_removes_leftovers(disk):
    s = LocalStore(_cfg(disk))
    for i in range(5):
        s.put(_key(i), _data(i))
    s.flush(5)
    s.close()
    sub = disk / f"{NS}+0"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (sub / f"{TMP_PREFIX}{dead.pid}-0").write_bytes(b"half a chunk")  # a crashed writer's
    (sub / "deadbeef.kv").write_bytes(b"not a store file")  # garbage with our suffix
    (disk / "README.txt").write_text("not ours")  # left alone
    s2 = LocalStore(_cfg(disk))
    u = s2.usage()
    assert u["files"] == 5 and u["recovered"] == 5 and u["temp_removed"] == 1 and u["corrupt"] == 1
    assert sorted(s2.keys()) == sorted(_key(i) for i in range(5))
    assert not (sub / f"{TMP_PREFIX}{dead.pid}-0").exists() and not (sub / "deadbeef.kv").exists()
    assert (disk / "README.txt").exists()
    assert u["bytes"] == sum(f.stat().st_size for f in sub.iterdir())
    out = np.zeros(100_000, dtype=np.uint8)
    for i in range(5):
        assert s2.get(_key(i), out) == 100_000 and np.array_equal(out, _data(i))
    s2.close()


def test_second_process_view_adopts_new_files(disk):
    reader = LocalStore(_cfg(disk))  # e.g. decode, started before prefill wrote
    writer = LocalStore(_cfg(disk))
    writer.put(_key(1), _data(1))
    writer.flush(5)
    assert reader.contains([_key(1), _key(2)]) == 1
    out = np.zeros(100_000, dtype=np.uint8)
    assert reader.get(_key(1), out) == 100_000 and np.array_equal(out, _data(1))
    assert reader.usage()["adopted"] == 1 and reader.usage()["files"] == 1
    reader.close()
    writer.close()


# -- budget and eviction -----------------------------------------------------------------
def test_budget_is_kept(disk):
    s = LocalStore(_cfg(disk, size_gb=0.002, write_threads=2))  # 2 MB
    for i in range(30):
        assert s.put(_key(i), _data(i, 300_000))
        if i % 3 == 2:
            s.flush(5)
    s.flush(5)
    u = s.usage()
    on_disk = sum(f.stat().st_size for f in _files(disk))
    assert u["bytes"] == on_disk <= 2_000_000
    assert u["files"] == 6 and u["evictions"] == 24
    assert s.contains([_key(29)]) == 1
    # larger than the whole budget: refused at once
    assert not s.put(_key(99), np.zeros(2_100_000, dtype=np.uint8))
    assert s.usage()["too_large"] == 1 and s.usage()["dropped"] == 1
    s.close()


def _fill4(s: LocalStore) -> None:
    for i in range(4):
        s.put(_key(i), _data(i, 450_000))
        s.flush(5)


def _present(s: LocalStore, n: int = 6) -> list[int]:
    return [i for i in range(n) if s.contains([_key(i)])]


@pytest.mark.parametrize("policy,touch,evicted", [
    ("lru", [0], 1),            # a get refreshes key 0: key 1 is the least recently used
    ("fifo", [0, 0, 0], 0),     # hits do not matter: the first in goes first
    ("lfu", [1, 1, 0, 3], 2),   # key 2 has no hits
])
def test_eviction_order(disk, policy, touch, evicted):
    s = LocalStore(_cfg(disk, size_gb=0.002, eviction=policy))  # 4 chunks of 450 KB fit
    _fill4(s)
    out = np.zeros(450_000, dtype=np.uint8)
    for i in touch:
        assert s.get(_key(i), out) == 450_000
    s.put(_key(4), _data(4, 450_000))
    s.flush(5)
    assert _present(s) == sorted({0, 1, 2, 3, 4} - {evicted})
    assert s.usage()["evictions"] == 1
    s.close()


def test_lru_order_survives_restart(disk):
    s = LocalStore(_cfg(disk, size_gb=0.002))
    _fill4(s)
    s.close()
    s2 = LocalStore(_cfg(disk, size_gb=0.002))  # order from file times: key 0 is the oldest
    s2.put(_key(4), _data(4, 450_000))
    s2.flush(5)
    assert _present(s2) == [1, 2, 3, 4]
    s2.close()


# -- prefix, sharding, configuration -----------------------------------------------------
def test_contains_prefix(store):
    for i in (0, 1, 3):
        store.put(_key(i), _data(i, 1000))
    keys = [_key(i) for i in range(5)]
    assert store.contains(keys) == 2  # queued puts count
    store.flush(5)
    assert store.contains(keys) == 2
    assert store.contains(keys[3:]) == 1
    assert store.contains([]) == 0
    assert store.contains([_key(9)] + keys) == 0


def test_sharding_by_device_index(disk):
    p0, p1 = disk / "nvme0", disk / "nvme1"
    p0.mkdir()
    p1.mkdir()
    cfg = _cfg(f"file://{p0}", f"file://{p1}", size_gb=0.01)
    stores = [LocalStore(cfg, device_index=d) for d in range(3)]
    assert [s.path for s in stores] == [str(p0), str(p1), str(p0)]
    assert all(s.budget == 5_000_000 for s in stores)  # one total budget over two paths
    stores[1].put(_key(1, rank=1), _data(1))
    stores[1].flush(5)
    assert [f.parent.name for f in _files(p1)] == [f"{NS}+1"] and not _files(p0)
    for s in stores:
        s.close()


def test_missing_directory_is_made_owner_only(disk):
    s = LocalStore(_cfg(disk / "new" / "kv"))
    assert (disk / "new" / "kv").is_dir() and (disk / "new" / "kv").stat().st_mode & 0o777 == 0o700
    s.put(_key(1), _data(1))
    s.flush(5)
    (f,) = _files(disk / "new" / "kv")
    assert f.stat().st_mode & 0o777 == 0o600 and f.parent.stat().st_mode & 0o777 == 0o700
    s.close()
    ro = disk / "ro"
    ro.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere
        with pytest.raises(ValueError, match="cannot be made"):
            LocalStore(_cfg(ro / "kv"))


def test_two_stores_in_one_process_never_share_temp_names(disk):
    """Two writers on one directory in one process (two instances, or a restarted one) write
    their temporary files under distinct names: no put is lost to a collision."""
    a, b = LocalStore(_cfg(disk, write_threads=2)), LocalStore(_cfg(disk, write_threads=2))
    for i in range(40):
        a.put(_key(i), _data(i, 50_000))
        b.put(_key(1000 + i), _data(1000 + i, 50_000))
    a.flush(10)
    b.flush(10)
    assert a.usage()["write_errors"] == b.usage()["write_errors"] == 0
    assert a.contains([_key(i) for i in range(40)]) == 40
    assert b.contains([_key(1000 + i) for i in range(40)]) == 40
    assert not [f for f in disk.rglob(".tmp-*")]
    a.close()
    b.close()


def test_writers_share_one_budget(disk):
    """``writers`` processes on one path keep together to the path's share of ``size_gb``."""
    stores = [LocalStore(_cfg(disk, size_gb=0.004, writers=2)) for _ in range(2)]
    assert [s.budget for s in stores] == [2_000_000, 2_000_000]
    for i in range(20):
        for j, s in enumerate(stores):
            s.put(_key(100 * j + i), _data(100 * j + i, 300_000))
            s.flush(5)
    on_disk = sum(f.stat().st_size for f in _files(disk))
    assert 3_000_000 < on_disk <= 4_000_000
    for s in stores:
        s.close()
    with pytest.raises(ValueError, match="per writer"):
        LocalStore(_cfg(disk, size_gb=0.004, writers=8))


def test_bad_configuration(disk):
    f = disk / "a-file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        LocalStore(_cfg(f))
    with pytest.raises(ValueError, match="at least one directory"):
        LocalStore(StoreConfig(backend="local", paths=[]))
    with pytest.raises(ValueError, match="1 MiB"):
        LocalStore(_cfg(disk, size_gb=0.001))
    assert make_store(StoreConfig()) is None
    with pytest.raises(ValueError, match="needs hf3fs_py_usrbio.*backend local"):
        make_store(StoreConfig(backend="hf3fs", paths=[str(disk)]))
    s = make_store(_cfg(disk))
    assert isinstance(s, LocalStore)
    s.close()


def test_not_writable_directory(disk):
    ro = disk / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0500
    try:
        if not os.access(ro, os.W_OK):
            with pytest.raises(ValueError, match="not writable"):
                LocalStore(_cfg(ro))
            return
    finally:
        ro.chmod(0o700)
    # Root writes a 0500 directory anyway: use a read-only bind mount instead, if allowed.
    src, mnt = disk / "ro-src", disk / "ro-mnt"
    src.mkdir()
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode:
        pytest.skip("running as root (a 0500 directory is writable) and bind mounts are not allowed")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True).returncode:
            pytest.skip("running as root and read-only remounts are not allowed")
        with pytest.raises(ValueError, match="not writable"):
            LocalStore(_cfg(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# -- failures ----------------------------------------------------------------------------
def test_enospc_drops_the_put_and_serving_goes_on(store, monkeypatch):
    real = local_files.write_all
    calls = {"n": 0}

    def full_disk(fd, bufs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.write(fd, b"partial")  # some bytes made it before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(local_files, "write_all", full_disk)
    assert store.put(_key(1), _data(1))  # accepted: the failure happens later, in the writer
    assert store.flush(5)
    u = store.usage()
    assert u["write_errors"] == 1 and u["files"] == 0 and u["bytes"] == 0
    assert not _files(Path(store.path))  # the temp file is gone
    out = np.zeros(100_000, dtype=np.uint8)
    assert store.get(_key(1), out) == 0 and store.contains([_key(1)]) == 0
    assert store.put(_key(2), _data(2)) and store.flush(5)
    assert store.get(_key(2), out) == 100_000 and np.array_equal(out, _data(2))


def test_concurrent_puts_and_gets(disk):
    s = LocalStore(_cfg(disk, size_gb=0.004, write_threads=2))
    errors: list[str] = []

    def worker(t: int) -> None:
        out = np.zeros(50_000, dtype=np.uint8)
        for i in range(60):
            k = t * 1000 + i
            s.put(_key(k), _data(k, 50_000))
            j = t * 1000 + i // 2
            n = s.get(_key(j), out)
            if n and not np.array_equal(out[:n], _data(j, 50_000)):
                errors.append(f"wrong bytes for {j}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.flush(10)
    assert not errors
    u = s.usage()
    assert u["bytes"] == sum(f.stat().st_size for f in _files(disk)) <= 4_000_000
    assert u["corrupt"] == 0
    s.close()


# -- crash safety ------------------------------------------------------------------------
@pytest.mark.parametrize("o_direct", [False, True])
def test_crash_mid_write_leaves_only_whole_chunks(disk, o_direct):
    w = _writer_module()
    progress = w.run_until_killed([str(disk), "1" if o_direct else "0"], 60)
    assert progress >= 60, "writer made no progress"
    s = LocalStore(_cfg(disk, size_gb=0.025))
    keys = s.keys()
    assert len(keys) >= 5
    for key in keys:
        want = w.content(key)
        out = np.zeros(len(want), dtype=np.uint8)
        assert s.get(key, out) == len(want), key
        assert out.tobytes() == want, key
    names = [f.name for f in _files(disk)]
    assert not [n for n in names if n.startswith(TMP_PREFIX)]
    assert len(names) == len(keys)
    u = s.usage()
    assert u["corrupt"] == 0 and u["misses"] == 0
    print("crash: recovered", u["recovered"], "temp files removed", u["temp_removed"])
    assert u["bytes"] == sum(f.stat().st_size for f in _files(disk))
    s.close()


# -- staging buffers and O_DIRECT reads ----------------------------------------------------
def _aligned_buf(n: int, shift: int = 0) -> memoryview:
    """A writable view of ``n`` bytes at ``shift`` bytes past a page boundary."""
    import mmap
    m = mmap.mmap(-1, n + shift + 4096)
    return memoryview(m)[shift:shift + n]


@pytest.mark.parametrize("o_direct", [False, True])
def test_staging_buffers_are_reused(disk, o_direct):
    s = LocalStore(_cfg(disk, o_direct=o_direct))
    for i in range(6):
        assert s.put(_key(i), _data(i))
        assert s.flush(5)  # one buffer at a time: each put reuses the previous one
    pool = s._pool
    assert pool.allocated == 1 and pool.reused == 5 and pool.free_bytes() > 0
    out = np.zeros(100_000, dtype=np.uint8)
    for i in range(6):  # a reused buffer held the previous chunk: nothing of it may leak
        assert s.get(_key(i), out) == 100_000 and np.array_equal(out, _data(i))
    if o_direct:  # the padding of every file is zeros although the buffers were reused
        for i in range(6):
            raw = _stored_file(s, _key(i)).read_bytes()
            klen = len(_key(i).encode())
            assert raw[32 + klen:4096] == bytes(4096 - 32 - klen)
            assert raw[4096 + 100_000:] == bytes(len(raw) - 4096 - 100_000)
    s.close()


def test_buffer_pool_keeps_at_most_cap_and_prefers_the_new_size():
    pool = fileio.BufPool(cap=5 * 4096)
    a, b = pool.get(4096), pool.get(4096)
    big = pool.get(3 * 4096 - 5)
    assert len(big) == 3 * 4096 and len(a) == 4096
    for buf in (a, b, big):
        pool.put(buf)
    assert pool.free_bytes() == 5 * 4096
    assert pool.get(4096) in (a, b) and pool.reused == 1
    c = pool.get(2 * 4096)  # a new size: room is made by dropping the other sizes' free buffers
    pool.put(c)
    assert pool.free_bytes() <= 5 * 4096 and pool.get(2 * 4096) is c
    d = pool.get(6 * 4096)  # larger than the cap: never kept
    pool.put(d)
    assert pool.free_bytes() <= 5 * 4096 and pool.get(6 * 4096) is not d


@pytest.mark.parametrize("n,shift,room", [
    (1 << 20, 0, 0),          # page aligned, whole pages: all straight into the buffer
    (100_000, 0, 0),          # page aligned, the last partial page staged and copied
    (100_000, 0, 8192),       # page aligned with room for the padding: all into the buffer
    (1 << 20, 1, 0),          # not aligned: staged, then copied
    (1 << 20, 512, 100),      # 512-aligned only: staged, then copied
])
def test_odirect_read_into_caller_buffer(disk, monkeypatch, n, shift, room):
    s = LocalStore(_cfg(disk, o_direct=True))
    assert s.put(_key(1), _data(1, n)) and s.flush(5)
    staged = []
    real = ChunkFiles._read_staged

    def spy(self, *a):
        staged.append(a[0])
        return real(self, *a)

    monkeypatch.setattr(ChunkFiles, "_read_staged", spy)
    out = _aligned_buf(n + room, shift)
    out[:] = b"\xee" * len(out)
    assert s.get(_key(1), out) == n
    assert np.array_equal(np.frombuffer(out[:n], np.uint8), _data(1, n))
    assert staged == ([] if shift == 0 else [_key(1)])
    # a caller buffer too small is a miss that keeps the file
    small = _aligned_buf(n - 4096 if n > 8192 else 4096)
    assert s.get(_key(1), small) == 0 and _stored_file(s, _key(1)).exists()
    assert s.usage()["corrupt"] == 0
    s.close()


@pytest.mark.parametrize("o_direct", [False, True])
def test_older_padded_layout_is_still_read(disk, o_direct):
    """Files of the O_DIRECT layout before FLAG_ALIGNED: header, key, payload, padding."""
    import xxhash
    key, data = _key(3), _data(3).tobytes()
    kb = key.encode()
    hdr = local_format.HEADER.pack(MAGIC, local_format.VERSION, len(kb), local_format.FLAG_PADDED,
                                   len(data), xxhash.xxh3_64_intdigest(data))
    raw = hdr + kb + data
    raw += bytes(-len(raw) % 4096)
    f = disk / key_to_relpath(key)
    f.parent.mkdir(parents=True)
    f.write_bytes(raw)
    s = LocalStore(_cfg(disk, o_direct=o_direct))
    assert s.usage()["recovered"] == 1
    for out in (np.zeros(100_000, dtype=np.uint8), _aligned_buf(1 << 20)):
        assert s.get(key, out) == 100_000 and bytes(memoryview(out)[:100_000]) == data
    assert s.usage()["corrupt"] == 0 and s.usage()["hits"] == 2
    s.close()


def test_odirect_and_buffered_read_each_others_files(disk):
    a = LocalStore(_cfg(disk, o_direct=True))
    assert a.put(_key(1), _data(1)) and a.flush(5)
    a.close()
    b = LocalStore(_cfg(disk, o_direct=False))
    assert b.put(_key(2), _data(2)) and b.flush(5)
    out = np.zeros(100_000, dtype=np.uint8)
    assert b.get(_key(1), out) == 100_000 and np.array_equal(out, _data(1))
    b.close()
    c = LocalStore(_cfg(disk, o_direct=True))
    for i in (1, 2):
        for buf in (out, _aligned_buf(1 << 20)):
            assert c.get(_key(i), buf) == 100_000
            assert np.array_equal(np.frombuffer(buf[:100_000], np.uint8), _data(i))
    assert c.usage()["corrupt"] == 0
    c.close()


def test_queue_hit_keeps_its_buffer_until_copied(disk, monkeypatch):
    """A get copying from a queued put's buffer while the write finishes: the buffer must not
    go back to the pool (and be refilled by the next put) before the copy is done."""
    gate = _Gate(monkeypatch)
    s = LocalStore(_cfg(disk))
    in_get, go_on = threading.Event(), threading.Event()
    real_payload = local._Item.payload

    def slow_payload(item):
        in_get.set()
        go_on.wait(10)
        return real_payload(item)

    monkeypatch.setattr(local._Item, "payload", slow_payload)
    assert s.put(_key(1), _data(1))
    out = np.zeros(100_000, dtype=np.uint8)
    got = []
    t = threading.Thread(target=lambda: got.append(s.get(_key(1), out)))
    t.start()
    assert in_get.wait(10)
    gate.event.set()
    assert s.flush(10)  # key 1 is written; its buffer is still held by the get
    assert s.put(_key(2), np.full(100_000, 7, dtype=np.uint8)) and s.flush(10)
    assert s._pool.reused == 0  # key 2 got a buffer of its own
    go_on.set()
    t.join(10)
    assert got == [100_000] and np.array_equal(out, _data(1))
    assert s.usage()["queue_hits"] == 1
    assert s.put(_key(3), _data(3)) and s.flush(10)
    assert s._pool.reused == 1  # ... and the released one is reused afterwards
    s.close()


def test_key_to_relpath_mapping():
    cases = {
        "model-1/0/abc": "model-1+0/abc.kv",         # the usual key (fast path)
        "a/b/.c/d": "a+b+.c/d.kv",
        ".hidden/0/x": "%2Ehidden+0/x.kv",             # a leading "." is escaped
        "a/.b": "a/%2Eb.kv",
        "a+b/c": "a%2Bb/c.kv",                        # "+" is escaped: "/" -> "+" stays injective
        "a b/c%": "a%20b/c%25.kv",
        "x/": "x/%e.kv",
        "/y": "%e/y.kv",
        "flat": "%flat/flat.kv",
        "ns/é": "ns/%C3%A9.kv",
    }
    for key, want in cases.items():
        assert key_to_relpath(key) == want, key
    long = key_to_relpath("n/" + "a" * 300)
    name = long.split("/")[1]
    assert long.startswith("n/") and len(name) == local_format._MAX_NAME + len(".kv") and "#" in name
    assert key_to_relpath("n/" + "a" * 300) != key_to_relpath("n/" + "a" * 301)


@pytest.mark.parametrize("read_threads", [1, 4])
@pytest.mark.parametrize("piece,room", [(8192, 0), (8192, 5), (4096 * 3 + 1, 0), (50_000, 0)])
def test_buffered_read_in_pieces_hashed_alongside(disk, monkeypatch, piece, room, read_threads):
    """A large buffered read goes piece by piece (pieces made tiny here), hashed by the helper
    thread (one reader) or by the reader itself (several); the result and the corruption check
    are the same as in one piece."""
    monkeypatch.setattr(local_files, "READ_PIECE", piece)
    if read_threads > 1:  # several readers never hand pieces to the shared hashing thread

        def no_hasher():
            raise AssertionError("the shared hashing thread was used with several readers")

        monkeypatch.setattr(local_files, "hasher", no_hasher)
    s = LocalStore(_cfg(disk, read_threads=read_threads))
    assert s._files.inline_hash == (read_threads > 1)
    for i in range(3):
        assert s.put(_key(i), _data(i)) and s.flush(5)
    out = _aligned_buf(100_000 + room)
    for i in range(3):
        out[:] = b"\xee" * len(out)
        assert s.get(_key(i), out) == 100_000
        assert np.array_equal(np.frombuffer(out[:100_000], np.uint8), _data(i))
    f = _stored_file(s, _key(1))
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1  # a bit in a middle piece
    f.write_bytes(raw)
    assert s.get(_key(1), out) == 0 and not f.exists() and s.usage()["corrupt"] == 1
    assert s.get(_key(2), out) == 100_000  # the helper thread is still there
    s.close()


@pytest.mark.parametrize("o_direct", [False, True])
def test_reused_buffers_under_concurrent_puts_gets_deletes(disk, o_direct):
    """Staging buffers go round the pool while other threads put, get (also from the queue) and
    delete: every hit must still return the bytes put under that key."""
    import random

    s = LocalStore(_cfg(disk, o_direct=o_direct, size_gb=0.004, queue_mb=1, write_threads=2))

    def data(i: int) -> np.ndarray:
        return _data(i, 50_000 + (i % 3) * 4096)

    bad: list[int] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        out = np.zeros(70_000, dtype=np.uint8)
        for _ in range(150):
            i = rng.randrange(60)
            if rng.random() < 0.5:
                s.put(_key(i), data(i))
            else:
                n = s.get(_key(i), out)
                if n and not np.array_equal(out[:n], data(i)):
                    bad.append(i)
            if rng.random() < 0.05:
                s.delete([_key(rng.randrange(60))])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert s.flush(10)
    u = s.usage()
    assert not bad and u["corrupt"] == 0 and u["write_errors"] == 0 and u["hits"] > 0
    assert s._pool.reused > 0
    s.close()


def test_read_in_pieces_after_fork(disk, monkeypatch):
    """The hashing thread is per process: a child forked after the parent used it starts its own
    (instead of waiting forever on a thread that fork did not copy)."""
    monkeypatch.setattr(local_files, "READ_PIECE", 8192)
    s = LocalStore(_cfg(disk, read_threads=1))  # one reader: pieces go to the hashing thread
    assert s.put(_key(1), _data(1)) and s.flush(5)
    out = np.zeros(100_000, dtype=np.uint8)
    assert s.get(_key(1), out) == 100_000  # the parent's hashing thread is running now
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if the read in pieces works here too
        ok = False
        try:
            buf = np.zeros(100_000, dtype=np.uint8)
            ok = s.get(_key(1), buf) == 100_000 and np.array_equal(buf, _data(1))
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung reading in pieces")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    s.close()


def test_get_many_is_get_one_by_one(store):
    for i in range(3):
        assert store.put(_key(i), _data(i))
    assert store.flush(5)
    outs = [np.zeros(100_000, dtype=np.uint8) for _ in range(4)]
    assert store.get_many([_key(0), _key(9), _key(2), _key(1)], outs) == [100_000, 0, 100_000, 100_000]
    assert np.array_equal(outs[0], _data(0)) and np.array_equal(outs[3], _data(1))
    assert store.usage()["hits"] == 3 and store.usage()["misses"] == 1
    with pytest.raises(ValueError):
        store.get_many([_key(0)], [])


@pytest.mark.parametrize("o_direct", [False, True])
def test_a_file_replaced_while_read_gives_its_key_or_a_miss_never_another(disk, o_direct, monkeypatch):
    """Issue 17's review of store/local: a value's file replaced (renamed over) by another key's
    while it is read. The read holds the old inode: its own key's bytes. A later read finds the
    other key's chunk under this name: a miss (header names another key), that file removed."""
    s = LocalStore(_cfg(disk, o_direct=o_direct))
    for i in (1, 2):
        s.put(_key(i), _data(i))
    s.flush(5)
    f1 = _stored_file(s, _key(1))
    other = _stored_file(s, _key(2)).read_bytes()

    def swapped_first(real):
        def read(self, key, full, fd, st, out):
            Path(full + ".swap").write_bytes(other)
            os.rename(full + ".swap", full)  # key 2's chunk now under key 1's name
            return real(self, key, full, fd, st, out)
        return read

    monkeypatch.setattr(ChunkFiles, "_read_buffered", swapped_first(ChunkFiles._read_buffered))
    monkeypatch.setattr(ChunkFiles, "_read_direct", swapped_first(ChunkFiles._read_direct))
    out = np.zeros(100_000, dtype=np.uint8)
    assert s.get(_key(1), out) == 100_000 and np.array_equal(out, _data(1))
    monkeypatch.undo()
    out[:] = 0
    assert s.get(_key(1), out) == 0 and not f1.exists()
    assert s.get(_key(2), out) == 100_000 and np.array_equal(out, _data(2))
    s.close()


# ---- issue 18, item 4: directories and files nobody else can plant ------------------------------

def test_a_store_path_others_can_write_is_refused(disk):
    from common.config import ConfigError

    shared = disk / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ConfigError, match=r"store path .*shared is owned by uid \d+ with mode 1777; it must be ours"):
        LocalStore(_cfg(shared))


def test_a_planted_symlink_sub_directory_is_never_written_through(disk):
    s = LocalStore(_cfg(disk))
    elsewhere = disk.parent / f"{disk.name}-elsewhere"
    elsewhere.mkdir(exist_ok=True)
    try:
        target = _stored_file(s, _key(1))
        top = Path(s.path) / os.path.relpath(target, s.path).split(os.sep)[0]
        top.symlink_to(elsewhere, target_is_directory=True)  # planted before the first write under it
        s.put(_key(1), _data(1))
        s.flush(5)
        assert list(elsewhere.rglob("*")) == []  # nothing written where the symlink points
        out = np.zeros(100_000, dtype=np.uint8)
        assert s.get(_key(1), out) == 0
    finally:
        s.close()


def test_a_value_file_planted_by_another_user_or_as_a_symlink_is_a_miss(disk):
    s = LocalStore(_cfg(disk))
    try:
        for i in (1, 2):
            s.put(_key(i), _data(i))
        s.flush(5)
        f1, f2 = _stored_file(s, _key(1)), _stored_file(s, _key(2))
        os.chown(f1, 4321, 4321)  # (root in this container can hand a file to another uid)
        out = np.zeros(100_000, dtype=np.uint8)
        assert s.get(_key(1), out) == 0 and not f1.exists()
        real = disk / "real-value"
        real.write_bytes(f2.read_bytes())
        f2.unlink()
        f2.symlink_to(real)
        assert s.get(_key(2), out) == 0 and not f2.is_symlink() and real.exists()
    finally:
        s.close()


def test_get_many_reads_a_batch_on_the_reader_threads(tmp_path):
    """store.read_threads: the batch's file reads run on the store's reader threads, in order."""
    import threading

    import numpy as np

    from store.config import StoreConfig
    from store.local import LocalStore

    s = LocalStore(StoreConfig(backend="local", paths=[str(tmp_path)], size_gb=0.01, read_threads=2))
    names: set[str] = set()
    get = s.get
    s.get = lambda key, into: names.add(threading.current_thread().name) or get(key, into)
    try:
        data = [np.full(5000 + i, i, dtype=np.uint8) for i in range(5)]
        for i, d in enumerate(data):
            assert s.put(f"ns/0/{i:032x}", d)
        s.flush(10)
        outs = [np.zeros(6000, dtype=np.uint8) for _ in range(6)]
        got = s.get_many([f"ns/0/{i:032x}" for i in (4, 3, 2, 1, 0, 9)], outs)
        assert got == [5004, 5003, 5002, 5001, 5000, 0]
        assert all((out[:n] == 4 - j).all() for j, (out, n) in enumerate(zip(outs[:5], got)))
        assert names and all(n.startswith("pd-store-read") for n in names)
    finally:
        s.close()


def test_reader_threads_finish_every_read_before_an_error_is_raised():
    """store/reads.py: one read failing never leaves another still writing into its buffer."""
    import threading
    import time

    import pytest

    from store.reads import Readers

    r, done = Readers(3, "t-read"), []

    def read(i):
        if i == 0:
            raise OSError("disk gone")
        time.sleep(0.2)
        done.append(i)
        return i

    with pytest.raises(OSError, match="disk gone"):
        r.map(read, [(0,), (1,), (2,)])
    assert sorted(done) == [1, 2]
    r.close()
    assert r.map(read, [(3,), (4,)]) == [3, 4] and threading.current_thread().name == "MainThread"
