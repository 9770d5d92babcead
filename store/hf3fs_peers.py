"""Reading the other writers' directories of a store/hf3fs device (its peers).

Every process reads every ``w*`` directory of its device: its own through its in-memory index,
the others through views that tail their ``index.log`` before each lookup (new records are
applied; another generation means the log was rewritten and is read again from its start). New
``w*`` directories are looked for at most once a second, and on a miss when the last look is
0.1 s old. A view may be stale (the peer has evicted the value and reused its slot): the slot
header check makes such a read a miss, never another value. Reads by other processes do not
refresh the writer's LRU order. A writer directory, index or data file that is not this uid's
(or is a symlink, or writable by others) is never read: the values it lists are misses.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Sequence

from store.fileio import not_ours, open_own
from store.hf3fs_format import (
    LOG_HDR,
    LOG_HDR_MAGIC,
    OP_ADD,
    OP_DEL,
    VERSION,
    data_file,
    parse_log,
)
from store.hf3fs_usrbio import close_registered, open_registered

log = logging.getLogger(__name__)

PEER_SCAN_S = 1.0   # new writer directories are looked for this often ...
MISS_RESCAN_S = 0.1  # ... and on a miss, if the last look is older than this
WRITER_DIR = re.compile(r"(?:[A-Za-z0-9_-]+\.)?w\d+")  # <host>.w<k> (w<k>: before hosts were named)


class Ref:
    """Where a peer's value lies: data file, offset, and what its slot header must say."""
    __slots__ = ("file", "off", "length", "csum", "seq")

    def __init__(self, file, off, length, csum, seq):
        self.file, self.off, self.length, self.csum, self.seq = file, off, length, csum, seq


class View:
    """Read-only view of a peer's writer directory: tails its index log (see the module doc)."""

    def __init__(self, path: str, io: Any):
        self.path, self.io = path, io
        self.gen: int | None = None
        self.pos = 0
        self.entries: dict[str, Ref] = {}
        self.fds: dict[int, int] = {}

    def _reset(self, gen: int | None) -> None:
        self.entries.clear()
        self.gen, self.pos = gen, LOG_HDR.size

    def refresh(self) -> None:
        try:
            fd = open_own(os.path.join(self.path, "index.log"), os.O_RDONLY)
        except PermissionError:  # another user's log, or a symlink: read nothing of it
            self._reset(None)
            raise
        except OSError:  # no log (yet): nothing to read
            self._reset(None)
            return
        try:
            size = os.fstat(fd).st_size
            hdr = os.pread(fd, LOG_HDR.size, 0)
            if len(hdr) < LOG_HDR.size:
                self._reset(None)
                return
            magic, version, gen = LOG_HDR.unpack(hdr)
            if magic != LOG_HDR_MAGIC or version != VERSION:
                self._reset(None)
                return
            if gen != self.gen or size < self.pos:  # rewritten: read it again from the start
                self._reset(gen)
            if size <= self.pos:
                return
            raw = os.pread(fd, size - self.pos, self.pos)
        finally:
            os.close(fd)
        recs, used = parse_log(raw, 0)  # a record being appended is read next time
        self.pos += used
        for op, key, f, off, _cls, length, csum, seq in recs:
            if op == OP_ADD:
                self.entries[key] = Ref(f, off, length, csum, seq)
            elif op == OP_DEL:
                ref = self.entries.get(key)
                if ref is not None and ref.seq == seq:
                    del self.entries[key]

    def fd(self, f: int) -> int:
        fd = self.fds.get(f)
        if fd is None:
            fd = open_registered(self.io, data_file(self.path, f), os.O_RDONLY)
            self.fds[f] = fd
        return fd

    def close(self) -> None:
        close_registered(self.io, self.fds)


class Peers:
    """The views of the writer directories under ``root`` but ``own`` (this process's; "" for a
    reader). Callers hold ``lock`` around ``refresh``, ``refs`` and the views."""

    def __init__(self, root: str, io: Any, own: str = "") -> None:
        self.root, self.io, self.own = root, io, own
        self.lock = threading.Lock()
        self.views: dict[str, View] = {}
        self.skipped: set[str] = set()  # writer directories not ours (logged once)
        self.scanned = float("-inf")

    def refresh(self, force: bool = False) -> None:
        """Tail the peers' logs; look for new peers if ``force`` or a scan is due."""
        now = time.monotonic()
        if force or now - self.scanned >= PEER_SCAN_S:
            self.scanned = now
            try:
                names = os.listdir(self.root)
            except OSError as e:
                log.warning("hf3fs store %s: cannot list writers: %s", self.root, e)
                names = []
            for name in names:
                path = os.path.join(self.root, name)
                if WRITER_DIR.fullmatch(name) and path != self.own and path not in self.views:
                    self._add(path)
        for view in list(self.views.values()):
            try:
                view.refresh()
            except PermissionError as e:  # not ours: dropped, and skipped from now on
                self._skip(view.path, e.strerror)
                view.close()
                del self.views[view.path]
            except OSError as e:
                log.warning("hf3fs store %s: cannot read the index of %s: %s", self.root, view.path, e)

    def _add(self, path: str) -> None:
        """A view of writer directory ``path`` unless it is a symlink, another user's or writable
        by others (its index and data could be anyone's)."""
        if path in self.skipped:
            return
        why = not_ours(path)
        if why:
            self._skip(path, f"{path} is {why}")
        else:
            self.views[path] = View(path, self.io)

    def _skip(self, path: str, why: str) -> None:
        self.skipped.add(path)
        log.warning("hf3fs store %s: not reading the writer directory %s: %s (pdkv reads only directories "
                    "and files of its own uid)", self.root, path, why)

    def refs(self, keys: Sequence[str]) -> dict[str, tuple[View, Ref]]:
        """Where the peers hold ``keys``; looks for new peers on a miss."""
        self.refresh()
        found = {}
        for attempt in range(2):
            for key in keys:
                if key not in found:
                    for view in self.views.values():
                        ref = view.entries.get(key)
                        if ref is not None:
                            found[key] = (view, ref)
                            break
            if len(found) == len(keys) or attempt or time.monotonic() - self.scanned < MISS_RESCAN_S:
                break
            self.refresh(force=True)
        return found

    def keys(self, own: list[str]) -> list[str]:
        """``own`` then the peers' keys not in it (as last seen)."""
        with self.lock:
            self.refresh()
            seen = set(own)
            return own + [k for v in self.views.values() for k in v.entries if k not in seen
                          and not seen.add(k)]

    def forget(self, view: View, key: str, ref: Ref) -> None:
        """A read found ``ref`` stale: forget it here (a peer's log is never touched)."""
        with self.lock:
            if view.entries.get(key) is ref:
                del view.entries[key]

    def usage(self) -> dict:
        with self.lock:
            return {"peers": len(self.views), "peer_values": sum(len(v.entries) for v in self.views.values())}

    def close(self) -> None:
        with self.lock:
            for view in self.views.values():
                view.close()
            self.views.clear()
