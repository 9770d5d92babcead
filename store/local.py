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
* File names and the file format: store/local_format.py; reading and writing the files (checked,
  O_DIRECT or buffered, temp file + rename): store/local_files.py.

Writes are asynchronous: ``put`` copies the bytes into a bounded queue (``queue_mb``) and
returns; ``write_threads`` background threads evict (``lru``/``lfu``/``fifo``, store/eviction.py)
until the new file fits, write it (header and payload in one write) and publish it. A full queue,
a value larger than the budget, or any OS error while writing (ENOSPC, EIO, ...) drops the put
and counts it; serving goes on. The queue's copies live in page-aligned staging buffers that are
reused (pre-faulted) rather than allocated per put; up to ``queue_mb`` of free buffers are kept,
so an idle store holds at most that much staging memory (the same bound as a full queue), plus at
most ``min(queue_mb, 64 MiB)`` of staging buffers for O_DIRECT reads.

A store opened with ``writer=False`` (a scheduler's lookups, a decode worker's fallback reads)
starts no writer threads and drops every ``put`` (counted ``read_only``); it still reads every
file under its path, whoever wrote it.

Keys are content addresses: a put of a key that is already stored or queued is skipped
(counted ``duplicates``) and returns True.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any, Sequence

from common.bytes import byte_view
from common.config import ConfigError
from store.base import STAT_KEYS as COMMON_STAT_KEYS
from store.base import parse_path, writer_budget
from store.eviction import make_policy
from store.fileio import BufPool
from store.local_files import ChunkFiles, check_dir, unlink_quiet
from store.local_format import MAX_KEY, layout
from store.queue import DUPLICATE, QUEUED, WriteQueue
from store.reads import Readers

log = logging.getLogger(__name__)

STAT_KEYS = COMMON_STAT_KEYS + (
    "adopted",          # files found on disk that the index did not know (another process)
    "temp_removed",     # leftover temporary files removed at start
    "odirect_fallbacks",  # the filesystem refused O_DIRECT: buffered I/O from then on
)


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


class _Entry:
    __slots__ = ("size", "last_use", "hits")

    def __init__(self, size: int, last_use: float, hits: int = 0):
        self.size, self.last_use, self.hits = size, last_use, hits


class LocalStore:
    """``store.base.KVStore`` on a local directory (see the module docstring)."""

    def __init__(self, cfg: Any, device_index: int = 0, fsync: bool = False, writer: bool = True) -> None:
        paths = [parse_path(p) for p in (cfg.paths or [])]
        if not paths:
            raise ConfigError("store backend local needs at least one directory in store.paths "
                             "(e.g. paths: [\"file:///mnt/nvme0/pdkv\"])")
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index}")
        path = paths[device_index % len(paths)]
        self.path = os.path.abspath(path)
        check_dir(path)
        self.budget = writer_budget(cfg, len(paths), "local")
        self.location = f"local:{self.path}"
        self.eviction = cfg.eviction
        self.queue_budget = int(cfg.queue_mb) << 20
        # a put larger than the budget or the write queue is refused (see ``put``)
        self.max_value = min(self.budget, self.queue_budget)
        self.fsync = fsync
        self.writer = bool(writer)  # False: lookups and reads only; every put is dropped
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        read_threads = int(getattr(cfg, "read_threads", 1))
        self._readers = Readers(read_threads, "pd-store-read")
        self._q = WriteQueue(self.queue_budget, self.stats, self._lock, f"local store {self.path}",
                             writer=self.writer)
        self._cv = self._q.cv
        self._index: dict[str, _Entry] = {}
        self._policy = make_policy(cfg.eviction)
        self._used = 0              # bytes of indexed files
        self._inflight = 0          # bytes reserved by files being written
        self._pool = BufPool(self.queue_budget)  # staging buffers of queued puts
        self._files = ChunkFiles(self.path, bool(cfg.o_direct), fsync, self.queue_budget, self.stats,
                                 self._lock, inline_hash=read_threads > 1)
        self._evicting: set[str] = set()
        for mtime, key, size in self._files.scan():
            self._index[key] = _Entry(size, mtime)
            self._policy.add(key)
            self._used += size
        self.stats["recovered"] = len(self._index)
        self._threads = [threading.Thread(target=self._writer, name=f"pdkv-store-w{i}", daemon=True)
                         for i in range(int(cfg.write_threads) if self.writer else 0)]
        for t in self._threads:
            t.start()
        log.info("local store %s: budget %d B, %d files (%d B) found, eviction %s, o_direct %s",
                 self.path, self.budget, len(self._index), self._used, self.eviction, self._files.direct)

    def _forget(self, key: str) -> _Entry | None:
        """Drop ``key`` from the index (lock held)."""
        e = self._index.pop(key, None)
        if e is not None:
            self._used -= e.size
            self._policy.remove(key)
        return e

    # -- KVStore ---------------------------------------------------------------------------
    def put(self, key: str, data: Any) -> bool:
        mv = byte_view(data)
        plen = mv.nbytes
        kb = key.encode()
        if len(kb) > MAX_KEY:
            raise ValueError(f"store key is {len(kb)} bytes long; at most {MAX_KEY}")
        direct = self._files.direct
        poff, size = layout(len(kb), plen, direct)
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
        full = self._files.file(key)
        n = self._files.read(key, full, out)
        if n and e is None:
            self._adopt(key, full)
        elif not n and e is not None:
            with self._lock:
                if not os.path.exists(full) and self._index.get(key) is e:
                    self._forget(key)
        self._count_get(key, n)
        return n

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        """``get`` of each key into its buffer (``store.base.KVStore``), ``read_threads`` at a time."""
        if len(keys) != len(intos):
            raise ValueError(f"get_many: {len(keys)} keys but {len(intos)} buffers")
        return self._readers.map(self.get, list(zip(keys, intos)))

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

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        for key in keys:
            with self._lock:
                known = key in self._index or key in self._q.pending
            if not known and not os.path.exists(self._files.file(key)):
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
                os.unlink(self._files.file(key))
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
                    "o_direct": self._files.direct, **self.stats}

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._q.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._readers.close()
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
            full = self._files.file(key)
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
        full = self._files.file(item.key)
        err: OSError | None = None
        try:
            self._files.write(item, full)
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
            unlink_quiet(full)

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

