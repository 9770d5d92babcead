"""The DRAM tier of the store: a bounded cache in shared memory, shared by the instances of one
host, in front of the local/3FS store (store/tiered.py puts it there; docs/design.md, "The DRAM
tier"). The file, its checks and its layout: store/dram_arena.py.

The arena holds ``units`` units of ``unit`` bytes; a value takes a run of whole units (first fit)
and one entry of the table, whose fields are: ``stamp = seq << 2 | state`` (FREE, RESERVED,
COMMITTED), the key's 128-bit digest (``d0``, ``d1``), ``start`` and ``units`` of its run, its
``length``, the writer (``pid``: its process's random token << 32 | its pid), and for eviction ``tick`` (last
use, CLOCK_MONOTONIC ns, the same clock in every process of the host), ``hits`` and ``born``.

A key index (open addressing over the digest, linear probing, backward-shift deletion) finds a
key's entry in O(1); it holds every entry that is not FREE and is changed under the lock only.

Guards, the shm transport's (transport/arena.py): every state change takes a new seq from the
header's counter, so a stamp names one incarnation of an entry for ever. Readers take no lock:
stamp, fields, copy, stamp again; a value is served only if the stamp was COMMITTED and did not
change, and the digest and the length match (a key of another namespace, model or rank has
another digest; a read that raced an index change may miss, never return another key's value).
Writers hold the lock file's ``flock`` (waiting at most ``LOCK_TIMEOUT_S``: a stopped process that
holds it costs drops, not a hung engine): they evict (set FREE, then free the units),
allocate (mark the units, write the fields, set RESERVED), copy without the lock and set
COMMITTED. A writer killed inside the lock leaves the header's ``dirty`` flag set: the next one
rebuilds the unit map from the entries. One killed while copying leaves a RESERVED entry, never
served, reclaimed once its writer is gone. The bytes of a value are not checksummed here: a
chunk carries its own checksum, which the connector checks after every store read.

Eviction follows ``StoreConfig.eviction`` (the policies of store/eviction.py on the shared fields:
lru = oldest ``tick``, lfu = fewest ``hits`` then oldest ``tick``, fifo = oldest ``born``).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import secrets
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from common.bytes import buffer_address, byte_view
from common.config import ConfigError
from common.cuda import cuda_pin, cuda_unpin
from common.process import pid_alive
from store import dram_arena as arena
from store.dram_arena import H_DIRTY, H_SEQ, H_UNIT, H_UNITS

log = logging.getLogger(__name__)

FREE, RESERVED, COMMITTED = 0, 1, 2
POLICIES = ("lru", "lfu", "fifo")
LOCK_TIMEOUT_S = 2.0
#: This process's mark in the entries it reserves (with its pid): every tier object of the process
#: shares it, so one never takes another's copy in flight for a dead writer's; a later process that
#: happens to get the same pid has another token.
_TOKEN = secrets.randbits(31)

#: The tier's counters (this process's; ``usage()`` adds the arena's shared state).
STAT_KEYS = (
    "dram_hits", "dram_misses", "dram_get_bytes",
    "dram_puts",          # values copied in by puts
    "dram_fills",         # values copied in after a read from disk
    "dram_put_bytes",
    "dram_duplicates",    # already there (or being written by another process): skipped
    "dram_too_large",     # larger than the tier: not kept in it
    "dram_full",          # no room even after evicting (the rest held by values being written)
    "dram_evictions",
    "dram_torn",          # a read raced an eviction (the stamp changed): a miss
    "dram_reclaimed",     # entries of writers that died while copying, freed
    "dram_repairs",       # unit maps and indexes rebuilt after a writer died inside the lock
    "dram_busy",          # puts/deletes given up: the lock was held longer than LOCK_TIMEOUT_S
)


@dataclass
class DramRead:
    """A value read in place (``DramTier.acquire``): its bytes, and the entry and stamp it had."""

    key: str
    view: memoryview
    entry: int
    stamp: int


class _Busy(Exception):
    """The lock could not be had within LOCK_TIMEOUT_S."""


def digest(key: str) -> tuple[int, int]:
    d = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def _owner() -> int:
    return _TOKEN << 32 | os.getpid()


def default_dir() -> str:
    return os.path.join(arena.SHM_DIR, f"pdkv-dram-{os.geteuid()}")


class DramTier:
    """The arena ``<directory>/<name>-<size>.dram`` (made or found; ``directory``: default_dir())."""

    def __init__(self, size: int, name: str, eviction: str = "lru", directory: str | None = None) -> None:
        if size < arena.MIN_BYTES:
            raise ConfigError(f"store.dram_gb gives {size} bytes; the DRAM tier needs at least "
                              f"{arena.MIN_BYTES} bytes (1 MiB), or 0 to turn it off")
        if eviction not in POLICIES:
            raise ConfigError(f"store.eviction {eviction!r} is not allowed; choose lru, lfu or fifo")
        self.eviction, self.size = eviction, size
        self.path, self._fd, self._lfd = arena.open_arena(directory or default_dir(), name, size)
        self._mm, fields, self._umap, self._index, self._head, self._data = arena.map_arena(self._fd, size)
        self._mask = len(self._index) - 1
        (self._stamp, self._d0, self._d1, self._start, self._units, self._length, self._pid, self._tick,
         self._hits, self._born) = (fields[f] for f in arena.FIELDS)
        self.unit, self.n = int(self._head[H_UNIT]), int(self._head[H_UNITS])
        self.budget = self.max_value = self.n * self.unit
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))  # temporary export, gone
        self._lock = threading.Lock()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        torch = sys.modules.get("torch")  # a process that uses CUDA has imported torch already
        self.pinned = bool(torch is not None and torch.cuda.is_available()
                           and cuda_pin(self._addr, size, f"DRAM tier {self.path}"))
        try:
            with self._locked():
                self._reclaim()
        except _Busy:
            log.warning("DRAM tier %s: its lock is held by another process; not checked at start", self.path)
        log.info("DRAM tier %s: %d B in %d units of %d B, eviction %s, %d values found, CUDA-pinned %s",
                 self.path, self.budget, self.n, self.unit, eviction, self.values(), self.pinned)

    # -- the lock and the shared bookkeeping (lock held) ------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The thread lock and the host's lock file (_Busy after LOCK_TIMEOUT_S); repairs first
        if the last holder died inside."""
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise _Busy
        try:
            deadline, pause = time.monotonic() + LOCK_TIMEOUT_S, 0.0002
            while True:
                try:
                    fcntl.flock(self._lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise _Busy from None
                    time.sleep(pause)
                    pause = min(2 * pause, 0.005)
            try:
                if self._head[H_DIRTY]:
                    self._repair()
                self._head[H_DIRTY] = 1
                yield
                self._head[H_DIRTY] = 0
            finally:
                fcntl.flock(self._lfd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    # -- the key index -----------------------------------------------------------------------
    def _probe(self, d0: int, d1: int, states: tuple[int, ...] = (COMMITTED,)) -> int:
        """The entry of that digest in one of ``states``, or -1 (no lock: a racing change may hide it)."""
        j = d0 & self._mask
        for _ in range(len(self._index)):
            v = int(self._index[j])
            if not v:
                return -1
            i = v - 1
            if i < self.n and int(self._d0[i]) == d0 and int(self._d1[i]) == d1 \
                    and int(self._stamp[i]) & 3 in states:
                return i
            j = (j + 1) & self._mask
        return -1

    def _index_add(self, i: int) -> None:
        j = int(self._d0[i]) & self._mask
        while self._index[j]:
            j = (j + 1) & self._mask
        self._index[j] = i + 1

    def _index_remove(self, i: int) -> None:
        """Take entry ``i`` out of the index (backward-shift deletion, Knuth's Algorithm R)."""
        mask = self._mask
        hole = int(self._d0[i]) & mask
        for _ in range(len(self._index)):
            v = int(self._index[hole])
            if v == i + 1:
                break
            if not v:
                return
            hole = (hole + 1) & mask
        else:
            return
        k = hole
        while True:
            k = (k + 1) & mask
            v = int(self._index[k])
            if not v or v > self.n:
                break
            home = int(self._d0[v - 1]) & mask
            if (k - home) & mask < (k - hole) & mask:
                continue  # its home lies after the hole: it stays
            self._index[hole] = v
            hole = k
        self._index[hole] = 0

    def _next_seq(self) -> int:
        seq = int(self._head[H_SEQ]) + 1
        self._head[H_SEQ] = seq
        return seq

    def _free(self, i: int) -> None:
        """Entry ``i`` out of the index, FREE (a new seq: readers of it see the change), then its units."""
        self._index_remove(i)
        self._stamp[i] = self._next_seq() << 2 | FREE
        s, u = int(self._start[i]), int(self._units[i])
        if s + u <= self.n:
            self._umap[s:s + u] = 0

    def _dead(self, i: int) -> bool:
        """Whether RESERVED entry ``i``'s writer is gone (dead, or an earlier process of our pid)."""
        owner = int(self._pid[i])
        if owner == _owner():
            return False
        pid = owner & 0xFFFFFFFF
        return pid == os.getpid() or not pid_alive(pid)

    def _reclaim(self) -> int:
        """Free the RESERVED entries of writers that are gone; how many."""
        n = 0
        for i in np.flatnonzero((self._stamp & 3) == RESERVED):
            if self._dead(int(i)):
                self._free(int(i))
                n += 1
        self.stats["dram_reclaimed"] += n
        return n

    def _repair(self) -> None:
        """Rebuild the unit map from the entries (a writer died inside the lock)."""
        live = np.flatnonzero((self._stamp & 3) != FREE)
        start, units = self._start[live].astype(np.int64), self._units[live].astype(np.int64)
        bad = (units <= 0) | (start + units > self.n)
        for i in live[bad]:
            self._stamp[i] = self._next_seq() << 2 | FREE
        start, units = start[~bad], units[~bad]
        self._index[:] = 0
        for i in live[~bad]:
            self._index_add(int(i))
        delta = np.zeros(self.n + 1, np.int64)
        np.add.at(delta, start, 1)
        np.add.at(delta, start + units, -1)
        self._umap[:] = np.cumsum(delta[:-1]) > 0
        self.stats["dram_repairs"] += 1
        log.warning("DRAM tier %s: a writer died while changing it; rebuilt its unit map and index (%d values)",
                    self.path, len(start))

    def _run(self, units: int) -> int:
        """Start of the first run of ``units`` free units, or -1."""
        # Between a used unit before the first and one after the last, the changes alternate:
        # used -> free (a run's start), free -> used (its end).
        edges = np.flatnonzero(np.diff(self._umap.view(np.int8), prepend=np.int8(1), append=np.int8(1)))
        starts, ends = edges[0::2], edges[1::2]
        ok = np.flatnonzero(ends - starts >= units)
        return int(starts[ok[0]]) if ok.size else -1

    def _victims(self) -> np.ndarray:
        """The COMMITTED entries in the order the policy evicts them."""
        live = np.flatnonzero((self._stamp & 3) == COMMITTED)
        if self.eviction == "lfu":
            return live[np.lexsort((self._tick[live], self._hits[live]))]
        return live[np.argsort((self._born if self.eviction == "fifo" else self._tick)[live], kind="stable")]

    def _alloc(self, units: int) -> tuple[int, int] | None:
        """(entry, first unit) of a new run of ``units`` units, evicting by the policy; None if
        the rest is held by values being written."""
        start = self._run(units)
        if start < 0 and self._reclaim():
            start = self._run(units)
        if start < 0:
            free = self.n - int(np.count_nonzero(self._umap))
            for v in self._victims():
                free += int(self._units[v])
                self._free(int(v))
                self.stats["dram_evictions"] += 1
                if free >= units and (start := self._run(units)) >= 0:
                    break
        if start < 0:
            return None
        i = int(np.argmax((self._stamp & 3) == FREE))
        if int(self._stamp[i]) & 3 != FREE:
            return None
        self._umap[start:start + units] = 1
        return i, start

    def _present(self, d0: int, d1: int) -> bool:
        """Whether the key is COMMITTED or being written by a live writer (lock held)."""
        i = self._probe(d0, d1, (COMMITTED, RESERVED))
        if i < 0:
            return False
        if int(self._stamp[i]) & 3 == COMMITTED or not self._dead(i):
            return True
        self._free(i)
        self.stats["dram_reclaimed"] += 1
        return False

    # -- lookups (no lock) -------------------------------------------------------------------
    def get(self, key: str, into: Any) -> int:
        """Copy the value of ``key`` into ``into``; its length, 0 = miss (absent, longer than
        ``into``, or evicted while being read)."""
        out = byte_view(into)
        d0, d1 = digest(key)
        n = self._read(d0, d1, out)
        with self._stats_lock:  # reads run on several threads (store/reads.py)
            if n:
                self.stats["dram_hits"] += 1
                self.stats["dram_get_bytes"] += n
            else:
                self.stats["dram_misses"] += 1
        return n

    def _read(self, d0: int, d1: int, out: memoryview) -> int:
        i = self._probe(d0, d1)
        if i < 0:
            return 0
        s1 = int(self._stamp[i])
        start, units, n = int(self._start[i]), int(self._units[i]), int(self._length[i])
        if (s1 & 3 != COMMITTED or int(self._d0[i]) != d0 or int(self._d1[i]) != d1 or n == 0
                or n > out.nbytes or n > units * self.unit or start + units > self.n):
            return 0
        ctypes.memmove(buffer_address(out), self._addr + self._data + start * self.unit, n)  # GIL released
        if int(self._stamp[i]) != s1:
            with self._stats_lock:
                self.stats["dram_torn"] += 1
            return 0
        self._tick[i] = time.monotonic_ns()
        self._hits[i] = int(self._hits[i]) + 1  # racy between processes: a lost count, no harm
        return n

    def acquire(self, key: str) -> "DramRead | None":
        """``key``'s value in place, a view of this tier's (pinned) memory for a load to scatter
        from without copying it first; None for a miss. Nothing is held: ``release`` says
        whether the value stayed the whole time, and the view's bytes are its value only then."""
        stamp, (d0, d1) = self._stamp, digest(key)
        i = -1 if stamp is None else self._probe(d0, d1)
        s1 = int(stamp[i]) if i >= 0 else 0
        start, units, n = (int(self._start[i]), int(self._units[i]), int(self._length[i])) if i >= 0 else (0, 0, 0)
        if (s1 & 3 != COMMITTED or n == 0 or n > units * self.unit or start + units > self.n
                or int(self._d0[i]) != d0 or int(self._d1[i]) != d1):
            return None  # (counted as a miss by the copying read that follows)
        # used now, not after the scatter: eviction (lru, lfu) takes others while it is read
        self._tick[i] = time.monotonic_ns()
        self._hits[i] = int(self._hits[i]) + 1
        off = self._data + start * self.unit
        return DramRead(key, memoryview(self._mm)[off:off + n], i, s1)

    def release(self, read: "DramRead") -> bool:
        """Done with ``read``: True if its value was not changed or evicted since ``acquire``."""
        stamp = self._stamp
        ok = stamp is not None and int(stamp[read.entry]) == read.stamp
        with self._stats_lock:
            self.stats["dram_hits" if ok else "dram_torn"] += 1
            self.stats["dram_get_bytes"] += len(read.view) if ok else 0
        return ok

    def contains(self, keys: Sequence[str]) -> int:
        """Length of the longest prefix of ``keys`` held here."""
        n = 0
        for key in keys:
            if self._probe(*digest(key)) < 0:
                break
            n += 1
        return n

    # -- changes (the lock) -------------------------------------------------------------------
    def put(self, key: str, data: Any, fill: bool = False) -> bool:
        """Copy ``data`` in under ``key`` (``fill``: it was read from disk); False if it is larger
        than the tier or there is no room. A key already here is skipped (True)."""
        src = byte_view(data)
        n = src.nbytes
        if n == 0 or n > self.max_value:
            with self._stats_lock:
                self.stats["dram_too_large"] += n > 0
            return False
        d0, d1 = digest(key)
        units = -(-n // self.unit)
        try:
            got = self._reserve(d0, d1, n, units)
        except _Busy:
            with self._stats_lock:
                self.stats["dram_busy"] += 1
            return False
        if got is None:
            return True
        if not got:
            return False
        i, start, seq = got
        try:
            ctypes.memmove(self._addr + self._data + start * self.unit, buffer_address(src), n)
        except BaseException:
            with self._locked():
                self._free(i)
            raise
        self._stamp[i] = seq << 2 | COMMITTED  # only this writer changes a live RESERVED entry
        with self._stats_lock:
            self.stats["dram_fills" if fill else "dram_puts"] += 1
            self.stats["dram_put_bytes"] += n
        return True

    def _reserve(self, d0: int, d1: int, n: int, units: int) -> tuple[int, int, int] | tuple | None:
        """Under the lock: None (a duplicate), () (no room) or (entry, first unit, seq), the entry
        RESERVED with its fields and indexed."""
        with self._locked():
            if self._present(d0, d1):
                self.stats["dram_duplicates"] += 1
                return None
            got = self._alloc(units)
            if got is None:
                self.stats["dram_full"] += 1
                return ()
            i, start = got
            seq = self._next_seq()
            for arr, v in ((self._d0, d0), (self._d1, d1), (self._start, start), (self._units, units),
                           (self._length, n), (self._pid, _owner()), (self._hits, 0)):
                arr[i] = v
            self._tick[i] = self._born[i] = time.monotonic_ns()
            self._stamp[i] = seq << 2 | RESERVED
            self._index_add(i)
            return i, start, seq

    def delete(self, keys: Sequence[str]) -> list[bool]:
        """Remove these keys; for each, whether it was here."""
        out = []
        try:
            with self._locked():
                for key in keys:
                    i = self._probe(*digest(key))
                    if i >= 0:
                        self._free(i)
                    out.append(i >= 0)
        except _Busy:
            with self._stats_lock:
                self.stats["dram_busy"] += 1
            log.warning("DRAM tier %s: a delete gave up waiting for the lock; its keys may still be read",
                        self.path)
            return out + [False] * (len(keys) - len(out))
        return out

    def values(self) -> int:
        return int(np.count_nonzero((self._stamp & 3) == COMMITTED))

    def usage(self) -> dict:
        if self._mm is None:  # closed
            return {"dram_path": self.path, "dram_budget": self.budget, **self.stats}
        return {"dram_path": self.path, "dram_bytes": int(np.count_nonzero(self._umap)) * self.unit,
                "dram_values": self.values(), "dram_budget": self.budget, "dram_unit": self.unit,
                "dram_pinned": self.pinned, **self.stats}

    def close(self) -> None:
        """Unpin and unmap; the arena and its values stay for the next process."""
        if self._mm is None:
            return
        if self.pinned:
            cuda_unpin(self._addr)
            self.pinned = False
        (self._stamp, self._d0, self._d1, self._start, self._units, self._length, self._pid, self._tick,
         self._hits, self._born, self._umap, self._index, self._head) = (None,) * 13
        try:
            self._mm.close()
        except BufferError:  # a view still exported: unmapped when it goes
            pass
        self._mm = None
        for fd in (self._fd, self._lfd):
            os.close(fd)
