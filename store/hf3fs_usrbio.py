"""The USRBIO client (``hf3fs_fuse.io``, imported on first use: an optional dependency), the
resources of one store/hf3fs instance, and its batched reads and writes.

One shared-memory segment (``iov_size_mb``) registered once with ``make_iovec``: its first
``read_area`` bytes stage reads (one batch at a time), the rest is split between the writer
threads (``write_area`` each), each with its own write ioring; a value larger than a writer's
share is written in pieces (several submits). Data files are ``register_fd``-ed once. Writes and
batched reads prepare every I/O of a batch, submit once and wait for all results (``Ring``).

The binding's rules that shape ``Ring`` (deepseek-ai/3FS ``src/lib/api/UsrbIo.cc``,
``src/lib/py/usrbio_binding.cc``): ``prepare`` may raise ``OSError`` (EBADF, EACCES, EINVAL,
EAGAIN) after earlier I/Os of the batch were prepared, and a prepared I/O may already run
before ``submit``; ``wait`` returns at most ``max(max_results, min_results)`` completions, in
any order, and at its timeout returns what it has; an entry is free only once ``wait`` returned
its completion. So every I/O carries its batch's tag, a completion with another tag (a batch
given up on) is counted and dropped, never taken for another key's, and a ring whose I/Os are
not all collected is not used again (its staging area may still be read or written) until they
are.
"""
from __future__ import annotations

import datetime
import errno
import gc
import itertools
import logging
import os
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator, Sequence

from common.config import ConfigError
from store.fileio import check_owned, make_own_dirs, open_own, round_up

log = logging.getLogger(__name__)

MISSING_MODULE = ("store backend hf3fs needs hf3fs_py_usrbio (build it from the 3FS source tree); "
                  "a 3FS FUSE mount can be used with backend local meanwhile")


def import_io() -> Any:
    """``hf3fs_fuse.io``; ValueError(MISSING_MODULE) without it."""
    try:
        import hf3fs_fuse.io as io  # type: ignore[import-not-found]
    except Exception:  # ImportError, or the .so failing to load (libhf3fs_api_shared missing)
        raise ConfigError(MISSING_MODULE) from None
    return io


def open_registered(io: Any, path: str, flags: int) -> int:
    """Open ``path`` (a regular file of this uid, never through a symlink: ``open_own``) and
    register the fd with the USRBIO client ``io``."""
    fd = open_own(path, flags)
    try:
        io.register_fd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def close_registered(io: Any, fds: dict[int, int]) -> None:
    """Deregister and close the fds of ``fds`` (emptied)."""
    for fd in fds.values():
        try:
            io.deregister_fd(fd)
        finally:
            os.close(fd)
    fds.clear()


# 3FS is shared by every host: each host's pdkv must run as one uid to share a base path.
SAME_UID = "; every host's pdkv that shares a 3FS base path must run as the same uid"


def locate(io: Any, mount_point: str, base: str, device_index: int) -> tuple[str, str]:
    """(the 3FS mount, device ``device_index``'s directory under ``base``), made if missing.

    The real ``extract_mount_point`` resolves a path with ``boost::filesystem::canonical``:
    the path must exist (a missing one is a RuntimeError) and symlinks are followed; a path
    on no 3FS mount is None. So it is asked about the nearest existing directory, and
    mount points are compared resolved."""
    mp = mount_point
    if not mp:
        if not os.path.isabs(base):
            raise ConfigError("store.hf3fs.mount_point is empty and the base path "
                             f"{base!r} is relative; set mount_point (e.g. /3fs/stage)")
        mp = mount_of(io, base)
        if not mp:
            raise ConfigError(f"store base path {base} is not on a 3FS mount")
    if not os.path.isdir(mp):
        raise ConfigError(f"store.hf3fs.mount_point {mp} does not exist")
    mount = os.path.realpath(mp)
    base_abs = base if os.path.isabs(base) else os.path.join(mount, base)
    root = os.path.join(os.path.abspath(base_abs), f"dev{device_index}")
    found = mount_of(io, root)
    if not found or os.path.realpath(found) != mount:
        raise ConfigError(f"store path {root} is not under the 3FS mount {mp}"
                          + (f" (it is on {found})" if found else ""))
    top = os.path.dirname(root)  # the base path
    try:
        os.makedirs(top, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"store path {top} cannot be created ({e.strerror or e})") from None
    check_owned(top, "store base path", SAME_UID)
    try:
        make_own_dirs(top, root)
    except PermissionError as e:
        raise ConfigError(f"{e.strerror}{SAME_UID}") from None
    except OSError as e:
        raise ConfigError(f"store path {root} cannot be created ({e.strerror or e})") from None
    return mount, root

