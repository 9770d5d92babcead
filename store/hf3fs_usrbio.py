"""The USRBIO client (``hf3fs_fuse.io``, imported on first use: an optional dependency), the
resources of one store/hf3fs instance, and its batched reads and writes.

One shared-memory segment (``iov_size_mb``) registered once with ``make_iovec``: its first
``read_area`` bytes stage reads (one batch at a time), the rest is split between the writer
threads (``write_area`` each), each with its own write ioring; a value larger than a writer's
share is written in pieces (several submits). Data files are ``register_fd``-ed once. Writes and
batched reads prepare every I/O of a batch, submit once and wait for all results.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator, Sequence

from common.config import ConfigError
from store.fileio import round_up

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
    """Open ``path`` and register the fd with the USRBIO client ``io``."""
    fd = os.open(path, flags, 0o600)
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


class Usrbio:
    """The iovec, the iorings and the registered data files (``fds``: file number -> fd)."""

    def __init__(self, io: Any, mount_point: str, size: int, read_area: int, write_area: int,
                 n_writers: int, entries: int, io_depth: int, numa: int, name: str = "") -> None:
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
            self._read_ring = io.make_ioring(mount_point, entries, for_read=True, io_depth=io_depth, numa=numa)
            self._rings = [io.make_ioring(mount_point, entries, for_read=False, io_depth=io_depth, numa=numa)
                           for _ in range(n_writers)]
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

    def read(self, reads: list[tuple[int, int, int, int, Any]]) -> list:
        """Read each (fd, file offset, area offset, bytes, userdata) of ``reads`` into the read
        area at its offset: one submit, the results (``.result``, ``.userdata``). Call with
        ``read_lock`` held (kept while the area is read); raises if the ring refuses."""
        ring = self._read_ring
        for fd, foff, off, n, userdata in reads:
            ring.prepare(self._iov[off:off + n], True, fd, foff, userdata=userdata)
        return ring.submit().wait(min_results=len(reads))

    # -- writes ----------------------------------------------------------------------------
    def write(self, w: int, slots: list[tuple[int, int, bytes, Any]]) -> dict[int, int]:
        """Write each (fd, file offset, header, payload) of ``slots`` (zero padded to ``ALIGN``)
        through writer ``w``'s area and ring, in pieces of at most the area (a value larger than
        the area takes several rounds). Returns {k: error} for the slots that failed (-errno,
        or the bytes of a short write)."""
        ring, area0 = self._rings[w], self.read_area + w * self.write_area
        errors: dict[int, int] = {}
        prepared = used = 0

        def round_trip() -> None:
            for r in ring.submit().wait(min_results=prepared):
                k, want = r.userdata
                if r.result != want and k not in errors:
                    errors[k] = r.result if r.result < 0 else max(r.result, 1)

        for k, (fd, foff, hdr, data) in enumerate(slots):
            total = round_up(len(hdr) + len(data))
            p0 = 0
            while p0 < total:
                p1 = min(total, p0 + self.write_area)
                if used + p1 - p0 > self.write_area or prepared >= self.entries:
                    round_trip()
                    prepared = used = 0
                dst = area0 + used
                self._stage(dst, hdr, data, p0, p1)
                ring.prepare(self._iov[dst:dst + p1 - p0], False, fd, foff + p0, userdata=(k, p1 - p0))
                prepared += 1
                used += p1 - p0
                p0 = p1
        if prepared:
            round_trip()
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
