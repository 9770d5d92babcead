"""The consumer's loads: ``Loads``, built by ``pd.connector.worker.WorkerSide`` when vLLM registers its caches.

A P/D load streams: WAIT(pd_id, have=chunks loaded) at the coordinator on a wait thread; when a
READY says more chunks are out, load them on an I/O thread, then wait again, until the final
READY. Each chunk comes from the transport (zero-copy: scattered straight from the producer's
shared slot) or, when it is missing or bad there, from the persistent store; its header must
carry the layout fingerprint and the chain hash of the keys computed here from the prompt, so
another request's KV can never be used. From the first chunk that neither has, every block is
reported as a load error and vLLM recomputes it. Every load ends in ``finished_recving`` exactly
once (failed and cancelled ones included) and in one DONE to the coordinator.

A prefix load (no pd_id: a stored prefix found by the scheduler) reads the store alone.

A rank that holds several KV-head groups (``pd.connector.heads``: decode at a lower TP size than prefill)
runs one load per group, each with its own WAIT, chunks, store shard and DONE, each scattering
into its group's heads; the request is finished when all are, and its failed blocks are the
union of theirs (vLLM recomputes a block for every head).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from pd.config import ConnectorConfig
from pd.connector import chunk as chunkfmt
from pd.connector.codec import ChunkCodec
from pd.connector.keys import transfer_key
from pd.connector.kv_layout import StagingPool
from pd.connector.prefetch import Batch, Span, load_from_store, release_held
from pd.connector.scheduler import LoadSpec
from pd.coordinator.protocol import MAX_LOAD_PARTS, Aborted, Done, LoadPart, Ready
from store.base import KVStore
from transport.base import Transport

# Store-only loads read a batch while the last is scattered (pd.connector.prefetch); off only to
# measure what that gains (scripts/bench_prefix_load.py).
PIPELINED_STORE_LOADS = True
logger = logging.getLogger("pd.connector")

WAIT_THREADS = 256  # loads that may wait for READY at once (threads are made as needed)


@dataclass
class _Load:
    spec: LoadSpec
    keys: list[str]  # the prompt's chunk keys, computed here
    t0: float
    next_chunk: int  # chunks before this one are loaded (or before the local prefix hit)
    loaded_upto: int  # blocks [first block, loaded_upto) hold valid KV
    n_chunks: int = 0
    n_bytes: int = 0
    from_store: int = 0
    in_place: int = 0  # of those, scattered straight from the store's DRAM tier
    wait_ms: float = 0.0
    ready: bool = False  # a READY was seen (the producer's chunks exist)
    error: str = ""
    store: KVStore | None = None  # the store to fall back to (None: none, or KV not keyed by tokens)
    group: int = 0  # the head group this load fills (pd.connector.heads)
    join: "_Join | None" = None
    parts: list[LoadPart] = field(default_factory=list)  # the first MAX_LOAD_PARTS, for DONE
    total: LoadPart = field(default_factory=lambda: LoadPart(0.0))  # over every part


@dataclass
class _Join:
    """The group loads of one request: it is finished when the last one is."""

    left: int
    bad: set = field(default_factory=set)
    sync: bool = False  # loaded within the step: no finished_recving for it


class Loads:
    """The loads of one worker: started by ``start``, reported by ``take_finished`` and ``take_errors``.

    ``codec``, ``pool``: the registered caches as chunks and the staging slabs (shared with the
    worker's saves); ``coord``, ``transport``, ``stores`` (head group -> store or None): where chunks
    are awaited and read from; ``cfg``: the timeouts, read at each load; ``instance_id``: the id
    DONE names; ``io``: the worker's I/O threads; ``stats``: the worker's counters, added to.
    """

    def __init__(self, codec: ChunkCodec, pool: StagingPool, coord, transport: Transport | None,
                 stores: dict[int, KVStore | None], *, cfg: ConnectorConfig, instance_id: str,
                 io: ThreadPoolExecutor, stats: dict[str, int]):
        self.codec, self.pool = codec, pool
        self.coord, self.transport, self.stores = coord, transport, stores
        self.zero_copy = transport is not None and transport.zero_copy
        self.cfg = cfg
        self.instance_id = instance_id
        self.stats = stats
        self._io = io
        # Waiting for READY holds no I/O thread: a load waiting on a long prefill must not queue
        # the loads (and saves) behind it.
        self._waits = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="pd-wait")
        # reads of a store load's next batch while its last is scattered (one per I/O thread)
        self._prefetch = ThreadPoolExecutor(max(1, cfg.io_threads), thread_name_prefix="pd-prefetch")
        self._lock = threading.Lock()  # guards what the load threads report to the engine's
        self._done_recving: set[str] = set()
        self._bad_blocks: set[int] = set()
        self._cancel: dict[str, threading.Event] = {}

    # ---- the worker's calls ------------------------------------------------------------------

    def start(self, spec: LoadSpec) -> None:
        self._cancel[spec.req_id] = threading.Event()
        for st in self._group_loads(spec):
            if spec.pd_id:
                self._waits.submit(self._await_ready, st)
            else:  # prefix reuse: the chunks are in the store, no transfer to wait for
                self._io.submit(self._run_store_load, st)

    def load_now(self, spec: LoadSpec) -> None:
        """A synchronous load (``spec.sync``: the scheduler saw every chunk in the transport):
        read and scatter it here, before this step's forward, without waiting at the
        coordinator. Blocks that fail are reported through ``take_errors`` after this step
        (vLLM discards the step's output for the request and recomputes them); no
        ``finished_recving`` comes for it; DONE goes to the coordinator off this thread."""
        for st in self._group_loads(spec, sync=True):
            st.ready = True  # published: the producer's chunks exist (or are a miss now)
            try:
                self._load_range(st, len(st.keys), use_transport=self.transport is not None)
            except Exception as e:  # never let a load failure escape into the engine
                logger.exception("pd_id=%s: load failed", spec.pd_id)
                st.error = f"internal error: {e}"
            try:
                self._finish(st)
            except Exception:  # (this runs in vLLM's step: recompute rather than fail the engine)
                logger.exception("pd_id=%s: finishing an in-step load failed; its blocks are recomputed", spec.pd_id)
                with self._lock:
                    self._bad_blocks |= set(spec.block_ids[spec.start_token // self.codec.chunking.block_size:])
        self.stats["loads_sync"] += 1

    def _group_loads(self, spec: LoadSpec, sync: bool = False) -> list[_Load]:
        """One ``_Load`` per head group this rank holds, joined."""
        ch = self.codec.chunking
        first_block = spec.start_token // ch.block_size
        join = _Join(len(self.codec.owned), sync=sync)
        return [_Load(spec, self.codec.keys(spec.token_ids, spec.seed, group), time.monotonic(),
                      first_block // ch.blocks_per_chunk, first_block,
                      store=self.stores.get(group) if spec.seed is not None else None, group=group, join=join)
                for group in self.codec.owned]

    def cancel(self, req_ids: list[str]) -> None:
        """vLLM aborted these requests: their loads stop at the next chunk or wait slice."""
        for req_id in req_ids:
            ev = self._cancel.get(req_id)
            if ev is not None:
                ev.set()

    def take_finished(self) -> set[str]:
        """Requests whose loads ended (well or not) since the last call."""
        with self._lock:
            done, self._done_recving = self._done_recving, set()
        return done

    def take_errors(self) -> set[int]:
        """Blocks that failed to load since the last call (vLLM recomputes them)."""
        with self._lock:
            bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    def shutdown(self) -> None:
        for ev in list(self._cancel.values()):
            ev.set()
        self._waits.shutdown(wait=True, cancel_futures=False)  # cancelled waits end within 1 s

    def close(self) -> None:
        """After the worker's I/O threads have stopped: no load can ask for a read any more."""
        self._prefetch.shutdown(wait=True, cancel_futures=False)

    def _settle(self, st: _Load, bad: set) -> None:
        """One group load of a request is over; the last one reports the request finished."""
        with self._lock:
            st.join.bad |= bad
            st.join.left -= 1
            if st.join.left:
                return
            self._bad_blocks |= st.join.bad
            if not st.join.sync:
                self._done_recving.add(st.spec.req_id)
            self._cancel.pop(st.spec.req_id, None)

    # ---- P/D loads -----------------------------------------------------------------------

    def _await_ready(self, st: _Load) -> None:
        """On a wait thread: wait for (more of) READY, then load on an I/O thread."""
        t = time.monotonic()
        try:
            reply = self._wait_ready(st)
        except Exception:  # the load below still runs (store, else recompute) and reports DONE
            logger.exception("pd_id=%s: waiting for READY failed", st.spec.pd_id)
            reply = None
        st.wait_ms += (time.monotonic() - t) * 1e3
        try:
            self._io.submit(self._load_step, st, reply)
        except RuntimeError:  # shutting down: finish it here, so the request is released
            self._load_step(st, reply)

    def _wait_ready(self, st: _Load):
        # For each part of a stream; the first counts the time the request already waited in
        # vLLM's queue for it (pd.connector.scheduler: an early decode's lookup answered None).
        waited, st.spec.waited_s = st.spec.waited_s, 0.0
        deadline = time.monotonic() + self.cfg.wait_timeout_s - waited
        cancel = self._cancel.get(st.spec.req_id)
        while True:
            if cancel is not None and cancel.is_set():
                return Aborted(pd_id=st.spec.pd_id, reason="request aborted")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            reply = self.coord.wait(st.spec.pd_id, st.group, min(left, 1.0), have=st.next_chunk)
            if isinstance(reply, (Ready, Aborted)):
                return reply

    def _load_step(self, st: _Load, reply) -> None:
        """On an I/O thread: load what ``reply`` made available; wait again or finish."""
        n_total = len(st.keys)
        try:
            if isinstance(reply, Ready):
                st.ready = True
                if reply.n_tokens != len(st.spec.token_ids):
                    st.error = f"READY has {reply.n_tokens} tokens, request has {len(st.spec.token_ids)}"
                else:
                    upto = n_total if reply.final or not reply.chunks_ready else min(reply.chunks_ready, n_total)
                    self._load_range(st, upto, use_transport=self.transport is not None)
                    if not st.error and upto < n_total:
                        self._waits.submit(self._await_ready, st)  # the rest is still being prefilled
                        return
            else:
                why = "aborted" if isinstance(reply, Aborted) else "timed out waiting for READY"
                if self._cancelled(st):  # the request is gone: nothing to load for it
                    st.error = "request aborted"
                elif st.store is None:
                    st.error = why
                else:  # without READY (prefill late, down, or aborted) the store may hold the chunks
                    self._load_range(st, n_total, use_transport=False)
                    st.error = f"{why}; {st.error}" if st.error else ""
        except Exception as e:  # never let a load failure escape into the engine
            logger.exception("pd_id=%s: load failed", st.spec.pd_id)
            st.error = f"internal error: {e}"
        self._finish(st)

    def _cancelled(self, st: _Load) -> bool:
        """Whether vLLM aborted the request (its blocks are released once the load reports)."""
        ev = self._cancel.get(st.spec.req_id)
        return ev is not None and ev.is_set()

    def _finish(self, st: _Load) -> None:
        spec, ch = st.spec, self.codec.chunking
        n_blocks = ch.blocks(len(spec.token_ids))
        first_block = spec.start_token // ch.block_size
        bad = set(spec.block_ids[st.loaded_upto:n_blocks])
        ok = not bad
        if ok and first_block and self.transport is not None:
            # Chunks before the local prefix hit were not read: they are not needed either.
            self.transport.delete([transfer_key(spec.pd_id, k) for k in st.keys[: first_block // ch.blocks_per_chunk]])
        elif self.transport is not None and not (ok and st.ready):
            # The rest is recomputed, or came from the store without a READY: none of this
            # request's chunks in the transport is of use any more. The coordinator also frees
            # them through the producer, but not those whose READY it never saw (it was down or
            # restarted, and lost them): this delete is what removes those.
            self.transport.delete([transfer_key(spec.pd_id, k) for k in st.keys])
        self._settle(st, bad)
        load_ms = max(0.0, (time.monotonic() - st.t0) * 1e3 - st.wait_ms)  # the protocol refuses < 0
        self.stats["loads_ok" if ok else "loads_failed"] += 1
        self.stats["loads_aborted"] += st.error.endswith("request aborted")
        self.stats["load_timeouts"] += st.error == "load timed out"
        self.stats["chunks_loaded"] += st.n_chunks
        self.stats["bytes_loaded"] += st.n_bytes
        self.stats["store_chunks_loaded"] += st.from_store
        self.stats["store_chunks_in_place"] += st.in_place
        if ok:
            logger.info("pd_id=%s: loaded %d chunks (%d B) in %.1f ms (%s)%s", spec.pd_id, st.n_chunks,
                        st.n_bytes, load_ms, "in the step" if st.join.sync else f"waited {st.wait_ms:.1f} ms",
                        _from_store(st))
        else:
            logger.warning("pd_id=%s: %s; %d of %d blocks will be recomputed", spec.pd_id, st.error,
                           len(bad), n_blocks - first_block)
        t = st.total
        done = Done(pd_id=spec.pd_id, rank=st.group, ok=ok, instance_id=self.instance_id,
                    n_chunks=st.n_chunks, n_bytes=st.n_bytes, load_ms=load_ms, error=st.error,
                    n_store_chunks=st.from_store, groups=self.codec.groups, parts=st.parts,
                    get_ms=round(t.get_ms, 3), store_ms=round(t.store_ms, 3), scatter_ms=round(t.scatter_ms, 3),
                    sync=st.join.sync)
        try:
            if not st.join.sync:
                raise RuntimeError
            self._io.submit(self.coord.done, done)  # the engine's step waits for the load, not for this
        except RuntimeError:  # (or the pool is shutting down)
            self.coord.done(done)

    # ---- prefix loads ----------------------------------------------------------------------

    def _run_store_load(self, st: _Load) -> None:
        spec = st.spec
        n_blocks = self.codec.chunking.blocks(len(spec.token_ids))
        try:
            self._load_range(st, len(st.keys), use_transport=False)
        except Exception as e:
            logger.exception("req %s: prefix load from the store failed", spec.req_id)
            st.error = f"internal error: {e}"
        bad = set(spec.block_ids[st.loaded_upto:n_blocks])
        self._settle(st, bad)
        self.stats["prefix_loads_ok" if not bad else "prefix_loads_failed"] += 1
        self.stats["store_chunks_loaded"] += st.from_store
        self.stats["store_chunks_in_place"] += st.in_place
        if bad:
            logger.warning("req %s: prefix from the store: %s; %d blocks recomputed", spec.req_id,
                           st.error or "no store", len(bad))
        else:
            logger.info("req %s: loaded a %d-token prefix from the store in %.1f ms%s", spec.req_id,
                        len(spec.token_ids) - spec.start_token, (time.monotonic() - st.t0) * 1e3, _from_store(st))

    # ---- chunks ----------------------------------------------------------------------------

    def _load_range(self, st: _Load, upto: int, use_transport: bool) -> None:
        """Load chunks [st.next_chunk, upto) in batches; stop at the first one that fails. One part
        of the load's timeline (the chunks, their read, store and scatter times)."""
        spans = list(self.codec.chunking.spans(len(st.spec.token_ids), st.next_chunk, upto))
        blocks = torch.tensor(st.spec.block_ids, dtype=torch.long)
        deadline = time.monotonic() + self.cfg.load_timeout_s
        if st.store is None and not use_transport:
            st.error = "no transport and no store to load from"
            return
        part, before = LoadPart(0.0), (st.n_chunks, st.from_store)
        try:
            if not use_transport and PIPELINED_STORE_LOADS and self.pool.n_slabs >= 2 and spans:
                load_from_store(self, st, spans, blocks, deadline, part, self._prefetch)
                return
            for i in range(0, len(spans), self.pool.n_slabs):
                if not self._load_batch(st, spans[i : i + self.pool.n_slabs], blocks, use_transport, deadline,
                                        part):
                    return
        finally:
            _end_part(st, part, before)

    def _check(self, view, key: str, size: int, nb: int) -> str:
        """'' if the chunk in ``view`` is the right one and intact, else why not."""
        if len(view) != size:
            return f"chunk is {len(view)} B, expected {size} B"
        try:
            self.codec.verify(view, key, size, nb)
        except chunkfmt.ChunkError as e:
            with self._lock:  # (also from the store loads' read threads)
                self.stats["chunk_errors"] += 1
            return str(e)
        return ""

    def _load_batch(self, st: _Load, spans: list[Span], blocks: torch.Tensor, use_transport: bool,
                    deadline: float, part: LoadPart) -> bool:
        """Load one batch of chunks (times into ``part``); False when one failed (``st.error`` says why)."""
        zero_copy = use_transport and self.zero_copy
        xkeys = [transfer_key(st.spec.pd_id, st.keys[c]) for c, *_ in spans]
        t0 = time.perf_counter()
        b = Batch(spans, [self.codec.chunk_bytes(nb) for _, _, nb, _ in spans], xkeys,
                   self.transport.acquire(xkeys) if zero_copy else [None] * len(spans),
                   store_reads=[None] * len(spans))
        with ExitStack() as stack:
            stack.callback(lambda: self.transport.release(b.reads) if zero_copy else None)
            stack.callback(release_held, st, b)  # in-place store reads a failure left unscattered
            self._read_transport(st, b, use_transport, zero_copy, stack)
            t1 = t2 = time.perf_counter()
            part.get_ms += (t1 - t0) * 1e3
            if any(b.why) and st.store is not None:
                self._read_store(st, b, use_transport, zero_copy, stack)
                t2 = time.perf_counter()
                part.store_ms += (t2 - t1) * 1e3
            try:
                for j in range(len(spans)):
                    if not self._scatter(st, b, j, blocks, deadline):
                        return False
            finally:
                part.scatter_ms += (time.perf_counter() - t2) * 1e3
            if use_transport:
                self.transport.delete(xkeys)
        return True

    def _read_transport(self, st: _Load, b: Batch, use_transport: bool, zero_copy: bool,
                        stack: ExitStack) -> None:
        """Fill ``b.views`` from the transport: its own slots (zero-copy) or staging slabs."""
        b.views = [r.view if r is not None else None for r in b.reads]
        if not zero_copy:  # copy transports (and the store) read into staging slabs
            slabs = stack.enter_context(self.pool.acquire(len(b.spans)))
            b.views = [memoryview(s.numpy())[:n] for s, n in zip(slabs, b.sizes)]
            got = self.transport.get(b.xkeys, b.views) if use_transport else [0] * len(b.spans)
        else:
            got = [len(v) if v is not None else 0 for v in b.views]
        b.why = [("" if n == size else "missing from the transport") for n, size in zip(got, b.sizes)]
        if use_transport:
            b.why = [w or self._check(b.views[j], st.keys[c], b.sizes[j], nb)
                     for j, (w, (c, _b0, nb, _t)) in enumerate(zip(b.why, b.spans))]
        b.source = ["" if w else "transport" for w in b.why]

    def _read_store(self, st: _Load, b: Batch, use_transport: bool, zero_copy: bool, stack: ExitStack) -> None:
        """Read the chunks the transport did not have (or had bad) from the store: in place where
        the store offers it (its DRAM tier: scattered from there, released after), else copied."""
        need = [j for j, w in enumerate(b.why) if w]
        read = dict.fromkeys(need, 0)
        if getattr(st.store, "zero_copy", False):
            for j, r in zip(need, st.store.acquire([st.keys[b.spans[j][0]] for j in need])):
                if r is not None:
                    b.views[j], b.store_reads[j], read[j] = r.view, r, len(r.view)
        copy = [j for j in need if b.store_reads[j] is None]
        if zero_copy and copy:  # never read the store into the producer's slots
            slabs = stack.enter_context(self.pool.acquire(len(copy)))
            for j, s in zip(copy, slabs):
                b.views[j] = memoryview(s.numpy())[: b.sizes[j]]
        if copy:
            read.update(zip(copy, st.store.get_many([st.keys[b.spans[j][0]] for j in copy],
                                                    [b.views[j] for j in copy])))
        for j, n in read.items():
            c, _b0, nb, _t = b.spans[j]
            bad = "" if n != b.sizes[j] else self._check(b.views[j], st.keys[c], b.sizes[j], nb)
            if n == b.sizes[j] and not bad:
                b.source[j], b.why[j] = "store", ""
            elif use_transport:
                b.why[j] += f"; store copy: {bad}" if bad else "; not in the store either"
            else:
                b.why[j] = f"store copy: {bad}" if bad else "not in the store"

    def _scatter(self, st: _Load, b: Batch, j: int, blocks: torch.Tensor, deadline: float) -> bool:
        """Scatter chunk ``j`` of the batch into its blocks; False (``st.error``) to stop the load."""
        c, b0, nb, _t = b.spans[j]
        if b.why[j]:
            st.error = f"chunk {c}: {b.why[j]}"
            return False
        if time.monotonic() > deadline:
            st.error = "load timed out"
            return False
        if self._cancelled(st):  # stop at the next chunk, not after the whole batch
            st.error = "request aborted"
            return False
        skip = max(0, st.loaded_upto - b0)  # blocks already valid from the local cache
        self.codec.scatter_from(b.views[j], blocks[b0 + skip : b0 + nb], nb, skip, st.group)
        if b.reads[j] is not None:
            stable = self.transport.release([b.reads[j]])[0]
            b.reads[j] = None
            if b.source[j] == "transport" and not stable:
                # The producer reused the slot while it was read: what was scattered may
                # be another value's bytes; these blocks and the rest are recomputed.
                st.error = f"chunk {c} was evicted from the transport while it was read"
                return False
        if b.store_reads[j] is not None:
            stable = st.store.release([b.store_reads[j]])[0]
            b.store_reads[j] = None
            if not stable:  # the same for the store's DRAM tier
                st.error = f"chunk {c} was evicted from the store's DRAM tier while it was read"
                return False
            st.in_place += 1
        st.loaded_upto, st.n_chunks, st.n_bytes = b0 + nb, st.n_chunks + 1, st.n_bytes + b.sizes[j]
        st.next_chunk = c + 1
        st.from_store += b.source[j] == "store"
        return True


def _from_store(st: _Load) -> str:
    """What the load's log line says of its store chunks ("" if none)."""
    if not st.from_store:
        return ""
    return f"; {st.from_store} chunks from the store" + (f", {st.in_place} of them in place from its DRAM tier"
                                                         if st.in_place else "")


def _end_part(st: _Load, part: LoadPart, before: tuple[int, int]) -> None:
    """A part of ``st``'s load is over: its chunks and end time, into its parts (the first
    MAX_LOAD_PARTS) and its totals (all)."""
    part.at_ms = time.time() * 1e3
    part.chunks, part.store_chunks = st.n_chunks - before[0], st.from_store - before[1]
    part.get_ms, part.store_ms, part.scatter_ms = (round(part.get_ms, 3), round(part.store_ms, 3),
                                                   round(part.scatter_ms, 3))
    t = st.total
    t.get_ms, t.store_ms, t.scatter_ms = t.get_ms + part.get_ms, t.store_ms + part.store_ms, \
        t.scatter_ms + part.scatter_ms
    t.chunks, t.store_chunks = t.chunks + part.chunks, t.store_chunks + part.store_chunks
    if len(st.parts) < MAX_LOAD_PARTS:
        st.parts.append(part)
