"""3FS KV store through the USRBIO API (``hf3fs_fuse.io``), the same behaviour as ``store.local``.

Tested only against ``tests.doubles.usrbio_emulator`` (a test double over local files); no real 3FS
cluster has run this backend.

Layout under ``<mount_point>/<base path>/dev<device_index>/``: one directory ``<host>.w<k>`` per
writing process (the first ``k`` whose ``lock`` file it can ``flock``; a restarted writer takes its
old directory back and replays its index). The host's name is part of it because 3FS's FUSE has
no lock operations: a ``flock`` holds only among the processes of one host, so writers of two
hosts must never contend for one directory. A writer directory holds:

* ``data-NNNN.bin``: a few large data files, cut into slabs of ``slab_size`` bytes (see
  store/hf3fs_slabs.py): at most 1 GiB, a quarter of the budget, and the read staging area (half
  the iovec). The largest value is ``slab_size`` - 64 bytes: 64 MiB - 64 with the default 200 MB
  iovec; raise ``iov_size_mb`` for larger chunks. The budget (``size_gb`` over the base paths and
  ``writers``, the processes writing to each base path, which ``pd launch`` sets from the prefill
  pool) is the number of slabs x ``slab_size`` of one writer directory, so the data files of all
  writers together never exceed ``size_gb``. Slot and log formats: store/hf3fs_format.py.
* ``index.log``: this writer's index (store/hf3fs_log.py).
* ``lock``: ``flock`` held by the one process that writes the directory.

The base path, ``dev<k>`` and the writer directories must be this uid's and writable by it only,
and are never followed as symlinks (store/fileio.py; every host's pdkv sharing a base path runs
as one uid); data files of another uid are never read (a peer's: its values are misses).

Every process reads every ``w*`` directory of its device (store/hf3fs_peers.py). A process opened
with ``writer=False`` (a scheduler, a decode worker) claims no directory, writes nothing and drops
every ``put`` (counted ``read_only``). I/O goes through one iovec and batched iorings
(store/hf3fs_usrbio.py).

``put`` copies into the bounded write queue of ``store.queue`` (``queue_mb``) and returns at
once; a full queue, a value that cannot fit a slab, a closed store drop the put (counted). A
failed write (``result < 0``, e.g. -ENOSPC) drops that put and frees its slot. When no slot is
free, the least recently used value is evicted where it has the slot's size, else the values
of its slab, which then changes size (``_alloc``); the DEL records reach the log before the slot
is rewritten.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import threading
from collections import OrderedDict
from typing import Any, Sequence

import xxhash

from common.bytes import byte_view
from common.config import ConfigError
from store.base import STAT_KEYS as COMMON_STAT_KEYS
from store.base import parse_path, writer_budget
from store.fileio import ALIGN, make_own_dirs, open_own, round_up
from store.hf3fs_format import (
    HDR,
    OP_ADD,
    OP_DEL,
    Entry,
    check_slot,
    data_file,
    slot_header,
)
from store.hf3fs_log import IndexLog
from store.hf3fs_peers import Peers
from store.hf3fs_slabs import FILE_BYTES, Slabs, slab_size, slot_class
from store.hf3fs_usrbio import (
    MISSING_MODULE,
    SAME_UID,
    RingBusy,
    Usrbio,
    import_io,
    locate,
)
from store.queue import DUPLICATE, QUEUED, WriteQueue

__all__ = ["HDR", "MISSING_MODULE", "Hf3fsStore"]  # HDR and MISSING_MODULE: for launch/

log = logging.getLogger(__name__)

MAX_WRITERS = 64

STAT_KEYS = COMMON_STAT_KEYS + ("read_errors", "log_compactions", "batches", "peer_hits", "peer_corrupt")


class _Item:
    __slots__ = ("key", "data", "size", "cancelled")

    def __init__(self, key: str, data: bytes):
        self.key, self.data, self.size, self.cancelled = key, data, len(data), False


class Hf3fsStore:
    """``store.base.KVStore`` on 3FS through USRBIO (see the module docstring)."""

    def __init__(self, cfg: Any, device_index: int = 0, io: Any = None, writer: bool = True) -> None:
        self.io = io if io is not None else import_io()
        h = cfg.hf3fs
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index}")
        if h.io_depth > 0:
            raise ConfigError(f"store.hf3fs.io_depth={h.io_depth}: batches of exactly io_depth I/Os "
                             "are not supported (this store's batches vary); use 0 or a negative value")
        bases = list(h.base_paths) or [parse_path(p) for p in (cfg.paths or [])] or ["pdkv"]
        self.mount_point, self.root = locate(self.io, h.mount_point,
                                                bases[device_index % len(bases)], device_index)
        self.location = f"hf3fs:{self.root}"
        self.writer = bool(writer)
        self.budget = writer_budget(cfg, len(bases), "hf3fs", "base path(s)")
        if cfg.eviction != "lru" and self.writer:
            log.warning("hf3fs store: eviction %r is not implemented; using lru", cfg.eviction)
        self.iov_size = int(h.iov_size_mb) << 20
        self.n_writers = int(h.io_threads) if self.writer else 0
        # A reader stages reads in the whole iovec; a writer in half, the rest split between its threads.
        self.read_area = (self.iov_size // 2 if self.writer else self.iov_size) // ALIGN * ALIGN
        self.write_area = ((self.iov_size - self.read_area) // self.n_writers // ALIGN * ALIGN
                           if self.writer else 0)
        self.slab_size = slab_size(self.budget, self.read_area)
        self.n_slabs = self.budget // self.slab_size
        self.slabs_per_file = max(1, FILE_BYTES // self.slab_size)
        self.entries = int(h.ior_entries)
        self.queue_budget = int(cfg.queue_mb) << 20
        self.max_value = min(self.slab_size - HDR, self.queue_budget)  # one slab; the write queue
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._q = WriteQueue(self.queue_budget, self.stats, self._lock, f"hf3fs store {self.root}",
                             writer=self.writer)
        self._cv = self._q.cv
        self._next_commit = 0  # the batch (in take order) whose turn it is to enter the index
        self._index: OrderedDict[str, Entry] = OrderedDict()  # LRU order: oldest first
        self._slabs = Slabs(self.n_slabs, self.slab_size, self.slabs_per_file)
        self._seq = 0
        # this process's writer directory ("" for a reader) and the fd of its lock
        self.path, self._lockfd = self._claim_dir() if self.writer else ("", -1)
        self._peers = Peers(self.root, self.io, own=self.path)
        self._log = IndexLog(self.path, self._slabs, self._index, self._lock, self.stats)
        self._usrbio: Usrbio | None = None
        self._open(h)
        self._threads = [threading.Thread(target=self._writer, args=(i,), name=f"pdkv-3fs-w{i}",
                                          daemon=True) for i in range(self.n_writers)]
        for t in self._threads:
            t.start()
        log.info("hf3fs store %s: %s, %d slabs of %d B, %d values found, %d peers", self.root,
                 f"writer {self.path}" if self.writer else "reader", self.n_slabs, self.slab_size,
                 len(self._index), len(self._peers.views))

    def _open(self, h: Any) -> None:
        """Replay the log (a writer), map the iovec, make the iorings, open the data files, find
        the peers; on any failure release what was taken (the writer directory too)."""
        try:
            if self.writer:
                self._seq = self._log.replay()
            self._usrbio = Usrbio(self.io, self.mount_point, self.iov_size, self.read_area, self.write_area,
                                  self.n_writers, self.entries, h.io_depth, h.numa, name=self.path or self.root,
                                  timeout_s=h.io_timeout_s)
            if self.writer:
                for f in range((self.n_slabs + self.slabs_per_file - 1) // self.slabs_per_file):
                    self._usrbio.open_file(f, data_file(self.path, f))
            with self._peers.lock:
                self._peers.refresh(force=True)
        except BaseException:
            self._release()
            raise

    def _claim_dir(self) -> tuple[str, int]:
        """Take the first writer directory ``<host>.w<k>`` whose lock no live process of this
        host holds: (its path, the fd holding its lock). ConfigError if one is not ours."""
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
        for k in range(MAX_WRITERS):
            path = os.path.join(self.root, f"{host}.w{k}")
            try:  # ours, never a symlink another user planted (their directory would get our files)
                make_own_dirs(self.root, path, "hf3fs writer directory")
                fd = open_own(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT)
            except PermissionError as e:
                raise ConfigError(f"{e.strerror}; remove it (pdkv makes it again){SAME_UID}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            return path, fd
        raise ValueError(f"store path {self.root} has {MAX_WRITERS} live writers; no directory "
                         "left for another (give instances their own base paths)")

    def _where(self, e: Entry) -> tuple[int, int]:
        """(fd, offset) of an entry's slot."""
        f, off = self._slabs.locate(e)
        return self._usrbio.fds[f], off

    def _forget(self, key: str) -> Entry | None:
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
            todo += self._peer_reads(keys, missing, outs)
        for batch in self._usrbio.batches(todo, lambda t: round_up(HDR + t[4])):
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

    def _peer_reads(self, keys: Sequence[str], missing: list[int], outs: list[memoryview]) -> list[tuple]:
        """The reads (as in ``get_many``) of the values of ``keys[i]``, i in ``missing``, that
        peers hold and that fit their buffers."""
        todo = []
        with self._peers.lock:
            found = self._peers.refs([keys[i] for i in missing])
            for i in missing:
                got = found.get(keys[i])
                if got is not None and got[1].length <= outs[i].nbytes:
                    view, ref = got
                    try:
                        fd = view.fd(ref.file)
                    except OSError as ex:
                        log.warning("hf3fs store %s: cannot open data file %d of %s: %s",
                                    self.root, ref.file, view.path, ex)
                        if isinstance(ex, PermissionError):  # not ours: never read, nor tried again
                            view.entries.pop(keys[i], None)
                        continue
                    todo.append((i, keys[i], fd, ref.off, ref.length, ref.csum, ref.seq, got))
        return todo

    def _read_batch(self, batch, outs, res) -> None:
        bad: list[tuple[str, Any, str]] = []
        usrbio = self._usrbio
        with usrbio.read_lock:
            try:
                done, err = usrbio.read([(t[2], t[3], off, n, (t, off)) for t, off, n in batch])
            except RingBusy as ex:  # an earlier batch's reads are still out: this one is a miss
                done, err = [], ex
            if err is not None:  # the values not in ``done`` are misses
                log.error("hf3fs store %s: read batch: %d of %d values not read: %s", self.root,
                          len(batch) - len(done), len(batch), err)
                with self._lock:
                    self.stats["read_errors"] += len(batch) - len(done)
            for ((i, key, _fd, _foff, length, csum, seq, owner), off), result in done:
                if result < 0:
                    with self._lock:
                        self.stats["read_errors"] += 1
                    log.warning("hf3fs store %s: read of %s failed: %s", self.root, key,
                                os.strerror(-result))
                    continue
                slot = usrbio.buf[off:off + HDR + length]
                why = check_slot(slot, key, length, csum, seq, result)
                if why:
                    bad.append((key, owner, why))
                    continue
                outs[i][:length] = slot[HDR:]
                res[i] = length
                if not isinstance(owner, Entry):
                    with self._lock:
                        self.stats["peer_hits"] += 1
        self._bad_reads(bad)

    def _bad_reads(self, bad: list[tuple[str, Any, str]]) -> None:
        """Forget the values whose slots failed the check: (key, owner, why); owner: an entry
        of this writer's index, or a peer's (view, ref)."""
        for key, owner, why in bad:
            if not isinstance(owner, Entry):  # a peer's value: forget it here, never touch its log
                view, ref = owner
                self._peers.forget(view, key, ref)
                with self._lock:
                    self.stats["peer_corrupt"] += 1
                log.info("hf3fs store %s: %s of %s is a miss (%s)", self.root, key, view.path, why)
                continue
            with self._lock:
                if self._index.get(key) is owner:
                    self._forget(key)
                    self.stats["corrupt"] += 1
                    rec = self._log.record(OP_DEL, key, owner)
                else:
                    rec = None
            if rec:
                self._log.append([rec])
                log.warning("hf3fs store %s: %s is a miss (%s)", self.path, key, why)

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._index and key not in self._q.pending:
                    break
                n += 1
        if n == len(keys):
            return n
        with self._peers.lock:
            found = self._peers.refs(keys[n:])
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
        return self._peers.keys(own)

    def delete(self, keys: Sequence[str]) -> int:
        n, recs = 0, []
        with self._lock:
            for key in keys:
                item = self._q.pending.pop(key, None)
                if item is not None:
                    item.cancelled = True
                e = self._forget(key)
                if e is not None:
                    recs.append(self._log.record(OP_DEL, key, e))
                n += e is not None or item is not None
            self.stats["deletes"] += n
        self._log.append(recs)
        return n

    def usage(self) -> dict:
        peers = self._peers.usage()
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
        self._peers.close()
        if self._usrbio is not None:
            self._usrbio.release()
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1

    def __enter__(self) -> "Hf3fsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- background writing ------------------------------------------------------------
    def _writer(self, w: int) -> None:
        while True:
            used = [0]

            def more(batch: list[_Item], nxt: _Item) -> bool:
                """Batch while the ring has entries and this thread's staging area has room."""
                used[0] = used[0] or round_up(HDR + batch[0].size)
                n = round_up(HDR + nxt.size)
                if len(batch) >= self.entries or used[0] + n > self.write_area:
                    return False
                used[0] += n
                return True

            got = self._q.take(more)
            if got is None:
                return
            turn, batch = got
            try:
                self._write_batch(batch, w, turn)
            except Exception:  # never let a writer thread die
                log.exception("hf3fs store %s: write batch failed", self.path)
                with self._lock:
                    self.stats["write_errors"] += len(batch)
            finally:
                with self._cv:
                    self._cv.wait_for(lambda: self._next_commit >= turn)
                    self._next_commit = max(self._next_commit, turn + 1)
                    self._q.finish_locked(batch)

    def _alloc(self, cls: int, evicted: list[bytes]) -> tuple[int, int] | None:
        """A free slot of class ``cls``, evicting in LRU order (DEL records to ``evicted``; lock
        held): the least recently used value where it is of class ``cls``, else all the values
        of its slab, which then goes to ``cls``. A put evicts one slab's values at most (more only
        where a slab also holds a slot being written)."""
        while True:
            got = self._slabs.alloc(cls)
            if got is not None or not self._index:
                return got
            key, e = next(iter(self._index.items()))
            victims = [key] if e.cls == cls else [k for k, x in self._index.items() if x.slab == e.slab]
            for key in victims:
                evicted.append(self._log.record(OP_DEL, key, self._forget(key)))
                self.stats["evictions"] += 1

    def _write_batch(self, batch: list[_Item], w: int, turn: int = 0) -> None:
        staged: list[tuple[_Item, Entry]] = []
        evicted: list[bytes] = []
        sums = [xxhash.xxh3_64_intdigest(item.data) for item in batch]  # outside the lock
        with self._lock:
            for item, csum in zip(batch, sums):
                if item.cancelled:
                    continue
                length = len(item.data)
                cls = slot_class(length)
                where = self._alloc(cls, evicted)
                if where is None:
                    self.stats["budget_drops"] += 1
                    continue
                self._seq += 1
                staged.append((item, Entry(where[0], where[1], cls, length, csum, self._seq)))
        self._log.append(evicted)
        if not staged:
            return
        try:
            results = self._usrbio.write(w, [(*self._where(e), slot_header(item.key, len(item.data), e.csum, e.seq),
                                              item.data) for item, e in staged])
        except Exception as ex:
            log.error("hf3fs store %s: write batch refused: %s", self.path, ex)
            results = {k: -errno.EIO for k in range(len(staged))}
        self._commit(staged, results, turn)

    def _commit(self, staged: list[tuple[_Item, Entry]], results: dict[int, int], turn: int) -> None:
        """Enter the values written into the index (their slots freed where the write failed
        or the key was deleted meanwhile) and their ADD records into the log."""
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
                recs.append(self._log.record(OP_ADD, item.key, e))
            self.stats["batches"] += 1
        self._log.append(recs)
