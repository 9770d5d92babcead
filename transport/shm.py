"""Same-host transport: one file per chunk in a tmpfs directory (``/dev/shm/pdkv-<name>``).

A producer writes each chunk to a temporary file in the pool directory and renames it to the
chunk's name, so a reader never sees a half-written chunk. A consumer opens the file and reads
it straight into its own buffer; an open descriptor keeps the data even if the producer evicts
(unlinks) the file meanwhile. Consumers delete what they have read.

Memory is bounded per producer: ``pool_size_mb`` is the budget of the bytes *this instance*
put. When a put would exceed it, entries whose files are already gone (consumed) are forgotten
first, then the oldest chunks still there are evicted until the new one fits.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from typing import Any, Sequence

from transport.base import TransportError

log = logging.getLogger(__name__)

_PLAIN = re.compile(r"[A-Za-z0-9_.-]")
_MAX_NAME = 200  # well under NAME_MAX (255 bytes)
_TMP_PREFIX = ".tmp-"

STAT_KEYS = (
    "puts",          # chunks stored
    "put_bytes",     # bytes stored
    "dropped",       # puts that returned False (too large for the budget, or an OS error)
    "put_errors",    # ... of which OS errors (ENOSPC, EIO, ...)
    "evictions",     # chunks unlinked to make room (never read by a consumer)
    "reclaimed",     # tracked chunks found already deleted by a consumer
    "gets",          # keys asked for
    "get_hits",
    "get_misses",    # absent, buffer too small, or an OS error
    "get_bytes",
    "deletes",       # files unlinked by delete()
)


def key_to_name(key: str) -> str:
    """Flat, injective file name for a key.

    ``[A-Za-z0-9_.-]`` stay as they are, ``/`` becomes ``+``, every other byte (of the UTF-8
    form) becomes ``%XX``; a leading ``.`` is escaped too, so no name is ``.``/``..`` or
    collides with a temporary file. Names longer than ``_MAX_NAME`` keep a readable prefix and
    end in ``#`` + a 128-bit digest of the key (``#`` never occurs in an escaped name).
    """
    out = []
    for i, ch in enumerate(key):
        if ch == "/":
            out.append("+")
        elif _PLAIN.match(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    name = "".join(out)
    if len(name) > _MAX_NAME:
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        name = name[: _MAX_NAME - 33] + "#" + digest
    return name


def name_to_key(name: str) -> str | None:
    """Inverse of ``key_to_name`` (None for hashed long names and temporary files)."""
    if "#" in name or name.startswith(_TMP_PREFIX):
        return None
    raw = bytearray()
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "%":
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
            continue
        raw += b"/" if ch == "+" else ch.encode()
        i += 1
    return raw.decode()


def pool_dir(cfg: Any) -> str:
    """The pool directory of a ``TransportConfig``: ``<shm_dir>/pdkv-<name>``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name) or "default"
    return os.path.join(cfg.shm_dir, f"pdkv-{safe}")


def cleanup_pool(cfg: Any) -> None:
    """Remove the whole pool directory (every producer's chunks); the launcher's clean stop."""
    path = pool_dir(cfg)
    shutil.rmtree(path, ignore_errors=True)
    log.info("removed shm pool %s", path)


def _byte_view(buf: Any) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


