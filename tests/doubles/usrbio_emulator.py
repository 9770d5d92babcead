"""TEST DOUBLE: an emulator of the ``hf3fs_fuse.io`` USRBIO Python API (3FS), for unit tests.

This is NOT 3FS. It lets ``store.hf3fs.Hf3fsStore`` run without a 3FS cluster: the names and
signatures follow the real binding (``hf3fs_fuse/io.py`` and ``src/lib/py/usrbio_binding.cc`` of
deepseek-ai/3FS, as read for ``shared/research/stores.md`` section 2), but the I/O is plain
``os.preadv``/``os.pwritev`` on local files, done synchronously inside ``submit()``.
No real 3FS cluster (nor the real ``hf3fs_py_usrbio`` module) has ever run the hf3fs backend.

Strict (the default, ``STRICT``) where the binding is strict, each rule with its source in
deepseek-ai/3FS (``src/lib/py/usrbio_binding.cc``, ``src/lib/api/UsrbIo.cc``, ``hf3fs_fuse/io.py``):

* ``extract_mount_point`` resolves the path like ``boost::filesystem::canonical``
  (``hf3fs_extract_mount_point``, UsrbIo.cc): it must exist (else ``RuntimeError``, boost's
  ``filesystem_error`` as pybind11 passes it on) and symlinks are followed; a path on no mount
  gives None;
* ``register_fd`` (``hf3fs_reg_fd``): ``OSError(EBADF)`` for a bad fd, ``OSError(EINVAL)`` for one
  already registered; it records the fd's access mode; ``deregister_fd`` never raises;
* ``prepare`` (``hf3fs_prep_io``) raises ``OSError``, checked in this order: ``EINVAL`` (a read
  on a write ring or the reverse, an empty iov), ``EBADF`` (fd not registered), ``EACCES`` (a
  read on an ``O_WRONLY`` fd, a write on an ``O_RDONLY`` one), ``EAGAIN`` (no free entry: an
  entry is free only once ``wait`` has returned its completion); an I/O may run as soon as it is
  prepared (the docstring: "may be executed at any time"): here it runs in ``prepare``;
* ``wait(*, max_results=0, min_results=0, timeout=None)`` (``hf3fs_wait_for_ios``) returns at
  most ``max(max_results, min_results)`` completions, at least one slot even for (0, 0);
  ``timeout`` is a ``datetime.timedelta`` or float seconds (an int is a ``TypeError``, as
  pybind11's chrono conversion refuses it); at the timeout it returns what completed (maybe
  nothing), never raises; completions come in any order (shuffled here).

``STRICT = False`` (or ``PDKV_USRBIO_LAX=1`` in the environment) keeps the emulator's earlier,
laxer behaviour (ValueError for a wrong direction, EBADF reported in the completion, every
completion returned by one wait, in order, I/O only at submit), so that a test can show what
the strict rules catch.

What it checks besides, like the real client would refuse or report:

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
``PREPARE_FAULT``: ``(fd, offset, length, read) -> errno or None``, a non-None errno makes that
``prepare`` raise ``OSError(errno)``. ``HANG``: ``(fd, offset, length, read) -> bool``, True
holds that I/O (no completion, its data not moved) until ``release_hung()`` (a stuck FUSE
daemon, a storage outage).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import random
import threading
import time
import weakref
from typing import Any, Callable, Optional
from uuid import uuid4

#: True in this module only: lets tools say that their figures are not 3FS figures.
EMULATOR = True
MARKER = os.path.join("3fs-virt", "EMULATED")

#: Strict like the real binding (see the module docstring).
STRICT = os.environ.get("PDKV_USRBIO_LAX", "") != "1"

#: Fault injection hooks (see the module docstring).
FAULT: Optional[Callable[[int, int, int, bool], Optional[int]]] = None
PREPARE_FAULT: Optional[Callable[[int, int, int, bool], Optional[int]]] = None
HANG: Optional[Callable[[int, int, int, bool], bool]] = None

_REGISTERED: dict[int, int] = {}  # fd -> its access mode (O_RDONLY, O_WRONLY, O_RDWR) at registration
_LOCK = threading.Lock()
_HUNG = threading.Event()  # set by release_hung(): held I/Os complete
_RINGS: "weakref.WeakSet[_RawIoring]" = weakref.WeakSet()  # live rings (release_hung completes their held I/Os)


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
    """Test helper: forget the fds this process registered, and every fault hook."""
    global FAULT, PREPARE_FAULT, HANG
    with _LOCK:
        _REGISTERED.clear()
    FAULT = PREPARE_FAULT = HANG = None
    release_hung()


def release_hung() -> None:
    """Test helper: the I/Os ``HANG`` held run now and complete (the daemon came back)."""
    with _LOCK:
        rings = list(_RINGS)
    for ring in rings:
        ring.run_held()


def _is_mount(p: str) -> bool:
    return os.path.isfile(os.path.join(p, MARKER))


def extract_mount_point(path: str) -> Optional[str]:
    if STRICT:  # boost::filesystem::canonical (hf3fs_extract_mount_point, src/lib/api/UsrbIo.cc)
        if not os.path.exists(path):
            raise RuntimeError(f'boost::filesystem::canonical: No such file or directory: "{path}"')
        p = os.path.realpath(path)
    else:
        p = os.path.abspath(path)
    if len(p) > 4096:
        raise OSError(errno.ENAMETOOLONG, "path too long")
    while True:
        if _is_mount(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def register_fd(fd: int, flags: int = 0) -> None:
    os.fstat(fd)  # EBADF for a closed fd
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    with _LOCK:
        if STRICT and fd in _REGISTERED:  # hf3fs_reg_fd (UsrbIo.cc): a second registration is EINVAL
            raise OSError(errno.EINVAL, f"fd {fd} is already registered")
        _REGISTERED[fd] = mode


def deregister_fd(fd: int) -> None:
    with _LOCK:
        _REGISTERED.pop(fd, None)


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
        self._prepared: list[tuple[_RawIovec, bool, int, int, Any]] = []  # lax: run at submit
        self._done: list[_RawIovec] = []  # completions wait has not returned yet
        self._held: list[tuple[_RawIovec, memoryview, bool, int, int]] = []  # strict: HANG holds these
        self._taken = 0  # strict: entries in use (an entry is free once wait returned it)
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        with _LOCK:
            _RINGS.add(self)

    @staticmethod
    def size_for_entries(entries: int) -> int:
        return 4096 + 64 * int(entries)

    def prepare(self, iov, read, fd, off, userdata=None):
        if isinstance(iov, iovec):
            iov = iov.iov
        if not isinstance(iov, _RawIovec):
            raise TypeError("prepare needs an iovec made by make_iovec")
        if not STRICT:
            return self._prepare_lax(iov, read, fd, off, userdata)
        # hf3fs_prep_io (src/lib/api/UsrbIo.cc), its checks in its order
        if bool(read) != self.for_read or len(iov) == 0:
            raise OSError(errno.EINVAL, "prepare: wrong direction for this ring, or an empty iov")
        with _LOCK:
            mode = _REGISTERED.get(int(fd))
        if mode is None:
            raise OSError(errno.EBADF, f"prepare: fd {fd} is not registered")
        if (read and mode == os.O_WRONLY) or (not read and mode == os.O_RDONLY):
            raise OSError(errno.EACCES, f"prepare: fd {fd} is not open for {'reading' if read else 'writing'}")
        with self._lock:
            if self._taken >= self.entries:
                raise OSError(errno.EAGAIN, f"prepare: ioring full ({self.entries} entries)")
        err = PREPARE_FAULT(int(fd), int(off), len(iov), bool(read)) if PREPARE_FAULT is not None else None
        if err:
            raise OSError(err, f"prepare: {os.strerror(err)} (injected)")
        done = _RawIovec(iov._mv, iov.mount_point, iov.base_off, iov._root)
        done.userdata = userdata
        with self._lock:
            self._taken += 1
        if HANG is not None and HANG(int(fd), int(off), len(iov), bool(read)):
            with self._lock:
                self._held.append((done, iov._mv, bool(read), int(fd), int(off)))
            return self
        done.result = self._do(iov._mv, bool(read), int(fd), int(off))  # "may be executed at any time"
        with self._lock:
            self._done.append(done)
        return self

    def _prepare_lax(self, iov, read, fd, off, userdata):
        if bool(read) != self.for_read:
            raise ValueError(f"a {'read' if read else 'write'} on an ioring made for "
                             f"{'reads' if self.for_read else 'writes'}")
        with self._lock:
            if len(self._prepared) + len(self._done) >= self.entries:
                raise OSError(errno.EAGAIN, f"ioring full ({self.entries} entries)")
            self._prepared.append((iov, bool(read), int(fd), int(off), userdata))
        return self

    def run_held(self) -> None:
        """The held I/Os run and complete (``release_hung``)."""
        with self._lock:
            held, self._held = self._held, []
        for done, mv, read, fd, off in held:
            done.result = self._do(mv, read, fd, off)
            with self._lock:
                self._done.append(done)

    def submit(self):
        if STRICT:  # the I/Os ran when prepared (or are held)
            return self
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
        if not STRICT:
            return self._wait_lax(max_results, min_results)
        # hf3fs_wait_for_ios (UsrbIo.cc) through usrbio_binding.cc's wait
        if timeout is not None and not isinstance(timeout, (datetime.timedelta, float)):
            raise TypeError(f"wait: timeout must be a datetime.timedelta or float seconds, not {type(timeout).__name__}")
        limit = max(int(max_results), int(min_results), 1)
        secs = None if timeout is None else (timeout.total_seconds() if isinstance(timeout, datetime.timedelta)
                                             else float(timeout))
        deadline = None if secs is None else time.monotonic() + max(0.0, secs)
        while True:
            with self._lock:
                if len(self._done) >= min_results or (deadline is not None and time.monotonic() >= deadline):
                    self._rng.shuffle(self._done)  # any order
                    out, self._done = self._done[:limit], self._done[limit:]
                    self._taken -= len(out)
                    return out
                if deadline is None and not self._held:
                    raise TimeoutError(f"wait(min_results={min_results}) with {len(self._done)} completions "
                                       "and nothing in flight: the real client would block forever")
            if deadline is None:
                raise TimeoutError(f"wait(min_results={min_results}) without a timeout while I/Os are held: "
                                   "the real client would block until they complete")
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def _wait_lax(self, max_results, min_results):
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
            self._held.clear()
            self._taken = 0


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
