"""Shared-memory arena of the shm transport: the mapped file, its slot headers, its allocator.

An arena is one file on tmpfs, allocated up front (``posix_fallocate``: a full tmpfs is a clean
error here, not a SIGBUS later), mapped ``MAP_SHARED`` read-write and faulted in once
(``MAP_POPULATE``). Its owner (one producer) carves it into slots; any process of the host may
map it to read values or to mark them deleted.

Slot layout (little endian): a ``HEADER`` (64 B) at the slot's start, which is a multiple of
``PAGE``, then the value. The slot spans ``slot_bytes(length)`` bytes.

    magic Q | stamp Q | length Q | deleted Q | key digest 16s | (16 B zero)

``stamp = seq << 2 | state`` is written in one aligned 8-byte store, by the owner only, and every
state change takes a new ``seq`` from the owner's counter, so (arena, offset, seq) names one
incarnation of a slot for ever. ``deleted`` is the one field other processes write: the seq of the
incarnation they deleted (it cannot touch a later incarnation, whose seq differs). Readers use the
stamp as a seqlock: check it, copy, check it again.

Memory ordering: the stamp loads/stores are plain 8-byte moves; between a stamp access and a
bulk copy the GIL is released and re-acquired (atomic instructions, full fences on x86-64), which
orders them on x86's TSO. This was reasoned for x86-64; on weaker CPUs the GIL's
acquire/release barriers are what orders them.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import logging
import mmap
import os
import struct

import numpy as np

from common.bytes import buffer_address
from common.cuda import clear_cuda_error as _clear_cuda_error
from common.cuda import cuda_pin, cuda_unpin  # noqa: F401 - transport/ imports them from here
from transport import shm_gpu

log = logging.getLogger(__name__)

PAGE = 4096
HEADER = 64
MAGIC = int.from_bytes(b"PDKVSLT1", "little")
RESERVED, COMMITTED, FREED = 1, 2, 3
_HDR = struct.Struct("<QQQQ16s16x")  # magic, stamp, length, deleted, digest
assert _HDR.size == HEADER
_STAMP, _DELETED = 8, 24  # field offsets
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def slot_bytes(length: int) -> int:
    """Bytes a value of ``length`` bytes occupies in an arena (header + value, page-rounded)."""
    return -(-(HEADER + length) // PAGE) * PAGE


def stamp(seq: int, state: int) -> int:
    return seq << 2 | state


def key_digest16(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


class FirstFit:
    """First-fit allocator of ``PAGE``-aligned ranges of ``[0, size)``; frees coalesce."""

    def __init__(self, size: int) -> None:
        self.size = size - size % PAGE
        self._starts = [0] if self.size else []  # sorted starts of the free ranges
        self._ends = [self.size] if self.size else []
        self.free_bytes = self.size

    def alloc(self, n: int) -> int | None:
        """Offset of a free range of ``n`` (a multiple of PAGE) bytes, or None."""
        for i, (s, e) in enumerate(zip(self._starts, self._ends)):
            if e - s >= n:
                if e - s == n:
                    del self._starts[i], self._ends[i]
                else:
                    self._starts[i] = s + n
                self.free_bytes -= n
                return s
        return None

    def free(self, off: int, n: int) -> None:
        """Give ``[off, off + n)`` back (it must be allocated); merges with its neighbours."""
        i = bisect.bisect_left(self._starts, off)
        if (i < len(self._starts) and self._starts[i] < off + n) or (i and self._ends[i - 1] > off):
            raise ValueError(f"double free of [{off}, {off + n})")
        end = off + n
        merge_prev = i > 0 and self._ends[i - 1] == off
        merge_next = i < len(self._starts) and self._starts[i] == end
        if merge_prev and merge_next:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_prev:
            self._ends[i - 1] = end
        elif merge_next:
            self._starts[i] = off
        else:
            self._starts.insert(i, off)
            self._ends.insert(i, end)
        self.free_bytes += n

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends))


class Mapping:
    """One arena mapped into this process (its owner's or another producer's).

    ``holds`` counts the slot views handed out (reads, writes) and copies in progress; a mapping
    is unmapped only at ``holds == 0`` (``retire`` defers it to the last ``unhold``). Callers
    keep ``holds`` under their own lock.
    """

    def __init__(self, path: str, fd: int, size: int, owner: bool, populate: bool = True) -> None:
        self.path, self.name, self.fd, self.size, self.owner = path, os.path.basename(path), fd, size, owner
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | (_POPULATE if populate else 0),
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if populate and not _POPULATE:  # fault every page in now, in C (no Python loop per page)
            pages = np.frombuffer(self.mm, np.uint8)[::PAGE]
            if owner:
                pages[:] = 0  # a fresh file: zeros already, but a write fault allocates the page
            else:
                int(pages.sum())  # read faults only: never write into another producer's arena
            del pages
        self.mv = memoryview(self.mm)
        self.u64 = np.frombuffer(self.mm, np.uint64)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))  # temporary export, gone
        self.holds = 0
        self.retired = False
        self.pinned = False
        self.dev = None  # a GPU arena's device buffer (values at the slots' offsets); None: in ``mm``

    @classmethod
    def create(cls, path: str, size: int, device=None) -> "Mapping":
        """A new arena file of ``size`` bytes, allocated and faulted in (OSError if no room).
        With a CUDA ``device``: a GPU arena (``transport/shm_gpu.py``), the file sparse and the
        values in a device buffer, described in page 0 (GpuArenaError if it cannot be made)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if device is None:
                os.posix_fallocate(fd, 0, size)
                return cls(path, fd, size, owner=True)
            os.ftruncate(fd, size)  # sparse: only the header pages are ever touched
            m = cls(path, fd, size, owner=True, populate=False)
            try:
                m.dev, head = shm_gpu.create(m.name, size, device)
            except BaseException:
                m.close()
                raise
            m.mm[: len(head)] = head
            return m
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise

    @classmethod
    def open(cls, path: str, device=None) -> "Mapping":
        """Map another producer's arena; a GPU arena's buffer is mapped on ``device`` (a CUDA
        device of this process; GpuArenaError without one, or where it cannot be mapped)."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < PAGE:
                raise OSError(f"arena {path} is too small ({size} bytes)")
            head = os.pread(fd, PAGE, 0)
            gpu = shm_gpu.is_gpu_arena(head)
            m = cls(path, fd, size, owner=False, populate=not gpu)
        except BaseException:
            os.close(fd)
            raise
        if gpu:
            try:
                m.dev = shm_gpu.open_buffer(m.name, head, size, device)
            except BaseException:
                m.close()
                raise
        return m

    # -- slot headers --------------------------------------------------------------------
    def get_stamp(self, off: int) -> int:
        return ctypes.c_uint64.from_address(self.addr + off + _STAMP).value

    def set_stamp(self, off: int, value: int) -> None:
        ctypes.c_uint64.from_address(self.addr + off + _STAMP).value = value

    def mark_deleted(self, off: int, seq: int) -> None:
        ctypes.c_uint64.from_address(self.addr + off + _DELETED).value = seq

    def write_header(self, off: int, seq: int, length: int, digest: bytes) -> None:
        """A RESERVED header (the owner's new slot, invisible to readers)."""
        _HDR.pack_into(self.mm, off, MAGIC, stamp(seq, RESERVED), length, 0, digest)

    def check(self, off: int, seq: int, length: int, digest: bytes) -> bool:
        """Whether the slot at ``off`` holds the committed value ``seq`` of that key and length."""
        if off % PAGE or off < 0 or length < 0 or off + HEADER + length > self.size:
            return False  # (a negative length let a link name a header past the arena's end)
        magic, st, hlen, deleted, hdig = _HDR.unpack_from(self.mm, off)
        return (magic == MAGIC and hlen == length and hdig == digest and deleted != seq
                and self.get_stamp(off) == stamp(seq, COMMITTED))

    def deleted_seqs(self, offs: np.ndarray) -> np.ndarray:
        """The ``deleted`` field of the slots at ``offs`` (int64 array), in one numpy gather."""
        return self.u64[offs // 8 + _DELETED // 8]

    # -- data ----------------------------------------------------------------------------
    def view(self, off: int, length: int):
        """Writable 1-D uint8 view of the value of the slot at ``off``: a memoryview, or for a
        GPU arena a uint8 CUDA tensor."""
        if self.dev is not None:
            return self.dev[off + HEADER : off + HEADER + length]
        return self.mv[off + HEADER : off + HEADER + length]

    def copy_in(self, off: int, src: memoryview) -> None:
        """Copy the bytes of ``src`` into the value of the slot at ``off`` (done on return)."""
        if self.dev is not None:
            return shm_gpu.copy(self.view(off, src.nbytes), src)
        ctypes.memmove(self.addr + off + HEADER, buffer_address(src), src.nbytes)  # releases the GIL

    def copy_out(self, off: int, dst: memoryview, length: int) -> None:
        """Copy the first ``length`` bytes of the slot's value into ``dst`` (done on return)."""
        if self.dev is not None:
            return shm_gpu.copy(dst[:length], self.view(off, length))
        ctypes.memmove(buffer_address(dst), self.addr + off + HEADER, length)

    def exists(self) -> bool:
        """Whether the arena file is still linked (the owner or a cleanup may have removed it)."""
        try:
            return os.fstat(self.fd).st_nlink > 0
        except OSError:
            return False

    # -- CUDA ----------------------------------------------------------------------------
    def pin(self) -> int:
        """Page-lock the mapping for CUDA (``cudaHostRegister``, portable: every device's context
        sees it pinned, whichever device the calling thread has current); the cudaError, 0 = ok."""
        if self.dev is not None:  # a GPU arena: its file holds headers only, nothing to pin
            return 0
        import torch  # only pin_cuda instances get here

        rc = int(torch.cuda.cudart().cudaHostRegister(self.addr, self.size, 1))
        if rc != 0:
            _clear_cuda_error()
        self.pinned = rc == 0
        return rc

    def close(self) -> None:
        """Unpin and unmap (holds must be 0). Views the caller still keeps (e.g. a tensor made
        from a released view) keep the memory mapped until they are freed: never an error."""
        if self.dev is not None:
            if self.owner:
                shm_gpu.forget(self.name)
            self.dev = None  # the buffer goes (an IPC mapping closes) with its last tensor
        if self.pinned:
            import torch

            self.pinned = False
            rc = int(torch.cuda.cudart().cudaHostUnregister(self.addr))
            if rc != 0:
                _clear_cuda_error()
                log.warning("shm arena %s: cudaHostUnregister failed (cudaError %d)", self.name, rc)
        self.u64 = None
        try:
            self.mv.release()
            self.mm.close()
        except BufferError:  # exported views still alive: unmapped when the last one goes
            log.debug("shm arena %s: views still exported, unmapped when they are freed", self.name)
        try:
            os.close(self.fd)
        except OSError:
            pass
