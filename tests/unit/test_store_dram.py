"""The DRAM tier (store/dram.py, store/tiered.py) beyond the contract suite (which runs on it too,
tests/unit/test_store_contract.py): eviction to disk, fills from disk, the bound, the policies,
restarts and writers killed mid-copy or inside the lock, foreign arenas, its config key.

Arenas live under the test's tmp_path (``directory=``), not /dev/shm; processes are real ones.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, load
from store import dram as dram_mod
from store import dram_arena, make_store
from store.config import StoreConfig
from store.dram import DramTier
from store.local import LocalStore
from store.tiered import TieredStore, dram_name, make_dram

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000


def _key(i: int) -> str:
    return f"dram-test/0/{i:032x}"


def _data(i: int, n: int = 200_000) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def _read(s, i: int, n: int = 200_000) -> np.ndarray | None:
    out = np.zeros(n, dtype=np.uint8)
    got = s.get(_key(i), out)
    return out[:got] if got else None


@pytest.fixture
def cfg(tmp_path) -> StoreConfig:
    (tmp_path / "disk").mkdir()
    return StoreConfig(backend="local", paths=[str(tmp_path / "disk")], size_gb=0.02, dram_gb=0.0012)


@pytest.fixture
def shm(tmp_path) -> str:
    return str(tmp_path / "shm" / "pdkv-dram")


def _tiered(cfg: StoreConfig, shm: str, writer: bool = True) -> TieredStore:
    return TieredStore(LocalStore(cfg, writer=writer), make_dram(cfg, shm))


def _run(code: str, *args: str, until: str = "") -> subprocess.Popen | None:
    """Run ``code`` in a new Python process (the repo on its path). With ``until``: wait for that
    line, then SIGKILL it. Without: wait for its exit (status 0)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if until:
        line = proc.stdout.readline().strip()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        assert line == until, line
        return None
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


PUT_THEN = """
import sys, time, numpy as np
from store.dram import DramTier
t = DramTier(2 * 10**6, "n", "lru", sys.argv[1])
for i in range(3):
    assert t.put(f"dram-test/0/{i:032x}", np.random.default_rng(i).integers(0, 256, 200_000, dtype=np.uint8))
"""


def test_a_value_evicted_from_dram_is_served_from_disk(cfg, shm):
    s = _tiered(cfg, shm)
    try:
        for i in range(12):  # 2.4 MB through a 1.2 MB tier
            assert s.put(_key(i), _data(i))
        assert s.flush(10)
        u = s.usage()
        assert u["dram_evictions"] >= 6 and u["dram_bytes"] <= u["dram_budget"] < 1.2 * MB
        assert s.dram.contains([_key(0)]) == 0 and s.dram.contains([_key(11)]) == 1
        assert s.contains([_key(i) for i in range(13)]) == 12  # either tier
        assert np.array_equal(_read(s, 0), _data(0))  # from disk ...
        assert s.usage()["dram_fills"] == 1 and s.dram.contains([_key(0)]) == 1  # ... and back in DRAM
        assert np.array_equal(_read(s, 0), _data(0)) and s.usage()["dram_hits"] == 1
    finally:
        s.close()


def test_disk_reads_fill_dram_for_every_instance_of_the_host(cfg, shm):
    w = LocalStore(cfg)  # values written without the tier
    for i in range(3):
        assert w.put(_key(i), _data(i))
    assert w.flush(10)
    w.close()
    a = _tiered(cfg, shm, writer=False)
    b = TieredStore(LocalStore(cfg, writer=False), DramTier(int(cfg.dram_gb * 1e9), dram_name(cfg), "lru", shm))
    assert b.dram is not a.dram  # a mapping of its own, as another process has
    try:
        assert np.array_equal(_read(a, 1), _data(1))
        assert a.usage()["dram_fills"] == 1 and a.disk.stats["hits"] == 1
        assert np.array_equal(_read(b, 1), _data(1))  # another instance: from the shared DRAM
        assert b.usage()["dram_hits"] == 1 and b.disk.stats["hits"] == 0
        assert not b.put(_key(5), _data(5)) and a.dram.contains([_key(5)]) == 0  # readers put nothing
    finally:
        a.close()
        b.close()


def test_the_stores_of_one_process_share_one_mapping(cfg, shm):
    a, b = _tiered(cfg, shm), _tiered(cfg, shm)
    try:
        assert a.dram is b.dram
        a.close()
        assert b.put(_key(0), _data(0)) and np.array_equal(_read(b, 0), _data(0))  # still open
    finally:
        a.close()
        b.close()
    assert b.dram._mm is None  # the last store closed it
    c = _tiered(cfg, shm)
    try:
        assert c.dram is not a.dram and np.array_equal(_read(c, 0), _data(0))
    finally:
        c.close()


