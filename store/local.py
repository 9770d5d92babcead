"""Local-disk KV store: one file per chunk on a local (NVMe) filesystem or a FUSE mount.

Layout and sharding (the conventions of LMCache's local-disk backend):

* ``StoreConfig.paths`` lists directories (``file://`` prefix allowed). The instance on device
  ``d`` uses ``paths[d % len(paths)]``, so each GPU writes to its own drive. A directory that
  does not exist yet is made (owner-only); it must be writable (checked at construction).
* ``StoreConfig.size_gb`` is ONE total budget for all paths and all their writers: each writing
  process keeps to ``size_gb * 1e9 / len(paths) / writers`` bytes (``StoreConfig.writers``: the
  processes that write to each path; ``pd launch`` sets it from the prefill pool), accounting for
  the files under its own path (what it found there at start, what it wrote, and files of other
  processes it read), so the writers of a path together stay within its share.
* Files and directories are created readable by their owner only (0600 / 0700).
* Key ``namespace/rank/hexhash`` -> ``<path>/<namespace>+<rank>/<hexhash>.kv``. Characters
  outside ``[A-Za-z0-9_.-]`` are escaped as ``%XX`` (``/`` inside the directory part as ``+``),
  so the mapping is injective and a lookup is a single ``open``; no index scan.

File format (little endian): ``magic 8s | version H | key_len H | flags I | payload_len Q |
xxh3-64 of the payload Q`` (32 bytes), then the UTF-8 key, then the payload. With O_DIRECT the
header+key is zero-padded to 4096 bytes so the payload starts page aligned, and the payload is
zero-padded to a multiple of 4096 bytes (flags ``PADDED | ALIGNED``); the true length is in the
header. An O_DIRECT read of such a file goes straight into the caller's buffer when that is page
aligned (only the header page, and a tail the buffer has no room for, are staged). Files of the
older O_DIRECT layout (``PADDED`` only: header, key, payload, then padding) are still read. Each
file is written to a temporary file in the same directory and renamed, so a chunk is never
visible half-written; a file that fails any check on read (magic, version, key, length,
checksum) is a miss and is deleted.

Writes are asynchronous: ``put`` copies the bytes into a bounded queue (``queue_mb``) and
returns; ``write_threads`` background threads evict (``lru``/``lfu``/``fifo``) until the new
file fits, write it (header and payload in one write) and publish it. A full queue, a value
larger than the budget, or any OS error while writing (ENOSPC, EIO, ...) drops the put and counts
it; serving goes on. The queue's copies live in page-aligned staging buffers that are reused
(pre-faulted) rather than allocated per put; up to ``queue_mb`` of free buffers are kept, so an
idle store holds at most that much staging memory (the same bound as a full queue), plus at most
``min(queue_mb, 64 MiB)`` of staging buffers for O_DIRECT reads.

A store opened with ``writer=False`` (a scheduler's lookups, a decode worker's fallback reads)
starts no writer threads and drops every ``put`` (counted ``read_only``); it still reads every
file under its path, whoever wrote it.

Keys are content addresses: a put of a key that is already stored or queued is skipped
(counted ``duplicates``) and returns True.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import logging
import mmap
import os
import queue
import re
import struct
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Sequence

import xxhash

from common.bytes import byte_view
from store.queue import DUPLICATE, QUEUED, WriteQueue

log = logging.getLogger(__name__)

MAGIC = b"PDKVSTOR"
VERSION = 1
_HDR = struct.Struct("<8sHHIQQ")
HEADER_FIXED = _HDR.size  # 32
FLAG_PADDED = 1            # the file is zero-padded to a multiple of ALIGN
FLAG_ALIGNED = 2           # the payload starts at the first ALIGN boundary after the key
ALIGN = 4096
_ZEROS = bytes(ALIGN)
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"
_MAX_KEY = 0xFFFF
_MAX_NAME = 200            # well under NAME_MAX (255 bytes)
_TMP_STALE_S = 600.0       # temp files of live processes older than this are removed at start
MIN_BUDGET = 1 << 20
READ_POOL_MAX = 64 << 20   # free staging buffers kept for O_DIRECT reads (at most queue_mb)
READ_PIECE = 4 << 20       # buffered reads of >= 2 pieces: piece by piece, hashed alongside

_PLAIN = re.compile(r"[A-Za-z0-9_.-]")
# whole components that _escape leaves as they are ("/" becomes "+" in the directory part)
_ALL_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_ALL_PLAIN_DIR = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_./-]*")
_FLAT_DIR = "%flat"        # keys without "/"; "%f" can never come out of _escape
_EMPTY = "%e"              # an empty component

STAT_KEYS = (
    "puts",             # put() calls queued
    "put_bytes",        # payload bytes queued
    "duplicates",       # put() of a key already stored or queued (skipped, returned True)
    "dropped",          # put() returned False (queue full, too large, closed)
    "queue_full",       # ... of which the queue was full
    "too_large",        # ... of which the value can never fit in the budget
    "read_only",        # ... of which the store was opened with writer=False
    "writes",           # files published
    "write_bytes",      # bytes of those files
    "write_errors",     # queued puts lost to an OS error while writing (ENOSPC, EIO, ...)
    "budget_drops",     # queued puts lost because in-flight writes held the rest of the budget
    "evictions",        # files removed to make room
    "hits",
    "misses",           # absent, too long for the buffer, corrupt, or an I/O error
    "get_bytes",
    "queue_hits",       # ... hits served from the write queue (not yet on disk)
    "corrupt",          # files found torn/corrupt/mismatched (deleted)
    "deletes",          # keys removed by delete()
    "recovered",        # files indexed by the scan at start
    "adopted",          # files found on disk that the index did not know (another process)
    "temp_removed",     # leftover temporary files removed at start
    "odirect_fallbacks",  # the filesystem refused O_DIRECT: buffered I/O from then on
)


def _escape(part: str, slash: str | None = None) -> str:
    if not part:
        return _EMPTY
    if len(part) <= _MAX_NAME:  # fast path (the usual keys): one regex instead of one per character
        if slash is None:
            if _ALL_PLAIN.fullmatch(part):
                return part
        elif _ALL_PLAIN_DIR.fullmatch(part):
            return part.replace("/", slash)
    out = []
    for i, ch in enumerate(part):
        if slash is not None and ch == "/":
            out.append(slash)
        elif _PLAIN.match(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    name = "".join(out)
    if len(name) > _MAX_NAME:  # readable prefix + 128-bit digest; "#" never occurs otherwise
        digest = hashlib.blake2b(part.encode(), digest_size=16).hexdigest()
        name = name[: _MAX_NAME - 33] + "#" + digest
    return name


def key_to_relpath(key: str) -> str:
    """Injective, filesystem-safe relative path of a key: ``<dir>/<file>.kv``."""
    if "/" in key:
        prefix, last = key.rsplit("/", 1)
        d = _escape(prefix, slash="+")
    else:
        d, last = _FLAT_DIR, key
    return os.path.join(d, _escape(last) + SUFFIX)


def parse_path(p: str) -> str:
    return p[len("file://"):] if p.startswith("file://") else p


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(klen: int, plen: int, direct: bool) -> tuple[int, int]:
    """(payload offset, file size) of a file written now (O_DIRECT: the ALIGNED layout)."""
    hoff = HEADER_FIXED + klen
    if direct:
        poff = _round_up(hoff)
        return poff, poff + _round_up(plen)
    return hoff, hoff + plen


def _write_all(fd: int, bufs: list) -> None:
    """Write every buffer of ``bufs`` in order (a module function so tests can inject ENOSPC)."""
    for buf in bufs:
        mv = memoryview(buf)
        done = 0
        while done < len(mv):  # more than one call only beyond the kernel's ~2 GiB per call
            n = os.write(fd, mv[done:])
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n


def _pread_into(fd: int, buf: memoryview, offset: int, direct: bool = False) -> int:
    """Read into ``buf`` from ``offset`` until it is full or EOF; returns bytes read."""
    return _preadv_all(fd, [buf], offset, direct)


def _preadv_all(fd: int, bufs: list, offset: int, direct: bool = False) -> int:
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


class _Hasher:
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


_HASHER: _Hasher | None = None
_HASHER_LOCK = threading.Lock()


def _hasher() -> _Hasher:
    """The process's hashing thread (started on first use, shared by all stores)."""
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None:
            _HASHER = _Hasher()
        return _HASHER


