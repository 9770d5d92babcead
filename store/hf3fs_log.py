"""The index log of a store/hf3fs writer directory (``index.log``, records in store/hf3fs_format.py).

Replayed at start into the writer's index (a torn tail is cut off; another slab layout than the
one the log was written with starts empty), appended to as values are written and evicted, and
rewritten (temp file + rename, new generation) when it holds many dead records. LRU order at
restart is the order of the log.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from store.hf3fs_format import (
    LOG_HDR,
    LOG_HDR_MAGIC,
    OP_ADD,
    OP_DEL,
    VERSION,
    Entry,
    pack_record,
    parse_log,
)
from store.hf3fs_slabs import Slabs

log = logging.getLogger(__name__)


class IndexLog:
    """The log of writer directory ``path``; ``index`` (LRU order, oldest first) is the store's,
    read under its ``lock``; counts ``log_compactions`` and ``recovered`` in its ``stats``."""

    def __init__(self, path: str, slabs: Slabs, index: OrderedDict[str, Entry], lock: threading.Lock,
                 stats: dict[str, int]) -> None:
        self.dir = path
        self.path = os.path.join(path, "index.log")
        self.slabs = slabs
        self._index, self._lock, self.stats = index, lock, stats
        self.records = 0  # records in the file (live and dead)
        self._append_lock = threading.Lock()

    def record(self, op: int, key: str, e: Entry) -> bytes:
        f, off = self.slabs.locate(e)
        return pack_record(op, key, f, off, e.cls, e.length, e.csum, e.seq)

    def replay(self) -> int:
        """Fill the index (and claim its slots) from the log; the highest sequence number in it."""
        s = self.slabs
        layout = f"version={VERSION} slab={s.slab_size} slabs={s.n_slabs} per_file={s.per_file}\n"
        raw = self._read(layout)
        if raw is None:
            self.rewrite([], layout_text=layout)
            return 0
        recs, pos = parse_log(raw, LOG_HDR.size)
        live: OrderedDict[str, Entry] = OrderedDict()
        seq = 0
        for op, key, f, off, cls, length, csum, rseq in recs:
            seq = max(seq, rseq)
            self.records += 1
            if op == OP_DEL:
                live.pop(key, None)
            elif op == OP_ADD:
                where = s.find(f, off, cls)
                if where is not None:
                    live.pop(key, None)
                    live[key] = Entry(where[0], where[1], cls, length, csum, rseq)
        if pos < len(raw):
            log.warning("hf3fs store %s: index log torn at byte %d of %d; cut", self.dir, pos, len(raw))
            with open(self.path, "r+b") as fh:
                fh.truncate(pos)
        for key, e in live.items():
            if s.claim(e.slab, e.slot, e.cls):
                self._index[key] = e
        self.stats["recovered"] = len(self._index)
        if self.records > 2 * len(self._index) + 1024:
            self.rewrite(list(self._index.items()))
        return seq

    def _read(self, layout: str) -> bytes | None:
        """The log's bytes if it was written with this ``layout`` and has a good header; None:
        start empty."""
        try:
            with open(os.path.join(self.dir, "layout")) as fh:
                same = fh.read() == layout
        except FileNotFoundError:
            same = False
        if not same:  # a new store, or another slab layout: the old index cannot be trusted
            if os.path.exists(self.path):
                log.warning("hf3fs store %s: layout changed; starting empty", self.dir)
            return None
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raw = b""
        if len(raw) < LOG_HDR.size or LOG_HDR.unpack_from(raw)[:2] != (LOG_HDR_MAGIC, VERSION):
            log.warning("hf3fs store %s: index log missing or unreadable; starting empty", self.dir)
            return None
        return raw

    def rewrite(self, items: list[tuple[str, Entry]], layout_text: str | None = None) -> None:
        """A new log (new generation) holding ``items``; ``layout_text``: the slab layout too."""
        tmp = self.path + f".tmp-{os.getpid()}"
        gen = int.from_bytes(os.urandom(8), "little")
        with open(tmp, "wb") as fh:
            fh.write(LOG_HDR.pack(LOG_HDR_MAGIC, VERSION, gen))
            fh.write(b"".join(self.record(OP_ADD, k, e) for k, e in items))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if layout_text is not None:
            with open(os.path.join(self.dir, "layout.tmp"), "w") as fh:
                fh.write(layout_text)
            os.replace(os.path.join(self.dir, "layout.tmp"), os.path.join(self.dir, "layout"))
        self.records = len(items)

    def append(self, records: list[bytes]) -> None:
        """Append ``records``; rewrite the log when most of it is dead."""
        if not records:
            return
        with self._append_lock:
            try:
                with open(self.path, "ab") as fh:
                    fh.write(b"".join(records))
                self.records += len(records)
                if self.records > 4 * len(self._index) + 1024:
                    with self._lock:
                        items = list(self._index.items())
                    self.rewrite(items)
                    self.stats["log_compactions"] += 1
            except OSError as e:
                log.error("hf3fs store %s: index log write failed: %s", self.dir, e)