def test_the_tier_keeps_to_dram_gb(tmp_path, shm):
    t = DramTier(2 * MB, "bound", "lru", shm)
    rng = np.random.default_rng(0)
    try:
        sizes = rng.integers(1, 300_000, 60)
        for i, n in enumerate(sizes):
            assert t.put(_key(i), _data(i, int(n)))
            live = np.flatnonzero((t._stamp & 3) == dram_mod.COMMITTED)
            # the unit map holds exactly the committed values' units (none leaked, none shared) ...
            assert int(t._units[live].sum()) == int(np.count_nonzero(t._umap)) == t.usage()["dram_bytes"] // t.unit
            assert t.values() == len(live) and t.contains([_key(i)]) == 1  # ... and the newest is one of them
        assert os.path.getsize(t.path) == 2 * MB and t.usage()["dram_evictions"] > 0
        for i, n in enumerate(sizes):  # what is kept is whole
            got = _read(t, i, int(n))
            assert got is None or np.array_equal(got, _data(i, int(n))), i
        assert not t.put(_key(99), bytes(t.max_value + 1)) and t.stats["dram_too_large"] == 1
    finally:
        t.close()


# Which key one more put evicts: (A) k0 read 3 times, then k1..k(N-1) once; (B) k0 read once.
EVICTED = {"lru": (0, 1), "lfu": (1, 1), "fifo": (0, 0)}


@pytest.mark.parametrize("policy", sorted(EVICTED))
def test_eviction_follows_the_store_policy(shm, policy):
    for scenario, want in zip("AB", EVICTED[policy]):
        t = DramTier(1_100_000, f"policy-{scenario}", policy, shm)
        try:
            n = t.budget // 200_000
            for i in range(n):
                assert t.put(_key(i), _data(i))
            for _ in range(3 if scenario == "A" else 1):
                _read(t, 0)
            for i in range(1, n if scenario == "A" else 1):
                _read(t, i)
            assert t.put(_key(n), _data(n)) and t.stats["dram_evictions"] == 1
            assert [i for i in range(n) if not t.contains([_key(i)])] == [want], (policy, scenario)
        finally:
            t.close()


def test_the_key_index_agrees_with_a_model_through_puts_and_deletes(shm):
    """Random puts and deletes of 300 keys (one unit each, no evictions) over a 512-slot index:
    probes across collisions and backward shifts find exactly the keys the model holds."""
    t = DramTier(2 * MB, "index", "lru", shm)
    rng = np.random.default_rng(7)
    model: set[int] = set()
    try:
        assert len(t._index) == 1024 and t.n > 300
        for _ in range(3000):
            k = int(rng.integers(300))
            if rng.random() < 0.6:
                assert t.put(_key(k), _data(k, 4000))
                model.add(k)
            else:
                assert t.delete([_key(k)]) == [k in model]
                model.discard(k)
            probe = int(rng.integers(300))
            assert t.contains([_key(probe)]) == (probe in model)
        assert t.stats["dram_evictions"] == 0 and t.values() == len(model)
        for k in range(300):
            got = _read(t, k, 4000)
            assert (got is not None) == (k in model) and (got is None or np.array_equal(got, _data(k, 4000)))
    finally:
        t.close()


def test_a_held_lock_drops_puts_and_never_stops_reads(shm, monkeypatch):
    t = DramTier(2 * MB, "busy", "lru", shm)
    try:
        assert t.put(_key(0), _data(0))
        monkeypatch.setattr(dram_mod, "LOCK_TIMEOUT_S", 0.05)
        with open(t.path[: -len(".dram")] + ".lock", "r+b") as other:  # another process holds it
            fcntl.flock(other, fcntl.LOCK_EX)
            assert not t.put(_key(1), _data(1)) and t.stats["dram_busy"] == 1
            assert np.array_equal(_read(t, 0), _data(0))  # reads take no lock
        assert t.put(_key(1), _data(1))
    finally:
        t.close()


def test_values_survive_a_restart_of_their_writer(shm):
    _run(PUT_THEN, shm)  # a process writes and exits
    t = DramTier(2 * MB, "n", "lru", shm)
    try:
        assert t.contains([_key(i) for i in range(4)]) == 3
        for i in range(3):
            assert np.array_equal(_read(t, i), _data(i))
    finally:
        t.close()


