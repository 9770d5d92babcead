"""The same behavioural tests for every store backend: store/local, store/hf3fs, and store/local
with the DRAM tier in front (store/tiered.py; its arena in /dev/shm, removed after each test).

store/hf3fs runs on the USRBIO emulator (``tests.doubles.usrbio_emulator``, a test double of
``hf3fs_fuse.io`` over local files, put on the path as ``hf3fs_fuse.io`` from tests/doubles),
built through ``store.make_store`` as an instance builds it. No real 3FS is involved.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from conftest import round_trip

from store import KVStore, make_store
from store.config import Hf3fsConfig, StoreConfig
from store.dram import default_dir
from store.tiered import dram_name
from tests.doubles import usrbio_emulator as emu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NS = "contract-0123456789abcdef"
META = {"index.log", "layout", "lock", "EMULATED"}  # hf3fs bookkeeping, not data


def _writer_module():
    spec = importlib.util.spec_from_file_location("store_crash_writer", HERE / "store_crash_writer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Backend:
    def __init__(self, name: str, root: Path, base: str = "kv", dram_gb: float = 0.0):
        self.name, self.root, self.base, self.dram_gb = name, root, base, dram_gb
        # the crash writer's name of it
        self.label = f"{name}-dram" if dram_gb else name

    def cfg(self, **kw) -> StoreConfig:
        kw.setdefault("size_gb", 0.01)
        kw.setdefault("dram_gb", self.dram_gb)
        if self.name == "local":
            return StoreConfig(backend="local", paths=[str(self.root)], **kw)
        return StoreConfig(backend="hf3fs", paths=[self.base], **kw,
                           hf3fs=Hf3fsConfig(mount_point=str(self.root), iov_size_mb=100, io_threads=2))

    def open(self, writer: bool = True, **kw) -> KVStore:
        return make_store(self.cfg(**kw), 0, writer=writer)

    def cold(self, store: KVStore, keys: list[str]) -> None:
        """Drop these keys from the DRAM tier, if there is one: the next reads go to the disk."""
        if self.dram_gb:
            store.dram.delete(keys)

    def data_files(self) -> list[Path]:
        top = self.root if self.name == "local" else self.root / self.base
        return [p for p in top.rglob("*") if p.is_file() and p.name not in META
                and "3fs-virt" not in p.parts]


#: A real 3FS mount to run the hf3fs tests on instead of the emulator (a user with a cluster:
#: PDKV_3FS_MOUNT=/3fs/stage with hf3fs_py_usrbio importable; each test uses its own directory there).
REAL_3FS = os.environ.get("PDKV_3FS_MOUNT", "")


def _remove_drams(cfgs: list[StoreConfig]) -> None:
    """Remove the DRAM arenas (every size) of these stores from /dev/shm."""
    for cfg in cfgs:
        for p in Path(default_dir()).glob(f"{dram_name(cfg)}-*"):
            p.unlink(missing_ok=True)


@pytest.fixture(params=["local", "local-dram", "hf3fs", "hf3fs-lax"])
def backend(request, tmp_path, monkeypatch) -> Backend:
    """hf3fs: on the strict USRBIO emulator (the binding's rules); hf3fs-lax: the same tests on
    its old, lax behaviour (PDKV_USRBIO_LAX=1), which the store must pass too; local-dram: store/local
    behind a 4 MB DRAM tier."""
    if request.param == "local-dram":
        root = tmp_path / "disk"
        root.mkdir()
        b = Backend("local", root, dram_gb=0.004)
        yield b
        _remove_drams([b.cfg(), _writer_module().crash_config(str(root), b.label)])
        return
    if request.param == "hf3fs-lax":
        if REAL_3FS:
            pytest.skip("a real mount has no lax behaviour")
        monkeypatch.setattr(emu, "STRICT", False)
        monkeypatch.setenv("PDKV_USRBIO_LAX", "1")  # the crash writer's subprocess too
        request.getfixturevalue("usrbio_double")
        yield Backend("hf3fs", Path(emu.emulate_mount(str(tmp_path / "3fs"))))
        emu.forget_mounts()
        return
    if request.param == "hf3fs" and REAL_3FS:
        root = Path(REAL_3FS)
        test_dir = root / "pdkv-contract" / uuid.uuid4().hex[:8]
        test_dir.mkdir(parents=True)
        yield Backend("hf3fs", root, base=str(test_dir.relative_to(root)))
        shutil.rmtree(test_dir, ignore_errors=True)
        return
    if request.param == "hf3fs":
        request.getfixturevalue("usrbio_double")  # hf3fs_fuse.io = the emulator
        root = Path(emu.emulate_mount(str(tmp_path / "3fs")))
    else:
        root = tmp_path / "disk"
        root.mkdir()
    yield Backend(request.param, root)
    emu.forget_mounts()


# The method each backend's writer threads call before their I/O.
WRITE_IO = {"local": ("store.local_files", "ChunkFiles", "write"),
            "hf3fs": ("store.hf3fs", "Hf3fsStore", "_write_batch")}


@pytest.fixture
def gate(backend, monkeypatch) -> threading.Event:
    """Holds the store's writer threads before their I/O until set (the disk "hangs")."""
    mod, cls_name, name = WRITE_IO[backend.name]
    cls = getattr(importlib.import_module(mod), cls_name)
    real, event = getattr(cls, name), threading.Event()

    def held(self, *args, **kw):
        event.wait(10)
        return real(self, *args, **kw)

    monkeypatch.setattr(cls, name, held)
    yield event
    event.set()


@pytest.fixture
def store(backend):
    s = backend.open()
    yield s
    s.close()


def _key(i: int) -> str:
    return f"{NS}/0/{i:032x}"


def _data(i: int, n: int = 100_000) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def _get(s: KVStore, i: int, n: int = 100_000) -> np.ndarray | None:
    out = np.zeros(n, dtype=np.uint8)
    got = s.get(_key(i), out)
    return out[:got] if got else None


def test_round_trip_misses_and_counters(store):
    assert isinstance(store, KVStore)
    sizes = round_trip(store, _key, _data)
    assert _get(store, 99) is None  # unknown key
    assert store.get(_key(3), np.zeros(99_999, dtype=np.uint8)) == 0  # buffer too small: a miss
    with pytest.raises(ValueError, match="read-only"):
        store.get(_key(3), bytes(100_000))
    u = store.usage()
    assert u["hits"] == 5 and u["misses"] == 2 and u["bytes"] >= sum(sizes)


def test_location_and_max_value(store, backend):
    assert store.location.startswith(f"{backend.name}:")
    assert store.max_value > 0
    assert not store.put(_key(1), bytes(store.max_value + 1))  # can never fit: dropped at once
    assert store.usage()["too_large"] == 1 and store.usage()["dropped"] == 1


def test_put_copies_and_is_readable_before_and_after_flush(store):
    src = _data(1)
    assert store.put(_key(1), src)
    src[:] = 0  # the caller reuses its buffer at once
    got = _get(store, 1)
    assert got is not None and np.array_equal(got, _data(1))  # from the queue or the disk
    assert store.flush(10)
    got = _get(store, 1)
    assert got is not None and np.array_equal(got, _data(1))


def test_put_is_asynchronous_and_served_from_the_queue(backend, gate):
    s = backend.open()
    try:
        data = _data(7)
        assert s.put(_key(7), data)
        data[:] = 0  # the caller reuses its buffer at once
        assert s.contains([_key(7)]) == 1
        assert np.array_equal(_get(s, 7), _data(7))  # from the queue: nothing is written yet
        assert not s.flush(0.2) and s.usage()["writes"] == 0
        gate.set()
        assert s.flush(10)
        assert np.array_equal(_get(s, 7), _data(7))
        u = s.usage()
        if backend.dram_gb:  # the DRAM tier in front serves both reads
            assert u["dram_hits"] == 2 and u["queue_hits"] == 0
        else:
            assert u["queue_hits"] == 1
        assert u["writes"] == 1
    finally:
        gate.set()
        s.close()


def test_a_full_queue_drops_puts_without_blocking(backend, gate):
    s = backend.open(queue_mb=1)
    try:
        data = _data(0, 200_000)
        results, worst = [], 0.0
        for i in range(40):
            t0 = time.perf_counter()
            results.append(s.put(_key(i), data))
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 1.0, f"a put blocked for {worst:.3f} s"  # held writers block for 10 s
        accepted = sum(results)
        assert 1 <= accepted <= 5  # 1 MiB of queue / 200 kB per put
        u = s.usage()
        assert u["dropped"] == 40 - accepted == u["queue_full"]
        gate.set()
        assert s.flush(10) and s.usage()["writes"] == accepted
        assert s.put(_key(100), data)  # room again
    finally:
        gate.set()
        s.close()


def test_duplicates_delete_and_prefix_lookup(store):
    for i in range(4):
        assert store.put(_key(i), _data(i))
    assert store.put(_key(2), _data(2))  # a content address: skipped, still True
    assert store.flush(10) and store.usage()["duplicates"] == 1
    assert store.contains([_key(i) for i in range(6)]) == 4
    assert store.contains([_key(9), _key(0)]) == 0
    assert store.delete([_key(2), _key(7)]) == 1
    assert _get(store, 2) is None
    assert store.contains([_key(i) for i in range(4)]) == 2


def test_restart_finds_the_values(backend):
    s = backend.open()
    for i in range(6):
        assert s.put(_key(i), _data(i, 50_000 + i))
    assert s.flush(10)
    s.close()
    s = backend.open()
    try:
        assert s.contains([_key(i) for i in range(7)]) == 6
        for i in range(6):
            got = _get(s, i, 60_000)
            assert got is not None and np.array_equal(got, _data(i, 50_000 + i))
    finally:
        s.close()


def test_budget_is_kept_and_recent_values_stay(backend):
    s = backend.open(size_gb=0.002)  # 2 MB
    try:
        for i in range(40):  # 4 MB of values
            assert s.put(_key(i), _data(i))
            if i % 5 == 4:
                assert s.flush(10)
        assert s.flush(10)
        u = s.usage()
        on_disk = sum(p.stat().st_size for p in backend.data_files())
        assert u["evictions"] > 0 and u["bytes"] <= 2e6 and on_disk <= 2e6, (u, on_disk)
        assert _get(s, 39) is not None and np.array_equal(_get(s, 39), _data(39))
        for i in range(40):  # evicted: a miss; kept: its own bytes
            got = _get(s, i)
            assert got is None or np.array_equal(got, _data(i)), i
    finally:
        s.close()


def test_corrupt_bytes_on_disk_are_a_miss(store, backend):
    assert store.put(_key(1), _data(1)) and store.put(_key(2), _data(2)) and store.flush(10)
    backend.cold(store, [_key(1), _key(2)])  # the disk's bytes are what is read
    needle = _data(1)[50_000:50_064].tobytes()
    hits = [(p, p.read_bytes().find(needle)) for p in backend.data_files()]
    (path, pos), = [(p, at) for p, at in hits if at >= 0]
    with open(path, "r+b") as fh:  # one flipped byte in the middle of the payload
        fh.seek(pos + 10)
        b = fh.read(1)
        fh.seek(pos + 10)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert _get(store, 1) is None
    assert _get(store, 1) is None  # and stays a miss
    assert np.array_equal(_get(store, 2), _data(2))  # its neighbour is intact
    assert store.usage()["corrupt"] == 1


def test_reader_sees_the_writer_and_drops_its_puts(store, backend):
    r = backend.open(writer=False)
    try:
        for i in range(3):  # written after the reader opened
            assert store.put(_key(i), _data(i))
        assert store.flush(10)
        assert r.contains([_key(i) for i in range(4)]) == 3
        for i in range(3):
            assert np.array_equal(_get(r, i), _data(i))
        assert r.put(_key(5), _data(5)) is False
        u = r.usage()
        assert u["read_only"] == 1 and u["dropped"] == 1
        assert store.contains([_key(5)]) == 0
    finally:
        r.close()


def test_closed_store_drops_puts(backend):
    s = backend.open()
    s.close()
    assert s.put(_key(1), _data(1)) is False and s.usage()["dropped"] == 1


def test_writer_killed_mid_write_leaves_only_whole_values(backend):
    if backend.name == "hf3fs" and REAL_3FS:
        pytest.skip("the crash writer runs on the emulator's mount layout (kv/ under the mount)")
    """SIGKILL a writer process while a reader in this process reads: nothing torn is ever read."""
    w = _writer_module()
    bad: list[str] = []
    latest = [0]  # puts the writer has accepted
    reads = [0, 0]  # hits, misses while the writer ran
    stop = threading.Event()

    def read_while_writing() -> None:
        r = None
        while r is None and not stop.is_set():
            try:
                r = make_store(w.crash_config(str(backend.root), backend.label), 0, writer=False)
            except ValueError:  # the writer has not made its directory yet
                time.sleep(0.05)
        i, listed = 0, []
        while not stop.is_set():
            if i % 10 == 0:  # what the reader's index lists now (a slow writer may be far behind
                listed = r.keys()[-20:]  # its accepted puts: then these are what can hit)
            if i % 2 and listed:
                key = listed[i // 2 % len(listed)]  # listed, maybe being evicted or overwritten
            else:
                key = w.key_of(max(0, latest[0] - 1 - i % 20))  # the last puts: written or being written
            want = w.content(key)
            out = np.zeros(len(want), dtype=np.uint8)
            n = r.get(key, out)
            reads[n == 0] += 1
            if n and out.tobytes() != want:
                bad.append(key)
            i += 1
        if r is not None:
            r.close()

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        # Killed once it has accepted 60 puts and the reader has read a value whole: with the
        # slabs holding as few as 3 of these values, a reader starved of the cores (a loaded CI
        # machine) could otherwise miss every read (CI of 2026-12-07: 0 hits of 409 reads).
        progress = w.run_until_killed([str(backend.root), "0", backend.label], 60,
                                      on_progress=lambda p: latest.__setitem__(0, p),
                                      until=lambda: reads[0] > 0)
    finally:
        stop.set()
        reader.join(30)
    assert progress >= 60, "writer made no progress"
    assert not bad, f"torn or foreign values read while writing: {bad[:3]}"
    assert reads[0] > 0, reads
    s = make_store(w.crash_config(str(backend.root), backend.label), 0)  # a restarted writer
    try:
        keys = s.keys()
        # What survives is whole. Usually some values do (how many depends on which slot classes
        # the last puts filled: the hf3fs slabs of a 25 MB budget hold as few as 3 of these
        # 64 KiB..1 MiB values); under load none may (probably: the last puts can all be in flight when the
        # kill comes, after the values their slots held were deleted, as DELs reach the log first).
        # The full test run of 2026-12-07 (session 10) saw that once, for hf3fs-lax.
        for key in keys:
            want = w.content(key)
            out = np.zeros(len(want), dtype=np.uint8)
            assert s.get(key, out) == len(want) and out.tobytes() == want, key
        u = s.usage()
        assert u["corrupt"] == 0 and u["misses"] == 0, u
        # And the restarted writer works: a new value is written and read back whole.
        fresh = w.key_of(progress + 1000)
        want = w.content(fresh)
        assert s.put(fresh, np.frombuffer(want, dtype=np.uint8)) and s.flush(10)
        out = np.zeros(len(want), dtype=np.uint8)
        assert s.get(fresh, out) == len(want) and out.tobytes() == want
    finally:
        s.close()


def test_the_store_sees_the_emulators_strictness(backend):
    """hf3fs_fuse.io, as the store imports it, is this very emulator module: the lax run is lax."""
    if backend.name != "hf3fs" or REAL_3FS:
        pytest.skip("the emulator only")
    import hf3fs_fuse.io as io

    with pytest.raises(RuntimeError) if emu.STRICT else nullcontext():
        io.extract_mount_point(str(backend.root / "not" / "yet"))
