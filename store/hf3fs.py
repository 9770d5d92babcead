"""3FS KV store through the USRBIO API (``hf3fs_fuse.io``), the same behaviour as ``store.local``.

Tested only against ``tests.doubles.usrbio_emulator`` (a test double over local files); no real 3FS
cluster has run this backend.

Layout under ``<mount_point>/<base path>/dev<device_index>/``: one directory ``w<k>`` per writing
process (the first ``k`` whose ``lock`` file it can ``flock``; a restarted writer takes its old
directory back and replays its index). A writer directory holds:

* ``data-NNNN.bin``: a few large data files (at most ``FILE_BYTES`` each), cut into slabs of
  ``slab_size`` bytes, a power of two: at most 1 GiB, a quarter of the budget, and the read
  staging area (half the iovec). The largest value is ``slab_size`` - 64 bytes: 64 MiB - 64 with
  the default 200 MB iovec; raise ``iov_size_mb`` for larger chunks. A slab is given to one slot
  size class (4 KiB x 2^k up to the slab size) when a value of that class needs room, and goes
  back to the free slabs when its last slot is freed. The budget (``size_gb`` over the base
  paths and ``writers``, the processes writing to each base path, which ``pd launch`` sets from
  the prefill pool) is the number of slabs x ``slab_size`` of one writer directory, so the data
  files of all writers together never exceed ``size_gb``.
* Each slot: a 64-byte header ``magic 4s | version H | pad H | xxh3(key) Q | payload_len Q |
  xxh3(payload) Q | seq Q`` then the payload. A slot whose header does not name the key, the
  index's sequence number, the length or the checksum is a miss (torn, stale, overwritten).
* ``index.log``: a header ``magic | version | generation`` (random, new at each rewrite), then
  append-only records ``magic | op | key_len | file | offset | slot size | length | checksum |
  seq`` + key + xxh3 of the record; replayed at start (a torn tail is cut off), rewritten (temp
  file + rename, new generation) when it holds many dead records. LRU order at restart is the
  order of the log.
* ``lock``: ``flock`` held by the one process that writes the directory.

Sharing between processes: every process reads every ``w*`` directory of its device: its own
through its in-memory index, the others (peers) through views that tail their ``index.log``
before each lookup (new records are applied; another generation means the log was rewritten and
is read again from its start). New ``w*`` directories are looked for at most once a second, and
on a miss when the last look is 0.1 s old. A process opened with ``writer=False`` (a scheduler,
a decode worker) claims no directory, writes nothing and drops every ``put`` (counted
``read_only``). A view may be stale (the peer has evicted the value and reused its slot): the
slot header check makes such a read a miss, never another value. Reads by other processes do not
refresh the writer's LRU order.

I/O: one shared-memory segment (``iov_size_mb``) registered once with ``make_iovec``; its first
half stages reads (one batch at a time), its second half is split between ``io_threads`` writer
threads, each with its own write ioring; a value larger than a writer's share is written in
pieces (several submits). The data files are ``register_fd``-ed once. Writes and batched reads
prepare every I/O of a batch, submit once and wait for all results.

``put`` copies into the bounded write queue of ``store.queue`` (``queue_mb``) and returns at
once; a full queue, a value that cannot fit a slab, a closed store drop the put (counted). A
failed write (``result < 0``, e.g. -ENOSPC) drops that put and frees its slot. When no slot is
free, least recently used values are evicted (the DEL records reach the log before the slot is
rewritten).
"""
from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from multiprocessing import shared_memory
from typing import Any, Sequence

import xxhash

from common.bytes import byte_view
from store.queue import DUPLICATE, QUEUED, WriteQueue

log = logging.getLogger(__name__)

MISSING_MODULE = ("store backend hf3fs needs hf3fs_py_usrbio (build it from the 3FS source tree); "
                  "a 3FS FUSE mount can be used with backend local meanwhile")

ALIGN = 4096
MIN_CLASS = 4096
MAX_SLAB = 1 << 30
FILE_BYTES = 4 << 30
MIN_BUDGET = 1 << 20
SLOT_MAGIC = b"PK3S"
VERSION = 1
_SLOT = struct.Struct("<4sHHQQQQ")  # 40 bytes, padded to HDR
HDR = 64
LOG_MAGIC = b"PK3L"
_REC = struct.Struct("<4sBxHIQIQQQ")  # 48 bytes, then key, then xxh3 Q
OP_ADD, OP_DEL = 1, 2
LOG_HDR_MAGIC = b"PK3H"
_LOG_HDR = struct.Struct("<4sIQ")  # magic, version, generation
MAX_WRITERS = 64
PEER_SCAN_S = 1.0   # new writer directories are looked for this often ...
MISS_RESCAN_S = 0.1  # ... and on a miss, if the last look is older than this
_WRITER_DIR = re.compile(r"w\d+")

