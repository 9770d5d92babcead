"""Network transport over InfiniStore (``pip install 'pdkv[infinistore]'``): one server holds the
values in its DRAM pool, every pdkv process is a client, over RDMA or TCP.

* RDMA (``connection_type: rdma``): the staging region is registered with the NIC once
  (``register_mr``); puts and gets are batched one-sided ``rdma_write_cache_async`` /
  ``rdma_read_cache_async`` calls, one block size per call (values are grouped by size), at most
  1024 keys and ~3 MiB of keys per call (the server's request message is 4 MiB), at most
  ``max_inflight`` calls in flight (the server allows 128 per connection). A batched read fails
  as a whole when one key is absent: its keys are then read one by one, so each is a hit or a miss.
* TCP (``connection_type: tcp``): ``tcp_write_cache`` / ``tcp_read_cache``, one key per call,
  one connection per thread, ``tcp_threads`` threads. A read asks ``check_exist`` first.

The InfiniStore client runs in a process of its own (``transport/infinistore_client.py``: why
there), sharing the staging region (a memfd) with this one. This side owns the region's slots,
the framing and the counters; it talks to that process over a socketpair.

Framing: the server never says how long a value is on an RDMA read (it writes what it holds into
a block of the reader's size), and a TCP put is visible before all its bytes arrived. Each value
is stored as a 24-byte header (magic, version, payload length, a random nonce), the payload, and
the nonce again: a read whose header or trailing nonce does not match is a miss, never other bytes.

Failure: a server that is not there at start is a ``TransportError``. Later, a call that fails or
takes longer than ``op_timeout_s``, or a client process that died, marks the server down: calls
answer misses / drops at once while a background probe starts a new client process every
``DOWN_S`` until one connects. The slots of a call that timed out stay held until its answer
arrives or its process is gone, so a late answer never lands in memory handed out again.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import struct
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

from transport.arena import PAGE, FirstFit, buffer_address, cuda_pin
from transport.base import (
    InFlight,
    TransportError,
    check_buffers,
    check_reserve,
    close_reads,
    close_written,
)
from transport.infinistore_client import ClientProcess

log = logging.getLogger(__name__)

HEADER = struct.Struct("<4sHHQQ")  # magic, version, flags, payload length, nonce
TRAILER = struct.Struct("<Q")      # the nonce again, after the payload
FRAME = HEADER.size + TRAILER.size
MAGIC, VERSION = b"PDIS", 1
DOWN_S = 1.0

STAT_KEYS = ("puts", "put_bytes", "dropped", "too_large", "gets", "get_hits", "get_misses", "get_bytes",
             "too_small", "errors", "deletes", "server_down", "timeouts", "restarts")


def _span(n: int) -> int:
    return max(PAGE, -(-n // PAGE) * PAGE)


class InfinistoreSlot:
    """A value's place in the staging region: ``view`` is its payload (``size`` bytes)."""

    __slots__ = ("key", "view", "size", "_off", "_owner", "_done")

    def __init__(self, key: str, view: memoryview, size: int, off: int, owner: "InfinistoreTransport") -> None:
        self.key, self.view, self.size, self._off, self._owner, self._done = key, view, size, off, owner, False