def test_a_writer_killed_while_copying_leaves_a_miss(shm):
    _run(PUT_THEN + """
import ctypes, types
import store.dram as d
real = ctypes.memmove
def half(dst, src, n):
    real(dst, src, n // 2)
    print("half", flush=True)
    time.sleep(60)
d.ctypes = types.SimpleNamespace(memmove=half, addressof=ctypes.addressof, c_char=ctypes.c_char)
t.put("dram-test/0/torn", np.ones(200_000, np.uint8))
""", shm, until="half")
    t = DramTier(2 * MB, "n", "lru", shm)  # opening reclaims the dead writer's entry
    try:
        assert t.stats["dram_reclaimed"] == 1
        assert t.get("dram-test/0/torn", np.zeros(200_000, np.uint8)) == 0
        assert t.contains(["dram-test/0/torn"]) == 0
        assert np.array_equal(_read(t, 2), _data(2))  # its neighbours are whole
        assert t.put("dram-test/0/torn", np.ones(200_000, np.uint8))  # and the key can be stored again
    finally:
        t.close()


def test_a_copy_in_flight_is_never_reclaimed_by_another_tier_of_its_process(shm):
    a = DramTier(2 * MB, "flight", "lru", shm)
    d0, d1 = dram_mod.digest(_key(0))
    i, _start, _seq = a._reserve(d0, d1, 200_000, 49)  # reserved, being copied
    b = DramTier(2 * MB, "flight", "lru", shm)  # another object of this process checks at start
    try:
        assert b.stats["dram_reclaimed"] == 0 and int(b._stamp[i]) & 3 == dram_mod.RESERVED
        assert b.put(_key(0), _data(0))  # a duplicate of the one in flight: skipped
        assert b.stats["dram_duplicates"] == 1 and b.contains([_key(0)]) == 0
    finally:
        a.close()
        b.close()


def test_a_writer_killed_inside_the_lock_is_repaired(shm):
    _run(PUT_THEN + """
with t._locked():
    print("locked", flush=True)
    time.sleep(60)
""", shm, until="locked")
    t = DramTier(2 * MB, "n", "lru", shm)
    try:
        assert t.stats["dram_repairs"] == 1
        assert t.usage()["dram_bytes"] == 3 * 49 * 4096  # the unit map rebuilt: 3 values of 49 pages
        for i in range(3):
            assert np.array_equal(_read(t, i), _data(i))
        assert t.put(_key(3), _data(3)) and np.array_equal(_read(t, 3), _data(3))
    finally:
        t.close()


def test_a_read_that_races_an_eviction_is_a_miss(shm, monkeypatch):
    reader, writer = DramTier(MB * 2, "race", "lru", shm), DramTier(MB * 2, "race", "lru", shm)
    try:
        assert writer.put(_key(0), _data(0))
        real_ctypes = dram_mod.ctypes

        def evict_then_copy(dst, src, n):  # another instance evicts it and reuses its units mid-read
            monkeypatch.setattr(dram_mod, "ctypes", real_ctypes)
            assert writer.delete([_key(0)]) == [True] and writer.put(_key(1), _data(1))
            return real_ctypes.memmove(dst, src, n)

        monkeypatch.setattr(dram_mod, "ctypes", types.SimpleNamespace(memmove=evict_then_copy))
        assert _read(reader, 0) is None and reader.stats["dram_torn"] == 1
        assert np.array_equal(_read(reader, 1), _data(1))
    finally:
        reader.close()
        writer.close()


def test_a_foreign_arena_is_replaced_when_unused_and_refused_in_use(shm):
    t = DramTier(2 * MB, "f", "lru", shm)
    path = t.path
    assert t.put(_key(0), _data(0))
    t.close()
    with open(path, "r+b") as fh:  # another format's header
        fh.write(b"NOTPDKV!" * 8)
    t = DramTier(2 * MB, "f", "lru", shm)  # nobody uses it: replaced, empty
    try:
        assert t.values() == 0 and _read(t, 0) is None
    finally:
        t.close()
    with open(path, "r+b") as fh:
        fh.write(b"NOTPDKV!" * 8)
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_SH)  # a process uses it
        with pytest.raises(ConfigError, match="foreign or damaged header, and processes use it"):
            DramTier(2 * MB, "f", "lru", shm)


def test_a_remover_never_unlinks_an_arena_made_after_it_looked(shm, monkeypatch):
    """Another remover took the file first and a new arena (in use) took its name before this one
    got its lock: the new arena and its lock file stay."""
    t = DramTier(2 * MB, "r", "lru", shm)
    path, lock = t.path, t.path[: -len(".dram")] + ".lock"
    t.close()

    def replaced_first(fd, op):  # once, before this remover's lock
        monkeypatch.setattr(dram_arena, "fcntl", fcntl)
        os.unlink(lock)
        os.unlink(path)  # the other remover ...
        DramTier(2 * MB, "r", "lru", shm).close()  # ... and a new arena under the same name
        return fcntl.flock(fd, op)

    monkeypatch.setattr(dram_arena, "fcntl", types.SimpleNamespace(flock=replaced_first, LOCK_EX=fcntl.LOCK_EX,
                                                                   LOCK_NB=fcntl.LOCK_NB))
    assert dram_arena.remove_arena(path)
    assert os.path.exists(path) and os.path.exists(lock)
    assert dram_arena.remove_arena(path) and not os.path.exists(path) and not os.path.exists(lock)


