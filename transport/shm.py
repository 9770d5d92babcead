"""Same-host transport: each producer's chunks live in its own shared-memory arena.

The pool is a tmpfs directory (``/dev/shm/pdkv-<name>``). Each instance that writes owns one
*arena* there, ``.arena-<pid>-<uuid8>``: a file of ``pool_size_mb`` MiB, created on the first
write, allocated and faulted in once, reused for the instance's life (``transport/arena.py``).
A value is one slot of it (64-byte header + bytes); the shared memory *is* the staging memory,
so ``put`` is one copy in and ``get`` one copy out, and ``reserve``/``acquire`` hand out views
of the slot itself (no copy at all; on GPUs a DMA straight from/into it, with ``pin_cuda``).

Index: one symlink per key -> ``"<arena>:<offset>:<length>:<seq>"``, made atomically once the
value is complete (``transport/shm_index.py``). Readers resolve the link, map the arena (cached,
``transport/shm_maps.py``), check the slot header (magic, committed, seq, length, key digest),
copy, and check the seq again: a slot that changed meanwhile is a miss, never a torn or foreign
value. The producer never waits for readers.

Budget: the arena (``transport/shm_owner.py``). When a value does not fit, the producer frees
the slots consumers deleted, then evicts its oldest committed values; reserved slots are never
evicted; a value larger than the arena is dropped. ``delete`` works from any process: it unlinks
the link and marks the slot deleted in shared memory; the producer reuses the space when it
next needs room. A SIGKILLed producer leaves its arena and links: readers still get its
committed values, and a slot it was writing has no link; the next producer that creates an arena
in the pool (its restart) removes the arenas of pids that no longer run and the links into them.
``cleanup_pool`` (the launcher's clean stop) removes everything.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any, Sequence

from transport import shm_index as index
from transport.arena import COMMITTED, Mapping, key_digest16, stamp
from transport.base import (
    TransportError,
    check_buffers,
    check_reserve,
    close_reads,
    close_written,
)
from transport.shm_index import cleanup_pool, key_to_name, make_private_dir, pool_dir  # noqa: F401 - cleanup_pool: launch/ imports it here
from transport.shm_maps import MapCache
from transport.shm_owner import ArenaOwner, Call, Entry

log = logging.getLogger(__name__)

STAT_KEYS = (
    "puts",          # values published (put or commit)
    "put_bytes",     # bytes published
    "dropped",       # values not published: no room, too large, no arena, an OS error
    "put_errors",    # ... of which OS errors (ENOSPC, EIO, ...)
    "evictions",     # values unpublished to make room (never read by a consumer)
    "reclaimed",     # slots found deleted by a consumer (or their link gone) and reused
    "gets",          # keys asked for (get and acquire)
    "get_hits",
    "get_misses",    # absent, buffer too small, or the slot changed during the copy
    "get_bytes",
    "deletes",       # index links unlinked by delete()
    "read_races",    # reads that lost to the producer: a get miss, or a release() False
    "aborted",       # reserved slots released unpublished (commit with ok False)
    "arenas",        # arena files this instance created (1, or more if the pool was removed)
    "reaped_arenas", # arenas of producers that were gone (SIGKILLed), removed when creating ours
    "reaped_links",  # ... and the index links into them
)


class SlotWrite:
    """A reserved slot: fill ``view`` (writable 1-D uint8, exactly ``size`` bytes), then commit."""
    __slots__ = ("key", "view", "size", "_owner", "_m", "_e", "_done")

    def __init__(self, key: str, view: memoryview, size: int, owner: "ShmTransport", m: Mapping,
                 e: Entry) -> None:
        self.key, self.view, self.size = key, view, size
        self._owner, self._m, self._e, self._done = owner, m, e, False


class SlotRead:
    """A held committed value: ``view`` (1-D uint8, ``size`` bytes) stays mapped until release,
    which says whether the value stayed unchanged for the whole hold."""
    __slots__ = ("key", "view", "size", "_owner", "_m", "_off", "_seq", "_done")

    def __init__(self, key: str, view: memoryview, size: int, owner: "ShmTransport", m: Mapping,
                 off: int, seq: int) -> None:
        self.key, self.view, self.size = key, view, size
        self._owner, self._m, self._off, self._seq, self._done = owner, m, off, seq, False


class ShmTransport:
    """``Transport`` and ``ZeroCopyTransport`` over shared-memory arenas (same host only).

    Thread-safe. ``pin_cuda``: every arena this instance creates or maps is registered with CUDA
    once (``cudaHostRegister``), so GPU copies from/into slot views are DMA; on failure it warns
    once and goes on unpinned.
    """

    #: ``release`` re-checks each slot's sequence number: a read that raced the producer is
    #: reported, so the connector may skip payload checksums (``connector.checksum: auto``).
    guards_reads = True
    zero_copy = True

    def __init__(self, cfg: Any, pin_cuda: bool = False, device: Any = None) -> None:
        self.path = pool_dir(cfg)
        self.location = f"shm:{self.path}"
        self.budget = int(cfg.pool_size_mb) << 20
        self.pin_cuda = pin_cuda
        self.gpu = getattr(cfg, "shm_memory", "host") == "gpu"
        if self.gpu and (device is None or str(device).split(":")[0] != "cuda"):
            raise TransportError(f"connector.transport.shm_memory: gpu keeps the chunks in the producer's GPU "
                                 f"memory and needs a CUDA device; this instance runs on {device or 'the CPU'}; "
                                 "allowed here: host")
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._uid = uuid.uuid4().hex[:8]  # temporary link names: unique across instances
        self._lock = threading.Lock()
        # A reader with a CUDA device maps any producer's GPU arena; one without sees its keys miss.
        self._maps = MapCache(self.path, self._lock, pin_cuda, device)
        self._own = ArenaOwner(self.path, self.budget, self._maps, self.stats, self._link, self._uid,
                               device if self.gpu else None)
        make_private_dir(self.path)

    # -- copy API (Transport) --------------------------------------------------------------
    def put(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[bool]:
        """Store each buffer under its key: reserve, one copy, commit. False = dropped."""
        mvs = check_buffers("put", keys, buffers)
        res: list[bool] = []
        call = Call()
        for key, mv in zip(keys, mvs):  # one value at a time: a batch may exceed the arena
            with self._lock:
                (got,) = self._own.reserve([key], [mv.nbytes], call)
            if got is None:
                res.append(False)
                continue
            m, e = got
            try:
                if e.size:
                    m.copy_in(e.off, mv)
            except BaseException:
                self._commit(m, e, False)
                raise
            res.append(self._commit(m, e, True))
        self._log_drops(call.dropped, len(keys))
        return res

    def get(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[int]:
        """Copy each key's value into its buffer; bytes read per key, 0 = miss.

        A buffer smaller than the value is a miss and is not written. A read that loses a race
        with the producer (the slot was evicted during the copy) is a miss too, and the buffer
        then holds unspecified bytes.
        """
        mvs = check_buffers("get", keys, buffers, writable=True)
        out: list[int] = []
        races = 0
        for key, mv in zip(keys, mvs):
            found = self._lookup(key)
            if found is None:
                out.append(0)
                continue
            m, off, length, seq = found
            n = 0
            try:
                if 0 < length <= mv.nbytes:
                    m.copy_out(off, mv, length)
                    n = length if m.get_stamp(off) == stamp(seq, COMMITTED) else 0
                    races += not n
            finally:
                self._maps.unhold(m)
            out.append(n)
        hits = sum(1 for n in out if n)
        self._bump(gets=len(out), get_hits=hits, get_misses=len(out) - hits, get_bytes=sum(out),
                   read_races=races)
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key has a committed value now (it may vanish right after)."""
        out = []
        for key in keys:
            found = self._lookup(key)
            if found is not None:
                self._maps.unhold(found[0])
            out.append(found is not None)
        return out

    def delete(self, keys: Sequence[str]) -> int:
        """Unlink the keys' index links (anyone's) and mark their values deleted in the
        producers' arenas; returns how many links were unlinked."""
        n = 0
        for key in keys:
            link = self._link(key)
            target = index.read_link(link)
            try:
                os.unlink(link)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("shm pool %s: delete %s failed: %s", self.path, key, e)
                continue
            n += 1
            if target:
                self._mark_deleted(key, target)
        self._bump(deletes=n)
        return n

    def close(self) -> None:
        """Unlink this instance's links and arena, unpin and unmap every arena it mapped.

        Never raises. A view still out (a SlotRead not released, a SlotWrite not committed)
        keeps its arena mapped (and pinned) until the last one is released/committed, then it
        is unmapped; release() still tells whether the value held. After close, writes are
        dropped and reads miss.
        """
        with self._lock:
            if self._own.closed:
                return
            own, arena = self._own.close()
        self._own.remove(own, arena)
        self._maps.close()
        log.debug("shm pool %s: closed; stats %s", self.path, self.stats)

    def used_bytes(self) -> int:
        """Bytes of this instance's arena in use (committed and reserved slots, headers included)."""
        with self._lock:
            return self._own.used_bytes()

    @property
    def arena_bytes(self) -> int:
        """Size of this instance's arena (0 before the first write)."""
        a = self._own.arena
        return 0 if a is None else a.size

    # -- zero-copy API (ZeroCopyTransport) --------------------------------------------------
    def reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> list[SlotWrite | None]:
        """A writable slot per key (None = no room / too large / no arena; counted as dropped).
        The batch is held at once: its slots cannot evict each other. Readers cannot see a slot
        before ``commit``, and every slot must be committed (ok or not) to free its space."""
        sizes = check_reserve(keys, sizes)
        call = Call()
        with self._lock:
            got = self._own.reserve(keys, sizes, call)
        self._log_drops(call.dropped, len(keys))
        return [None if g is None else SlotWrite(k, g[0].view(g[1].off, g[1].size), g[1].size, self, *g)
                for k, g in zip(keys, got)]

    def commit(self, slots: Sequence[SlotWrite | None], ok: Sequence[bool] | None = None) -> list[bool]:
        """Publish each slot (atomically per key); slots with ``ok`` False are released unpublished.
        Returns per slot whether it was published. The slot views must not be used afterwards."""
        store = close_written(self, slots, ok)
        return [s is not None and self._commit(s._m, s._e, g) for s, g in zip(slots, store)]

    def acquire(self, keys: Sequence[str]) -> list[SlotRead | None]:
        """A view of each key's committed value (None = miss), inside the producer's arena.
        The memory is mapped writable (so torch.frombuffer takes it) but must only be read."""
        out: list[SlotRead | None] = []
        for key in keys:
            found = self._lookup(key)
            if found is None:
                out.append(None)
                continue
            m, off, length, seq = found
            out.append(SlotRead(key, m.view(off, length), length, self, m, off, seq))
        got = [r.size for r in out if r is not None]
        self._bump(gets=len(out), get_hits=len(got), get_misses=len(out) - len(got), get_bytes=sum(got))
        return out

    def release(self, reads: Sequence[SlotRead | None]) -> list[bool]:
        """End the holds; True where the value stayed committed and unchanged for the whole hold
        (what was read from the view is the committed value). None (or released) entries: False."""
        held = close_reads(self, reads)
        res = []
        for r, h in zip(reads, held):
            res.append(h and r._m.get_stamp(r._off) == stamp(r._seq, COMMITTED))
            if h:
                self._maps.unhold(r._m)
        self._bump(read_races=sum(h and not same for h, same in zip(held, res)))
        return res

    # -- helpers -------------------------------------------------------------------------
    def _link(self, key: str) -> str:
        return f"{self.path}/{key_to_name(key)}"

    def _commit(self, m: Mapping, e: Entry, good: bool) -> bool:
        with self._lock:
            published, replaced = self._own.commit(m, e, good)
            self._maps.unhold_locked(m)
        if replaced:  # another producer's value under this key: let it reuse that slot
            self._mark_deleted(e.key, replaced)
        return published

    def _lookup(self, key: str) -> tuple[Mapping, int, int, int] | None:
        """Resolve ``key`` to a committed slot, holding its mapping (caller must unhold)."""
        self._maps.sweep()
        try:
            name, off, length, seq = index.parse_target(os.readlink(self._link(key)))
        except (OSError, ValueError):
            return None
        m = self._maps.hold(name)
        if m is None:
            return None
        # a GPU arena's memory belongs to its producer's CUDA context: once that process is gone
        # its values are misses (a host arena's file stays whole and readable)
        if not m.check(off, seq, length, key_digest16(key)) or (m.dev is not None and not index.producer_alive(name)):
            self._maps.unhold(m)
            return None
        return m, off, length, seq

    def _mark_deleted(self, key: str, target: str) -> None:
        """Mark the slot a just-unlinked (or replaced) link pointed to as deleted."""
        try:
            name, off, length, seq = index.parse_target(target)
        except ValueError:
            return
        with self._lock:
            own = self._own.arena
            if own is not None and name == own.name:  # our own value: free it now
                self._own.free_if(off, seq)
                return
        m = self._maps.hold(name)
        if m is None:
            return
        try:
            if m.check(off, seq, length, key_digest16(key)):
                m.mark_deleted(off, seq)
        finally:
            self._maps.unhold(m)

    def _log_drops(self, dropped: list[int], n: int) -> None:
        if dropped:
            log.warning("shm pool %s: dropped %d of %d values (%s; largest %d bytes, arena %d bytes)",
                        self.path, len(dropped), n, self._own.why_dropped(max(dropped)), max(dropped),
                        self.budget)

    def _bump(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v