STAT_KEYS = ("puts", "put_bytes", "duplicates", "dropped", "queue_full", "too_large", "writes",
             "write_bytes", "write_errors", "budget_drops", "evictions", "hits", "misses",
             "get_bytes", "queue_hits", "corrupt", "read_errors", "deletes", "recovered",
             "log_compactions", "batches", "read_only", "peer_hits", "peer_corrupt")


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def _khash(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


def _parse_log(raw: bytes, pos: int) -> tuple[list[tuple], int]:
    """The whole records of an index log from ``pos``: (records, end of the last whole one)."""
    out = []
    while pos + _REC.size <= len(raw):
        magic, op, klen, f, off, cls, length, csum, seq = _REC.unpack_from(raw, pos)
        end = pos + _REC.size + klen + 8
        if magic != LOG_MAGIC or end > len(raw):
            break
        if struct.unpack_from("<Q", raw, end - 8)[0] != xxhash.xxh3_64_intdigest(raw[pos:end - 8]):
            break
        out.append((op, raw[pos + _REC.size:end - 8].decode("utf-8", "replace"), f, off, cls,
                    length, csum, seq))
        pos = end
    return out, pos


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


class _Ref:
    """Where a peer's value lies: data file, offset, and what its slot header must say."""
    __slots__ = ("file", "off", "length", "csum", "seq")

    def __init__(self, file, off, length, csum, seq):
        self.file, self.off, self.length, self.csum, self.seq = file, off, length, csum, seq


class _View:
    """Read-only view of a peer's writer directory: tails its index log (see the module doc)."""

    def __init__(self, path: str, io: Any):
        self.path, self.io = path, io
        self.gen: int | None = None
        self.pos = 0
        self.entries: dict[str, _Ref] = {}
        self.fds: dict[int, int] = {}

    def _reset(self, gen: int | None) -> None:
        self.entries.clear()
        self.gen, self.pos = gen, _LOG_HDR.size

    def refresh(self) -> None:
        try:
            fd = os.open(os.path.join(self.path, "index.log"), os.O_RDONLY)
        except OSError:  # no log (yet): nothing to read
            self._reset(None)
            return
        try:
            size = os.fstat(fd).st_size
            hdr = os.pread(fd, _LOG_HDR.size, 0)
            if len(hdr) < _LOG_HDR.size:
                self._reset(None)
                return
            magic, version, gen = _LOG_HDR.unpack(hdr)
            if magic != LOG_HDR_MAGIC or version != VERSION:
                self._reset(None)
                return
            if gen != self.gen or size < self.pos:  # rewritten: read it again from the start
                self._reset(gen)
            if size <= self.pos:
                return
            raw = os.pread(fd, size - self.pos, self.pos)
        finally:
            os.close(fd)
        recs, used = _parse_log(raw, 0)  # a record being appended is read next time
        self.pos += used
        for op, key, f, off, _cls, length, csum, seq in recs:
            if op == OP_ADD:
                self.entries[key] = _Ref(f, off, length, csum, seq)
            elif op == OP_DEL:
                ref = self.entries.get(key)
                if ref is not None and ref.seq == seq:
                    del self.entries[key]

    def fd(self, f: int) -> int:
        fd = self.fds.get(f)
        if fd is None:
            fd = os.open(os.path.join(self.path, f"data-{f:04d}.bin"), os.O_RDONLY)
            try:
                self.io.register_fd(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fds[f] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                self.io.deregister_fd(fd)
            finally:
                os.close(fd)
        self.fds.clear()


class _Item:
    __slots__ = ("key", "data", "size", "cancelled")

    def __init__(self, key: str, data: bytes):
        self.key, self.data, self.size, self.cancelled = key, data, len(data), False


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

    def __init__(self, cfg: Any, device_index: int = 0, io: Any = None, writer: bool = True) -> None:
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
        self.root = os.path.join(os.path.abspath(base_abs), f"dev{device_index}")
        if self.io.extract_mount_point(self.root) != self.mount_point:
            raise ValueError(f"store path {self.root} is not under the 3FS mount {self.mount_point}")
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ValueError(f"store path {self.root} cannot be created ({e.strerror or e})") from None
        self.location = f"hf3fs:{self.root}"
        self.writer = bool(writer)
        writers = max(1, int(getattr(cfg, "writers", 1)))
        self.budget = int(cfg.size_gb * 1e9 / len(bases) / writers)
        if self.budget < MIN_BUDGET:
            raise ValueError(f"store.size_gb={cfg.size_gb} gives {self.budget} bytes per writer over "
                             f"{len(bases)} base path(s) and {writers} writer(s) per path; the hf3fs store needs "
                             f"at least {MIN_BUDGET} bytes (1 MiB) per writer")
        if cfg.eviction != "lru" and self.writer:
            log.warning("hf3fs store: eviction %r is not implemented; using lru", cfg.eviction)
        self.iov_size = int(h.iov_size_mb) << 20
        self.n_writers = int(h.io_threads) if self.writer else 0
        # A reader stages reads in the whole iovec; a writer in half, the rest split between its threads.
        self.read_area = (self.iov_size // 2 if self.writer else self.iov_size) // ALIGN * ALIGN
        self.write_area = ((self.iov_size - self.read_area) // self.n_writers // ALIGN * ALIGN
                           if self.writer else 0)
        # A value is read in one piece (the read area bounds the slab); writes go in pieces.
        self.slab_size = max(MIN_CLASS, _pow2_floor(min(MAX_SLAB, self.budget // 4, self.read_area)))
        self.n_slabs = self.budget // self.slab_size
        self.slabs_per_file = max(1, FILE_BYTES // self.slab_size)
        self.max_value = self.slab_size - HDR
        self.entries = int(h.ior_entries)
        self.queue_budget = int(cfg.queue_mb) << 20
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._q = WriteQueue(self.queue_budget, self.stats, self._lock, f"hf3fs store {self.root}",
                             writer=self.writer)
        self._cv = self._q.cv
        self._next_commit = 0  # the batch (in take order) whose turn it is to enter the index
        self._read_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._peer_lock = threading.Lock()
        self._peers: dict[str, _View] = {}
        self._peers_scanned = float("-inf")
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._slabs = _Slabs(self.n_slabs, self.slab_size)
        self._seq = 0
        self._log_records = 0
        self._fds: dict[int, int] = {}
        self._lockfd = -1
        self.path = ""  # this process's writer directory ("" for a reader)
        self._shm = self._iov = self._read_ring = None
        self._rings: list[Any] = []
        self._threads: list[threading.Thread] = []
        try:
            if self.writer:
                self._claim_dir()
                self._replay()
            self._shm = shared_memory.SharedMemory(create=True, size=self.iov_size)
            self._buf = memoryview(self._shm.buf)
            self._iov = self.io.make_iovec(self._shm, self.mount_point, block_size=0, numa=h.numa)
            self._read_ring = self.io.make_ioring(self.mount_point, self.entries, for_read=True,
                                                  io_depth=h.io_depth, numa=h.numa)
            self._rings = [self.io.make_ioring(self.mount_point, self.entries, for_read=False,
                                               io_depth=h.io_depth, numa=h.numa)
                           for _ in range(self.n_writers)]
            if self.writer:
                for f in range((self.n_slabs + self.slabs_per_file - 1) // self.slabs_per_file):
                    self._open_file(f)
            self._refresh_peers(force=True)
        except BaseException:
            self._release()
            raise
        self._threads = [threading.Thread(target=self._writer, args=(i,), name=f"pdkv-3fs-w{i}",
                                          daemon=True) for i in range(self.n_writers)]
        for t in self._threads:
            t.start()
        log.info("hf3fs store %s: %s, %d slabs of %d B, %d values found, %d peers", self.root,
                 f"writer {self.path}" if self.writer else "reader", self.n_slabs, self.slab_size,
                 len(self._index), len(self._peers))

    def _claim_dir(self) -> None:
        """Take the first writer directory ``w<k>`` whose lock no live process holds."""
        for k in range(MAX_WRITERS):
            path = os.path.join(self.root, f"w{k}")
            os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lockfd, self.path = fd, path
            return
        raise ValueError(f"store path {self.root} has {MAX_WRITERS} live writers; no directory "
                         "left for another (give instances their own base paths)")

    # -- peers (other writers' directories) ------------------------------------------------
    def _refresh_peers(self, force: bool = False) -> None:
        """Tail the peers' logs; look for new peers if ``force`` or a scan is due (peer lock held
        or not needed: called at start and under ``_peer_lock``)."""
        now = time.monotonic()
        if force or now - self._peers_scanned >= PEER_SCAN_S:
            self._peers_scanned = now
            try:
                names = os.listdir(self.root)
            except OSError as e:
                log.warning("hf3fs store %s: cannot list writers: %s", self.root, e)
                names = []
            for name in names:
                path = os.path.join(self.root, name)
                if _WRITER_DIR.fullmatch(name) and path != self.path and path not in self._peers:
                    self._peers[path] = _View(path, self.io)
        for view in self._peers.values():
            try:
                view.refresh()
            except OSError as e:
                log.warning("hf3fs store %s: cannot read the index of %s: %s", self.root, view.path, e)

    def _peer_refs(self, keys: Sequence[str]) -> dict[str, tuple[_View, _Ref]]:
        """Where the peers hold ``keys`` (peer lock held); looks for new peers on a miss."""
        self._refresh_peers()
        found = {}
        for attempt in range(2):
            for key in keys:
                if key not in found:
                    for view in self._peers.values():
                        ref = view.entries.get(key)
                        if ref is not None:
                            found[key] = (view, ref)
                            break
            if len(found) == len(keys) or attempt or time.monotonic() - self._peers_scanned < MISS_RESCAN_S:
                break
            self._refresh_peers(force=True)
        return found

    # -- files, addresses, index log -------------------------------------------------------
    def _open_file(self, f: int) -> int:
        fd = os.open(os.path.join(self.path, f"data-{f:04d}.bin"), os.O_RDWR | os.O_CREAT, 0o600)
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
        layout = (f"version={VERSION} slab={self.slab_size} slabs={self.n_slabs} "
                  f"per_file={self.slabs_per_file}\n")
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
        if len(raw) < _LOG_HDR.size or _LOG_HDR.unpack_from(raw)[:2] != (LOG_HDR_MAGIC, VERSION):
            log.warning("hf3fs store %s: index log missing or unreadable; starting empty", self.path)
            self._rewrite_log([], layout_text=layout)
            return
        recs, pos = _parse_log(raw, _LOG_HDR.size)
        live: OrderedDict[str, _Entry] = OrderedDict()
        for op, key, f, off, cls, length, csum, seq in recs:
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
        gen = int.from_bytes(os.urandom(8), "little")
        with open(tmp, "wb") as fh:
            fh.write(_LOG_HDR.pack(LOG_HDR_MAGIC, VERSION, gen))
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
        mv = byte_view(data)
        got = self._q.reserve(key, mv.nbytes, self._index.__contains__, limit=self.max_value)
        if got != QUEUED:
            return got == DUPLICATE
        return self._q.push(_Item(key, mv.tobytes()), mv.nbytes)

    def get(self, key: str, into: Any) -> int:
        return self.get_many([key], [into])[0]

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        """Batched ``get``: one submit per read-staging area's worth of values."""
        outs = [byte_view(b) for b in intos]
        if any(o.readonly for o in outs):
            raise ValueError("get: the destination buffer is read-only")
        res = [0] * len(keys)
        todo: list[tuple] = []  # (i, key, fd, offset, length, csum, seq, owner)
        missing: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                e = self._index.get(key)
                item = self._q.pending.get(key)
                if e is None and item is not None:
                    if len(item.data) <= outs[i].nbytes:
                        outs[i][:len(item.data)] = item.data
                        res[i] = len(item.data)
                        self.stats["queue_hits"] += 1
                elif e is not None:
                    if e.length <= outs[i].nbytes:
                        todo.append((i, key, *self._where(e), e.length, e.csum, e.seq, e))
                else:
                    missing.append(i)
        if missing:
            with self._peer_lock:
                found = self._peer_refs([keys[i] for i in missing])
                for i in missing:
                    got = found.get(keys[i])
                    if got is not None and got[1].length <= outs[i].nbytes:
                        view, ref = got
                        try:
                            fd = view.fd(ref.file)
                        except OSError as ex:
                            log.warning("hf3fs store %s: cannot open data file %d of %s: %s",
                                        self.root, ref.file, view.path, ex)
                            continue
                        todo.append((i, keys[i], fd, ref.off, ref.length, ref.csum, ref.seq, got))
        start = 0
        while start < len(todo):
            batch, used = [], 0
            for j in range(start, len(todo)):
                n = _round_up(HDR + todo[j][4])
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
        bad: list[tuple[str, Any, str]] = []
        with self._read_lock:
            ring = self._read_ring
            try:
                for t, off, n in batch:
                    ring.prepare(self._iov[off:off + n], True, t[2], t[3], userdata=(t, off))
                done = ring.submit().wait(min_results=len(batch))
            except Exception as ex:  # the ring refused: every value of the batch is a miss
                log.error("hf3fs store %s: read batch failed: %s", self.root, ex)
                with self._lock:
                    self.stats["read_errors"] += len(batch)
                return
            for r in done:
                (i, key, _fd, _foff, length, csum, seq, owner), off = r.userdata
                result = r.result
                del r
                if result < 0:
                    with self._lock:
                        self.stats["read_errors"] += 1
                    log.warning("hf3fs store %s: read of %s failed: %s", self.root, key,
                                os.strerror(-result))
                    continue
                slot = self._buf[off:off + HDR + length]
                why = self._check_slot(slot, key, length, csum, seq, result)
                if why:
                    bad.append((key, owner, why))
                    continue
                outs[i][:length] = slot[HDR:]
                res[i] = length
                if not isinstance(owner, _Entry):
                    with self._lock:
                        self.stats["peer_hits"] += 1
        for key, owner, why in bad:
            if not isinstance(owner, _Entry):  # a peer's value: forget it here, never touch its log
                view, ref = owner
                with self._peer_lock:
                    if view.entries.get(key) is ref:
                        del view.entries[key]
                with self._lock:
                    self.stats["peer_corrupt"] += 1
                log.info("hf3fs store %s: %s of %s is a miss (%s)", self.root, key, view.path, why)
                continue
            with self._lock:
                if self._index.get(key) is owner:
                    self._forget(key)
                    self.stats["corrupt"] += 1
                    rec = self._record(OP_DEL, key, owner)
                else:
                    rec = None
            if rec:
                self._append_log([rec])
                log.warning("hf3fs store %s: %s is a miss (%s)", self.path, key, why)

    @staticmethod
    def _check_slot(slot: memoryview, key: str, length: int, csum: int, seq: int, got: int) -> str:
        if got < HDR + length:
            return "short read"
        magic, version, _, kh, s_length, s_csum, s_seq = _SLOT.unpack_from(slot, 0)
        if magic != SLOT_MAGIC or version != VERSION:
            return "bad slot header"
        if kh != _khash(key) or s_seq != seq or s_length != length:
            return "slot holds another value"
        if s_csum != csum or xxhash.xxh3_64_intdigest(slot[HDR:HDR + length]) != csum:
            return "checksum mismatch"
        return ""

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._index and key not in self._q.pending:
                    break
                n += 1
        if n == len(keys):
            return n
        with self._peer_lock:
            found = self._peer_refs(keys[n:])
        for key in keys[n:]:
            if key not in found:
                with self._lock:  # written here meanwhile?
                    if key not in self._index and key not in self._q.pending:
                        break
            n += 1
        return n

    def keys(self) -> list[str]:
        """This process's keys, then the peers' (as last seen)."""
        with self._lock:
            own = list(self._index)
        with self._peer_lock:
            self._refresh_peers()
            seen = set(own)
            return own + [k for v in self._peers.values() for k in v.entries if k not in seen
                          and not seen.add(k)]

    def delete(self, keys: Sequence[str]) -> int:
        n, recs = 0, []
        with self._lock:
            for key in keys:
                item = self._q.pending.pop(key, None)
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
        with self._peer_lock:
            peers = {"peers": len(self._peers), "peer_values": sum(len(v.entries) for v in self._peers.values())}
        with self._lock:
            used = sum(e.cls for e in self._index.values())
            return {"path": self.path or self.root, "writer": self.writer, **peers, "bytes": used,
                    "files": len(self._index),
                    "budget": self.budget, "slab_size": self.slab_size, "slabs": self.n_slabs,
                    "free_slabs": len(self._slabs.free_slabs), "max_value": self.max_value,
                    "queued": len(self._q.items), "queued_bytes": self._q.queued_bytes,
                    "queue_budget": self.queue_budget, **self.stats}

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._q.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._q.close(self._threads, timeout_s) is not None:
            self._release()

    def _release(self) -> None:
        with self._peer_lock:
            for view in self._peers.values():
                view.close()
            self._peers.clear()
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
            used = [0]

            def more(batch: list[_Item], nxt: _Item) -> bool:
                """Batch while the ring has entries and this thread's staging area has room."""
                used[0] = used[0] or _round_up(HDR + batch[0].size)
                n = _round_up(HDR + nxt.size)
                if len(batch) >= self.entries or used[0] + n > self.write_area:
                    return False
                used[0] += n
                return True

            got = self._q.take(more)
            if got is None:
                return
            turn, batch = got
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
                    self._q.finish_locked(batch)

    def _stage(self, dst: int, item: _Item, e: _Entry, p0: int, p1: int) -> None:
        """Copy bytes [p0, p1) of the slot image of ``item`` (header, payload, zero padding) to
        the iovec at ``dst``."""
        buf, n, pos = self._buf, len(item.data), dst
        if p0 < HDR:
            hdr = _SLOT.pack(SLOT_MAGIC, VERSION, 0, _khash(item.key), n, e.csum, e.seq)
            hdr += bytes(HDR - len(hdr))
            buf[pos:pos + HDR - p0] = hdr[p0:]
            pos += HDR - p0
        d0, d1 = max(p0, HDR) - HDR, min(p1 - HDR, n)
        if d1 > d0:
            buf[pos:pos + d1 - d0] = memoryview(item.data)[d0:d1]
            pos += d1 - d0
        end = dst + p1 - p0
        if end > pos:
            buf[pos:end] = bytes(end - pos)

    def _write_slots(self, ring: Any, area0: int, staged: list[tuple[_Item, _Entry]]) -> dict[int, int]:
        """Write the slots of ``staged`` through this thread's write area, in pieces of at most
        the area (a value larger than the area takes several rounds). Returns {k: error} for
        the values that failed (-errno, or the bytes of a short write)."""
        errors: dict[int, int] = {}
        prepared = used = 0

        def round_trip() -> None:
            for r in ring.submit().wait(min_results=prepared):
                k, want = r.userdata
                if r.result != want and k not in errors:
                    errors[k] = r.result if r.result < 0 else max(r.result, 1)

        for k, (item, e) in enumerate(staged):
            fd, foff = self._where(e)
            total = _round_up(HDR + len(item.data))
            p0 = 0
            while p0 < total:
                p1 = min(total, p0 + self.write_area)
                if used + p1 - p0 > self.write_area or prepared >= self.entries:
                    round_trip()
                    prepared = used = 0
                dst = area0 + used
                self._stage(dst, item, e, p0, p1)
                ring.prepare(self._iov[dst:dst + p1 - p0], False, fd, foff + p0, userdata=(k, p1 - p0))
                prepared += 1
                used += p1 - p0
                p0 = p1
        if prepared:
            round_trip()
        return errors

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
        staged: list[tuple[_Item, _Entry]] = []
        sums = [xxhash.xxh3_64_intdigest(item.data) for item in batch]  # outside the lock
        with self._lock:
            self._evicted: list[bytes] = []
            for item, csum in zip(batch, sums):
                if item.cancelled:
                    continue
                length = len(item.data)
                cls = self._class(length)
                where = self._alloc(cls)
                if where is None:
                    self.stats["budget_drops"] += 1
                    continue
                self._seq += 1
                staged.append((item, _Entry(where[0], where[1], cls, length, csum, self._seq)))
            evicted = self._evicted
        self._append_log(evicted)
        if not staged:
            return
        try:
            results = self._write_slots(ring, area0, staged)
        except Exception as ex:
            log.error("hf3fs store %s: write batch refused: %s", self.path, ex)
            results = {k: -errno.EIO for k in range(len(staged))}
        recs = []
        with self._cv:
            # Commit in the order the puts were queued, so LRU order is put order, whichever
            # writer thread finished first.
            self._cv.wait_for(lambda: self._next_commit >= turn)
            for k, (item, e) in enumerate(staged):
                got = results.get(k, 0)
                if got or item.cancelled:
                    self._slabs.free(e.slab, e.slot)
                    if got:
                        self.stats["write_errors"] += 1
                        err = os.strerror(-got) if got < 0 else f"short write ({got} bytes)"
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
