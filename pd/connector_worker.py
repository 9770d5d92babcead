"""Worker-side half of PDConnector: gathers/saves and loads/scatters KV chunks in the background.

Save job (producer): gather the request's blocks into staging slabs, one chunk per slab,
write each chunk header (layout fingerprint, key hash, checksum), ``transport.put`` the batch,
then publish READY(pd_id, keys, n_tokens) to the coordinator. The scheduler holds the blocks
until the job reports the send finished.

Load job (consumer): WAIT(pd_id) at the coordinator, ``transport.get`` the chunks the request
needs into staging slabs, verify each header against the keys computed locally from the
prompt (so another request's KV can never be used), scatter the valid prefix, and report every
block from the first bad chunk on as a load error: vLLM recomputes those. Every load ends in
``finished_recving`` exactly once, failed or cancelled ones included.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pd import chunk as chunkfmt
from pd.config import ConnectorConfig
from pd.connector_scheduler import LoadSpec, PDMetadata, SaveSpec
from pd.keys import chunk_hashes, chunk_key, key_digest, transfer_key
from pd.kv_layout import KVLayout, StagingPool
from pd.protocol import Aborted, Done, Ready

logger = logging.getLogger("pd.connector")

# Staging memory per worker: enough slabs to keep one batch in flight per I/O thread.
SLABS_PER_THREAD = 8
WAIT_THREADS = 256  # loads that may wait for READY at once (threads are made as needed)


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, rank: int, namespace_model: str, block_size: int,
                 coordinator, transport, layout_extra: dict, store=None, fingerprint: bytes | None = None,
                 page_bytes: int | None = None):
        self.cfg = cfg
        self.rank = rank
        self.model = namespace_model
        self.block_size = block_size
        self.coord = coordinator
        self.transport = transport
        self.store = store
        self.write_through = store is not None and cfg.store.write_through == "always"
        self.layout_extra = layout_extra
        self.spec_fingerprint, self.spec_page_bytes = fingerprint, page_bytes
        self.layout: KVLayout | None = None
        self.pool: StagingPool | None = None
        self.namespace = ""
        self._exec = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="pd-io")
        # Waiting for READY holds no I/O thread: a load waiting on a long prefill must not queue
        # the loads (and saves) behind it.
        self._waits = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="pd-wait")
        self._lock = threading.Lock()
        self._save_jobs: dict[str, Future] = {}
        self._done_sending: set[str] = set()
        self._finished_seen: set[str] = set()
        self._done_recving: set[str] = set()
        self._bad_blocks: set[int] = set()
        self._cancel: dict[str, threading.Event] = {}
        self._last_store_chunks: dict[str, int] = {}
        self.stats = {"saves": 0, "chunks_saved": 0, "loads_ok": 0, "loads_failed": 0,
                      "chunks_loaded": 0, "bytes_loaded": 0, "chunk_errors": 0,
                      "store_chunks_loaded": 0, "store_puts_dropped": 0,
                      "prefix_loads_ok": 0, "prefix_loads_failed": 0}

    # ---- setup -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from pd.keys import make_namespace

        self.layout = KVLayout(kv_caches, self.block_size, self.layout_extra)
        if self.spec_fingerprint is not None:
            if self.spec_page_bytes is not None and self.layout.page_bytes != self.spec_page_bytes:
                raise ValueError(f"registered KV pages are {self.layout.page_bytes} B but the KV cache spec "
                                 f"says {self.spec_page_bytes} B; this layout is not supported by pdkv")
            self.layout.fingerprint = self.spec_fingerprint
        bpc = self.cfg.chunk_size // self.block_size
        slab = chunkfmt.HEADER_SIZE + self.layout.chunk_payload_bytes(bpc)
        self.pool = StagingPool(slab, SLABS_PER_THREAD * self.cfg.io_threads,
                                pin=self.layout.device.type == "cuda")
        self.namespace = make_namespace(self.model, self.layout.fingerprint)  # = the scheduler's
        limit = getattr(self.store, "max_value", None) or getattr(self.store, "budget", None)
        if self.write_through and limit is not None and slab > limit:
            logger.error("pdkv worker rank %d: a chunk is %d B but the %s store holds at most %d B per "
                         "value: every store put will be dropped (counted too_large); lower "
                         "connector.chunk_size, or raise connector.store.size_gb (or, for hf3fs, "
                         "iov_size_mb)", self.rank, slab, getattr(self.store, "location", "?"), limit)
        logger.info("pdkv worker rank %d: %d layers, page %d B, chunk %d tokens = %d B, namespace %s",
                    self.rank, self.layout.num_layers, self.layout.page_bytes, self.cfg.chunk_size,
                    slab, self.namespace)

    def _keys(self, token_ids: list[int]) -> list[str]:
        return [chunk_key(self.namespace, self.rank, h) for h in chunk_hashes(token_ids, self.cfg.chunk_size)]

    def _chunk_spans(self, n_tokens: int, first_chunk: int = 0):
        """(chunk index, first block offset, n_blocks, n_tokens) for each chunk from first_chunk."""
        bpc = self.cfg.chunk_size // self.block_size
        n_chunks = -(-n_tokens // self.cfg.chunk_size)
        for c in range(first_chunk, n_chunks):
            toks = min(self.cfg.chunk_size, n_tokens - c * self.cfg.chunk_size)
            yield c, c * bpc, -(-toks // self.block_size), toks

    # ---- per step ----------------------------------------------------------------------

    def start_step(self, meta: PDMetadata) -> None:
        for req_id in meta.cancels:
            ev = self._cancel.get(req_id)
            if ev is not None:
                ev.set()
        for spec in meta.loads:
            self._cancel[spec.req_id] = threading.Event()
            if spec.pd_id:
                self._waits.submit(self._await_ready, spec)
            else:  # prefix reuse: the chunks are in the store, no transfer to wait for
                self._exec.submit(self._run_load, spec, None, time.monotonic(), 0.0)

    def after_forward(self, meta: PDMetadata) -> None:
        event = None
        if self.layout is not None and self.layout.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        for spec in meta.saves:
            self._save_jobs[spec.req_id] = self._exec.submit(self._run_save, spec, event)

    def handle_preemptions(self, meta: PDMetadata) -> None:
        # A preempted request's blocks are about to be reused: finish reading them first.
        for req_id in meta.preempted:
            fut = self._save_jobs.get(req_id)
            if fut is not None:
                fut.result()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        with self._lock:
            self._finished_seen |= finished_req_ids
            sending = self._done_sending & self._finished_seen
            self._done_sending -= sending
            self._finished_seen -= sending
            recving, self._done_recving = self._done_recving, set()
        for req_id in sending:
            self._save_jobs.pop(req_id, None)
        return sending, recving

    def take_load_errors(self) -> set[int]:
        with self._lock:
            bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    # ---- save --------------------------------------------------------------------------

    def _run_save(self, spec: SaveSpec, event) -> None:
        t0 = time.monotonic()
        keys = self._keys(spec.token_ids)
        xkeys = [transfer_key(spec.pd_id, k) for k in keys] if self.transport is not None else []
        n_bytes = 0
        try:
            if event is not None:
                event.synchronize()
            if self.transport is not None or self.write_through:
                n_bytes = self._save_chunks(spec, keys, xkeys)
            if self.transport is None and self.write_through:
                # Decode reads from the store alone: READY must not overtake the queued writes.
                self.store.flush(self.cfg.load_timeout_s)
        except Exception:
            logger.exception("pd_id=%s: save failed; decode will recompute", spec.pd_id)
            xkeys = []
        finally:
            with self._lock:
                self._done_sending.add(spec.req_id)
        ok = self.coord.ready(Ready(pd_id=spec.pd_id, rank=self.rank, keys=xkeys,
                                    n_tokens=len(spec.token_ids), n_bytes=n_bytes,
                                    location=getattr(self.transport, "location", "none"),
                                    instance_id=self.cfg.instance_id))
        self.stats["saves"] += 1
        self.stats["chunks_saved"] += len(keys)
        logger.debug("pd_id=%s: saved %d chunks (%d B) in %.1f ms, ready %s", spec.pd_id, len(keys),
                     n_bytes, (time.monotonic() - t0) * 1e3, "sent" if ok else "NOT delivered")

    def _save_chunks(self, spec: SaveSpec, keys: list[str], xkeys: list[str]) -> int:
        layout, pool = self.layout, self.pool
        blocks = torch.tensor(spec.block_ids, dtype=torch.long)
        spans = list(self._chunk_spans(len(spec.token_ids)))
        n_bytes = 0
        for i in range(0, len(spans), pool.n_slabs):
            batch = spans[i : i + pool.n_slabs]
            with pool.acquire(len(batch)) as slabs:
                views = []
                for slab, (c, b0, nb, toks) in zip(slabs, batch):
                    layout.gather(blocks[b0 : b0 + nb], layout.payload_view(slab, nb))
                    size = chunkfmt.HEADER_SIZE + layout.chunk_payload_bytes(nb)
                    mv = memoryview(slab.numpy())[:size]
                    chunkfmt.write_header(mv, layout.fingerprint, key_digest(keys[c]), toks, nb,
                                          size - chunkfmt.HEADER_SIZE)
                    views.append(mv)
                    n_bytes += size
                if self.transport is not None:
                    ok = self.transport.put([xkeys[c] for c, *_ in batch], views)
                    if not all(ok):
                        logger.warning("pd_id=%s: transport dropped %d of %d chunks", spec.pd_id,
                                       ok.count(False), len(ok))
                if self.write_through:  # the store copies the bytes: the slab can be reused
                    for (c, *_), view in zip(batch, views):
                        if not self.store.put(keys[c], view):
                            self.stats["store_puts_dropped"] += 1
        return n_bytes

    # ---- load --------------------------------------------------------------------------

    def _await_ready(self, spec: LoadSpec) -> None:
        """On a wait thread: wait for READY (or abort, or the timeout), then load on an I/O thread."""
        t0 = time.monotonic()
        try:
            reply = self._wait_ready(spec)
        except Exception:  # the load below still runs (store, else recompute) and reports DONE
            logger.exception("pd_id=%s: waiting for READY failed", spec.pd_id)
            reply = None
        wait_ms = (time.monotonic() - t0) * 1e3
        try:
            self._exec.submit(self._run_load, spec, reply, t0, wait_ms)
        except RuntimeError:  # shutting down: finish it here, so the request is released
            self._run_load(spec, reply, t0, wait_ms)

    def _run_load(self, spec: LoadSpec, reply, t0: float, wait_ms: float) -> None:
        """Load a request's KV (``reply``: what waiting for READY gave, for a P/D load)."""
        n_prompt = len(spec.token_ids)
        first_block = spec.start_token // self.block_size
        n_blocks = -(-n_prompt // self.block_size)
        loaded_upto = first_block  # blocks [first_block, loaded_upto) are valid
        error, n_chunks, n_bytes = "", 0, 0
        if not spec.pd_id:
            self._run_store_load(spec, t0, first_block, n_blocks)
            return
        try:
            if isinstance(reply, Ready) and reply.n_tokens != n_prompt:
                error = f"READY has {reply.n_tokens} tokens, request has {n_prompt}"
            elif isinstance(reply, Ready) or self.store is not None:
                # Without READY (prefill late, down, or aborted) the store may still hold the chunks.
                use_transport = isinstance(reply, Ready) and self.transport is not None
                loaded_upto, n_chunks, n_bytes, error = self._load_chunks(spec, first_block, use_transport)
                if error and not isinstance(reply, Ready):
                    error = f"{'aborted' if isinstance(reply, Aborted) else 'timed out waiting for READY'}; {error}"
            else:
                error = "aborted" if isinstance(reply, Aborted) else "timed out waiting for READY"
        except Exception as e:  # never let a load failure escape into the engine
            logger.exception("pd_id=%s: load failed", spec.pd_id)
            error = f"internal error: {e}"
        bad = set(spec.block_ids[loaded_upto:n_blocks])
        ok = not bad
        if ok and first_block and self.transport is not None:
            # Chunks before the local prefix hit were not read: they are not needed either.
            bpc = self.cfg.chunk_size // self.block_size
            skipped = self._keys(spec.token_ids[: (first_block // bpc) * self.cfg.chunk_size])
            self.transport.delete([transfer_key(spec.pd_id, k) for k in skipped])
        elif not ok and self.transport is not None and isinstance(reply, Ready):
            # The rest is recomputed: none of this request's chunks is of use any more (the
            # coordinator also frees them through the producer; this does not wait for that).
            self.transport.delete([transfer_key(spec.pd_id, k) for k in self._keys(spec.token_ids)])
        with self._lock:
            self._bad_blocks |= bad
            self._done_recving.add(spec.req_id)
            self._cancel.pop(spec.req_id, None)
        load_ms = (time.monotonic() - t0) * 1e3 - wait_ms
        self.stats["loads_ok" if ok else "loads_failed"] += 1
        self.stats["chunks_loaded"] += n_chunks
        self.stats["bytes_loaded"] += n_bytes
        if ok:
            logger.info("pd_id=%s: loaded %d chunks (%d B) in %.1f ms (waited %.1f ms)", spec.pd_id,
                        n_chunks, n_bytes, load_ms, wait_ms)
        else:
            logger.warning("pd_id=%s: %s; %d of %d blocks will be recomputed", spec.pd_id, error,
                           len(bad), n_blocks - first_block)
        self.coord.done(Done(pd_id=spec.pd_id, rank=self.rank, ok=ok, instance_id=self.cfg.instance_id,
                             n_chunks=n_chunks, n_bytes=n_bytes, load_ms=load_ms, error=error,
                             n_store_chunks=self._last_store_chunks.pop(spec.req_id, 0)))

    def _run_store_load(self, spec: LoadSpec, t0: float, first_block: int, n_blocks: int) -> None:
        loaded_upto, error = first_block, "no store"
        try:
            loaded_upto, n_chunks, n_bytes, error = self._load_chunks(spec, first_block, use_transport=False)
        except Exception as e:
            logger.exception("req %s: prefix load from the store failed", spec.req_id)
            error = f"internal error: {e}"
        bad = set(spec.block_ids[loaded_upto:n_blocks])
        with self._lock:
            self._bad_blocks |= bad
            self._done_recving.add(spec.req_id)
            self._cancel.pop(spec.req_id, None)
        self._last_store_chunks.pop(spec.req_id, None)
        self.stats["prefix_loads_ok" if not bad else "prefix_loads_failed"] += 1
        if bad:
            logger.warning("req %s: prefix from the store: %s; %d blocks recomputed", spec.req_id, error, len(bad))
        else:
            logger.info("req %s: loaded a %d-token prefix from the store in %.1f ms", spec.req_id,
                        len(spec.token_ids) - spec.start_token, (time.monotonic() - t0) * 1e3)

    def _wait_ready(self, spec: LoadSpec):
        deadline = time.monotonic() + self.cfg.wait_timeout_s
        cancel = self._cancel.get(spec.req_id)
        while True:
            if cancel is not None and cancel.is_set():
                return Aborted(pd_id=spec.pd_id, reason="request aborted")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            reply = self.coord.wait(spec.pd_id, self.rank, min(left, 1.0))
            if isinstance(reply, (Ready, Aborted)):
                return reply

    def _check(self, view, key: str, size: int, nb: int) -> str:
        """'' if the chunk in ``view`` is the right one and intact, else why not."""
        try:
            _, hdr_blocks, _ = chunkfmt.verify(view, self.layout.fingerprint, key_digest(key),
                                               size - chunkfmt.HEADER_SIZE)
            if hdr_blocks != nb:
                raise chunkfmt.ChunkError(f"chunk has {hdr_blocks} blocks, expected {nb}")
        except chunkfmt.ChunkError as e:
            self.stats["chunk_errors"] += 1
            return str(e)
        return ""

    def _fetch(self, batch, keys: list[str], views, sizes, got) -> list[tuple[str, str]]:
        """Make each view of ``batch`` hold its chunk: the transport's read if it is good, else
        the store's copy (one batched read for the batch's misses). Returns (source, error) per
        chunk: source "transport"/"store" when the chunk is good, else why not."""
        out: list[tuple[str, str]] = []
        need = []
        for j, ((c, _b0, nb, _t), view, size, n_read) in enumerate(zip(batch, views, sizes, got)):
            why = f"chunk {c} missing from transport" if n_read != size else ""
            if not why:
                bad = self._check(view, keys[c], size, nb)
                if not bad:
                    out.append(("transport", ""))
                    continue
                why = f"chunk {c}: {bad}"
            out.append(("", why))
            need.append(j)
        if not need or self.store is None:
            return out
        read = self.store.get_many([keys[batch[j][0]] for j in need], [views[j] for j in need])
        for j, n in zip(need, read):
            c, _b0, nb, _t = batch[j]
            why = out[j][1]
            if n != sizes[j]:
                out[j] = ("", f"{why}; not in the store either")
                continue
            bad = self._check(views[j], keys[c], sizes[j], nb)
            out[j] = ("store", "") if not bad else ("", f"{why}; store copy: {bad}")
        return out

    def _load_chunks(self, spec: LoadSpec, first_block: int, use_transport: bool = True
                     ) -> tuple[int, int, int, str]:
        """Load chunk by chunk: transport, then store; stop at the first chunk neither has."""
        layout, pool = self.layout, self.pool
        bpc = self.cfg.chunk_size // self.block_size
        keys = self._keys(spec.token_ids)
        blocks = torch.tensor(spec.block_ids, dtype=torch.long)
        spans = list(self._chunk_spans(len(spec.token_ids), first_block // bpc))
        loaded_upto, n_chunks, n_bytes, from_store = first_block, 0, 0, 0
        deadline = time.monotonic() + self.cfg.load_timeout_s
        try:
            for i in range(0, len(spans), pool.n_slabs):
                batch = spans[i : i + pool.n_slabs]
                with pool.acquire(len(batch)) as slabs:
                    sizes = [chunkfmt.HEADER_SIZE + layout.chunk_payload_bytes(nb) for _, _, nb, _ in batch]
                    views = [memoryview(s.numpy())[:n] for s, n in zip(slabs, sizes)]
                    xkeys = [transfer_key(spec.pd_id, keys[c]) for c, *_ in batch]
                    got = self.transport.get(xkeys, views) if use_transport else [0] * len(batch)
                    fetched = self._fetch(batch, keys, views, sizes, got)
                    for slab, size, (source, error), (c, b0, nb, toks) in zip(slabs, sizes, fetched, batch):
                        if time.monotonic() > deadline:
                            return loaded_upto, n_chunks, n_bytes, "load timed out"
                        if error:
                            return loaded_upto, n_chunks, n_bytes, error
                        from_store += source == "store"
                        # Skip blocks before the load start (already valid from the local cache).
                        skip = max(0, first_block - b0)
                        layout.scatter(blocks[b0 + skip : b0 + nb], layout.payload_view(slab, nb)[:, skip:])
                        loaded_upto, n_chunks, n_bytes = b0 + nb, n_chunks + 1, n_bytes + size
                    if use_transport:
                        self.transport.delete(xkeys)
            return loaded_upto, n_chunks, n_bytes, ""
        finally:
            self.stats["store_chunks_loaded"] += from_store
            self._last_store_chunks[spec.req_id] = from_store

    def shutdown(self) -> None:
        for ev in list(self._cancel.values()):
            ev.set()
        self._waits.shutdown(wait=True, cancel_futures=False)  # cancelled waits end within 1 s
        self._exec.shutdown(wait=True, cancel_futures=False)