def mount_of(io: Any, path: str) -> str | None:
    """The 3FS mount holding ``path`` (or, while it does not exist yet, its nearest
    existing parent): ``extract_mount_point`` of that, None if on no 3FS mount."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return io.extract_mount_point(p)
    except (RuntimeError, OSError) as e:  # vanished meanwhile, or a path the client refuses
        raise ConfigError(f"store path {path}: the 3FS client cannot resolve {p}: {e}") from None


class RingBusy(OSError):
    """A ring still has I/Os of a batch given up on: its staging area may be in use."""


class Ring:
    """One ioring, the I/Os of this store outstanding on it, and batch tags (see the module)."""

    def __init__(self, ring: Any, timeout_s: float, what: str) -> None:
        self.ring, self.timeout_s, self.what = ring, timeout_s, what
        self.outstanding = 0  # prepared I/Os whose completion wait has not returned yet
        self.strays = 0  # completions of earlier, abandoned batches (counted, dropped)
        self._tags = itertools.count(1)

    def settle(self) -> bool:
        """Collect what earlier batches left (without blocking); whether none is left."""
        while self.outstanding:
            got = self.ring.wait(max_results=self.outstanding, timeout=datetime.timedelta(0))
            if not got:
                return False
            self.outstanding -= len(got)
            self.strays += len(got)
        return True

    def run(self, ios: Sequence[tuple[Any, bool, int, int, Any]]) -> tuple[list[tuple[Any, int]], Exception | None]:
        """Prepare, submit and wait for each (iov, read, fd, offset, item) of ``ios``: the
        (item, result) of those that completed, and what went wrong (None: all did). RingBusy
        (nothing prepared) while an earlier batch's I/Os are out."""
        if not self.settle():
            raise RingBusy(f"{self.what}: {self.outstanding} I/Os of a batch given up on are still out")
        tag, err, prepared = next(self._tags), None, 0
        for iov, read, fd, off, item in ios:
            try:
                self.ring.prepare(iov, read, fd, off, userdata=(tag, item))
            except Exception as e:  # OSError: EBADF, EACCES, EINVAL, EAGAIN; the rest: a bug
                err = e.with_traceback(None)  # (its frames would keep views of the iovec alive)
                break
            prepared += 1
        out: list[tuple[Any, int]] = []
        if not prepared:
            return out, err
        self.outstanding += prepared
        self.ring.submit()
        deadline = time.monotonic() + self.timeout_s
        while len(out) < prepared:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = self.ring.wait(min_results=prepared - len(out), max_results=self.outstanding,
                                 timeout=datetime.timedelta(seconds=left))
            self.outstanding -= len(got)
            for r in got:
                t, item = r.userdata
                if t == tag:
                    out.append((item, r.result))
                else:
                    self.strays += 1
        if len(out) < prepared and err is None:
            err = TimeoutError(f"{self.what}: {prepared - len(out)} of {prepared} I/Os not done in {self.timeout_s:g} s")
        return out, err


