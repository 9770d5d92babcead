"""The chunk files under one directory of store/local: checked reads, atomic writes, the scan
at start (the format is store/local_format.py; the index and the budget are store/local.py's).

Reads: a file that fails any check (magic, version, key, length, checksum) is a miss and is
deleted. An O_DIRECT read of a file goes straight into the caller's buffer when that is page
aligned (only the header page, and a tail the buffer has no room for, are staged); buffered
reads of large files hash one piece while the next is read. A filesystem that refuses O_DIRECT
is used buffered from then on (counted ``odirect_fallbacks``).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import xxhash

from common.config import ConfigError
from store.fileio import (
    ALIGN,
    BufPool,
    address,
    check_owned,
    hasher,
    make_own_dirs,
    not_ours,
    own_file,
    pread_into,
    preadv_all,
    round_up,
    write_all,
)
from store.local_format import (
    HEADER_FIXED,
    MAX_KEY,
    SUFFIX,
    TMP_PREFIX,
    fill_image,
    key_to_relpath,
    parse_header,
    read_meta,
    stale_temp,
    tmp_name,
)

if TYPE_CHECKING:
    from store.local import _Item

log = logging.getLogger(__name__)

READ_POOL_MAX = 64 << 20   # free staging buffers kept for O_DIRECT reads (at most queue_mb)
READ_PIECE = 4 << 20       # buffered reads of >= 2 pieces: piece by piece, hashed alongside


def check_dir(path: str) -> None:
    """Make ``path`` if it is missing; ValueError unless it is a directory this process can
    create files in."""
    if not os.path.exists(path):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"store path {path} does not exist and cannot be made ({e.strerror or e}); "
                             "create the directory (on the disk meant for the KV store) before starting") from None
        log.info("local store: made the directory %s", path)
    if not os.path.isdir(path):
        raise ConfigError(f"store path {path} is not a directory; store.paths needs directories")
    check_owned(path)
    # named like a temp file of this (live) process, so a concurrent scan leaves it alone
    probe = os.path.join(path, f"{TMP_PREFIX}{os.getpid()}-probe-{threading.get_ident()}")
    try:
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "no write permission")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        unlink_quiet(probe)
    except OSError as e:
        raise ConfigError(f"store path {path} is not writable ({e.strerror or e}); the store "
                         "needs a directory this process can create files in") from None


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class ChunkFiles:
    """The files of directory ``path``; counts ``corrupt``, ``odirect_fallbacks`` and
    ``temp_removed`` in the store's ``stats`` (under its ``lock``)."""

    def __init__(self, path: str, direct: bool, fsync: bool, read_pool: int, stats: dict[str, int],
                 lock: threading.Lock, inline_hash: bool = False) -> None:
        self.path = path
        # large buffered reads: each reader hashes its own pieces (several reader threads), or the
        # process's helper thread hashes a piece while the next is read (one reader)
        self.inline_hash = inline_hash
        self.direct = direct        # O_DIRECT (until the filesystem refuses it)
        self.fsync = fsync
        self.stats, self._lock = stats, lock
        # staging of O_DIRECT reads (a header page; whole files for unaligned callers): apart
        # from the write queue's buffers, so that they do not push each other's out
        self._rpool = BufPool(min(read_pool, READ_POOL_MAX))
        self._seq = itertools.count()
        self._uid = uuid.uuid4().hex[:12]  # temp names: unique per store, not per process only
        self._dirs: set[str] = set()

    def file(self, key: str) -> str:
        return os.path.join(self.path, key_to_relpath(key))

    def make_dirs(self, d: str) -> None:
        """Make the sub-directories from the store's path down to ``d`` (0700), each checked to
        be ours and not a symlink (OSError EPERM naming the one that is not: the write fails)."""
        make_own_dirs(self.path, d)
        self._dirs.add(d)

    def scan(self) -> list[tuple[float, str, int]]:
        """(mtime, key, size) of the files already under the path, oldest first; removes
        leftover temp files and bad files."""
        found: list[tuple[float, str, int]] = []
        now = time.time()
        for dirpath, dirnames, filenames in os.walk(self.path):
            why = not_ours(dirpath) if dirpath != self.path else ""
            if why:  # never adopt (nor delete) files of a directory someone else controls
                log.warning("local store %s: skipping %s (%s)", self.path, dirpath, why)
                dirnames.clear()
                continue
            for name in filenames:
                full = os.path.join(dirpath, name)
                if name.startswith(TMP_PREFIX):
                    if stale_temp(name, full, now):
                        try:
                            os.unlink(full)
                            self.stats["temp_removed"] += 1
                        except OSError:
                            pass
                    continue
                if not name.endswith(SUFFIX) or not own_file(full):
                    continue  # not ours: leave it alone
                got = read_meta(self.path, full)
                if got is None:
                    self.remove_bad(full, None, "unreadable header at start")
                    continue
                key, size, mtime = got
                found.append((mtime, key, size))
            if dirpath != self.path:
                self._dirs.add(dirpath)
        found.sort()
        return found

    def remove_bad(self, full: str, fd_stat: os.stat_result | None, why: str) -> None:
        """Delete a corrupt file (only if it is still the same inode we looked at)."""
        try:
            if fd_stat is not None:
                st = os.stat(full)
                if (st.st_ino, st.st_dev) != (fd_stat.st_ino, fd_stat.st_dev):
                    return
            os.unlink(full)
        except OSError:
            pass
        with self._lock:
            self.stats["corrupt"] += 1
        log.warning("local store %s: removed %s (%s)", self.path, full, why)

    def _header_of(self, key: str, full: str, st: os.stat_result, hdr: Any) -> tuple[str, int, int, int] | None:
        """The parsed header ``hdr`` of file ``full`` if it is ``key``'s; else the file is bad:
        removed, and None."""
        parsed = parse_header(hdr, st.st_size)
        if parsed is None or parsed[0] != key:
            self.remove_bad(full, st, "bad header, wrong key or wrong length")
            return None
        return parsed

    def _direct_fallback(self, e: OSError) -> None:
        with self._lock:
            if not self.direct:
                return
            self.direct = False
            self.stats["odirect_fallbacks"] += 1
        log.warning("local store %s: the filesystem refuses O_DIRECT (%s); using buffered I/O",
                    self.path, e)

    # -- reading ---------------------------------------------------------------------------
    def read(self, key: str, full: str, out: memoryview) -> int:
        """Read the value of ``key`` from file ``full`` into ``out``: its length, or 0 (a miss)."""
        direct = self.direct
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            return 0
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink planted under the value's name
                self.remove_bad(full, None, "a symlink, not a value file")
                return 0
            if direct and e.errno == errno.EINVAL:
                self._direct_fallback(e)
                return self.read(key, full, out)
            log.warning("local store %s: open %s failed: %s", self.path, full, e)
            return 0
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
                self.remove_bad(full, st, f"a file of uid {st.st_uid}, not ours")
                return 0
            if direct:
                return self._read_direct(key, full, fd, st, out)
            return self._read_buffered(key, full, fd, st, out)
        except OSError as e:
            log.warning("local store %s: read %s failed: %s", self.path, full, e)
            return 0
        finally:
            os.close(fd)

    def _read_buffered(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        # Two reads (the header, then the payload straight into ``out``) on purpose: measured on
        # ext4 with the page cache cold, one preadv of header+payload was up to 2x slower (the
        # small first read starts the kernel's readahead before the large one).
        parsed = self._header_of(key, full, st, os.pread(fd, HEADER_FIXED + len(key.encode()), 0))
        if parsed is None:
            return 0
        _, poff, plen, csum = parsed
        if plen > out.nbytes:
            return 0
        dst = out[:plen]
        if plen >= 2 * READ_PIECE:  # large: hash each piece while the next one is read
            ok = self._read_pieces(fd, dst, poff, csum)
        else:
            ok = pread_into(fd, dst, poff) == plen and xxhash.xxh3_64_intdigest(dst) == csum
        if not ok:
            self.remove_bad(full, st, "checksum mismatch or short read")
            return 0
        return plen

    def _read_direct(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        size = st.st_size
        if size < HEADER_FIXED:
            self.remove_bad(full, st, "truncated header")
            return 0
        poff = round_up(HEADER_FIXED + len(key.encode()))
        body = size - poff  # payload + padding if the file has the ALIGNED layout
        n_out = min(body, out.nbytes // ALIGN * ALIGN)
        if body <= 0 or size % ALIGN or n_out <= 0 or address(out) % ALIGN:
            return self._read_staged(key, full, fd, st, out)
        # the payload pages straight into ``out`` (its bytes beyond the payload are unspecified);
        # the header page and any tail ``out`` has no room for go to a staging buffer. One preadv:
        # the kernel keeps all of it in flight (reading in pieces to hash one while the next is
        # read was measured no faster here: it lowers the queue depth).
        stage = self._rpool.get(poff + body - n_out)
        try:
            sv = memoryview(stage)
            tail = sv[poff:poff + body - n_out]
            got = preadv_all(fd, [sv[:poff], out[:n_out], tail], 0, direct=True)
            parsed = self._header_of(key, full, st, sv[:poff] if got >= poff else b"")
            if parsed is None:
                return 0
            _, hoff, plen, csum = parsed
            if hoff != poff:  # the older PADDED layout: the payload is not where it was read to
                return self._read_staged(key, full, fd, st, out)
            if plen > out.nbytes:
                return 0
            ok = got == size
            if ok and plen > n_out:  # the tail that did not fit in whole pages
                out[n_out:plen] = tail[:plen - n_out]
            if not ok or xxhash.xxh3_64_intdigest(out[:plen]) != csum:
                self.remove_bad(full, st, "checksum mismatch or short read")
                return 0
            return plen
        finally:
            self._rpool.put(stage)

    def _read_pieces(self, fd: int, dst: memoryview, foff: int, csum: int) -> bool:
        """Read ``dst`` from file offset ``foff`` in pieces; True if all was read and the checksum
        matches. With several reader threads (``read_threads``) each hashes its pieces as it reads
        them (in parallel across values, each piece hashed while still in cache): one shared helper
        thread capped 4 readers at its one core's hashing speed. A single reader instead hands each
        piece to the helper thread and reads the next meanwhile."""
        h = xxhash.xxh3_64()
        hashing = None if self.inline_hash else hasher()
        ok, off, end = True, 0, len(dst)
        try:
            while ok and off < end:
                piece = dst[off:off + READ_PIECE]
                ok = pread_into(fd, piece, foff + off) == len(piece)
                if ok and hashing is None:
                    h.update(piece)
                elif ok:
                    hashing.update(h, piece)
                off += len(piece)
        finally:  # (the helper: also on errors, nothing may touch ``dst`` after we return)
            digest = h.intdigest() if hashing is None else hashing.finish(h)
        return ok and digest == csum

    def _read_staged(self, key: str, full: str, fd: int, st: os.stat_result, out: memoryview) -> int:
        """O_DIRECT read of the whole file into a staging buffer, then a copy into ``out``."""
        size = st.st_size
        stage = self._rpool.get(size)  # page aligned, as O_DIRECT needs
        try:
            mv = memoryview(stage)
            got = pread_into(fd, mv, 0, direct=True)
            parsed = self._header_of(key, full, st, mv[:min(got, HEADER_FIXED + MAX_KEY)])
            if parsed is None:
                return 0
            _, hoff, plen, csum = parsed
            if plen > out.nbytes:
                return 0
            payload = mv[hoff:hoff + plen]
            if got < hoff + plen or xxhash.xxh3_64_intdigest(payload) != csum:
                self.remove_bad(full, st, "checksum mismatch or short read")
                return 0
            out[:plen] = payload
            return plen
        finally:
            self._rpool.put(stage)

    # -- writing ---------------------------------------------------------------------------
    def write(self, item: _Item, full: str) -> None:
        """Write the file image of ``item`` (its buffer holds the payload; the header and the
        padding are filled in here) to a temp file, then rename it to ``full``. Raises OSError."""
        d = os.path.dirname(full)
        if d not in self._dirs:
            self.make_dirs(d)
        tmp = tmp_name(d, self._uid, next(self._seq))
        mv = memoryview(item.buf)
        csum = xxhash.xxh3_64_intdigest(mv[item.poff:item.poff + item.plen])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        use_direct = item.direct and self.direct
        fill_image(mv, item.key.encode(), item.poff, item.plen, item.size, item.direct, csum)
        fd = self._open_tmp(tmp, flags, use_direct)
        try:
            if fd < 0:  # O_DIRECT refused by this filesystem: buffered from now on
                fd = self._open_tmp(tmp, flags, False)
            write_all(fd, [mv[:item.size]])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quiet(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, full)
        except BaseException:
            unlink_quiet(tmp)
            raise
        if self.fsync:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _open_tmp(self, tmp: str, flags: int, direct: bool) -> int:
        try:
            return os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600)
        except FileNotFoundError:  # the sub-directory was removed under us
            self.make_dirs(os.path.dirname(tmp))
            return os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                self._direct_fallback(e)
                unlink_quiet(tmp)
                return -1
            raise
