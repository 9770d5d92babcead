"""The file under the DRAM tier (store/dram.py): where it lives, how it is made, checked, mapped.

``<SHM_DIR>/pdkv-dram-<uid>/<name>-<bytes>.dram``: the directory is ours and 0700 (checked as the
shm transport checks its pools: another user could read our KV or plant values there), the file
0600, not a symlink, ours, of exactly the size its name says. It is made whole and then linked
into place (``posix_fallocate`` first: a full /dev/shm is a clean error at start, not a SIGBUS
later), so a file under its final name always has its header. Every process that uses it holds a
shared ``flock`` on it for as long as it does; an arena nobody holds (a stale size after
``dram_gb`` changed, a file with a wrong header) is removed, one in use is refused. Writers
serialise on an exclusive ``flock`` of ``<name>-<bytes>.lock`` (the kernel releases it when a
writer dies).

Header (page 0, little-endian u64 words): magic, version, file size, unit, units, entries, the
seq counter, the dirty flag. Then one u64 array per entry field, the unit map (u8), the key index
(u32 slots, a power of two >= 2 x entries: entry + 1 or 0, open addressing from the digest), the data.
"""
from __future__ import annotations

import fcntl
import glob
import logging
import mmap
import os
import stat

import numpy as np

from common.config import ConfigError
from common.private import make_private_dir
from common.process import pid_alive

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PAGE = 4096
MAGIC = int.from_bytes(b"PDKVDRM1", "little")
VERSION = 2
MIN_BYTES = 1 << 20
MAX_UNITS = 1 << 17  # the unit grows with the arena, so a writer's free-run scan (under the lock) stays bounded
H_MAGIC, H_VERSION, H_SIZE, H_UNIT, H_UNITS, H_ENTRIES, H_SEQ, H_DIRTY = range(8)
#: The entry fields, one u64 array each (store/dram.py says what they hold).
FIELDS = ("stamp", "d0", "d1", "start", "units", "length", "pid", "tick", "hits", "born")


