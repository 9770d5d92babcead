"""Aligned file I/O and staging buffers that the stores share (see docs/design.md, the store).

``ALIGN`` is the page / O_DIRECT alignment both stores lay their files out in; the helpers here
write and scatter-read whole buffers (retrying short calls), keep page-aligned staging buffers
for reuse, and hash large reads on a helper thread while the next piece is read.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

ALIGN = 4096
ZEROS = bytes(ALIGN)
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def address(mv: memoryview) -> int:
    """Start address of a writable, non-empty byte view."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def write_all(fd: int, bufs: list) -> None:
    """Write every buffer of ``bufs`` in order."""
    for buf in bufs:
        mv = memoryview(buf)
        done = 0
        while done < len(mv):  # more than one call only beyond the kernel's ~2 GiB per call
            n = os.write(fd, mv[done:])
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n


def pread_into(fd: int, buf: memoryview, offset: int, direct: bool = False) -> int:
    """Read into ``buf`` from ``offset`` until it is full or EOF; returns bytes read."""
    return preadv_all(fd, [buf], offset, direct)


def preadv_all(fd: int, bufs: list, offset: int, direct: bool = False) -> int:
    """Scatter-read into ``bufs`` in order from ``offset`` until all are full or EOF; returns
    the bytes read. One ``preadv`` unless the kernel returns short (beyond ~2 GiB, or EOF)."""
    views = [memoryview(b) for b in bufs if len(b)]
    done = 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n <= 0:
            break
        done += n
        if direct and n % ALIGN:  # O_DIRECT: an unaligned count means EOF
            break
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return done


class Hasher:
    """A daemon thread that feeds pieces to hash objects in submission order (xxhash releases
    the GIL), so that a large read hashes one piece while the next is read."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="pdkv-store-hash", daemon=True).start()

    def _run(self) -> None:
        while True:
            h, mv, done = self._q.get()
            try:
                if mv is not None:
                    h.update(mv)
            except Exception:  # never let the thread die (update does not fail on byte views)
                log.exception("local store: hashing failed")
            if done is not None:
                done.set()

    def update(self, h: Any, mv: memoryview) -> None:
        self._q.put((h, mv, None))

    def finish(self, h: Any) -> int:
        """Wait until every piece given for ``h`` is hashed; its digest."""
        done = threading.Event()
        self._q.put((h, None, done))
        done.wait()
        return h.intdigest()


_HASHER: Hasher | None = None
_HASHER_LOCK = threading.Lock()


def hasher() -> Hasher:
    """The process's hashing thread (started on first use, shared by all stores)."""
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None:
            _HASHER = Hasher()
        return _HASHER


def _forget_hasher_after_fork() -> None:
    """A forked child has no copy of the parent's threads: it starts its own on first use."""
    global _HASHER, _HASHER_LOCK
    _HASHER, _HASHER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hasher_after_fork)


class BufPool:
    """Page-aligned staging buffers (anonymous mmaps, pages faulted in) reused across calls.

    A fresh buffer costs page faults and zeroing on every page (on a small VM that is slower than
    the disk); a reused one is copied into at memory speed. Buffers are kept per size (rounded up
    to ``ALIGN``), at most ``cap`` bytes of free ones; to keep a new size, free buffers of other
    sizes are dropped first (the least recently freed first). Thread safe.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._free: OrderedDict[int, list[mmap.mmap]] = OrderedDict()
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0       # buffers mapped
        self.reused = 0          # buffers handed out again

    def get(self, nbytes: int) -> mmap.mmap:
        size = round_up(max(nbytes, 1))
        with self._lock:
            lst = self._free.get(size)
            if lst:
                buf = lst.pop()
                if not lst:
                    del self._free[size]
                self._free_bytes -= size
                self.reused += 1
                return buf
            self.allocated += 1
        return mmap.mmap(-1, size, flags=_MAP_FLAGS)

    def put(self, buf: mmap.mmap) -> None:
        """Give ``buf`` back (the caller must not use it any more)."""
        size = len(buf)
        with self._lock:
            while self._free_bytes + size > self.cap:
                other = next((s for s in self._free if s != size), None)
                if other is None:
                    return  # only buffers of this size are kept and they fill the cap: drop it
                lst = self._free[other]
                lst.pop(0)
                self._free_bytes -= other
                if not lst:
                    del self._free[other]
            self._free.setdefault(size, []).append(buf)
            self._free.move_to_end(size)
            self._free_bytes += size

    def free_bytes(self) -> int:
        with self._lock:
            return self._free_bytes