def _forget_hasher_after_fork() -> None:
    """A forked child has no copy of the parent's threads: it starts its own on first use."""
    global _HASHER, _HASHER_LOCK
    _HASHER, _HASHER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hasher_after_fork)


def _address(mv: memoryview) -> int:
    """Start address of a writable, non-empty byte view."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


class _BufPool:
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
        size = _round_up(max(nbytes, 1))
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Item:
    """A queued put: ``buf`` (a pooled staging buffer) holds the whole file image, the payload
    at ``poff``; the writer fills in the header. ``refs`` counts gets copying from the buffer
    (queue hits); the buffer goes back to the pool when the write is ``done`` and no get holds it."""

    __slots__ = ("key", "buf", "poff", "plen", "size", "direct", "cancelled", "refs", "done")

    def __init__(self, key, buf, poff, plen, size, direct):
        self.key, self.buf, self.poff, self.plen, self.size, self.direct = key, buf, poff, plen, size, direct
        self.cancelled = False
        self.refs = 0
        self.done = False

    def payload(self) -> memoryview:
        return memoryview(self.buf)[self.poff:self.poff + self.plen]


class _OrderPolicy:
    """LRU (``refresh=True``: hits move a key to the back) or FIFO (insertion order)."""

    def __init__(self, refresh: bool):
        self.refresh = refresh
        self.order: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def touch(self, key: str) -> None:
        if self.refresh and key in self.order:
            self.order.move_to_end(key)

    def remove(self, key: str) -> None:
        self.order.pop(key, None)

    def victim(self) -> str | None:
        return next(iter(self.order), None)


class _LFUPolicy:
    """Fewest hits first; ties: least recently used first."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.buckets: dict[int, OrderedDict[str, None]] = {}

    def _place(self, key: str, n: int) -> None:
        self.count[key] = n
        self.buckets.setdefault(n, OrderedDict())[key] = None

    def _unplace(self, key: str) -> int | None:
        n = self.count.pop(key, None)
        if n is not None:
            b = self.buckets[n]
            del b[key]
            if not b:
                del self.buckets[n]
        return n

    def add(self, key: str) -> None:
        self._unplace(key)
        self._place(key, 0)

    def touch(self, key: str) -> None:
        n = self._unplace(key)
        if n is not None:
            self._place(key, n + 1)

    def remove(self, key: str) -> None:
        self._unplace(key)

    def victim(self) -> str | None:
        if not self.buckets:
            return None
        return next(iter(self.buckets[min(self.buckets)]))