class InfinistoreTransport:
    """``Transport`` and ``ZeroCopyTransport`` over one InfiniStore server (see the module doc)."""

    #: reads are not checked against a racing writer: the connector keeps its payload checksums
    guards_reads = False
    zero_copy = True

    def __init__(self, cfg: Any, pin_cuda: bool = False) -> None:
        c = cfg.infinistore
        c.check()
        host, port, device = c.server()
        self.cfg, self.location = c, f"infinistore:{host}:{port}"
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.op_timeout = float(c.op_timeout_s)
        self.size = int(c.staging_mb) << 20
        self.max_value = min(int(c.max_value_mb) << 20, self.size - FRAME)
        self._cv = threading.Condition()
        self._closed, self._down, self._drop_logged = False, False, -1e9
        self._fd = os.memfd_create("pdkv-infinistore-staging")
        os.ftruncate(self._fd, self.size)
        self._mm = mmap.mmap(self._fd, self.size)
        self._mv = memoryview(self._mm)
        self.addr = buffer_address(self._mv)
        self._ff = FirstFit(self.size)
        self._client_json = json.dumps({
            "host": host, "port": port, "mode": c.connection_type, "device": device, "ib_port": c.ib_port,
            "link_type": c.link_type, "gid_index": c.gid_index, "threads": c.tcp_threads,
            "max_inflight": c.max_inflight, "connect_timeout_s": c.connect_timeout_s})
        try:
            self._client = self._start()
        except TransportError:
            self._release_region()
            raise
        self.pinned = pin_cuda and cuda_pin(self.addr, self.size, "infinistore")
        log.info("infinistore transport: server %s:%d, %s%s, %d MiB staging", host, port, c.connection_type,
                 f" on {device}" if c.connection_type == "rdma" else "", c.staging_mb)

    # -- the client process ---------------------------------------------------------------------
    def _start(self) -> ClientProcess:
        host, port, _ = self.cfg.server()
        try:
            socket.create_connection((host, port), timeout=self.cfg.connect_timeout_s).close()
        except OSError as e:
            raise TransportError(f"infinistore server {host}:{port} is not reachable ({e}); start it (pd launch "
                                 "with connector.transport.infinistore.start_server: true) or fix "
                                 "connector.transport.infinistore.url") from None
        return ClientProcess(self._client_json, self._fd, self.size, 30.0 + self.cfg.connect_timeout_s)

    def _mark_down(self, why: str) -> None:
        with self._cv:
            if self._down or self._closed:
                return
            self._down = True
        log.warning("infinistore server %s: %s; transfers miss (then the store, then recompute) until it "
                    "answers again", self.location, why)
        threading.Thread(target=self._probe, name="pdkv-infinistore-probe", daemon=True).start()

    def _probe(self) -> None:
        """Every DOWN_S: a new client process (which connects to the server) until one starts."""
        while True:
            time.sleep(DOWN_S)
            with self._cv:
                if self._closed:
                    return
            old = self._client
            try:
                new = self._start()
            except TransportError:
                continue
            with self._cv:
                closed = self._closed
                if not closed:
                    self._client, self._down = new, False
                    self.stats["restarts"] += 1
            old.stop()
            if closed:
                new.stop()
                return
            log.warning("infinistore server %s: answering again", self.location)
            return

    def _call(self, op: str, args: Any, after: Callable[[], None] | None = None) -> Any:
        """``op`` in the client process, waiting at most op_timeout_s; None when closed, down, timed
        out or failed. ``after`` runs once the call has really ended (or its process is gone)."""
        with self._cv:
            go = not self._closed and not self._down
            if not go and not self._closed:
                self.stats["server_down"] += 1
            client = self._client
        if not go:
            if after:
                after()
            return None
        try:
            fut = client.submit(op, args, after)
        except EOFError as e:
            if after:
                after()
            self._mark_down(f"the client process is gone ({e})")
            return None
        try:
            return fut.result(timeout=self.op_timeout)
        except FutureTimeout:
            self._bump(timeouts=1)
            self._mark_down(f"{op} took longer than op_timeout_s={self.op_timeout}")
        except EOFError as e:
            self._mark_down(str(e))
        except Exception as e:  # noqa: BLE001 - a failed call is a miss, not a crash
            self._bump(errors=1)
            self._mark_down(f"{op} failed: {e}")
        return None

    # -- staging slots ---------------------------------------------------------------------
    def _alloc(self, spans: Sequence[int], wait: bool = True) -> list[int | None]:
        """An offset per span, in order; from the first that finds no room on, None. Waits (up to
        op_timeout_s, with ``wait``) for room only for the first (other calls hold what it needs)."""
        offs: list[int | None] = [None] * len(spans)
        deadline = time.monotonic() + self.op_timeout
        with self._cv:
            for i, span in enumerate(spans):
                off = None if self._closed or span > self._ff.size else self._ff.alloc(span)
                while off is None and wait and i == 0 and not self._closed and span <= self._ff.size:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cv.wait(left):
                        break
                    off = self._ff.alloc(span)
                if off is None:
                    break
                offs[i] = off
        return offs

    def _free(self, offs_spans: Sequence[tuple[int, int]]) -> None:
        with self._cv:
            for off, span in offs_spans:
                self._ff.free(off, span)
            self._cv.notify_all()

    def used_bytes(self) -> int:
        """Bytes of the staging region in slots now."""
        with self._cv:
            return self._ff.size - self._ff.free_bytes

    def _payload(self, off: int, n: int) -> int:
        """Payload length of the framed value read at ``off`` (``n`` bytes were written there), or -1."""
        if n < FRAME:
            return -1
        magic, version, _, length, nonce = HEADER.unpack_from(self._mv, off)
        end = off + HEADER.size + length
        if magic != MAGIC or version != VERSION or HEADER.size + length + TRAILER.size > n:
            return -1
        return length if TRAILER.unpack_from(self._mv, end)[0] == nonce else -1

    # -- zero-copy API -----------------------------------------------------------------------
    def reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> list[InfinistoreSlot | None]:
        """A writable slot per key (None = no room / too large, counted as dropped); commit every slot."""
        sizes = check_reserve(keys, sizes)
        offs = self._alloc([_span(n + FRAME) for n in sizes])
        self._drops([n for n, o in zip(sizes, offs) if o is None], "no room in, or larger than, the staging region")
        return [None if o is None else InfinistoreSlot(k, self._mv[o + HEADER.size:o + HEADER.size + n], n, o, self)
                for k, n, o in zip(keys, sizes, offs)]

    def commit(self, slots: Sequence[InfinistoreSlot | None], ok: Sequence[bool] | None = None) -> list[bool]:
        """Store the slots' bytes (one batched call; each key once, the last wins); ``ok`` False: freed unstored."""
        store = close_written(self, slots, ok)
        go = [s for s, g in zip(slots, store) if g]
        self._free([(s._off, _span(s.size + FRAME)) for s, g in zip(slots, store) if s is not None and not g])
        todo = list({s.key: s for s in go}.values())  # each key once: the last wins
        for s in todo:
            nonce = int.from_bytes(os.urandom(8), "little")
            HEADER.pack_into(self._mv, s._off, MAGIC, VERSION, 0, s.size, nonce)
            TRAILER.pack_into(self._mv, s._off + HEADER.size + s.size, nonce)
        held = [(s._off, _span(s.size + FRAME)) for s in go]
        rcs = self._call("put", [(s.key, s._off, s.size + FRAME) for s in todo], after=lambda: self._free(held)) \
            if todo else self._free(held)
        stored = {s.key for s, rc in zip(todo, rcs or ()) if rc}
        self._bump(puts=len(stored), put_bytes=sum(s.size for s in todo if s.key in stored))
        self._drops([s.size for s in todo if s.key not in stored], "the server refused or is down")
        sent = {id(s) for s in go}
        return [s is not None and id(s) in sent and s.key in stored for s in slots]

    def acquire(self, keys: Sequence[str]) -> list[InfinistoreSlot | None]:
        """Read each key into a slot; None = miss. ``release`` them. A read needs room for the largest
        value (max_value_mb) until it is answered; then the value moves to a slot of its size (see
        ``_settle``; none when max_value_mb is the chunk size). Keys that find no room in one round
        are read in the next."""
        cap = self.max_value + FRAME
        out: list[InfinistoreSlot | None] = [None] * len(keys)
        todo, first = list(range(len(keys))), True
        while todo:
            offs = self._alloc([_span(cap)] * len(todo), wait=first)
            got = [(i, o) for i, o in zip(todo, offs) if o is not None]
            if not got:
                break  # no room: the rest miss
            first, todo = False, todo[len(got):]
            rcs = self._read([keys[i] for i, _ in got], [o for _, o in got], [cap] * len(got))
            if rcs and rcs[0] is None:
                continue  # not answered: the slots are freed when it ends
            for (i, o), n in zip(got, rcs):
                length = self._payload(o, n) if n > 0 else -1
                if length < 0:
                    self._free([(o, _span(cap))])
                    continue
                o = self._settle(o, _span(cap), length)
                out[i] = InfinistoreSlot(keys[i], self._mv[o + HEADER.size:o + HEADER.size + length], length, o, self)
        hits = [s.size for s in out if s is not None]
        self._bump(gets=len(keys), get_hits=len(hits), get_misses=len(keys) - len(hits), get_bytes=sum(hits))
        return out

    def _settle(self, off: int, held: int, length: int) -> int:
        """Where a value read into ``held`` bytes at ``off`` stays: there when it fills them, else
        copied into a slot of its own size (freeing all of ``held``: shrinking in place would cut
        the region into pieces too small for the next reads), else there with the tail freed."""
        need = _span(length + FRAME)
        if need >= held:
            return off
        (dst,) = self._alloc([need], wait=False)
        if dst is None:
            self._free([(off + need, held - need)])
            return off
        n = HEADER.size + length
        self._mv[dst:dst + n] = self._mv[off:off + n]
        self._free([(off, held)])
        return dst

    def release(self, reads: Sequence[InfinistoreSlot | None]) -> list[bool]:
        """Free the slots; True for each held read (its bytes are this process's own copy)."""
        held = close_reads(self, reads)
        self._free([(r._off, _span(r.size + FRAME)) for r, h in zip(reads, held) if h])
        return held

    def _read(self, keys: list[str], offs: list[int], caps: list[int]) -> list[int | None]:
        """One get call into the slots: per key what was written (0 absent, <0 not usable); the slots
        stay the caller's unless the call never answered (then they are freed when it ends)."""
        if not keys:
            return []
        spans = [(o, _span(c)) for o, c in zip(offs, caps)]
        flight = InFlight(lambda: self._free(spans))
        rcs = self._call("get", [(k, o, c) for k, o, c in zip(keys, offs, caps)], after=flight.ended)
        if rcs is None:
            flight.abandon()
            return [None] * len(keys)  # the slots are not the caller's any more
        self._bump(too_small=sum(1 for n in rcs if n == -1), errors=sum(1 for n in rcs if n == -2))
        return list(rcs)

    # -- copy API (Transport) ----------------------------------------------------------------
    def put(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[bool]:
        """Store each buffer under its key (one copy into the staging region, batched calls); False = dropped."""
        mvs = check_buffers("put", keys, buffers)
        res = [False] * len(keys)
        big = [j for j, mv in enumerate(mvs) if _span(mv.nbytes + FRAME) > self.size]
        self._drops([mvs[j].nbytes for j in big], "larger than the staging region")
        skip = set(big)
        todo = [j for j in range(len(keys)) if j not in skip]
        while todo:
            offs = self._alloc([_span(mvs[j].nbytes + FRAME) for j in todo])
            got = [(j, o) for j, o in zip(todo, offs) if o is not None]
            if not got:
                self._drops([mvs[j].nbytes for j in todo], "no room in the staging region")
                break
            slots = []
            for j, o in got:
                n = mvs[j].nbytes
                self._mv[o + HEADER.size:o + HEADER.size + n] = mvs[j]
                slots.append(InfinistoreSlot(keys[j], self._mv[o + HEADER.size:o + HEADER.size + n], n, o, self))
            for (j, _), ok in zip(got, self.commit(slots)):
                res[j] = ok
            todo = [j for j, o in zip(todo, offs) if o is None]
        return res

    def get(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[int]:
        """Read each key into its buffer; bytes read per key, 0 = miss (absent, buffer too small, server
        down). Nothing is written into a buffer on a miss."""
        mvs = check_buffers("get", keys, buffers, writable=True)
        out = [0] * len(keys)
        todo = [j for j, mv in enumerate(mvs) if mv.nbytes > 0]
        while todo:
            caps = [min(mvs[j].nbytes + FRAME, self.size) for j in todo]
            offs = self._alloc([_span(c) for c in caps])
            n = next((k for k, o in enumerate(offs) if o is None), len(offs))
            if n == 0:
                break  # no room within op_timeout_s: the rest miss
            batch, offs, caps, todo = todo[:n], list(offs[:n]), caps[:n], todo[n:]
            rcs = self._read([keys[j] for j in batch], offs, caps)
            if rcs[0] is None:
                continue
            for j, o, rc in zip(batch, offs, rcs):
                length = self._payload(o, rc) if rc > 0 else -1
                if 0 <= length <= mvs[j].nbytes:
                    mvs[j][:length] = self._mv[o + HEADER.size:o + HEADER.size + length]
                    out[j] = length
            self._free([(o, _span(c)) for o, c in zip(offs, caps)])
        hits = [n for n in out if n]
        self._bump(gets=len(keys), get_hits=len(hits), get_misses=len(keys) - len(hits), get_bytes=sum(hits))
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key has a value now (it may be evicted right after)."""
        res = self._call("exists", list(keys)) if keys else []
        return list(res) if res is not None else [False] * len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        """Remove the keys; returns how many existed."""
        n = (self._call("delete", list(keys)) or 0) if keys else 0
        self._bump(deletes=n)
        return n

    def close(self) -> None:
        """Stop: later puts drop and gets miss; the client process ends. Never raises."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._client.stop()
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.addr)
        self._release_region()
        log.debug("infinistore transport closed; stats %s", self.stats)

    def _release_region(self) -> None:
        try:
            self._mv.release()
            self._mm.close()
        except BufferError:  # views still exported: unmapped when they are freed
            pass
        os.close(self._fd)

    # -- helpers -----------------------------------------------------------------------------
    def _drops(self, sizes: Sequence[int], why: str) -> None:
        if not sizes:
            return
        with self._cv:
            self.stats["dropped"] += len(sizes)
            self.stats["too_large"] += sum(1 for n in sizes if _span(n + FRAME) > self.size)
            quiet = time.monotonic() < self._drop_logged + 10
            if not quiet:
                self._drop_logged = time.monotonic()
        if not quiet:  # at most one line per 10 s
            log.warning("infinistore: dropped %d values (%s; largest %d B, staging region %d MiB); stats %s",
                        len(sizes), why, max(sizes), self.size >> 20, self.stats)

    def _bump(self, **deltas: int) -> None:
        with self._cv:
            for k, v in deltas.items():
                self.stats[k] += v