def _up(n: int, a: int = PAGE) -> int:
    return -(-n // a) * a


def index_slots(units: int) -> int:
    """Slots of the key index of ``units`` entries (load factor <= 1/2)."""
    return 1 << (2 * units - 1).bit_length()


def geometry(size: int) -> tuple[int, int, int]:
    """(unit bytes, units, data offset) of an arena file of ``size`` bytes, metadata included."""
    unit = max(PAGE, _up(size // MAX_UNITS))
    units = size // unit
    while units > 0:
        data = PAGE + _up(len(FIELDS) * 8 * units) + _up(units) + _up(4 * index_slots(units))
        if data + units * unit <= size:
            return unit, units, data
        units -= 1
    raise ConfigError(f"a DRAM tier of {size} bytes has no room for data")


def private_dir(path: str) -> None:
    """Make ``path`` (0700) or check the one there: a directory of ours, 0700, not a symlink."""
    try:
        why = make_private_dir(path)
    except OSError as e:
        raise ConfigError(f"store.dram_gb: cannot make the DRAM tier's directory {path}: {e}") from e
    if why:
        raise ConfigError(
            f"store.dram_gb: the DRAM tier's directory {path} is {why}; it must be a directory of ours "
            f"(uid {os.geteuid()}) with mode 0700, not a symlink: others could read or plant KV there. Remove it")


def _ours(fd: int, path: str, size: int) -> str:
    """Why the open file is not an arena of ours of ``size`` bytes ("" if it is)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return f"not a private file of ours (uid {st.st_uid}, mode {st.st_mode & 0o7777:04o})"
    if st.st_size != size:
        return f"{st.st_size} bytes, not {size}"
    head = np.frombuffer(os.pread(fd, 64, 0), np.uint64)
    unit, units, _ = geometry(size)
    want = (MAGIC, VERSION, size, unit, units, units)
    if len(head) < 8 or tuple(int(x) for x in head[:6]) != want:
        return "a foreign or damaged header"
    return ""


def lock_path(path: str) -> str:
    """The lock file of the arena ``path``."""
    return path[: -len(".dram")] + ".lock"


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` (not followed) is still the file open at ``fd``."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _try_remove(path: str, why: str, level: int = logging.WARNING) -> bool:
    """Unlink the arena ``path`` if no process holds it (its lock file too); whether it is gone.

    Only the file we hold exclusively is unlinked: another remover may have replaced it with a
    new arena in use since we opened it. The lock file goes first, while the arena is still there
    and held: a process opens the lock file only while it holds the arena at ``path`` shared, so
    none can have opened the old lock file and pair it with a new arena (two lock files for one
    arena would let two writers in at once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if not _same_file(fd, path):
            return True  # gone, or another remover's replacement (in use): ours is gone either way
        try:
            os.unlink(lock_path(path))
        except FileNotFoundError:
            pass
        os.unlink(path)
        log.log(level, "DRAM tier: removed %s (%s; no process used it)", path, why)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    return True


def remove_arena(path: str) -> bool:
    """Remove the arena ``path`` (and its lock file) unless a process uses it; whether it is gone."""
    return _try_remove(path, "asked to", logging.INFO)


def remove_stale(directory: str, name: str, keep: str) -> None:
    """Remove unused arenas of ``name`` of other sizes, and temporary files of dead creators."""
    for path in glob.glob(os.path.join(directory, f"{name}-*.dram")):
        if path != keep:
            _try_remove(path, "another size")
    for path in glob.glob(os.path.join(directory, f"{name}-*.dram.*.tmp")):
        pid = path.rsplit(".", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                os.unlink(path)
            except OSError:
                pass


def _create(path: str, size: int) -> int | None:
    """Make the arena (header written, shared lock held); None if another process linked one first."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            raise ConfigError(f"store.dram_gb: cannot allocate {size} bytes for the DRAM tier in "
                              f"{os.path.dirname(path)} ({e.strerror or e}); free memory there or lower "
                              "dram_gb") from None
        unit, units, _ = geometry(size)
        os.pwrite(fd, np.array([MAGIC, VERSION, size, unit, units, units, 1, 0], np.uint64).tobytes(), 0)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            return None
        return fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    finally:
        os.unlink(tmp)


def _open_existing(path: str, size: int) -> int | None:
    """The arena at ``path`` opened and share-locked; None if it is missing or was removed (retry).
    ConfigError if it is not ours or not usable and in use by others."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"store.dram_gb: cannot open the DRAM tier {path}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # being removed by another process: look again
        os.close(fd)
        return None
    why = _ours(fd, path, size)
    if not why and os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
        return fd
    os.close(fd)
    if not why:
        return None  # replaced meanwhile
    if _try_remove(path, why):
        return None
    raise ConfigError(f"store.dram_gb: the DRAM tier {path} is {why}, and processes use it; "
                      "stop them and remove the file")


def open_arena(directory: str, name: str, size: int) -> tuple[str, int, int]:
    """(path, fd of the arena, fd of its lock file): found or made, checked, share-locked."""
    private_dir(directory)
    path = os.path.join(directory, f"{name}-{size}.dram")
    remove_stale(directory, name, path)
    for _ in range(20):
        fd = _open_existing(path, size)
        if fd is None and not os.path.exists(path):
            fd = _create(path, size)
        if fd is not None:
            break
    else:
        raise ConfigError(f"store.dram_gb: could not open or make the DRAM tier {path} (it kept changing)")
    lock = lock_path(path)
    try:
        lfd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"store.dram_gb: cannot open the DRAM tier's lock file {lock}: {e}") from e
    return path, fd, lfd


def map_arena(fd: int, size: int) -> tuple[mmap.mmap, dict[str, np.ndarray], np.ndarray, np.ndarray,
                                           np.ndarray, int]:
    """(the mapping, the entry field arrays, the unit map, the key index, the header words, data offset)."""
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    _unit, units, data = geometry(size)
    fields, off = {}, PAGE
    for f in FIELDS:
        fields[f] = np.frombuffer(mm, np.uint64, count=units, offset=off)
        off += units * 8
    off = PAGE + _up(len(FIELDS) * 8 * units)
    umap = np.frombuffer(mm, np.uint8, count=units, offset=off)
    index = np.frombuffer(mm, np.uint32, count=index_slots(units), offset=off + _up(units))
    head = np.frombuffer(mm, np.uint64, count=8, offset=0)
    return mm, fields, umap, index, head, data
