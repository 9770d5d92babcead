"""The producer side of the shm transport: one instance's arena, its allocator and its slots.

Slots are reserved (header RESERVED, invisible), then committed (header COMMITTED with a new
seq, then the index link) or released. When a slot does not fit, the owner frees the slots
consumers marked deleted (one vectorised look at the headers), then evicts its oldest committed
values: link first, then a new seq in the header, so a reader still copying sees the change.
Reserved slots are never evicted. Everything here runs under the transport's lock, except
where a method says otherwise.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from collections import OrderedDict
from typing import Callable

import numpy as np

from transport import shm_index as index
from transport.arena import (
    COMMITTED,
    FREED,
    PAGE,
    FirstFit,
    Mapping,
    key_digest16,
    slot_bytes,
    stamp,
)
from transport.base import TransportError
from transport.shm_maps import MapCache

log = logging.getLogger(__name__)

RETRY_ARENA_S = 5.0  # after a failed arena creation, writes are dropped this long


class Entry:
    """A slot of the own arena (reserved or committed)."""
    __slots__ = ("key", "off", "span", "size", "seq", "target")

    def __init__(self, key: str, off: int, span: int, size: int, seq: int) -> None:
        self.key, self.off, self.span, self.size, self.seq, self.target = key, off, span, size, seq, ""


class Call:
    """State of one put()/reserve() call: at most one arena check and one reclaim scan."""
    __slots__ = ("checked", "scanned", "dropped")

    def __init__(self) -> None:
        self.checked, self.scanned, self.dropped = False, False, []


class ArenaOwner:
    def __init__(self, path: str, budget: int, maps: MapCache, stats: dict[str, int],
                 link: Callable[[str], str], uid: str, device=None) -> None:
        self.path, self.budget, self.maps, self.stats, self.link, self.uid = path, budget, maps, stats, link, uid
        self.device = device  # a CUDA device: values in a GPU arena (transport/shm_gpu.py)
        self.arena: Mapping | None = None
        self.alloc: FirstFit | None = None
        self.committed: OrderedDict[int, Entry] = OrderedDict()  # offset -> entry, oldest first
        self.by_key: dict[str, int] = {}      # key -> offset of its newest committed entry
        self.reserved: dict[int, Entry] = {}
        self.reserved_bytes = 0
        self.closed = False
        self._seq = itertools.count(1)
        self._tmp = itertools.count()
        self._retry_at = 0.0

    # -- reserve ---------------------------------------------------------------------------
    def reserve(self, keys, sizes, call: Call) -> list[tuple[Mapping, Entry] | None]:
        """Reserve one slot per key (None where it cannot fit; counted as dropped)."""
        out: list[tuple[Mapping, Entry] | None] = []
        a = self._ensure_arena(check=not call.checked)
        call.checked = True
        for key, size in zip(keys, sizes):
            span = slot_bytes(size)
            off = self._make_room(span, call) if a is not None and span <= a.size else None
            if off is None:
                out.append(None)
                call.dropped.append(size)
                self.stats["dropped"] += 1
                continue
            e = Entry(key, off, span, size, next(self._seq))
            a.write_header(off, e.seq, size, key_digest16(key))
            self.reserved[off] = e
            self.reserved_bytes += span
            a.holds += 1
            out.append((a, e))
        return out

    def why_dropped(self, largest: int) -> str:
        return ("closed" if self.closed else "no arena" if self.arena is None
                else "too large for the arena" if slot_bytes(largest) > self.budget
                else "no room: the rest is reserved")

    def _ensure_arena(self, check: bool) -> Mapping | None:
        a = self.arena
        if self.closed:
            return None
        if check and a is not None and not a.exists():  # the pool was removed under us
            log.warning("shm pool %s: arena %s was removed; starting a new one", self.path, a.name)
            for e in self.committed.values():
                index.unlink_if(self.link(e.key), e.target)
            self.committed.clear()
            self.by_key.clear()
            self.maps.retire(a)
            self.arena = self.alloc = a = None
        if a is None and time.monotonic() >= self._retry_at:
            path = os.path.join(self.path, f"{index.ARENA_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                index.make_private_dir(self.path)  # re-made if it was removed: checked like the first time
                a = Mapping.create(path, self.budget, self.device)
            except (OSError, ValueError, TransportError) as e:
                self._retry_at = time.monotonic() + RETRY_ARENA_S
                self.stats["put_errors"] += 1
                log.error("shm pool %s: cannot create a %d MiB arena: %s (writes dropped)",
                          self.path, self.budget >> 20, e)
                return None
            arenas, links = index.reap_dead(self.path)  # a SIGKILLed predecessor's memory
            self.stats["reaped_arenas"] += arenas
            self.stats["reaped_links"] += links
            self.maps.pin(a)
            self.maps.add_own(a)
            self.arena, self.alloc = a, FirstFit(a.size)
            if a.dev is not None:
                self.alloc.alloc(PAGE)  # page 0 describes the GPU buffer: never a slot
            self.reserved.clear()  # slots of a removed arena fail at commit
            self.reserved_bytes = 0
            self.stats["arenas"] += 1
        return a

    def _make_room(self, span: int, call: Call) -> int | None:
        """Allocate ``span`` bytes, reclaiming then evicting committed slots if needed."""
        off = self.alloc.alloc(span)
        if off is not None:
            return off
        if not call.scanned:  # one reclaim scan per reserve()/put() call
            call.scanned = True
            self._reclaim()
            off = self.alloc.alloc(span)
            if off is not None:
                return off
        if self.alloc.size - self.reserved_bytes < span:
            return None  # reserved slots hold too much: evicting would not help
        while off is None and self.committed:
            e = next(iter(self.committed.values()))
            # a link already gone (a consumer died between unlink and mark) counts as reclaimed
            self.stats["evictions" if index.unlink_if(self.link(e.key), e.target) else "reclaimed"] += 1
            self.free(e)
            off = self.alloc.alloc(span)
        return off

    def _reclaim(self) -> None:
        """Free the committed slots consumers marked deleted: one numpy gather of the headers."""
        if not self.committed:
            return
        entries = list(self.committed.values())
        deleted = self.arena.deleted_seqs(np.fromiter((e.off for e in entries), np.int64, len(entries)))
        gone = np.flatnonzero(deleted == np.fromiter((e.seq for e in entries), np.uint64, len(entries)))
        for i in gone:
            self.free(entries[i])
        self.stats["reclaimed"] += len(gone)

    def free(self, e: Entry) -> None:
        """Give a committed slot back (its seq changes: readers still copying lose)."""
        self.arena.set_stamp(e.off, stamp(next(self._seq), FREED))
        self.alloc.free(e.off, e.span)
        self.committed.pop(e.off, None)
        if self.by_key.get(e.key) == e.off:
            del self.by_key[e.key]

    def free_if(self, off: int, seq: int) -> None:
        """A delete of one of our own values: free it now if it is still that value."""
        e = self.committed.get(off)
        if e is not None and e.seq == seq:
            self.free(e)

    # -- commit ----------------------------------------------------------------------------
    def commit(self, m: Mapping, e: Entry, good: bool) -> tuple[bool, str]:
        """Publish (``good``) or release one reserved slot; (published, replaced link target).
        The caller unholds ``m`` afterwards."""
        live = m is self.arena and not self.closed and self.reserved.get(e.off) is e
        err: OSError | None = None
        replaced = ""
        if live and good:
            seq = next(self._seq)
            m.set_stamp(e.off, stamp(seq, COMMITTED))
            target = index.make_target(m.name, e.off, e.size, seq)
            try:
                replaced = index.publish(self.link(e.key), target,
                                         f"{self.path}/{index.TMP_PREFIX}{self.uid}-{next(self._tmp)}")
            except OSError as ex:
                err = ex
        if live:
            del self.reserved[e.off]
            self.reserved_bytes -= e.span
            if good and err is None:
                e.seq, e.target = seq, target
                old = self.committed.get(self.by_key.get(e.key, -1))
                if old is not None:  # an overwrite: the old value's readers lose
                    self.free(old)
                self.committed[e.off] = e
                self.by_key[e.key] = e.off
                self.stats["puts"] += 1
                self.stats["put_bytes"] += e.size
            else:
                m.set_stamp(e.off, stamp(next(self._seq), FREED))
                self.alloc.free(e.off, e.span)
        if not good:
            self.stats["aborted"] += 1
        elif not live or err is not None:
            self.stats["dropped"] += 1
            self.stats["put_errors"] += err is not None
            if err is not None:
                log.warning("shm pool %s: publishing %s failed: %s", self.path, e.key, err)
        published = live and good and err is None
        return published, (replaced if published and not replaced.startswith(m.name + ":") else "")

    # -- the end ---------------------------------------------------------------------------
    def close(self) -> tuple[list[Entry], Mapping | None]:
        """Stop writing; returns the committed entries and the arena for ``remove`` (no lock)."""
        self.closed = True
        own, arena = list(self.committed.values()), self.arena
        self.committed.clear()
        self.by_key.clear()
        self.arena = self.alloc = None
        return own, arena

    def remove(self, own: list[Entry], arena: Mapping | None) -> None:
        """(lock not held) Unlink the links that still point at our values, then the arena file."""
        for e in own:
            index.unlink_if(self.link(e.key), e.target)
        if arena is not None:
            try:
                os.unlink(arena.path)
            except OSError:
                pass

    def used_bytes(self) -> int:
        return 0 if self.alloc is None else self.alloc.size - self.alloc.free_bytes