class _Entry:
    __slots__ = ("size", "last_use", "hits")

    def __init__(self, size: int, last_use: float, hits: int = 0):
        self.size, self.last_use, self.hits = size, last_use, hits


class LocalStore:
    """``store.base.KVStore`` on a local directory (see the module docstring)."""

    def __init__(self, cfg: Any, device_index: int = 0, fsync: bool = False, writer: bool = True) -> None:
        paths = [parse_path(p) for p in (cfg.paths or [])]
        if not paths:
            raise ValueError("store backend local needs at least one directory in store.paths "
                             "(e.g. paths: [\"file:///mnt/nvme0/pdkv\"])")
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index}")
        path = paths[device_index % len(paths)]
        self.path = os.path.abspath(path)
        self._check_dir(path)
        writers = max(1, int(getattr(cfg, "writers", 1)))
        self.budget = int(cfg.size_gb * 1e9 / len(paths) / writers)
        if self.budget < MIN_BUDGET:
            raise ValueError(
                f"store.size_gb={cfg.size_gb} gives {self.budget} bytes per writer over {len(paths)} "
                f"path(s) and {writers} writer(s) per path; the local store needs at least {MIN_BUDGET} "
                "bytes (1 MiB) per writer")
        self.location = f"local:{self.path}"
        # a put is refused when its file image exceeds the budget (see ``put``)
        self.max_value = self.budget
        self.eviction = cfg.eviction
        self.queue_budget = int(cfg.queue_mb) << 20
        self.fsync = fsync
        self.writer = bool(writer)  # False: lookups and reads only; every put is dropped
        self._direct = bool(cfg.o_direct)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._q = WriteQueue(self.queue_budget, self.stats, self._lock, f"local store {self.path}",
                             writer=self.writer)
        self._cv = self._q.cv
        self._index: dict[str, _Entry] = {}
        if cfg.eviction == "lfu":
            self._policy: Any = _LFUPolicy()
        elif cfg.eviction in ("lru", "fifo"):
            self._policy = _OrderPolicy(refresh=cfg.eviction == "lru")
        else:
            raise ValueError(f"store.eviction {cfg.eviction!r} is not allowed; choose lru, lfu or fifo")
        self._used = 0              # bytes of indexed files
        self._inflight = 0          # bytes reserved by files being written
        self._pool = _BufPool(self.queue_budget)  # staging buffers of queued puts
        # staging of O_DIRECT reads (a header page; whole files for unaligned callers): apart,
        # so that reads and the write queue do not push each other's buffers out
        self._rpool = _BufPool(min(self.queue_budget, READ_POOL_MAX))
        self._evicting: set[str] = set()
        self._seq = itertools.count()
        self._uid = uuid.uuid4().hex[:12]  # temp names: unique per store, not per process only
        self._dirs: set[str] = set()
        self._scan()
        self._threads = [threading.Thread(target=self._writer, name=f"pdkv-store-w{i}", daemon=True)
                         for i in range(int(cfg.write_threads) if self.writer else 0)]
        for t in self._threads:
            t.start()
        log.info("local store %s: budget %d B, %d files (%d B) found, eviction %s, o_direct %s",
                 self.path, self.budget, len(self._index), self._used, self.eviction, self._direct)

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def _check_dir(path: str) -> None:
        if not os.path.exists(path):
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ValueError(f"store path {path} does not exist and cannot be made ({e.strerror or e}); "
                                 "create the directory (on the disk meant for the KV store) before starting") from None
            log.info("local store: made the directory %s", path)
        if not os.path.isdir(path):
            raise ValueError(f"store path {path} is not a directory; store.paths needs directories")
        # named like a temp file of this (live) process, so a concurrent scan leaves it alone
        probe = os.path.join(path, f"{TMP_PREFIX}{os.getpid()}-probe-{threading.get_ident()}")
        try:
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "no write permission")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            _unlink_quiet(probe)
        except OSError as e:
            raise ValueError(f"store path {path} is not writable ({e.strerror or e}); the store "
                             "needs a directory this process can create files in") from None

    def _scan(self) -> None:
        """Index the files already under the path; remove leftover temp files and bad files."""
        found: list[tuple[float, str, int]] = []
        now = time.time()
        for dirpath, _dirnames, filenames in os.walk(self.path):
            for name in filenames:
                full = os.path.join(dirpath, name)
                if name.startswith(TMP_PREFIX):
                    if self._stale_temp(name, full, now):
                        try:
                            os.unlink(full)
                            self.stats["temp_removed"] += 1
                        except OSError:
                            pass
                    continue
                if not name.endswith(SUFFIX):
                    continue  # not ours: leave it alone
                got = self._read_meta(full)
                if got is None:
                    self._remove_bad(full, None, "unreadable header at start")
                    continue
                key, size, mtime = got
                found.append((mtime, key, size))
            if dirpath != self.path:
                self._dirs.add(dirpath)
        found.sort()
        for mtime, key, size in found:
            self._index[key] = _Entry(size, mtime)
            self._policy.add(key)
            self._used += size
        self.stats["recovered"] = len(found)

    @staticmethod
    def _stale_temp(name: str, full: str, now: float) -> bool:
        try:
            pid = int(name[len(TMP_PREFIX):].split("-", 1)[0])
        except ValueError:
            return True
        if not _pid_alive(pid):  # the writer is gone (crashed): its temp files are garbage
            return True
        try:
            return now - os.stat(full).st_mtime > _TMP_STALE_S
        except OSError:
            return False

    def _read_meta(self, full: str) -> tuple[str, int, float] | None:
        """(key, file size, mtime) of a store file whose header is consistent, else None."""
        try:
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            hdr = os.pread(fd, 512, 0)  # the fixed part and any usual key
            if len(hdr) >= HEADER_FIXED:
                klen = _HDR.unpack_from(hdr, 0)[2]
                if HEADER_FIXED + klen > len(hdr):
                    hdr = os.pread(fd, HEADER_FIXED + klen, 0)
        except OSError:
            return None
        finally:
            os.close(fd)
        parsed = self._parse_header(hdr, st.st_size)
        if parsed is None:
            return None
        key = parsed[0]
        if os.path.join(self.path, key_to_relpath(key)) != full:
            return None  # the header names another key: not this file
        return key, st.st_size, st.st_mtime

    @staticmethod
    def _parse_header(hdr: Any, file_size: int) -> tuple[str, int, int, int] | None:
        """(key, payload offset, payload length, checksum) if the header fits the file size."""
        if len(hdr) < HEADER_FIXED:
            return None
        magic, version, klen, flags, plen, csum = _HDR.unpack_from(hdr, 0)
        if magic != MAGIC or version != VERSION or len(hdr) < HEADER_FIXED + klen:
            return None
        try:
            key = bytes(hdr[HEADER_FIXED:HEADER_FIXED + klen]).decode()
        except UnicodeDecodeError:
            return None
        hoff = HEADER_FIXED + klen
        if flags & FLAG_ALIGNED:
            hoff = _round_up(hoff)
            want = hoff + _round_up(plen)
        elif flags & FLAG_PADDED:
            want = _round_up(hoff + plen)
        else:
            want = hoff + plen
        if file_size != want:
            return None
        return key, hoff, plen, csum

    # -- helpers ---------------------------------------------------------------------------
    def _header_of(self, key: str, full: str, st: os.stat_result, hdr: Any) -> tuple[str, int, int, int] | None:
        """The parsed header ``hdr`` of file ``full`` if it is ``key``'s; else the file is bad:
        removed, and None."""
        parsed = self._parse_header(hdr, st.st_size)
        if parsed is None or parsed[0] != key:
            self._remove_bad(full, st, "bad header, wrong key or wrong length")
            return None
        return parsed

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key_to_relpath(key))

    def _remove_bad(self, full: str, fd_stat: os.stat_result | None, why: str) -> None:
        """Delete a corrupt file (only if it is still the same inode we looked at)."""
        try:
            if fd_stat is not None:
                st = os.stat(full)
                if (st.st_ino, st.st_dev) != (fd_stat.st_ino, fd_stat.st_dev):
                    return
            os.unlink(full)
        except OSError:
            pass
        with self._lock:
            self.stats["corrupt"] += 1
        log.warning("local store %s: removed %s (%s)", self.path, full, why)

    def _forget(self, key: str) -> _Entry | None:
        """Drop ``key`` from the index (lock held)."""
        e = self._index.pop(key, None)
        if e is not None:
            self._used -= e.size
            self._policy.remove(key)
        return e

    def _open_direct_fallback(self, e: OSError) -> None:
        with self._lock:
            if not self._direct:
                return
            self._direct = False
            self.stats["odirect_fallbacks"] += 1
        log.warning("local store %s: the filesystem refuses O_DIRECT (%s); using buffered I/O",
                    self.path, e)

    # -- KVStore ---------------------------------------------------------------------------
    def put(self, key: str, data: Any) -> bool:
        mv = byte_view(data)
        plen = mv.nbytes
        kb = key.encode()
        if len(kb) > _MAX_KEY:
            raise ValueError(f"store key is {len(kb)} bytes long; at most {_MAX_KEY}")
        direct = self._direct
        poff, size = _layout(len(kb), plen, direct)
        got = self._q.reserve(key, size, self._index.__contains__, limit=self.budget)
        if got != QUEUED:
            return got == DUPLICATE
        buf = None
        try:
            buf = self._pool.get(size)  # page aligned; header and padding are filled by the writer
            memoryview(buf)[poff:poff + plen] = mv
        except BaseException:
            self._q.unreserve(size)
            if buf is not None:
                self._pool.put(buf)
            raise
        if not self._q.push(_Item(key, buf, poff, plen, size, direct), plen):
            self._pool.put(buf)
            return False
        return True

    def get(self, key: str, into: Any) -> int:
        out = byte_view(into)
        if out.readonly:
            raise ValueError("get: the destination buffer is read-only")
        with self._lock:
            item = self._q.pending.get(key)
            e = self._index.get(key)
            if item is not None and e is None:
                item.refs += 1  # the writer may finish meanwhile: keep the buffer out of the pool
        if item is not None and e is None:
            n = 0
            try:
                if item.plen <= out.nbytes:
                    out[:item.plen] = item.payload()
                    n = item.plen
            finally:
                self._unref(item)
            self._count_get(key, n, queue=True)
            return n
        full = self._file(key)
        n = self._read_file(key, full, out)
        if n and e is None:
            self._adopt(key, full)
        elif not n and e is not None:
            with self._lock:
                if not os.path.exists(full) and self._index.get(key) is e:
                    self._forget(key)
        self._count_get(key, n)
        return n

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        """``get`` of each key into its buffer (``store.base.KVStore``); local files have no
        batch submit, so one by one."""
        if len(keys) != len(intos):
            raise ValueError(f"get_many: {len(keys)} keys but {len(intos)} buffers")
        return [self.get(key, into) for key, into in zip(keys, intos)]

    def _unref(self, item: _Item) -> None:
        with self._lock:
            item.refs -= 1
            buf = self._detach(item)
        if buf is not None:
            self._pool.put(buf)

    @staticmethod
    def _detach(item: _Item) -> Any:
        """The item's buffer if nothing uses it any more (lock held), else None."""
        if item.done and not item.refs and item.buf is not None:
            buf, item.buf = item.buf, None
            return buf
        return None

    def _count_get(self, key: str, n: int, queue: bool = False) -> None:
        with self._lock:
            if n:
                self.stats["hits"] += 1
                self.stats["get_bytes"] += n
                if queue:
                    self.stats["queue_hits"] += 1
                e = self._index.get(key)
                if e is not None:
                    e.hits += 1
                    e.last_use = time.time()
                    self._policy.touch(key)
            else:
                self.stats["misses"] += 1

    def _adopt(self, key: str, full: str) -> None:
        try:
            size = os.stat(full).st_size
        except OSError:
            return
        with self._lock:
            if key in self._index or full in self._evicting:
                return
            self._index[key] = _Entry(size, time.time())
            self._policy.add(key)
            self._used += size
            self.stats["adopted"] += 1

    def _read_file(self, key: str, full: str, out: memoryview) -> int:
        direct = self._direct
        try:
            fd = os.open(full, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            return 0
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                self._open_direct_fallback(e)
                return self._read_file(key, full, out)
            log.warning("local store %s: open %s failed: %s", self.path, full, e)
            return 0
        try:
            st = os.fstat(fd)
            if direct:
                return self._read_direct(key, full, fd, st, out)
            return self._read_buffered(key, full, fd, st, out)
        except OSError as e:
            log.warning("local store %s: read %s failed: %s", self.path, full, e)
            return 0
        finally:
            os.close(fd)

    def _read_buffered(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        # Two reads (the header, then the payload straight into ``out``) on purpose: measured on
        # ext4 with the page cache cold, one preadv of header+payload was up to 2x slower (the
        # small first read starts the kernel's readahead before the large one).
        parsed = self._header_of(key, full, st, os.pread(fd, HEADER_FIXED + len(key.encode()), 0))
        if parsed is None:
            return 0
        _, poff, plen, csum = parsed
        if plen > out.nbytes:
            return 0
        dst = out[:plen]
        if plen >= 2 * READ_PIECE:  # large: hash each piece while the next one is read
            ok = self._read_pieces(fd, dst, poff, csum)
        else:
            ok = _pread_into(fd, dst, poff) == plen and xxhash.xxh3_64_intdigest(dst) == csum
        if not ok:
            self._remove_bad(full, st, "checksum mismatch or short read")
            return 0
        return plen

    def _read_direct(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        size = st.st_size
        if size < HEADER_FIXED:
            self._remove_bad(full, st, "truncated header")
            return 0
        poff = _round_up(HEADER_FIXED + len(key.encode()))
        body = size - poff  # payload + padding if the file has the ALIGNED layout
        n_out = min(body, out.nbytes // ALIGN * ALIGN)
        if body <= 0 or size % ALIGN or n_out <= 0 or _address(out) % ALIGN:
            return self._read_staged(key, full, fd, st, out)
        # the payload pages straight into ``out`` (its bytes beyond the payload are unspecified);
        # the header page and any tail ``out`` has no room for go to a staging buffer. One preadv:
        # the kernel keeps all of it in flight (reading in pieces to hash one while the next is
        # read was measured no faster here: it lowers the queue depth).
        stage = self._rpool.get(poff + body - n_out)
        try:
            sv = memoryview(stage)
            tail = sv[poff:poff + body - n_out]
            got = _preadv_all(fd, [sv[:poff], out[:n_out], tail], 0, direct=True)
            parsed = self._header_of(key, full, st, sv[:poff] if got >= poff else b"")
            if parsed is None:
                return 0
            _, hoff, plen, csum = parsed
            if hoff != poff:  # the older PADDED layout: the payload is not where it was read to
                return self._read_staged(key, full, fd, st, out)
            if plen > out.nbytes:
                return 0
            ok = got == size
            if ok and plen > n_out:  # the tail that did not fit in whole pages
                out[n_out:plen] = tail[:plen - n_out]
            if not ok or xxhash.xxh3_64_intdigest(out[:plen]) != csum:
                self._remove_bad(full, st, "checksum mismatch or short read")
                return 0
            return plen
        finally:
            self._rpool.put(stage)

    @staticmethod
    def _read_pieces(fd: int, dst: memoryview, foff: int, csum: int) -> bool:
        """Read ``dst`` from file offset ``foff`` in pieces while the helper thread hashes the
        pieces already read; True if all was read and the checksum matches."""
        h = xxhash.xxh3_64()
        hasher = _hasher()
        ok, off, end = True, 0, len(dst)
        try:
            while ok and off < end:
                piece = dst[off:off + READ_PIECE]
                ok = _pread_into(fd, piece, foff + off) == len(piece)
                if ok:
                    hasher.update(h, piece)
                off += len(piece)
        finally:
            digest = hasher.finish(h)  # also on errors: nothing may touch ``dst`` after we return
        return ok and digest == csum

    def _read_staged(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        """O_DIRECT read of the whole file into a staging buffer, then a copy into ``out``."""
        size = st.st_size
        stage = self._rpool.get(size)  # page aligned, as O_DIRECT needs
        try:
            mv = memoryview(stage)
            got = _pread_into(fd, mv, 0, direct=True)
            parsed = self._header_of(key, full, st, mv[:min(got, HEADER_FIXED + _MAX_KEY)])
            if parsed is None:
                return 0
            _, hoff, plen, csum = parsed
            if plen > out.nbytes:
                return 0
            payload = mv[hoff:hoff + plen]
            if got < hoff + plen or xxhash.xxh3_64_intdigest(payload) != csum:
                self._remove_bad(full, st, "checksum mismatch or short read")
                return 0
            out[:plen] = payload
            return plen
        finally:
            self._rpool.put(stage)

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        for key in keys:
            with self._lock:
                known = key in self._index or key in self._q.pending
            if not known and not os.path.exists(self._file(key)):
                break
            n += 1
        return n

    def keys(self) -> list[str]:
        """The keys of the index (files on disk as this instance knows them)."""
        with self._lock:
            return list(self._index)

    def delete(self, keys: Sequence[str]) -> int:
        n = 0
        for key in keys:
            with self._lock:
                item = self._q.pending.pop(key, None)
                if item is not None:
                    item.cancelled = True
                had = self._forget(key) is not None or item is not None
            try:
                os.unlink(self._file(key))
                had = True
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("local store %s: delete %s failed: %s", self.path, key, e)
            n += had
        with self._lock:
            self.stats["deletes"] += n
        return n

    def usage(self) -> dict:
        with self._lock:
            return {"path": self.path, "bytes": self._used, "files": len(self._index),
                    "budget": self.budget, "queued": len(self._q.items),
                    "queued_bytes": self._q.queued_bytes, "queue_budget": self.queue_budget,
                    "o_direct": self._direct, **self.stats}

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._q.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        left = self._q.close(self._threads, timeout_s)
        if left is None:
            return
        freed = []
        with self._cv:
            for item in left:
                item.done = True
                freed.append(self._detach(item))
        for buf in freed:
            if buf is not None:
                self._pool.put(buf)
        log.debug("local store %s: closed; %s", self.path, self.stats)

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- background writing ------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            got = self._q.take()
            if got is None:
                return
            _, batch = got
            item = batch[0]
            try:
                self._write_item(item)
            except Exception:  # never let a writer thread die
                log.exception("local store %s: writing %s failed", self.path, item.key)
                with self._lock:
                    self.stats["write_errors"] += 1
            finally:
                with self._cv:
                    self._q.finish_locked(batch)
                    item.done = True
                    buf = self._detach(item)
                if buf is not None:
                    self._pool.put(buf)

    def _reserve(self, size: int) -> tuple[bool, list[str]]:
        """Evict until ``size`` more bytes fit, then reserve them (lock held).

        Returns (reserved, paths of evicted files to unlink outside the lock).
        """
        victims: list[str] = []
        while self._used + self._inflight + size > self.budget:
            key = self._policy.victim()
            if key is None:
                break
            self._forget(key)
            full = self._file(key)
            self._evicting.add(full)
            victims.append(full)
        self.stats["evictions"] += len(victims)
        if self._used + self._inflight + size > self.budget:
            return False, victims  # the rest of the budget is held by writes in flight
        self._inflight += size
        return True, victims

    def _write_item(self, item: _Item) -> None:
        with self._lock:
            if item.cancelled:
                return
            reserved, victims = self._reserve(item.size)
        self._unlink_victims(victims)
        if not reserved:
            with self._lock:
                self.stats["budget_drops"] += 1
            log.warning("local store %s: dropped %s: the budget is held by writes in flight",
                        self.path, item.key)
            return
        full = self._file(item.key)
        err: OSError | None = None
        try:
            self._write_file(item, full)
        except OSError as e:
            err = e
        with self._lock:
            self._inflight -= item.size
            if err is not None:
                self.stats["write_errors"] += 1
            elif not item.cancelled:
                self._forget(item.key)  # a file adopted meanwhile holds the same content
                self._index[item.key] = _Entry(item.size, time.time())
                self._policy.add(item.key)
                self._used += item.size
                self.stats["writes"] += 1
                self.stats["write_bytes"] += item.size
        if err is not None:
            level = logging.WARNING if err.errno in (errno.ENOSPC, errno.EDQUOT) else logging.ERROR
            log.log(level, "local store %s: write of %s dropped: %s", self.path, item.key, err)
        elif item.cancelled:  # deleted while being written
            _unlink_quiet(full)

    def _unlink_victims(self, victims: list[str]) -> None:
        for full in victims:
            try:
                os.unlink(full)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("local store %s: cannot evict %s: %s", self.path, full, e)
        if victims:
            with self._lock:
                self._evicting.difference_update(victims)

    def _write_file(self, item: _Item, full: str) -> None:
        d = os.path.dirname(full)
        if d not in self._dirs:
            os.makedirs(d, mode=0o700, exist_ok=True)
            self._dirs.add(d)
        tmp = os.path.join(d, f"{TMP_PREFIX}{os.getpid()}-{self._uid}-{next(self._seq)}")
        kb = item.key.encode()
        hoff, poff, end = HEADER_FIXED + len(kb), item.poff, item.poff + item.plen
        mv = memoryview(item.buf)
        csum = xxhash.xxh3_64_intdigest(mv[poff:end])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        use_direct = item.direct and self._direct
        # the file image in one buffer: header, key, (zero padding), payload, (zero padding)
        _HDR.pack_into(mv, 0, MAGIC, VERSION, len(kb), (FLAG_PADDED | FLAG_ALIGNED) if item.direct else 0,
                       item.plen, csum)
        mv[HEADER_FIXED:hoff] = kb
        if item.direct:  # a reused buffer holds old bytes where the padding goes
            mv[hoff:poff] = _ZEROS[:poff - hoff]
            mv[end:item.size] = _ZEROS[:item.size - end]
        fd = self._open_tmp(tmp, flags, use_direct)
        try:
            if fd < 0:  # O_DIRECT refused by this filesystem: buffered from now on
                fd = self._open_tmp(tmp, flags, False)
            _write_all(fd, [mv[:item.size]])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, full)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        if self.fsync:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _open_tmp(self, tmp: str, flags: int, direct: bool) -> int:
        try:
            return os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600)
        except FileNotFoundError:  # the sub-directory was removed under us
            os.makedirs(os.path.dirname(tmp), mode=0o700, exist_ok=True)
            return os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                self._open_direct_fallback(e)
                _unlink_quiet(tmp)
                return -1
            raise


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
