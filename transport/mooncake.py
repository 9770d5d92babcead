"""Network transport over Mooncake Store (``mooncake-transfer-engine``; ``-non-cuda`` on CPU hosts).

A Mooncake pool is one master service (``mooncake_master``: placement, eviction, leases) plus
clients; every client may contribute memory to the pool (``global_segment_size_mb``) and moves
bytes with the transfer engine, over TCP or RDMA. Each pdkv process is one client.

Staging: the process registers ONE region of its own memory with the engine once
(``local_buffer_size_mb``, faulted in up front, CUDA-pinned with ``pin_cuda``) and every transfer
goes from or into slots of it, in one batched call per batch of keys:

* zero-copy (``ZeroCopyTransport``): ``reserve`` hands out slots of the region (the connector
  gathers KV straight into them), ``commit`` publishes them with one ``batch_upsert_from``;
  ``acquire`` learns the values' sizes (one ``batch_get_replica_desc``) and reads them into slots
  with one ``batch_get_into``; the connector scatters from the slot, ``release`` frees it. The
  bytes in a slot are this process's private copy, so ``release`` is True for every held read.
* copy API: ``put`` copies the caller's bytes into slots and commits them; ``get`` reads into
  slots sized to the caller's buffers (the engine refuses a buffer smaller than the value, so a
  too-small buffer is a miss, never a partial read) and copies out.

Registering the callers' buffers instead was rejected: the transport cannot tell a long-lived
buffer from a temporary one, and an RDMA registration costs far more than the copy it saves;
the connector's long-lived staging is this region itself, through the zero-copy API.

Puts are upserts (last write wins) and go to this process's own segment when it has one
(``prefer_local_segment``). Deletes are forced: Mooncake refuses to remove a value whose read
lease (granted by every get/exists, 10 s by default) is live, and pdkv deletes a transfer key
only when its one reader has finished with it or no reader will come.

Failure: a master that is not there at start is a ``TransportError`` after a TCP probe (setup
itself would retry for ~90 s, holding the GIL). Every later call runs on a worker thread (the
engine releases the GIL) and its caller waits at most ``op_timeout_s``; a call that fails with an
RPC error (a dead master answers those in ~0-4.5 s) or times out marks the master down: from then
on calls return misses / drops at once, and a background probe tries the master every ``DOWN_S``
until it answers. A value that the pool cannot hold is a dropped put; a peer that died with the
value in its segment is a miss. Everything is counted in ``stats``. ``close`` (and the process's
exit, through Mooncake's own atexit hook) holds the GIL for 1-2 s, ~14 s when the master is gone.

The client pieces (import, start-up probes and setup, return codes, worker threads) are in
``transport/mooncake_client.py``.
"""
from __future__ import annotations

import logging
import mmap
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

from transport.arena import PAGE, FirstFit, buffer_address, cuda_pin, cuda_unpin
from transport.base import (
    InFlight,
    TransportError,
    check_buffers,
    check_reserve,
    close_reads,
    close_written,
)
from transport.mooncake_client import (
    BAD_PARAMS,
    CLOSE_WAIT_S,
    DOWN_S,
    FULL_RETRY_S,
    NO_SPACE,
    NOT_FOUND,
    RPC_FAILED,
    WORKERS,
    Workers,
    connect,
    import_store,
    in_parts,
)

log = logging.getLogger(__name__)

STAT_KEYS = (
    "puts", "put_bytes",
    "dropped",      # values not stored: too large, no room, pool full, master down, errors
    "too_large",    # ... of which larger than the staging region
    "pool_full",    # ... of which the pool refused (no space even after eviction, or larger than it)
    "gets", "get_hits", "get_misses", "get_bytes",
    "too_small",    # gets missed because the buffer was smaller than the value
    "errors",       # calls or keys that failed for another reason (transfer failed, ...)
    "deletes",
    "master_down",  # calls answered at once (miss/drop) because the master was down
    "timeouts",     # calls that took longer than op_timeout_s
)


