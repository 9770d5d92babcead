"""Local-disk KV store: one file per chunk on a local (NVMe) filesystem or a FUSE mount.

Layout and sharding (the conventions of LMCache's local-disk backend):

* ``StoreConfig.paths`` lists directories (``file://`` prefix allowed). The instance on device
  ``d`` uses ``paths[d % len(paths)]``, so each GPU writes to its own drive. The directories
  must exist and be writable (checked at construction).
* ``StoreConfig.size_gb`` is ONE total budget for all paths: each instance gets
  ``size_gb * 1e9 / len(paths)`` bytes and accounts only for the files under its own path
  (what it found there at start, what it wrote, and files of other processes it read). When
  several live processes write to the same path, each enforces the share on its own view, so
  that path may hold up to (number of writers) x the share.
* Key ``namespace/rank/hexhash`` -> ``<path>/<namespace>+<rank>/<hexhash>.kv``. Characters
  outside ``[A-Za-z0-9_.-]`` are escaped as ``%XX`` (``/`` inside the directory part as ``+``),
  so the mapping is injective and a lookup is a single ``open``; no index scan.

File format (little endian): ``magic 8s | version H | key_len H | flags I | payload_len Q |
xxh3-64 of the payload Q`` (32 bytes), then the UTF-8 key, then the payload. With O_DIRECT the
file is zero-padded to a multiple of 4096 bytes (flag ``PADDED``); the true length is in the
header. Each file is written to a temporary file in the same directory and renamed, so a chunk
is never visible half-written; a file that fails any check on read (magic, version, key,
length, checksum) is a miss and is deleted.

Writes are asynchronous: ``put`` copies the bytes into a bounded queue (``queue_mb``) and
returns; ``write_threads`` background threads evict (``lru``/``lfu``/``fifo``) until the new
file fits, write it and publish it. A full queue, a value larger than the budget, or any OS
error while writing (ENOSPC, EIO, ...) drops the put and counts it; serving goes on.

Keys are content addresses: a put of a key that is already stored or queued is skipped
(counted ``duplicates``) and returns True.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Sequence

import xxhash

log = logging.getLogger(__name__)

MAGIC = b"PDKVSTOR"
VERSION = 1
_HDR = struct.Struct("<8sHHIQQ")
HEADER_FIXED = _HDR.size  # 32
FLAG_PADDED = 1
ALIGN = 4096
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"
_MAX_KEY = 0xFFFF
_MAX_NAME = 200            # well under NAME_MAX (255 bytes)
_TMP_STALE_S = 600.0       # temp files of live processes older than this are removed at start
MIN_BUDGET = 1 << 20

_PLAIN = re.compile(r"[A-Za-z0-9_.-]")
_FLAT_DIR = "%flat"        # keys without "/"; "%f" can never come out of _escape
_EMPTY = "%e"              # an empty component

STAT_KEYS = (
    "puts",             # put() calls queued
    "put_bytes",        # payload bytes queued
    "duplicates",       # put() of a key already stored or queued (skipped, returned True)
    "dropped",          # put() returned False (queue full, too large, closed)
    "queue_full",       # ... of which the queue was full
    "too_large",        # ... of which the value can never fit in the budget
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


def _byte_view(buf: Any) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0 or (direct and n % ALIGN):  # O_DIRECT: an unaligned count means EOF
            break
        done += n
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Item:
    __slots__ = ("key", "buf", "hoff", "plen", "size", "direct", "cancelled")

    def __init__(self, key, buf, hoff, plen, size, direct):
        self.key, self.buf, self.hoff, self.plen, self.size, self.direct = key, buf, hoff, plen, size, direct
        self.cancelled = False

    def payload(self) -> memoryview:
        mv = memoryview(self.buf)
        return mv[self.hoff:self.hoff + self.plen] if self.direct else mv


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

    def __init__(self, cfg: Any, device_index: int = 0, fsync: bool = False) -> None:
        paths = [parse_path(p) for p in (cfg.paths or [])]
        if not paths:
            raise ValueError("store backend local needs at least one directory in store.paths "
                             "(e.g. paths: [\"file:///mnt/nvme0/pdkv\"])")
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index}")
        path = paths[device_index % len(paths)]
        self.path = os.path.abspath(path)
        self._check_dir(path)
        self.budget = int(cfg.size_gb * 1e9 / len(paths))
        if self.budget < MIN_BUDGET:
            raise ValueError(
                f"store.size_gb={cfg.size_gb} gives {self.budget} bytes per path over {len(paths)} "
                f"path(s); the local store needs at least {MIN_BUDGET} bytes (1 MiB) per path")
        self.location = f"local:{self.path}"
        self.eviction = cfg.eviction
        self.queue_budget = int(cfg.queue_mb) << 20
        self.fsync = fsync
        self._direct = bool(cfg.o_direct)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._index: dict[str, _Entry] = {}
        if cfg.eviction == "lfu":
            self._policy: Any = _LFUPolicy()
        elif cfg.eviction in ("lru", "fifo"):
            self._policy = _OrderPolicy(refresh=cfg.eviction == "lru")
        else:
            raise ValueError(f"store.eviction {cfg.eviction!r} is not allowed; choose lru, lfu or fifo")
        self._used = 0              # bytes of indexed files
        self._inflight = 0          # bytes reserved by files being written
        self._queue: deque[_Item] = deque()
        self._pending: dict[str, _Item] = {}
        self._queued_bytes = 0      # bytes reserved by queued (and being written) puts
        self._writing = 0
        self._closed = False
        self._stopping = False
        self._evicting: set[str] = set()
        self._seq = itertools.count()
        self._dirs: set[str] = set()
        self._scan()
        self._threads = [threading.Thread(target=self._writer, name=f"pdkv-store-w{i}", daemon=True)
                         for i in range(int(cfg.write_threads))]
        for t in self._threads:
            t.start()
        log.info("local store %s: budget %d B, %d files (%d B) found, eviction %s, o_direct %s",
                 self.path, self.budget, len(self._index), self._used, self.eviction, self._direct)

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def _check_dir(path: str) -> None:
        if not os.path.exists(path):
            raise ValueError(f"store path {path} does not exist; create the directory (on the disk "
                             "meant for the KV store) before starting")
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
    def _parse_header(hdr: bytes, file_size: int) -> tuple[str, int, int, int] | None:
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
        want = _round_up(hoff + plen) if flags & FLAG_PADDED else hoff + plen
        if file_size != want:
            return None
        return key, hoff, plen, csum

    # -- helpers ---------------------------------------------------------------------------
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
        mv = _byte_view(data)
        plen = mv.nbytes
        kb = key.encode()
        if len(kb) > _MAX_KEY:
            raise ValueError(f"store key is {len(kb)} bytes long; at most {_MAX_KEY}")
        hoff = HEADER_FIXED + len(kb)
        direct = self._direct
        size = _round_up(hoff + plen) if direct else hoff + plen
        with self._lock:
            if self._closed or size > self.budget or size > self.queue_budget:
                self.stats["dropped"] += 1
                if not self._closed:
                    self.stats["too_large"] += 1
                    log.warning("local store %s: dropped %s: %d bytes exceed the budget (%d) or the "
                                "queue (%d)", self.path, key, size, self.budget, self.queue_budget)
                return False
            if key in self._index or key in self._pending:
                self.stats["duplicates"] += 1
                return True
            if self._queued_bytes + size > self.queue_budget:
                self.stats["dropped"] += 1
                self.stats["queue_full"] += 1
                return False
            self._queued_bytes += size  # reserved; the copy happens outside the lock
        try:
            if direct:
                buf: Any = mmap.mmap(-1, size)  # page aligned, zero filled (the padding)
                buf[hoff:hoff + plen] = mv
            else:
                buf = mv.tobytes()
        except BaseException:
            with self._lock:
                self._queued_bytes -= size
            raise
        item = _Item(key, buf, hoff, plen, size, direct)
        with self._cv:
            if self._closed:
                self._queued_bytes -= size
                self.stats["dropped"] += 1
                return False
            self._queue.append(item)
            self._pending[key] = item
            self.stats["puts"] += 1
            self.stats["put_bytes"] += plen
            self._cv.notify()
        return True

    def get(self, key: str, into: Any) -> int:
        out = _byte_view(into)
        if out.readonly:
            raise ValueError("get: the destination buffer is read-only")
        with self._lock:
            item = self._pending.get(key)
            e = self._index.get(key)
        if item is not None and e is None:
            n = 0
            if item.plen <= out.nbytes:
                out[:item.plen] = item.payload()
                n = item.plen
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
            hdr = os.pread(fd, HEADER_FIXED + len(key.encode()), 0)
            parsed = self._parse_header(hdr, st.st_size)
            if parsed is None or parsed[0] != key:
                self._remove_bad(full, st, "bad header, wrong key or wrong length")
                return 0
            _, hoff, plen, csum = parsed
            if plen > out.nbytes:
                return 0
            dst = out[:plen]
            if _pread_into(fd, dst, hoff) != plen or xxhash.xxh3_64_intdigest(dst) != csum:
                self._remove_bad(full, st, "checksum mismatch or short read")
                return 0
            return plen
        except OSError as e:
            log.warning("local store %s: read %s failed: %s", self.path, full, e)
            return 0
        finally:
            os.close(fd)

    def _read_direct(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        size = st.st_size
        if size < HEADER_FIXED:
            self._remove_bad(full, st, "truncated header")
            return 0
        buf = mmap.mmap(-1, _round_up(size))  # page aligned, as O_DIRECT needs
        mv = memoryview(buf)
        got = _pread_into(fd, mv, 0, direct=True)
        parsed = self._parse_header(mv[:min(got, HEADER_FIXED + _MAX_KEY)], size)
        if parsed is None or parsed[0] != key:
            self._remove_bad(full, st, "bad header, wrong key or wrong length")
            return 0
        _, hoff, plen, csum = parsed
        if plen > out.nbytes:
            return 0
        payload = mv[hoff:hoff + plen]
        if got < hoff + plen or xxhash.xxh3_64_intdigest(payload) != csum:
            self._remove_bad(full, st, "checksum mismatch or short read")
            return 0
        out[:plen] = payload
        return plen  # buf is unmapped when the last view goes

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        for key in keys:
            with self._lock:
                known = key in self._index or key in self._pending
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
                item = self._pending.pop(key, None)
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
                    "budget": self.budget, "queued": len(self._queue),
                    "queued_bytes": self._queued_bytes, "queue_budget": self.queue_budget,
                    "o_direct": self._direct, **self.stats}

    def flush(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self.flush(timeout_s):
            log.warning("local store %s: closing with %d puts not written", self.path, len(self._queue))
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=timeout_s)
        with self._cv:
            for item in self._queue:
                self._pending.pop(item.key, None)
                self._queued_bytes -= item.size
            self._queue.clear()
        log.debug("local store %s: closed; %s", self.path, self.stats)

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- background writing ------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                item = self._queue.popleft()
                self._writing += 1
            try:
                self._write_item(item)
            except Exception:  # never let a writer thread die
                log.exception("local store %s: writing %s failed", self.path, item.key)
                with self._lock:
                    self.stats["write_errors"] += 1
            finally:
                with self._cv:
                    self._queued_bytes -= item.size
                    if self._pending.get(item.key) is item:
                        del self._pending[item.key]
                    self._writing -= 1
                    self._cv.notify_all()

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
            os.makedirs(d, mode=0o755, exist_ok=True)
            self._dirs.add(d)
        tmp = os.path.join(d, f"{TMP_PREFIX}{os.getpid()}-{next(self._seq)}")
        kb = item.key.encode()
        payload = item.payload()
        csum = xxhash.xxh3_64_intdigest(payload)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        use_direct = item.direct and self._direct
        if item.direct:
            _HDR.pack_into(item.buf, 0, MAGIC, VERSION, len(kb), FLAG_PADDED, item.plen, csum)
            item.buf[HEADER_FIXED:item.hoff] = kb
        fd = self._open_tmp(tmp, flags, use_direct)
        try:
            if fd < 0:  # O_DIRECT refused by this filesystem: buffered from now on
                fd = self._open_tmp(tmp, flags, False)
            if item.direct:
                _write_all(fd, [item.buf])
            else:
                _write_all(fd, [_HDR.pack(MAGIC, VERSION, len(kb), 0, item.plen, csum) + kb, payload])
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
            return os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o644)
        except FileNotFoundError:  # the sub-directory was removed under us
            os.makedirs(os.path.dirname(tmp), mode=0o755, exist_ok=True)
            return os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o644)
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
