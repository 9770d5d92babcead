"""3FS KV store through the USRBIO API (``hf3fs_fuse.io``), the same behaviour as ``store.local``.

Tested only against ``store.usrbio_emulator`` (a test double over local files); no real 3FS
cluster has run this backend.

Layout under ``<mount_point>/<base path>/dev<device_index>/``:

* ``data-NNNN.bin``: a few large data files (at most ``FILE_BYTES`` each), cut into slabs of
  ``slab_size`` bytes (a power of two, at most 64 MiB and at most what one staging area of the
  iovec holds). A slab is given to one slot size class (4 KiB x 2^k up to the slab size) when a
  value of that class needs room, and goes back to the free slabs when its last slot is freed.
  The budget (``size_gb`` over the base paths) is the number of slabs x ``slab_size``, so the
  data files never exceed it.
* Each slot: a 64-byte header ``magic 4s | version H | pad H | xxh3(key) Q | payload_len Q |
  xxh3(payload) Q | seq Q`` then the payload. A slot whose header does not name the key, the
  index's sequence number, the length or the checksum is a miss (torn, stale, overwritten).
* ``index.log``: append-only records ``magic | op | key_len | file | offset | slot size |
  length | checksum | seq`` + key + xxh3 of the record; replayed at start (a torn tail is cut
  off), rewritten (temp file + rename) when it holds many dead records. LRU order at restart is
  the order of the log.
* ``lock``: ``flock`` held by the one process that owns the directory.

I/O: one shared-memory segment (``iov_size_mb``) registered once with ``make_iovec``; its first
half stages reads (one batch at a time), its second half is split between ``io_threads`` writer
threads, each with its own write ioring. The data files are ``register_fd``-ed once. Writes and
batched reads prepare every I/O of a batch, submit once and wait for all results.

``put`` copies into a bounded queue (``queue_mb``) and returns at once; a full queue, a value
that cannot fit a slab, a closed store drop the put (counted). A failed write (``result < 0``,
e.g. -ENOSPC) drops that put and frees its slot. When no slot is free, least recently used
values are evicted. One process per directory; a second process does not see new values until
it restarts (not done: tailing the log of another writer).
"""
from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from multiprocessing import shared_memory
from typing import Any, Sequence

import xxhash

log = logging.getLogger(__name__)

MISSING_MODULE = ("store backend hf3fs needs hf3fs_py_usrbio (build it from the 3FS source tree); "
                  "a 3FS FUSE mount can be used with backend local meanwhile")

ALIGN = 4096
MIN_CLASS = 4096
MAX_SLAB = 64 << 20
FILE_BYTES = 4 << 30
MIN_BUDGET = 1 << 20
SLOT_MAGIC = b"PK3S"
VERSION = 1
_SLOT = struct.Struct("<4sHHQQQQ")  # 40 bytes, padded to HDR
HDR = 64
LOG_MAGIC = b"PK3L"
_REC = struct.Struct("<4sBxHIQIQQQ")  # 48 bytes, then key, then xxh3 Q
OP_ADD, OP_DEL = 1, 2

STAT_KEYS = ("puts", "put_bytes", "duplicates", "dropped", "queue_full", "too_large", "writes",
             "write_bytes", "write_errors", "budget_drops", "evictions", "hits", "misses",
             "get_bytes", "queue_hits", "corrupt", "read_errors", "deletes", "recovered",
             "log_compactions", "batches")