class Usrbio:
    """The iovec, the iorings and the registered data files (``fds``: file number -> fd)."""

    def __init__(self, io: Any, mount_point: str, size: int, read_area: int, write_area: int,
                 n_writers: int, entries: int, io_depth: int, numa: int, name: str = "",
                 timeout_s: float = 5.0) -> None:
        self.io, self.name = io, name  # name: the store's, for log lines
        self.read_area, self.write_area, self.entries = read_area, write_area, entries
        self.fds: dict[int, int] = {}
        self.read_lock = threading.Lock()  # one read batch at a time in the read area
        self._shm: shared_memory.SharedMemory | None = None
        self.buf = memoryview(bytearray())  # the iovec's memory, once mapped
        self._iov = self._read_ring = None
        self._rings: list[Any] = []
        try:
            self._shm = shared_memory.SharedMemory(create=True, size=size)
            self.buf = memoryview(self._shm.buf)
            self._iov = io.make_iovec(self._shm, mount_point, block_size=0, numa=numa)
            self._read_ring = Ring(io.make_ioring(mount_point, entries, for_read=True, io_depth=io_depth,
                                                  numa=numa), timeout_s, f"hf3fs store {name}: read ring")
            self._rings = [Ring(io.make_ioring(mount_point, entries, for_read=False, io_depth=io_depth, numa=numa),
                                timeout_s, f"hf3fs store {name}: write ring {w}") for w in range(n_writers)]
        except BaseException:
            self.release()
            raise

    def open_file(self, f: int, path: str) -> int:
        """Open (create) data file number ``f`` at ``path`` for reading and writing."""
        fd = open_registered(self.io, path, os.O_RDWR | os.O_CREAT)
        self.fds[f] = fd
        return fd

    # -- reads -----------------------------------------------------------------------------
    def batches(self, todo: Sequence[tuple], size: Callable[[tuple], int]) -> Iterator[list[tuple]]:
        """``todo`` in batches of (item, offset in the read area, bytes): each batch fits the
        read area and the ring (``size(item)``: the bytes an item reads)."""
        start = 0
        while start < len(todo):
            batch, used = [], 0
            for j in range(start, len(todo)):
                n = size(todo[j])
                if batch and (used + n > self.read_area or len(batch) >= self.entries):
                    break
                batch.append((todo[j], used, n))
                used += n
            start += len(batch)
            yield batch

    def read(self, reads: list[tuple[int, int, int, int, Any]]) -> tuple[list[tuple[Any, int]], Exception | None]:
        """Read each (fd, file offset, area offset, bytes, item) of ``reads`` into the read area
        at its offset: (item, result) of each read that completed, and what failed (``Ring.run``).
        Call with ``read_lock`` held (kept while the area is read)."""
        return self._read_ring.run([(self._iov[off:off + n], True, fd, foff, item) for fd, foff, off, n, item in reads])

    @property
    def strays(self) -> int:
        """Completions of batches given up on, on every ring."""
        return sum(r.strays for r in (self._read_ring, *self._rings) if r is not None)

    # -- writes ----------------------------------------------------------------------------
    def write(self, w: int, slots: list[tuple[int, int, bytes, Any]]) -> dict[int, int]:
        """Write each (fd, file offset, header, payload) of ``slots`` (zero padded to ``ALIGN``)
        through writer ``w``'s area and ring, in pieces of at most the area (a value larger than
        the area takes several rounds). Returns {k: error} for the slots that failed (-errno,
        or the bytes of a short write). Once a round fails (a prepare refused, I/Os not done in
        time) the slots after it are not tried: the area may still be in use."""
        ring, area0 = self._rings[w], self.read_area + w * self.write_area
        errors: dict[int, int] = {}
        ios: list[tuple] = []
        used = 0
        failed: list[Exception] = []

        def round_trip() -> None:
            try:
                done, err = ring.run(ios)  # (it first collects what earlier batches left)
            except RingBusy as busy:
                done, err = [], busy
            for (k, want, _p0), result in done:
                if result != want and k not in errors:
                    errors[k] = result if result < 0 else max(result, 1)
            finished = {item for item, _ in done}
            for *_, item in ios:
                if item not in finished:
                    errors.setdefault(item[0], -errno.EIO)
            if err is not None:
                failed.append(err)
            ios.clear()

        for k, (fd, foff, hdr, data) in enumerate(slots):
            if failed:
                errors[k] = -errno.EIO
                continue
            total = round_up(len(hdr) + len(data))
            p0 = 0
            while p0 < total and not failed:
                p1 = min(total, p0 + self.write_area)
                if ios and (used + p1 - p0 > self.write_area or len(ios) >= self.entries):
                    round_trip()
                    used = 0
                    if failed:
                        errors.setdefault(k, -errno.EIO)
                        break
                if not ios and not ring.settle():  # never restage while a given-up write reads the area
                    failed.append(RingBusy(f"{ring.what}: {ring.outstanding} I/Os still out"))
                    errors.setdefault(k, -errno.EIO)
                    break
                dst = area0 + used
                self._stage(dst, hdr, data, p0, p1)
                ios.append((self._iov[dst:dst + p1 - p0], False, fd, foff + p0, (k, p1 - p0, p0)))
                used += p1 - p0
                p0 = p1
        if ios:
            round_trip()
        if failed:
            log.error("hf3fs store %s: write batch failed: %s", self.name, failed[0])
        return errors

    def _stage(self, dst: int, hdr: bytes, data: Any, p0: int, p1: int) -> None:
        """Copy bytes [p0, p1) of the slot image ``hdr + data + zero padding`` to the iovec at
        ``dst``."""
        buf, n, h, pos = self.buf, len(data), len(hdr), dst
        if p0 < h:
            buf[pos:pos + h - p0] = hdr[p0:]
            pos += h - p0
        d0, d1 = max(p0, h) - h, min(p1 - h, n)
        if d1 > d0:
            buf[pos:pos + d1 - d0] = memoryview(data)[d0:d1]
            pos += d1 - d0
        end = dst + p1 - p0
        if end > pos:
            buf[pos:end] = bytes(end - pos)

    def release(self) -> None:
        close_registered(self.io, self.fds)
        self._rings = []
        self._read_ring = None
        self._iov = None  # the wrapper removes its 3fs-virt/iovs link
        if self._shm is not None:
            self.buf.release()
            gc.collect()
            try:
                self._shm.close()
            except BufferError:
                log.warning("hf3fs store %s: iovec memory still referenced at close", self.name)
            self._shm.unlink()
            self._shm = None