def test_a_changed_size_gets_its_own_arena_and_the_unused_old_one_goes(shm):
    DramTier(2 * MB, "s", "lru", shm).close()
    t = DramTier(3 * MB, "s", "lru", shm)
    try:
        assert sorted(p for p in os.listdir(shm) if p.endswith(".dram")) == [f"s-{3 * MB}.dram"]
    finally:
        t.close()


def test_config_key_and_refusals(tmp_path, shm):
    with pytest.raises(ConfigError, match=r"connector\.store\.dram_gb: -1\.0 is out of range; allowed 0\.\."):
        load(StoreConfig, {"dram_gb": -1}, prefix="connector.store.")
    with pytest.raises(ConfigError, match=r"connector\.store\.dram_gb: expected a number, got 'lots'"):
        load(StoreConfig, {"dram_gb": "lots"}, prefix="connector.store.")
    with pytest.raises(ConfigError, match="dram_gb: nan is not allowed"):
        load(StoreConfig, {"dram_gb": float("nan")}, prefix="connector.store.")
    assert load(StoreConfig, {}).dram_gb == 0  # off by default
    with pytest.raises(ConfigError, match="needs a store to sit in front of"):
        make_store(StoreConfig(backend="none", dram_gb=1))
    with pytest.raises(ConfigError, match="at least 1048576 bytes"):
        DramTier(int(0.0001 * 1e9), "tiny", "lru", shm)
    os.makedirs(tmp_path / "open", mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(ConfigError, match="mode 0700"):
        DramTier(2 * MB, "x", "lru", str(tmp_path / "open"))
    a = StoreConfig(backend="local", paths=[str(tmp_path / "a")])
    assert dram_name(a) == dram_name(StoreConfig(backend="local", paths=[str(tmp_path / "a") + "/"], dram_gb=3))
    assert dram_name(a) != dram_name(StoreConfig(backend="local", paths=[str(tmp_path / "b")]))


def test_a_batch_is_read_by_several_threads_and_comes_back_in_order(cfg, shm):
    """store.read_threads: a get_many's reads (DRAM hits, disk reads and the fills after them)
    run on the store's reader threads; each buffer gets its own key's bytes, misses stay 0."""
    import threading

    cfg.read_threads = 3
    s = TieredStore(LocalStore(cfg), make_dram(cfg, shm), cfg.read_threads)
    seen: set[str] = set()
    get = s.dram.get

    def spy(key, into):
        seen.add(threading.current_thread().name)
        return get(key, into)

    s.dram.get = spy
    try:
        for i in range(4):
            assert s.put(_key(i), _data(i))
        s.disk.flush(10)
        s.dram.delete([_key(0), _key(2)])  # these two come from disk (and are filled again)
        keys = [_key(i) for i in (3, 0, 9, 2, 1)]
        outs = [np.zeros(200_000, dtype=np.uint8) for _ in keys]
        got = s.get_many(keys, outs)
        assert got == [200_000, 200_000, 0, 200_000, 200_000]
        for i, out, n in zip((3, 0, 9, 2, 1), outs, got):
            assert (n == 0 and not out.any()) or np.array_equal(out, _data(i))
        assert all(name.startswith("pd-dram-read") for name in seen)
        assert s.dram.stats["dram_fills"] == 2 and s.dram.stats["dram_hits"] == 2
        assert s.dram.contains([_key(0), _key(2)]) == 2
    finally:
        s.close()
    assert s.get_many([_key(1)], [np.zeros(10, dtype=np.uint8)]) == [0]  # closed: no threads left to hang on


def test_in_place_reads_see_their_value_or_say_it_changed(cfg, shm):
    """TieredStore.acquire/release (the load's in-place reads): the view is the value while the
    entry's stamp holds; a rewrite or eviction meanwhile, or a closed store, makes release False."""
    s = _tiered(cfg, shm)
    try:
        assert s.put(_key(1), _data(1)) and s.put(_key(2), _data(2))
        a, b, miss = s.acquire([_key(1), _key(2), _key(7)])
        assert miss is None and np.array_equal(np.frombuffer(a.view, dtype=np.uint8), _data(1))
        assert s.release([a, None]) == [True, False]
        s.dram.delete([_key(2)])  # evicted while "read"
        assert s.release([b]) == [False] and s.dram.stats["dram_torn"] == 1
        c, = s.acquire([_key(1)])
    finally:
        s.close()
    assert s.release([c]) == [False] and s.acquire([_key(1)]) == [None]