def _byte_view(buf: Any) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def _khash(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


def _import_io() -> Any:
    try:
        import hf3fs_fuse.io as io  # type: ignore[import-not-found]
    except Exception:  # ImportError, or the .so failing to load (libhf3fs_api_shared missing)
        raise ValueError(MISSING_MODULE) from None
    return io


class _Entry:
    __slots__ = ("slab", "slot", "cls", "length", "csum", "seq")

    def __init__(self, slab, slot, cls, length, csum, seq):
        self.slab, self.slot, self.cls, self.length, self.csum, self.seq = slab, slot, cls, length, csum, seq


class _Item:
    __slots__ = ("key", "data", "cancelled")

    def __init__(self, key: str, data: bytes):
        self.key, self.data, self.cancelled = key, data, False


class _Slabs:
    """Slab allocator: slabs of ``slab_size`` given to slot classes on demand (lock held by caller)."""

    def __init__(self, n_slabs: int, slab_size: int):
        self.slab_size = slab_size
        self.free_slabs = list(range(n_slabs - 1, -1, -1))  # pop() gives the lowest first
        self.cls_of: dict[int, int] = {}           # slab -> slot size
        self.free_slots: dict[int, set[int]] = {}  # slab -> free slot numbers
        self.used: dict[int, int] = {}             # slab -> slots in use
        self.partial: dict[int, set[int]] = {}     # slot size -> slabs with a free slot

    def alloc(self, cls: int) -> tuple[int, int] | None:
        part = self.partial.get(cls)
        if part:
            slab = next(iter(part))
        elif self.free_slabs:
            slab = self.free_slabs.pop()
            self._assign(slab, cls)
        else:
            return None
        return slab, self._take(slab, None)

    def _assign(self, slab: int, cls: int) -> None:
        self.cls_of[slab] = cls
        self.free_slots[slab] = set(range(self.slab_size // cls))
        self.used[slab] = 0
        self.partial.setdefault(cls, set()).add(slab)

    def _take(self, slab: int, slot: int | None) -> int:
        free = self.free_slots[slab]
        slot = free.pop() if slot is None else (free.remove(slot) or slot)
        self.used[slab] += 1
        if not free:
            self.partial[self.cls_of[slab]].discard(slab)
        return slot

    def claim(self, slab: int, slot: int, cls: int) -> bool:
        """Mark a known slot used (replaying the index); False if it conflicts."""
        if slab in self.cls_of:
            if self.cls_of[slab] != cls or slot not in self.free_slots[slab]:
                return False
        else:
            if slab not in self.free_slabs or slot >= self.slab_size // cls:
                return False
            self.free_slabs.remove(slab)
            self._assign(slab, cls)
        self._take(slab, slot)
        return True

    def free(self, slab: int, slot: int) -> None:
        cls = self.cls_of[slab]
        self.free_slots[slab].add(slot)
        self.used[slab] -= 1
        if self.used[slab] == 0:
            del self.cls_of[slab], self.free_slots[slab], self.used[slab]
            self.partial[cls].discard(slab)
            self.free_slabs.append(slab)
        else:
            self.partial.setdefault(cls, set()).add(slab)


class Hf3fsStore:
    """``store.base.KVStore`` on 3FS through USRBIO (see the module docstring)."""

    def __init__(self, cfg: Any, device_index: int = 0, io: Any = None) -> None:
        self.io = io if io is not None else _import_io()
        h = cfg.hf3fs
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index}")
        if h.io_depth > 0:
            raise ValueError(f"store.hf3fs.io_depth={h.io_depth}: batches of exactly io_depth I/Os "
                             "are not supported (this store's batches vary); use 0 or a negative value")
        bases = list(h.base_paths) or [p[len("file://"):] if p.startswith("file://") else p
                                       for p in (cfg.paths or [])] or ["pdkv"]
        base = bases[device_index % len(bases)]
        mp = h.mount_point
        if not mp:
            if not os.path.isabs(base):
                raise ValueError("store.hf3fs.mount_point is empty and the base path "
                                 f"{base!r} is relative; set mount_point (e.g. /3fs/stage)")
            mp = self.io.extract_mount_point(base)
            if not mp:
                raise ValueError(f"store base path {base} is not on a 3FS mount")
        self.mount_point = os.path.abspath(mp)
        if not os.path.isdir(self.mount_point):
            raise ValueError(f"store.hf3fs.mount_point {mp} does not exist")
        base_abs = base if os.path.isabs(base) else os.path.join(self.mount_point, base)
        self.path = os.path.join(os.path.abspath(base_abs), f"dev{device_index}")
        if self.io.extract_mount_point(self.path) != self.mount_point:
            raise ValueError(f"store path {self.path} is not under the 3FS mount {self.mount_point}")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"store path {self.path} cannot be created ({e.strerror or e})") from None
        self.location = f"hf3fs:{self.path}"
        self.budget = int(cfg.size_gb * 1e9 / len(bases))
        if self.budget < MIN_BUDGET:
            raise ValueError(f"store.size_gb={cfg.size_gb} gives {self.budget} bytes per base path; "
                             f"the hf3fs store needs at least {MIN_BUDGET} bytes (1 MiB)")
        if cfg.eviction != "lru":
            log.warning("hf3fs store: eviction %r is not implemented; using lru", cfg.eviction)
        self.iov_size = int(h.iov_size_mb) << 20
        self.n_writers = int(h.io_threads)
        self.read_area = self.iov_size // 2 // ALIGN * ALIGN
        self.write_area = (self.iov_size - self.read_area) // self.n_writers // ALIGN * ALIGN
        self.slab_size = max(MIN_CLASS, _pow2_floor(min(MAX_SLAB, self.budget // 4, self.read_area,
                                                        self.write_area)))
        self.n_slabs = self.budget // self.slab_size
        self.slabs_per_file = max(1, FILE_BYTES // self.slab_size)
        self.max_value = self.slab_size - HDR
        self.entries = int(h.ior_entries)
        self.queue_budget = int(cfg.queue_mb) << 20
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._batch_seq = 0  # next batch a writer takes
        self._next_commit = 0  # the batch whose turn it is to enter the index
        self._read_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._slabs = _Slabs(self.n_slabs, self.slab_size)
        self._queue: deque[_Item] = deque()
        self._pending: dict[str, _Item] = {}
        self._queued_bytes = 0
        self._writing = 0
        self._closed = self._stopping = False
        self._seq = 0
        self._log_records = 0
        self._fds: dict[int, int] = {}
        self._lockfd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lockfd)
            raise ValueError(f"store path {self.path} is used by another process (one writer per "
                             "directory; give each instance its own base path or device index)") from None
        self._shm = self._iov = None
        self._rings: list[Any] = []
        try:
            self._replay()
            self._shm = shared_memory.SharedMemory(create=True, size=self.iov_size)
            self._buf = memoryview(self._shm.buf)
            self._iov = self.io.make_iovec(self._shm, self.mount_point, block_size=0, numa=h.numa)
            self._read_ring = self.io.make_ioring(self.mount_point, self.entries, for_read=True,
                                                  io_depth=h.io_depth, numa=h.numa)
            self._rings = [self.io.make_ioring(self.mount_point, self.entries, for_read=False,
                                               io_depth=h.io_depth, numa=h.numa)
                           for _ in range(self.n_writers)]
            for f in range((self.n_slabs + self.slabs_per_file - 1) // self.slabs_per_file):
                self._open_file(f)
        except BaseException:
            self._release()
            raise
        self._threads = [threading.Thread(target=self._writer, args=(i,), name=f"pdkv-3fs-w{i}",
                                          daemon=True) for i in range(self.n_writers)]
        for t in self._threads:
            t.start()
        log.info("hf3fs store %s: %d slabs of %d B, %d values found", self.path, self.n_slabs,
                 self.slab_size, len(self._index))

    # -- files, addresses, index log -------------------------------------------------------
    def _open_file(self, f: int) -> int:
        fd = os.open(os.path.join(self.path, f"data-{f:04d}.bin"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self.io.register_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fds[f] = fd
        return fd

    def _where(self, e: _Entry) -> tuple[int, int]:
        """(fd, offset) of an entry's slot."""
        f, s = divmod(e.slab, self.slabs_per_file)
        return self._fds[f], s * self.slab_size + e.slot * e.cls

    def _class(self, length: int) -> int:
        need = _round_up(HDR + length)
        return max(MIN_CLASS, 1 << (need - 1).bit_length())

    def _record(self, op: int, key: str, e: _Entry) -> bytes:
        kb = key.encode()
        f, s = divmod(e.slab, self.slabs_per_file)
        body = _REC.pack(LOG_MAGIC, op, len(kb), f, s * self.slab_size + e.slot * e.cls, e.cls,
                         e.length, e.csum, e.seq) + kb
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    def _log_path(self) -> str:
        return os.path.join(self.path, "index.log")

    def _replay(self) -> None:
        layout = f"slab={self.slab_size} slabs={self.n_slabs} per_file={self.slabs_per_file}\n"
        meta = os.path.join(self.path, "layout")
        try:
            with open(meta) as fh:
                same = fh.read() == layout
        except FileNotFoundError:
            same = False
        if not same:  # a new store, or another slab layout: the old index cannot be trusted
            if os.path.exists(self._log_path()):
                log.warning("hf3fs store %s: layout changed; starting empty", self.path)
            self._rewrite_log([], layout_text=layout)
            return
        try:
            with open(self._log_path(), "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raw = b""
        pos = 0
        live: OrderedDict[str, _Entry] = OrderedDict()
        while pos + _REC.size <= len(raw):
            magic, op, klen, f, off, cls, length, csum, seq = _REC.unpack_from(raw, pos)
            end = pos + _REC.size + klen + 8
            if magic != LOG_MAGIC or end > len(raw):
                break
            if struct.unpack_from("<Q", raw, end - 8)[0] != xxhash.xxh3_64_intdigest(raw[pos:end - 8]):
                break
            key = raw[pos + _REC.size:end - 8].decode("utf-8", "replace")
            pos = end
            self._seq = max(self._seq, seq)
            self._log_records += 1
            if op == OP_DEL:
                live.pop(key, None)
            elif op == OP_ADD and cls >= MIN_CLASS and cls & (cls - 1) == 0 and cls <= self.slab_size:
                slab = f * self.slabs_per_file + off // self.slab_size
                slot, rem = divmod(off % self.slab_size, cls)
                if rem == 0 and slab < self.n_slabs:
                    live.pop(key, None)
                    live[key] = _Entry(slab, slot, cls, length, csum, seq)
        if pos < len(raw):
            log.warning("hf3fs store %s: index log torn at byte %d of %d; cut", self.path, pos, len(raw))
            with open(self._log_path(), "r+b") as fh:
                fh.truncate(pos)
        for key, e in live.items():
            if self._slabs.claim(e.slab, e.slot, e.cls):
                self._index[key] = e
        self.stats["recovered"] = len(self._index)
        if self._log_records > 2 * len(self._index) + 1024:
            self._rewrite_log(list(self._index.items()))

    def _rewrite_log(self, items: list[tuple[str, _Entry]], layout_text: str | None = None) -> None:
        tmp = self._log_path() + f".tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(b"".join(self._record(OP_ADD, k, e) for k, e in items))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._log_path())
        if layout_text is not None:
            with open(os.path.join(self.path, "layout.tmp"), "w") as fh:
                fh.write(layout_text)
            os.replace(os.path.join(self.path, "layout.tmp"), os.path.join(self.path, "layout"))
        self._log_records = len(items)

    def _append_log(self, records: list[bytes]) -> None:
        if not records:
            return
        with self._log_lock:
            try:
                with open(self._log_path(), "ab") as fh:
                    fh.write(b"".join(records))
                self._log_records += len(records)
                if self._log_records > 4 * len(self._index) + 1024:
                    with self._lock:
                        items = list(self._index.items())
                    self._rewrite_log(items)
                    self.stats["log_compactions"] += 1
            except OSError as e:
                log.error("hf3fs store %s: index log write failed: %s", self.path, e)

    def _forget(self, key: str) -> _Entry | None:
        """Drop ``key`` from the index and free its slot (lock held)."""
        e = self._index.pop(key, None)
        if e is not None:
            self._slabs.free(e.slab, e.slot)
        return e

    # -- KVStore ---------------------------------------------------------------------------
    def put(self, key: str, data: Any) -> bool:
        mv = _byte_view(data)
        size = mv.nbytes
        with self._lock:
            if self._closed or size > self.max_value or size > self.queue_budget:
                self.stats["dropped"] += 1
                if not self._closed:
                    self.stats["too_large"] += 1
                    log.warning("hf3fs store %s: dropped %s: %d bytes exceed a slab (%d) or the "
                                "queue (%d)", self.path, key, size, self.max_value, self.queue_budget)
                return False
            if key in self._index or key in self._pending:
                self.stats["duplicates"] += 1
                return True
            if self._queued_bytes + size > self.queue_budget:
                self.stats["dropped"] += 1
                self.stats["queue_full"] += 1
                return False
            self._queued_bytes += size
        item = _Item(key, mv.tobytes())
        with self._cv:
            if self._closed:
                self._queued_bytes -= size
                self.stats["dropped"] += 1
                return False
            self._queue.append(item)
            self._pending[key] = item
            self.stats["puts"] += 1
            self.stats["put_bytes"] += size
            self._cv.notify()
        return True

    def get(self, key: str, into: Any) -> int:
        return self.get_many([key], [into])[0]

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        """Batched ``get``: one submit per read-staging area's worth of values."""
        outs = [_byte_view(b) for b in intos]
        if any(o.readonly for o in outs):
            raise ValueError("get: the destination buffer is read-only")
        res = [0] * len(keys)
        todo: list[tuple[int, str, _Entry]] = []
        with self._lock:
            for i, key in enumerate(keys):
                e = self._index.get(key)
                item = self._pending.get(key)
                if e is None and item is not None:
                    if len(item.data) <= outs[i].nbytes:
                        outs[i][:len(item.data)] = item.data
                        res[i] = len(item.data)
                        self.stats["queue_hits"] += 1
                elif e is not None and e.length <= outs[i].nbytes:
                    todo.append((i, key, e))
        start = 0
        while start < len(todo):
            batch, used = [], 0
            for j in range(start, len(todo)):
                n = _round_up(HDR + todo[j][2].length)
                if batch and (used + n > self.read_area or len(batch) >= self.entries):
                    break
                batch.append((todo[j], used, n))
                used += n
            start += len(batch)
            self._read_batch(batch, outs, res)
        with self._lock:
            for i, key in enumerate(keys):
                if res[i]:
                    self.stats["hits"] += 1
                    self.stats["get_bytes"] += res[i]
                    if key in self._index:
                        self._index.move_to_end(key)
                else:
                    self.stats["misses"] += 1
        return res

    def _read_batch(self, batch, outs, res) -> None:
        bad: list[tuple[str, _Entry, str]] = []
        with self._read_lock:
            ring = self._read_ring
            try:
                for (i, key, e), off, n in batch:
                    fd, foff = self._where(e)
                    ring.prepare(self._iov[off:off + n], True, fd, foff, userdata=(i, key, e, off, n))
                done = ring.submit().wait(min_results=len(batch))
            except Exception as ex:  # the ring refused: every value of the batch is a miss
                log.error("hf3fs store %s: read batch failed: %s", self.path, ex)
                with self._lock:
                    self.stats["read_errors"] += len(batch)
                return
            for r in done:
                i, key, e, off, n = r.userdata
                result = r.result
                del r
                if result < 0:
                    with self._lock:
                        self.stats["read_errors"] += 1
                    log.warning("hf3fs store %s: read of %s failed: %s", self.path, key,
                                os.strerror(-result))
                    continue
                slot = self._buf[off:off + HDR + e.length]
                why = self._check_slot(slot, key, e, result)
                if why:
                    bad.append((key, e, why))
                    continue
                outs[i][:e.length] = slot[HDR:]
                res[i] = e.length
        for key, e, why in bad:
            with self._lock:
                if self._index.get(key) is e:
                    self._forget(key)
                    self.stats["corrupt"] += 1
                    rec = self._record(OP_DEL, key, e)
                else:
                    rec = None
            if rec:
                self._append_log([rec])
                log.warning("hf3fs store %s: %s is a miss (%s)", self.path, key, why)

    @staticmethod
    def _check_slot(slot: memoryview, key: str, e: _Entry, got: int) -> str:
        if got < HDR + e.length:
            return "short read"
        magic, version, _, kh, length, csum, seq = _SLOT.unpack_from(slot, 0)
        if magic != SLOT_MAGIC or version != VERSION:
            return "bad slot header"
        if kh != _khash(key) or seq != e.seq or length != e.length:
            return "slot holds another value"
        if csum != e.csum or xxhash.xxh3_64_intdigest(slot[HDR:HDR + length]) != csum:
            return "checksum mismatch"
        return ""

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._index and key not in self._pending:
                    break
                n += 1
        return n

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def delete(self, keys: Sequence[str]) -> int:
        n, recs = 0, []
        with self._lock:
            for key in keys:
                item = self._pending.pop(key, None)
                if item is not None:
                    item.cancelled = True
                e = self._forget(key)
                if e is not None:
                    recs.append(self._record(OP_DEL, key, e))
                n += e is not None or item is not None
            self.stats["deletes"] += n
        self._append_log(recs)
        return n

    def usage(self) -> dict:
        with self._lock:
            used = sum(e.cls for e in self._index.values())
            return {"path": self.path, "bytes": used, "files": len(self._index),
                    "budget": self.budget, "slab_size": self.slab_size, "slabs": self.n_slabs,
                    "free_slabs": len(self._slabs.free_slabs), "max_value": self.max_value,
                    "queued": len(self._queue), "queued_bytes": self._queued_bytes,
                    "queue_budget": self.queue_budget, **self.stats}

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
            log.warning("hf3fs store %s: closing with %d puts not written", self.path, len(self._queue))
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=timeout_s)
        with self._cv:
            for item in self._queue:
                self._pending.pop(item.key, None)
                self._queued_bytes -= len(item.data)
            self._queue.clear()
        self._release()

    def _release(self) -> None:
        for fd in self._fds.values():
            try:
                self.io.deregister_fd(fd)
            finally:
                os.close(fd)
        self._fds.clear()
        self._rings = []
        self._read_ring = None
        self._iov = None  # the wrapper removes its 3fs-virt/iovs link
        if self._shm is not None:
            self._buf.release()
            gc.collect()
            try:
                self._shm.close()
            except BufferError:
                log.warning("hf3fs store %s: iovec memory still referenced at close", self.path)
            self._shm.unlink()
            self._shm = None
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1

    def __enter__(self) -> "Hf3fsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- background writing ------------------------------------------------------------
    def _writer(self, w: int) -> None:
        area0 = self.read_area + w * self.write_area
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                batch, used = [], 0
                while self._queue and len(batch) < self.entries:
                    n = _round_up(HDR + len(self._queue[0].data))
                    if batch and used + n > self.write_area:
                        break
                    batch.append(self._queue.popleft())
                    used += n
                self._writing += 1
                turn = self._batch_seq  # batches enter the index in the order they were taken
                self._batch_seq += 1
            try:
                self._write_batch(batch, w, area0, turn)
            except Exception:  # never let a writer thread die
                log.exception("hf3fs store %s: write batch failed", self.path)
                with self._lock:
                    self.stats["write_errors"] += len(batch)
            finally:
                with self._cv:
                    self._cv.wait_for(lambda: self._next_commit >= turn)
                    self._next_commit = max(self._next_commit, turn + 1)
                    for item in batch:
                        self._queued_bytes -= len(item.data)
                        if self._pending.get(item.key) is item:
                            del self._pending[item.key]
                    self._writing -= 1
                    self._cv.notify_all()

    def _alloc(self, cls: int) -> tuple[int, int] | None:
        """A free slot of class ``cls``, evicting LRU values as needed (lock held)."""
        while True:
            got = self._slabs.alloc(cls)
            if got is not None or not self._index:
                return got
            key, e = next(iter(self._index.items()))
            self._forget(key)
            self._evicted.append(self._record(OP_DEL, key, e))
            self.stats["evictions"] += 1

    def _write_batch(self, batch: list[_Item], w: int, area0: int, turn: int = 0) -> None:
        ring = self._rings[w]
        staged: list[tuple[_Item, _Entry, int]] = []
        off = area0
        with self._lock:
            self._evicted: list[bytes] = []
            for item in batch:
                if item.cancelled:
                    continue
                length = len(item.data)
                cls = self._class(length)
                where = self._alloc(cls)
                if where is None:
                    self.stats["budget_drops"] += 1
                    continue
                self._seq += 1
                e = _Entry(where[0], where[1], cls, length, xxhash.xxh3_64_intdigest(item.data), self._seq)
                staged.append((item, e, off))
                off += _round_up(HDR + length)
            evicted = self._evicted
        self._append_log(evicted)
        if not staged:
            return
        for item, e, o in staged:
            n = len(item.data)
            _SLOT.pack_into(self._buf, o, SLOT_MAGIC, VERSION, 0, _khash(item.key), n, e.csum, e.seq)
            self._buf[o + _SLOT.size:o + HDR] = bytes(HDR - _SLOT.size)
            self._buf[o + HDR:o + HDR + n] = item.data
            pad = _round_up(HDR + n) - HDR - n
            if pad:
                self._buf[o + HDR + n:o + HDR + n + pad] = bytes(pad)
        try:
            for k, (item, e, o) in enumerate(staged):
                fd, foff = self._where(e)
                ring.prepare(self._iov[o:o + _round_up(HDR + len(item.data))], False, fd, foff, userdata=k)
            done = ring.submit().wait(min_results=len(staged))
            results = {r.userdata: r.result for r in done}
            del done
        except Exception as ex:
            log.error("hf3fs store %s: write batch refused: %s", self.path, ex)
            results = {}
        recs = []
        with self._cv:
            # Commit in the order the puts were queued, so LRU order is put order, whichever
            # writer thread finished first.
            self._cv.wait_for(lambda: self._next_commit >= turn)
            for k, (item, e, o) in enumerate(staged):
                want = _round_up(HDR + len(item.data))
                got = results.get(k, -errno.EIO)
                if got != want or item.cancelled:
                    self._slabs.free(e.slab, e.slot)
                    if got != want:
                        self.stats["write_errors"] += 1
                        err = os.strerror(-got) if got < 0 else f"short write {got}/{want}"
                        log.log(logging.WARNING if got in (-errno.ENOSPC, -errno.EDQUOT) else logging.ERROR,
                                "hf3fs store %s: write of %s dropped: %s", self.path, item.key, err)
                    continue
                self._forget(item.key)
                self._index[item.key] = e
                self.stats["writes"] += 1
                self.stats["write_bytes"] += len(item.data)
                recs.append(self._record(OP_ADD, item.key, e))
            self.stats["batches"] += 1
        self._append_log(recs)


def make_hf3fs_store(cfg: Any, device_index: int = 0) -> Hf3fsStore:
    return Hf3fsStore(cfg, device_index)