def _span(n: int) -> int:
    return max(PAGE, -(-n // PAGE) * PAGE)


class MooncakeSlot:
    """A slot of the registered region: ``view`` (writable 1-D uint8, ``size`` bytes). From
    ``reserve`` (fill it, then commit) or ``acquire`` (read it, then release)."""
    __slots__ = ("key", "view", "size", "_off", "_span", "_owner", "_done")

    def __init__(self, key: str, view: memoryview, size: int, off: int, owner: "MooncakeTransport") -> None:
        self.key, self.view, self.size, self._off, self._span = key, view, size, off, _span(size)
        self._owner, self._done = owner, False


class MooncakeTransport:
    """``Transport`` and ``ZeroCopyTransport`` over a Mooncake Store pool. Thread-safe."""

    #: reads are not checked against a racing writer: the connector keeps its payload checksums
    guards_reads = False
    zero_copy = True

    def __init__(self, cfg: Any, pin_cuda: bool = False) -> None:
        m = cfg.mooncake
        m.check()
        self.cfg, self.location = m, f"mooncake:{m.master}"
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.op_timeout = float(m.op_timeout_s)
        self._cv = threading.Condition()
        self._closed, self._inflight, self._down = False, 0, False
        self._drop_logged = -1e9
        store_cls, rcfg_cls = import_store()
        self._store = connect(store_cls, m)
        self._workers = Workers(WORKERS)
        self.size = int(m.local_buffer_size_mb) << 20
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_POPULATE", 0)
        self._mm = mmap.mmap(-1, self.size, flags=flags)
        self._mv = memoryview(self._mm)
        self.addr = buffer_address(self._mv)
        self._ff = FirstFit(self.size)
        rc = self._store.register_buffer(self.addr, self.size)
        if rc != 0:
            self._store.close()
            raise TransportError(f"mooncake: registering {m.local_buffer_size_mb} MiB of staging memory failed "
                                 f"(rc {rc}); lower connector.transport.mooncake.local_buffer_size_mb")
        self.pinned = pin_cuda and cuda_pin(self.addr, self.size, "mooncake")
        self._rcfg = rcfg_cls()
        if m.prefer_local_segment and m.global_segment_size_mb > 0:
            self._rcfg.preferred_segment = self._store.get_hostname()
        log.info("mooncake transport: master %s, metadata %s, %s, this client %s (%d MiB to the pool, %d MiB "
                 "staging)", m.master, m.metadata_url(), m.protocol, self._store.get_hostname(),
                 m.global_segment_size_mb, m.local_buffer_size_mb)

    # -- calls ------------------------------------------------------------------------------
    def _up(self) -> bool:
        """False (counted) while the master is known to be down: from a failed or timed-out call,
        or the client's own health check, until the background probe gets an answer."""
        if not self._down and self._store.health_check() != 0:
            self._mark_down("the client lost it")
        if self._down:
            with self._cv:
                self.stats["master_down"] += 1
        return not self._down

    def _mark_down(self, why: str) -> None:
        with self._cv:
            if self._down or self._closed:
                return
            self._down = True
        log.warning("mooncake master %s: %s; transfers miss (then the store, then recompute) until it "
                    "answers again", self.cfg.master, why)
        threading.Thread(target=self._probe, name="pdkv-mooncake-probe", daemon=True).start()

    def _probe(self) -> None:
        """Every DOWN_S, one cheap call (on this thread, so no caller waits for it) until the
        master answers; then calls go through again."""
        while True:
            time.sleep(DOWN_S)
            with self._cv:
                if self._closed:
                    return
                self._inflight += 1
            try:
                rcs = self._store.batch_is_exist(["pdkv/probe"])
            except Exception:  # noqa: BLE001 - still down
                rcs = [RPC_FAILED]
            finally:
                with self._cv:
                    self._inflight -= 1
                    self._cv.notify_all()
            if RPC_FAILED not in rcs and self._store.health_check() == 0:
                with self._cv:
                    self._down = False
                log.warning("mooncake master %s: answering again", self.cfg.master)
                return

    def _call(self, what: str, fn: Callable, *args, after: Callable[[], None] | None = None) -> Any:
        """``fn(*args)`` on a worker, waiting at most op_timeout_s; None when the transport is
        closed, the master is down, the call timed out or raised. ``after`` runs when the call
        has really ended (it frees the slots the call reads or writes), however long that takes."""
        with self._cv:
            go = not self._closed and self._up()
            self._inflight += go
        if not go:
            if after:
                after()
            return None
        fut = self._workers.submit(fn, *args)

        def done(_f) -> None:
            if after:
                after()
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

        fut.add_done_callback(done)
        try:
            res = fut.result(timeout=self.op_timeout)
        except FutureTimeout:
            self._bump(timeouts=1)
            self._mark_down(f"{what} took longer than op_timeout_s={self.op_timeout}")
            return None
        except Exception as e:  # noqa: BLE001 - a failed call is a miss, not a crash
            self._bump(errors=1)
            log.warning("mooncake %s failed: %s", what, e)
            return None
        if isinstance(res, list) and RPC_FAILED in res:
            self._mark_down(f"{what} failed (RPC error)")
        return res

    # -- staging slots --------------------------------------------------------------------
    def _alloc(self, sizes: Sequence[int]) -> list[int | None]:
        """A slot offset per size; None for a value larger than the region, and for every value
        from the first one that found no room on. Waits (up to op_timeout_s) for room only while
        this call holds nothing (other calls hold the room it needs)."""
        offs: list[int | None] = [None] * len(sizes)
        deadline = time.monotonic() + self.op_timeout
        held = False
        with self._cv:
            for i, n in enumerate(sizes):
                span = _span(n)
                if self._closed or span > self._ff.size:
                    continue
                off = self._ff.alloc(span)
                while off is None and not held and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cv.wait(left):
                        break
                    off = self._ff.alloc(span)
                if off is None:
                    break
                offs[i], held = off, True
        return offs

    def _free(self, offs_sizes: Sequence[tuple[int, int]]) -> None:
        with self._cv:
            for off, n in offs_sizes:
                self._ff.free(off, _span(n))
            self._cv.notify_all()

    def _ptr(self, off: int) -> int:
        return self.addr + off

    def used_bytes(self) -> int:
        """Bytes of the staging region in slots now."""
        with self._cv:
            return self._ff.size - self._ff.free_bytes

    # -- zero-copy API --------------------------------------------------------------------
    def reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> list[MooncakeSlot | None]:
        """A writable slot of registered memory per key (None = no room / too large, counted as
        dropped). Commit every slot (ok or not) to give its room back."""
        sizes = check_reserve(keys, sizes)
        offs = self._alloc(sizes)
        out = [None if o is None else MooncakeSlot(k, self._mv[o:o + n], n, o, self)
               for k, n, o in zip(keys, sizes, offs)]
        self._count_drops([n for n, o in zip(sizes, offs) if o is None], "no room in, or larger than, the staging region")
        return out

    def commit(self, slots: Sequence[MooncakeSlot | None], ok: Sequence[bool] | None = None) -> list[bool]:
        """Store the slots' bytes (one batched upsert); slots with ``ok`` False are freed unstored."""
        store = close_written(self, slots, ok)
        go = [i for i, g in enumerate(store) if g]
        self._free([(s._off, s.size) for s, g in zip(slots, store) if s is not None and not g])
        res = [False] * len(slots)
        for i, r in zip(go, self._upsert([slots[i] for i in go])):
            res[i] = r
        return res

    def _upsert(self, slots: list[MooncakeSlot]) -> list[bool]:
        """One ``batch_upsert_from`` of the slots (each key once: the last wins); frees them."""
        if not slots:
            return []
        last = {s.key: j for j, s in enumerate(slots)}
        todo = [s for j, s in enumerate(slots) if last[s.key] == j and s.size > 0]
        held = [(s._off, s.size) for s in slots]
        if not todo:
            self._free(held)
        rcs = self._call("put", self._upsert_retry, [s.key for s in todo], [self._ptr(s._off) for s in todo],
                         [s.size for s in todo], after=lambda: self._free(held)) if todo else []
        by_key = {s.key: rc for s, rc in zip(todo, rcs or [None] * len(todo))}
        res = [by_key.get(s.key) == 0 for s in slots]
        stored = [s for s in todo if by_key[s.key] == 0]
        full = sum(1 for s in todo if by_key[s.key] == NO_SPACE)
        other = sorted({rc for rc in rcs or () if rc not in (0, NO_SPACE, RPC_FAILED)})
        self._bump(puts=len(stored), put_bytes=sum(s.size for s in stored), pool_full=full,
                   errors=sum(1 for s in todo if by_key[s.key] in other))
        why = ("the master is down or timed out" if rcs is None else
               f"the pool is full or smaller than the value ({full})" if full else f"codes {other}")
        self._count_drops([s.size for s in todo if by_key[s.key] != 0], why)
        self._count_drops([0] * sum(1 for s in slots if s.size == 0), "empty value")
        return res

    def _upsert_retry(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        rcs = in_parts(lambda *a: self._store.batch_upsert_from(*a, self._rcfg), keys, ptrs, sizes)
        again = [j for j, rc in enumerate(rcs) if rc == NO_SPACE]
        if again:  # the pool is full: the master evicts in the background; one more try
            time.sleep(FULL_RETRY_S)
            for j, rc in zip(again, self._store.batch_upsert_from(
                    [keys[j] for j in again], [ptrs[j] for j in again], [sizes[j] for j in again], self._rcfg)):
                rcs[j] = rc
        return rcs

    def acquire(self, keys: Sequence[str]) -> list[MooncakeSlot | None]:
        """Read each key's value into a slot of registered memory; None = miss. ``release`` them."""
        sizes: list[int] = [0] * len(keys)
        descs = self._call("lookup", self._store.batch_get_replica_desc, list(keys)) if keys else {}
        for i, k in enumerate(keys):
            for rep in (descs or {}).get(k, ()):
                if rep.is_memory_replica():
                    sizes[i] = int(rep.get_memory_descriptor().buffer_descriptor.size)
                    break
        want = [i for i, n in enumerate(sizes) if n > 0]
        offs = self._alloc([sizes[i] for i in want])
        got = [(i, o) for i, o in zip(want, offs) if o is not None]
        rcs = self._read([keys[i] for i, _ in got], [o for _, o in got], [sizes[i] for i, _ in got])
        out: list[MooncakeSlot | None] = [None] * len(keys)
        if rcs is not None:
            bad = []
            for (i, o), rc in zip(got, rcs):
                if rc == sizes[i]:
                    out[i] = MooncakeSlot(keys[i], self._mv[o:o + rc], rc, o, self)
                else:
                    bad.append((o, sizes[i]))
            self._free(bad)
            self._bump(errors=sum(1 for rc in rcs if rc < 0 and rc not in (NOT_FOUND, RPC_FAILED)))
        hits = [s.size for s in out if s is not None]
        self._bump(gets=len(keys), get_hits=len(hits), get_misses=len(keys) - len(hits), get_bytes=sum(hits))
        return out

    def release(self, reads: Sequence[MooncakeSlot | None]) -> list[bool]:
        """Free the slots; True for each held read (its bytes are this process's own copy)."""
        held = close_reads(self, reads)
        self._free([(r._off, r.size) for r, h in zip(reads, held) if h])
        return held

    def _read(self, keys: list[str], offs: list[int], caps: list[int]) -> list[int] | None:
        """One ``batch_get_into`` into slots: per key the bytes read or a negative code (the
        caller copies out and frees the slots), or None (closed, master down, timed out: the
        slots are freed here, once the engine has really let go of them)."""
        if not keys:
            return []
        held = list(zip(offs, caps))
        flight = InFlight(lambda: self._free(held))
        rcs = self._call("get", in_parts, self._store.batch_get_into, keys, [self._ptr(o) for o in offs], caps,
                         after=flight.ended)
        if rcs is None:
            flight.abandon()
        return None if rcs is None else list(rcs)

    # -- copy API (Transport) -------------------------------------------------------------
    def put(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[bool]:
        """Store each buffer under its key (one copy into registered memory, one batched upsert per
        batch that fits the region); False = dropped (counted)."""
        mvs = check_buffers("put", keys, buffers)
        res = [False] * len(keys)
        big = [j for j, mv in enumerate(mvs) if _span(mv.nbytes) > self.size]
        self._count_drops([mvs[j].nbytes for j in big], "larger than the staging region")
        todo = [j for j in range(len(keys)) if _span(mvs[j].nbytes) <= self.size]
        while todo:
            offs = self._alloc([mvs[j].nbytes for j in todo])
            got = [(j, o) for j, o in zip(todo, offs) if o is not None]
            if not got:  # no room within op_timeout_s (or closed): the rest are dropped
                self._count_drops([mvs[j].nbytes for j in todo], "no room in the staging region")
                break
            slots = []
            for j, o in got:
                n = mvs[j].nbytes
                self._mv[o:o + n] = mvs[j]
                slots.append(MooncakeSlot(keys[j], self._mv[o:o + n], n, o, self))
            for (j, _), ok in zip(got, self.commit(slots)):
                res[j] = ok
            todo = [j for j, o in zip(todo, offs) if o is None]
        return res

    def get(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[int]:
        """Read each key into its buffer; bytes read per key, 0 = miss (absent, buffer too small,
        master down, transfer failed). Nothing is written into a buffer on a miss."""
        mvs = check_buffers("get", keys, buffers, writable=True)
        out = [0] * len(keys)
        todo = [j for j, mv in enumerate(mvs) if mv.nbytes > 0]
        while todo:
            caps = [min(mvs[j].nbytes, self.size) for j in todo]
            offs = self._alloc(caps)  # caps never exceed the region: a prefix is allocated
            n = next((k for k, o in enumerate(offs) if o is None), len(offs))
            if n == 0:
                break  # no room in the staging region within op_timeout_s: the rest miss
            batch, offs, caps = todo[:n], list(offs[:n]), caps[:n]
            todo = todo[n:]
            rcs = self._read([keys[j] for j in batch], offs, caps)
            if rcs is None:
                continue
            for j, o, rc in zip(batch, offs, rcs):
                if rc > 0:
                    mvs[j][:rc] = self._mv[o:o + rc]
                    out[j] = rc
            self._free(list(zip(offs, caps)))
            small = sum(1 for rc in rcs if rc == BAD_PARAMS)
            other = sum(1 for rc in rcs if rc < 0 and rc not in (BAD_PARAMS, NOT_FOUND, RPC_FAILED))
            self._bump(too_small=small, errors=other)
        hits = [n for n in out if n]
        self._bump(gets=len(keys), get_hits=len(hits), get_misses=len(keys) - len(hits), get_bytes=sum(hits))
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key has a value now (it may be evicted right after)."""
        rcs = self._call("exists", self._store.batch_is_exist, list(keys)) if keys else []
        return [rc == 1 for rc in rcs] if rcs is not None else [False] * len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        """Remove the keys (forced: a live read lease does not stop it); returns how many existed."""
        rcs = self._call("delete", self._store.batch_remove, list(keys), True) if keys else []
        n = sum(1 for rc in rcs or () if rc == 0)
        self._bump(deletes=n)
        return n

    def close(self) -> None:
        """Stop: later puts drop and gets miss. Waits (up to op_timeout_s) for calls in flight,
        then leaves the pool: the values in this process's segment go with it. Never raises."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
            # A call still in the engine must end first: closing the client under it crashes.
            # They end within seconds (a failed RPC takes ~4.5 s); CLOSE_WAIT_S bounds a hung one.
            self._cv.wait_for(lambda: self._inflight == 0, timeout=max(CLOSE_WAIT_S, self.op_timeout))
            stuck = self._inflight
        self._workers.stop(WORKERS)
        if stuck:
            log.error("mooncake: %d calls still in the engine after %.0f s; leaving the client open", stuck,
                      max(CLOSE_WAIT_S, self.op_timeout))
        else:
            try:  # holds the GIL for 1-2 s (~14 s when the master is gone: it retries the unmount)
                self._store.close()
            except Exception as e:  # noqa: BLE001 - closing never raises
                log.warning("mooncake: close did not finish cleanly: %s", e)
        if self.pinned:
            cuda_unpin(self.addr)
        if not stuck:  # else the engine may still touch the region: leave it mapped
            try:
                self._mv.release()
                self._mm.close()
            except BufferError:  # views still exported: unmapped when they are freed
                pass
        log.debug("mooncake transport closed; stats %s", self.stats)

    # -- helpers --------------------------------------------------------------------------
    def _count_drops(self, sizes: Sequence[int], why: str) -> None:
        if not sizes:
            return
        big = sum(1 for n in sizes if _span(n) > self.size)
        with self._cv:
            self.stats["dropped"] += len(sizes)
            self.stats["too_large"] += big
            quiet = time.monotonic() < self._drop_logged + 10
            if not quiet:
                self._drop_logged = time.monotonic()
        if not quiet:  # at most one line per 10 s
            log.warning("mooncake: dropped %d values (%s; largest %d B, staging region %d MiB); stats %s",
                        len(sizes), why, max(sizes), self.size >> 20, self.stats)

    def _bump(self, **deltas: int) -> None:
        with self._cv:
            for k, v in deltas.items():
                self.stats[k] += v
