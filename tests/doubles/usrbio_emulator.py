"""TEST DOUBLE: an emulator of the ``hf3fs_fuse.io`` USRBIO Python API (3FS), for unit tests.

This is NOT 3FS. It lets ``store.hf3fs.Hf3fsStore`` run without a 3FS cluster: the names and
signatures follow the real binding (``hf3fs_fuse/io.py`` and ``src/lib/py/usrbio_binding.cc`` of
deepseek-ai/3FS, as read for ``shared/research/stores.md`` section 2), but the I/O is plain
``os.preadv``/``os.pwritev`` on local files, done synchronously inside ``submit()``.
No real 3FS cluster (nor the real ``hf3fs_py_usrbio`` module) has ever run the hf3fs backend.

What it checks, like the real client would refuse or report:

* a "mount" is a directory made with ``emulate_mount(path)``: it gets ``3fs-virt/iovs/`` and the
  marker file ``3fs-virt/EMULATED``, so every process sees it (the real client finds FUSE mounts
  of type hf3fs in the mount table); ``extract_mount_point`` answers the nearest emulated mount
  holding a path, else None;
* ``make_iovec(shm, mount_point, block_size=0, numa=-1)`` needs a
  ``multiprocessing.shared_memory.SharedMemory`` and makes the ``3fs-virt/iovs/<uuid>[.b<bs>]``
  symlink to ``/dev/shm/<name>`` (removed when the wrapper is collected), as the real one does;
* ``make_ioring(mount_point, entries, for_read=True, io_depth=0, priority=None, timeout=None,
  numa=-1, flags=0)``; ``prepare(iov, read, fd, off, userdata=None)`` beyond ``entries``
  outstanding I/Os raises; a read/write that does not match ``for_read`` raises (the emulator's
  choice); an fd that was not ``register_fd``-ed completes with ``-EBADF``;
* ``wait(*, max_results=0, min_results=0, timeout=None)`` returns completed iovec slices whose
  ``result`` (bytes done, or ``-errno``), ``userdata`` and ``base_off`` are the real field names;
  ``io_depth > 0`` with fewer queued I/Os, or ``min_results`` above what was submitted, raises
  ``TimeoutError`` where the real client would hang.

Fault injection for tests: set ``FAULT`` to a callable ``(fd, offset, length, read) -> errno or
None``; a non-None errno completes that I/O with ``-errno`` (e.g. ENOSPC) and moves no data.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Any, Callable, Optional
from uuid import uuid4

#: True in this module only: lets tools say that their figures are not 3FS figures.
EMULATOR = True
MARKER = os.path.join("3fs-virt", "EMULATED")

#: Fault injection hook (see the module docstring).
FAULT: Optional[Callable[[int, int, int, bool], Optional[int]]] = None

_REGISTERED: set[int] = set()
_LOCK = threading.Lock()


class IorPriority:
    HIGH = -1
    NORMAL = 0
    LOW = 1


def emulate_mount(path: str) -> str:
    """Make ``path`` an emulated 3FS mount point (test helper; not in the real API)."""
    mp = os.path.abspath(path)
    os.makedirs(os.path.join(mp, "3fs-virt", "iovs"), exist_ok=True)
    with open(os.path.join(mp, MARKER), "w") as fh:
        fh.write("usrbio emulator mount (pdkv test double), not 3FS\n")
    return mp


def forget_mounts() -> None:
    """Test helper: forget the fds this process registered."""
    with _LOCK:
        _REGISTERED.clear()


def _is_mount(p: str) -> bool:
    return os.path.isfile(os.path.join(p, MARKER))


def extract_mount_point(path: str) -> Optional[str]:
    if len(path) > 4096:
        raise OSError(errno.ENAMETOOLONG, "path too long")
    p = os.path.abspath(path)
    while True:
        if _is_mount(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def register_fd(fd: int, flags: int = 0) -> None:
    os.fstat(fd)  # EBADF for a closed fd
    with _LOCK:
        _REGISTERED.add(fd)


def deregister_fd(fd: int) -> None:
    with _LOCK:
        _REGISTERED.discard(fd)


def force_fsync(fd: int) -> int:
    os.fsync(fd)
    return 0


class _RawIovec:
    """``hf3fs_py_usrbio.iovec``: a 1-D uint8 buffer, sliceable, with completion fields."""

    def __init__(self, mv: memoryview, mount_point: str, base_off: int = 0, root: Any = None):
        self._mv = mv
        self.mount_point = mount_point
        self.base_off = base_off
        self._root = root if root is not None else self
        self.result = 0
        self.userdata = None

    def __len__(self) -> int:
        return self._mv.nbytes

    def __getitem__(self, s: slice) -> "_RawIovec":
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError("iovec slices need step 1")
        start, stop, _ = s.indices(self._mv.nbytes)
        return _RawIovec(self._mv[start:stop], self.mount_point, self.base_off + start, self._root)

    def __setitem__(self, s: slice, val: Any) -> None:
        self._mv[s] = val

    def __buffer__(self, flags: int) -> memoryview:  # Python 3.12+
        return self._mv

    def release(self) -> None:
        self._mv.release()


class iovec:
    """``hf3fs_fuse.io.iovec``: the wrapper that owns the ``3fs-virt/iovs`` symlink."""

    def __init__(self, iov: _RawIovec, link: str):
        self.iov = iov
        self.link = link

    def __del__(self):
        try:
            os.unlink(self.link)
        except OSError:
            pass

    def __getitem__(self, s):
        return self.iov[s]

    def __setitem__(self, s, val):
        self.iov[s] = val


def make_iovec(shm, hf3fs_mount_point, block_size=0, numa=-1):
    mp = os.path.abspath(hf3fs_mount_point)
    if not _is_mount(mp):
        raise OSError(errno.EINVAL, f"{hf3fs_mount_point} is not a 3FS mount point (emulated)")
    link = os.path.join(mp, "3fs-virt", "iovs", str(uuid4()) + (f".b{block_size}" if block_size > 0 else ""))
    os.symlink(os.path.normpath(f"/dev/shm/{shm.name}"), link)
    return iovec(_RawIovec(memoryview(shm.buf), mp), link)


class _RawIoring:
    def __init__(self, mount_point, entries, for_read, io_depth, priority, timeout, numa, flags):
        self.mount_point = mount_point
        self.entries = int(entries)
        self.for_read = bool(for_read)
        self.io_depth = int(io_depth)
        self.flags = flags
        self._prepared: list[tuple[_RawIovec, bool, int, int, Any]] = []
        self._done: list[_RawIovec] = []
        self._lock = threading.Lock()

    @staticmethod
    def size_for_entries(entries: int) -> int:
        return 4096 + 64 * int(entries)

    def prepare(self, iov, read, fd, off, userdata=None):
        if isinstance(iov, iovec):
            iov = iov.iov
        if not isinstance(iov, _RawIovec):
            raise TypeError("prepare needs an iovec made by make_iovec")
        if bool(read) != self.for_read:
            raise ValueError(f"a {'read' if read else 'write'} on an ioring made for "
                             f"{'reads' if self.for_read else 'writes'}")
        with self._lock:
            if len(self._prepared) + len(self._done) >= self.entries:
                raise OSError(errno.EAGAIN, f"ioring full ({self.entries} entries)")
            self._prepared.append((iov, bool(read), int(fd), int(off), userdata))
        return self

    def submit(self):
        with self._lock:
            todo = self._prepared
            if self.io_depth > 0 and len(todo) % self.io_depth:
                raise TimeoutError(f"io_depth={self.io_depth} but {len(todo)} I/Os queued: "
                                   "the real client would wait forever")
            self._prepared = []
        for iov, read, fd, off, userdata in todo:
            done = _RawIovec(iov._mv, iov.mount_point, iov.base_off, iov._root)
            done.userdata = userdata
            done.result = self._do(iov._mv, read, fd, off)
            with self._lock:
                self._done.append(done)
        return self

    def _do(self, mv: memoryview, read: bool, fd: int, off: int) -> int:
        with _LOCK:
            registered = fd in _REGISTERED
        if not registered:
            return -errno.EBADF
        if FAULT is not None:
            err = FAULT(fd, off, mv.nbytes, read)
            if err:
                return -err
        try:
            if read:
                got = 0
                while got < mv.nbytes:
                    n = os.preadv(fd, [mv[got:]], off + got)
                    if n <= 0:
                        break  # EOF or a hole past the end: a short read, as 3FS reports it
                    got += n
                return got
            done = 0
            while done < mv.nbytes:
                done += os.pwritev(fd, [mv[done:]], off + done)
            return done
        except OSError as e:
            return -(e.errno or errno.EIO)

    def wait(self, *, max_results=0, min_results=0, timeout=None):
        if max_results and max_results < min_results:
            max_results = min_results
        with self._lock:
            if len(self._done) < min_results:
                raise TimeoutError(f"wait(min_results={min_results}) with {len(self._done)} "
                                   "completions: the real client would block")
            n = len(self._done) if not max_results else min(max_results, len(self._done))
            out, self._done = self._done[:n], self._done[n:]
        return out

    def destroy(self) -> None:
        with self._lock:
            self._prepared.clear()
            self._done.clear()


class ioring:
    """``hf3fs_fuse.io.ioring``: delegates to the raw ring."""

    def __init__(self, ior):
        self.ior = ior

    @staticmethod
    def size_for_entries(entries):
        return _RawIoring.size_for_entries(entries)

    def prepare(self, iov, *args, **kwargs):
        return self.ior.prepare(iov.iov if isinstance(iov, iovec) else iov, *args, **kwargs)

    def submit(self):
        return self.ior.submit()

    def wait(self, *args, **kwargs):
        return self.ior.wait(*args, **kwargs)


def make_ioring(hf3fs_mount_point, entries, for_read=True, io_depth=0, priority=None, timeout=None,
                numa=-1, flags=0):
    mp = os.path.abspath(hf3fs_mount_point)
    if not _is_mount(mp):
        raise OSError(errno.EINVAL, f"{hf3fs_mount_point} is not a 3FS mount point (emulated)")
    return ioring(_RawIoring(mp, entries, for_read, io_depth, priority, timeout, numa, flags))
