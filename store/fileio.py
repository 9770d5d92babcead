"""Aligned file I/O, staging buffers and checked directories that the stores share (see
docs/design.md, the store).

``ALIGN`` is the page / O_DIRECT alignment both stores lay their files out in; the helpers here
write and scatter-read whole buffers (retrying short calls), keep page-aligned staging buffers
for reuse, and hash large reads on a helper thread while the next piece is read. The directories
and files a store uses must be this process's uid's and writable by it only (``check_owned``,
``make_own_dirs``, ``open_own``; issue 18): another user could otherwise plant, swap or delete
KV files, and a symlink planted in their place is never followed.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import stat
import threading
from collections import OrderedDict
from typing import Any

from common.config import ConfigError
from common.private import dir_problem

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


def not_ours(path: str) -> str:
    """Why directory ``path`` is not one pdkv may use ("" if it is): a symlink, not a directory,
    another user's, or writable by others (they could plant, swap or delete files in it)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return e.strerror or str(e)
    return dir_problem(st, 0o022)


def check_owned(path: str, what: str = "store path", hint: str = "") -> None:
    """ConfigError unless directory ``path`` (a symlink to one is followed: it is what the
    configuration names) is this uid's and writable by it only."""
    st = os.stat(path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"{what} {path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}; it must "
                          f"be ours (uid {os.geteuid()}) and writable by us only (e.g. 0700), or other users could "
                          f"plant or delete KV files there; use a directory of your own (e.g. a sub-directory){hint}")


def make_own_dirs(top: str, d: str, what: str = "store sub-directory") -> None:
    """Make the directories from ``top`` down to ``d`` (0700), each checked to be ours and not a
    symlink, whether made now or found (PermissionError EPERM naming the one that is not)."""
    rel = os.path.relpath(d, top)
    cur = top
    for part in ([] if rel == "." else rel.split(os.sep)):
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o700)
        except FileExistsError:
            pass
        why = not_ours(cur)
        if why:
            raise PermissionError(errno.EPERM, f"{what} {cur} is {why}; pdkv writes only into directories "
                                  "of its own")


def own_file(path: str) -> bool:
    """A regular file of ours (not a symlink, not another user's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def open_own(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symlink at ``path`` and refuses a file of another uid, or
    not a regular file (PermissionError EPERM naming it)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(errno.EPERM, f"{path} is a symlink; pdkv opens only files of its own") from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PermissionError(errno.EPERM, f"{path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}"
                              f"{'' if stat.S_ISREG(st.st_mode) else ' (not a regular file)'}; pdkv opens only "
                              f"files of its own (uid {os.geteuid()})")
    return fd


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