class ShmTransport:
    """``transport.base.Transport`` over files in a shared-memory directory (same host only)."""

    cleanup_pool = staticmethod(cleanup_pool)

    def __init__(self, cfg: Any) -> None:
        self.path = pool_dir(cfg)
        self.location = f"shm:{self.path}"
        self.budget = int(cfg.pool_size_mb) << 20
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._used = 0          # bytes of committed entries
        self._inflight = 0      # bytes reserved by puts being written
        self._seq = itertools.count()
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise TransportError(f"cannot create shm pool {self.path}: {e}") from e

    # -- helpers -------------------------------------------------------------------------
    def _file(self, key: str) -> str:
        return os.path.join(self.path, key_to_name(key))

    def _bump(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def _forget(self, key: str) -> None:
        """Drop ``key`` from the accounting (lock held)."""
        size = self._entries.pop(key, None)
        if size is not None:
            self._used -= size

    def _reserve(self, key: str, size: int, reclaimed: list[bool]) -> bool:
        """Make room for ``size`` bytes and reserve them (lock held); False if impossible."""
        if size > self.budget:
            return False
        old = self._entries.get(key, 0)  # an overwrite frees the old copy's bytes
        if self._used - old + self._inflight + size > self.budget and not reclaimed[0]:
            reclaimed[0] = True  # one scan per put() call is enough
            gone = [k for k in self._entries if not os.path.exists(self._file(k))]
            for k in gone:
                self._forget(k)
            self.stats["reclaimed"] += len(gone)
            old = self._entries.get(key, 0)
        while self._used - old + self._inflight + size > self.budget and self._entries:
            victim, _ = next(iter(self._entries.items()))
            self._forget(victim)
            if victim == key:
                old = 0
            try:
                os.unlink(self._file(victim))
                self.stats["evictions"] += 1
            except FileNotFoundError:
                self.stats["reclaimed"] += 1
            except OSError as e:
                log.warning("shm pool %s: cannot evict %s: %s", self.path, victim, e)
        if self._used - old + self._inflight + size > self.budget:
            return False  # the rest of the budget is held by puts still being written
        self._inflight += size
        return True

    def _write(self, key: str, mv: memoryview) -> None:
        tmp = os.path.join(self.path, f"{_TMP_PREFIX}{os.getpid()}-{next(self._seq)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # the pool directory was removed under us: recreate it
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(tmp, flags, 0o600)
        try:
            done = os.write(fd, mv)
            while done < len(mv):  # only for writes beyond the kernel's ~2 GiB per call
                done += os.write(fd, mv[done:])
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, self._file(key))
        except BaseException:
            os.unlink(tmp)
            raise

    # -- Transport -----------------------------------------------------------------------
    def put(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[bool]:
        """Store each buffer under its key (atomic rename); False = dropped, never raises."""
        if len(keys) != len(buffers):
            raise ValueError(f"put: {len(keys)} keys but {len(buffers)} buffers")
        ok: list[bool] = []
        reclaimed = [False]
        for key, buf in zip(keys, buffers):
            mv = _byte_view(buf)
            size = mv.nbytes
            with self._lock:
                reserved = self._reserve(key, size, reclaimed)
                if not reserved:
                    self.stats["dropped"] += 1
            if not reserved:
                log.warning("shm pool %s: dropped %s (%d bytes, budget %d bytes)",
                            self.path, key, size, self.budget)
                ok.append(False)
                continue
            err: OSError | None = None
            try:
                self._write(key, mv)
            except OSError as e:
                err = e
            with self._lock:
                self._inflight -= size
                if err is None:
                    self._forget(key)
                    self._entries[key] = size
                    self._used += size
                    self.stats["puts"] += 1
                    self.stats["put_bytes"] += size
                else:
                    self.stats["dropped"] += 1
                    self.stats["put_errors"] += 1
            if err is not None:
                level = logging.WARNING if err.errno in (errno.ENOSPC, errno.EDQUOT) else logging.ERROR
                log.log(level, "shm pool %s: put %s failed: %s", self.path, key, err)
            ok.append(err is None)
        return ok

    def get(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[int]:
        """Read each key into its buffer; bytes read per key, 0 = miss (incl. too small)."""
        if len(keys) != len(buffers):
            raise ValueError(f"get: {len(keys)} keys but {len(buffers)} buffers")
        out: list[int] = []
        for key, buf in zip(keys, buffers):
            mv = _byte_view(buf)
            try:
                fd = os.open(self._file(key), os.O_RDONLY)
            except FileNotFoundError:
                out.append(0)
                continue
            except OSError as e:
                log.warning("shm pool %s: open %s failed: %s", self.path, key, e)
                out.append(0)
                continue
            try:
                size = os.fstat(fd).st_size
                if size > mv.nbytes or size == 0:
                    out.append(0)
                    continue
                done = os.readv(fd, [mv[:size]])
                while 0 < done < size:  # only for reads beyond the kernel's ~2 GiB per call
                    n = os.readv(fd, [mv[done:size]])
                    if n == 0:
                        break
                    done += n
                out.append(size if done == size else 0)
            except OSError as e:
                log.warning("shm pool %s: read %s failed: %s", self.path, key, e)
                out.append(0)
            finally:
                os.close(fd)
        hits = sum(1 for n in out if n)
        self._bump(gets=len(out), get_hits=hits, get_misses=len(out) - hits, get_bytes=sum(out))
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key's chunk is in the pool now (it may vanish right after)."""
        return [os.path.exists(self._file(k)) for k in keys]

    def delete(self, keys: Sequence[str]) -> int:
        """Unlink the chunks that exist (anyone's); returns how many were unlinked."""
        n = 0
        for key in keys:
            try:
                os.unlink(self._file(key))
                n += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("shm pool %s: delete %s failed: %s", self.path, key, e)
        with self._lock:
            for key in keys:
                self._forget(key)
            self.stats["deletes"] += n
        return n

    def close(self) -> None:
        """Remove the chunks this instance put that are still in the pool."""
        with self._lock:
            keys = list(self._entries)
            self._entries.clear()
            self._used = 0
        for key in keys:
            try:
                os.unlink(self._file(key))
            except OSError:
                pass
        log.debug("shm pool %s: closed, removed up to %d chunks; stats %s", self.path, len(keys), self.stats)

    def used_bytes(self) -> int:
        """Bytes this instance currently accounts for (committed + being written)."""
        with self._lock:
            return self._used + self._inflight
