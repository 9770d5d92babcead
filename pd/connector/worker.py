"""Worker-side half of PDConnector: gathers/saves and loads/scatters KV chunks in the background.

Save jobs (producer): after each engine step that completed chunks of a prompt (the scheduler's
``SaveSpec``), gather those chunks' blocks, write each chunk header (layout fingerprint, key
hash, checksum), put them to the transport and publish READY(pd_id, chunks_ready, final) to the
coordinator. Chunks therefore move while the rest of the prompt is still being prefilled. With a
zero-copy transport (shm) the gather writes straight into the transport's shared slots: one copy
from the paged cache (one DMA on a GPU) and nothing else. A request's jobs publish in order; the
scheduler holds its blocks until every job has read them.

Load jobs (consumer, ``pd.connector.load``): WAIT at the coordinator, load the chunks published
so far, wait for more, until the final READY; each chunk is checked against keys computed from
the prompt before it is scattered.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pd.config import ConnectorConfig
from pd.connector import chunk as chunkfmt
from pd.connector.heads import HeadGroups
from pd.connector.keys import chunk_hashes, chunk_key, key_digest, transfer_key
from pd.connector.kv_layout import KVLayout, StagingPool
from pd.connector.load import LoadMixin
from pd.connector.scheduler import PDMetadata, SaveSpec
from pd.coordinator.protocol import Ready

logger = logging.getLogger("pd.connector")

# Staging memory per worker: enough slabs to keep one batch in flight per I/O thread.
SLABS_PER_THREAD = 8
WAIT_THREADS = 256  # loads that may wait for READY at once (threads are made as needed)


class WorkerSide(LoadMixin):
    def __init__(self, cfg: ConnectorConfig, rank: int, namespace_model: str, block_size: int,
                 coordinator, transport, layout_extra: dict, store=None, fingerprint: bytes | None = None,
                 page_bytes: int | None = None, instance_id: str = "", num_blocks: int | None = None,
                 heads: HeadGroups | None = None, group_stores: dict | None = None):
        self.cfg = cfg
        self.rank = rank
        self.model = namespace_model
        self.block_size = block_size
        self.coord = coordinator
        self.transport = transport
        # Zero-copy transports hand out slots of shared memory to gather into and scatter from.
        self.zero_copy = transport is not None and hasattr(transport, "reserve")
        self.store = store
        # Head groups (pd.connector.heads): the groups this rank saves or loads, each its own chunks, keys,
        # READY/WAIT/DONE and store shard; without ``heads`` one group, numbered as the rank.
        self.heads = heads
        self.owned = heads.owned if heads is not None else [rank]
        self.parts = len(self.owned)
        self.n_groups = heads.groups if heads is not None else 1
        self.stores = group_stores or {self.owned[0]: store}
        self.write_through = store is not None and cfg.store.write_through == "always"
        self.layout_extra = layout_extra
        self.spec_fingerprint, self.spec_page_bytes = fingerprint, page_bytes
        self.instance_id = instance_id or cfg.instance_id  # the id its agent registered (FREE goes there)
        self.num_blocks = num_blocks
        self.layout: KVLayout | None = None
        self.checksum = True  # payload checksums written (decided with the device, at registration)
        self.pool: StagingPool | None = None
        self.namespace = ""
        self._exec = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="pd-io")
        # Waiting for READY holds no I/O thread: a load waiting on a long prefill must not queue
        # the loads (and saves) behind it.
        self._waits = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="pd-wait")
        self._lock = threading.Lock()
        self._save_jobs: dict[str, Future] = {}  # req -> its latest save job (jobs run in order)
        self._finished_seen: set[str] = set()
        self._done_recving: set[str] = set()
        self._bad_blocks: set[int] = set()
        self._cancel: dict[str, threading.Event] = {}
        self.stats = {"saves": 0, "chunks_saved": 0, "loads_ok": 0, "loads_failed": 0,
                      "chunks_loaded": 0, "bytes_loaded": 0, "chunk_errors": 0,
                      "store_chunks_loaded": 0, "store_puts_dropped": 0, "transport_dropped": 0,
                      "prefix_loads_ok": 0, "prefix_loads_failed": 0, "ready_parts": 0,
                      "loads_aborted": 0, "load_timeouts": 0, "ready_undelivered": 0}

    # ---- setup -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from pd.connector.keys import make_namespace

        extra = {"num_blocks": self.num_blocks} if self.num_blocks else {}
        if self.heads is not None:
            extra["heads"] = self.heads.total_heads // self.heads.tp
        try:
            self.layout = KVLayout(kv_caches, self.block_size, self.layout_extra, **extra)
        except TypeError:  # a KVLayout without the num_blocks keyword
            self.layout = KVLayout(kv_caches, self.block_size, self.layout_extra)
        sliced = getattr(self.layout, "head_pages", None) is not None
        if self.parts > 1 and not sliced:
            raise ValueError(f"this rank holds {self.parts} KV-head groups but pdkv found no KV-head dim of "
                             f"{extra.get('heads')} heads in the registered caches (layout {self.layout.layout}); "
                             "cutting chunks by head group is not supported for this layout: use the same "
                             "tensor_parallel_size for prefill and decode")
        if self.spec_fingerprint is not None:
            if self.spec_page_bytes is not None and self.layout.page_bytes != self.spec_page_bytes:
                raise ValueError(f"registered KV pages are {self.layout.page_bytes} B but the KV cache spec "
                                 f"says {self.spec_page_bytes} B; this layout is not supported by pdkv")
            # Chunk headers carry the spec's fingerprint plus how the pages lie in memory (raw
            # bytes move as they are); keys keep the spec's alone, as the scheduler computes them.
            physical = (self.layout.group_layout(self.heads.group_heads) if sliced
                        else getattr(self.layout, "layout", ""))
            self.layout.fingerprint = (_with_physical(self.spec_fingerprint, physical) if physical
                                       else self.spec_fingerprint)
        on_gpu = self.layout.device.type == "cuda"
        # auto: no payload checksum only where the transport itself reports racing reads (shm's
        # slot sequence check) and checksumming would be the only CPU pass over GPU KV.
        guarded = getattr(self.transport, "guards_reads", False)
        self.checksum = self.cfg.checksum == "always" or (self.cfg.checksum == "auto"
                                                         and not (guarded and on_gpu))
        bpc = self.cfg.chunk_size // self.block_size
        slab = self._chunk_bytes(bpc)
        self.pool = StagingPool(slab, SLABS_PER_THREAD * self.cfg.io_threads,
                                pin=self.layout.device.type == "cuda")
        self.namespace = make_namespace(self.model, self.spec_fingerprint or self.layout.fingerprint)  # = the scheduler's
        limit = getattr(self.store, "max_value", None) or getattr(self.store, "budget", None)
        if self.write_through and limit is not None and slab > limit:
            logger.error("pdkv worker rank %d: a chunk is %d B but the %s store holds at most %d B per "
                         "value: every store put will be dropped (counted too_large); lower "
                         "connector.chunk_size, or raise connector.store.size_gb (or, for hf3fs, "
                         "iov_size_mb)", self.rank, slab, getattr(self.store, "location", "?"), limit)
        logger.info("pdkv worker rank %d: %d layers, page %d B, chunk %d tokens = %d B, namespace %s%s%s",
                    self.rank, self.layout.num_layers, self.layout.page_bytes, self.cfg.chunk_size,
                    slab, self.namespace, ", zero-copy transport" if self.zero_copy else "",
                    "" if self.checksum else ", payload checksums off")

    def _keys(self, token_ids: list[int], seed: bytes | None = b"", group: int | None = None) -> list[str]:
        """The prompt's chunk keys of head ``group`` (default: this rank's first); ``seed``:
        ``pd.connector.keys.request_seed`` of the request."""
        g = self.owned[0] if group is None else group
        return [chunk_key(self.namespace, g, h) for h in chunk_hashes(token_ids, self.cfg.chunk_size, seed or b"")]

    def _part(self, group: int) -> tuple[int, int] | None:
        """The slice of this rank's heads that ``group`` is (None: all of them)."""
        return None if self.parts == 1 else (group - self.owned[0], self.parts)

    def _chunk_spans(self, n_tokens: int, first_chunk: int = 0, last_chunk: int = -1):
        """(chunk index, first block offset, n_blocks, n_tokens) for chunks [first, last)."""
        bpc = self.cfg.chunk_size // self.block_size
        n_chunks = -(-n_tokens // self.cfg.chunk_size)
        last = n_chunks if last_chunk < 0 else min(last_chunk, n_chunks)
        for c in range(first_chunk, last):
            toks = min(self.cfg.chunk_size, n_tokens - c * self.cfg.chunk_size)
            yield c, c * bpc, -(-toks // self.block_size), toks

    def _chunk_bytes(self, n_blocks: int) -> int:
        """Bytes of one head group's chunk of ``n_blocks`` blocks."""
        return chunkfmt.HEADER_SIZE + self.layout.chunk_payload_bytes(n_blocks, self.parts)

    # ---- per step ----------------------------------------------------------------------

    def start_step(self, meta: PDMetadata) -> None:
        for req_id in meta.cancels:
            ev = self._cancel.get(req_id)
            if ev is not None:
                ev.set()
        for spec in meta.loads:
            self._cancel[spec.req_id] = threading.Event()
            self.start_load(spec)

    def after_forward(self, meta: PDMetadata) -> None:
        event = None
        if self.layout is not None and self.layout.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        for spec in meta.saves:
            prev = self._save_jobs.get(spec.req_id)
            self._save_jobs[spec.req_id] = self._exec.submit(self._run_save, spec, event, prev)

    def handle_preemptions(self, meta: PDMetadata) -> None:
        # A preempted request's blocks are about to be reused: finish reading them first (a
        # request's jobs run in order, so its latest job finishing means all have).
        for req_id in meta.preempted:
            fut = self._save_jobs.get(req_id)
            if fut is not None:
                fut.result()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        with self._lock:
            # A request that had saves is reported (once) when it has finished and its last
            # save job is done: its blocks can then be freed, final or aborted midway alike.
            self._finished_seen |= {r for r in finished_req_ids if r in self._save_jobs}
            sending = {r for r in self._finished_seen if self._save_jobs[r].done()}
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

    def _run_save(self, spec: SaveSpec, event, prev: Future | None) -> None:
        t0 = time.monotonic()
        if event is not None:
            event.synchronize()
        # Each head group of this rank: its own chunks and its own READY (a consumer rank waits
        # for exactly the groups it holds).
        parts = [self._save_group(spec, group) for group in self.owned]
        if prev is not None:
            prev.result()  # READYs of one request go out in order (jobs never raise)
        last = parts[0][2]
        for group, (xkeys, n_bytes, _) in zip(self.owned, parts):
            ok = self.coord.ready(Ready(pd_id=spec.pd_id, rank=group, keys=xkeys,
                                        n_tokens=len(spec.token_ids), n_bytes=n_bytes,
                                        location=getattr(self.transport, "location", "none"),
                                        instance_id=self.instance_id, chunks_ready=last, final=spec.final,
                                        groups=self.n_groups))
            logger.debug("pd_id=%s: group %d: saved chunks %d..%d (%d B) in %.1f ms, %sready %s", spec.pd_id,
                         group, spec.first_chunk, last - 1, n_bytes, (time.monotonic() - t0) * 1e3,
                         "final " if spec.final else "", "sent" if ok else "NOT delivered")
            self.stats["ready_undelivered"] += not ok  # the coordinator was down: decode will time out
        self.stats["saves"] += spec.final
        self.stats["ready_parts"] += 1
        self.stats["chunks_saved"] += (last - spec.first_chunk) * self.parts

    def _save_group(self, spec: SaveSpec, group: int) -> tuple[list[str], int, int]:
        """Save head ``group``'s chunks of ``spec``; (transport keys, bytes, chunks ready)."""
        keys = self._keys(spec.token_ids, spec.seed, group)
        store = self.stores.get(group)
        to_store = self.write_through and store is not None and spec.seed is not None  # None: not keyed by tokens
        last = len(keys) if spec.last_chunk < 0 else spec.last_chunk
        xkeys = ([transfer_key(spec.pd_id, keys[c]) for c in range(spec.first_chunk, last)]
                 if self.transport is not None else [])
        n_bytes, dropped = 0, 0
        try:
            if self.transport is not None or to_store:
                n_bytes, dropped = self._save_chunks(spec, keys, last, to_store, group)
            if to_store and (self.transport is None or dropped):
                # Decode will read these chunks from the store (there is no transport, or it
                # dropped them: full, or its server down): READY must not overtake the writes.
                store.flush(self.cfg.load_timeout_s)
        except Exception:
            logger.exception("pd_id=%s: saving chunks %d..%d of head group %d failed; decode will recompute "
                             "them", spec.pd_id, spec.first_chunk, last - 1, group)
        return xkeys, n_bytes, last

    def _gather_into(self, view: memoryview, blocks: torch.Tensor, key: str, toks: int, nb: int,
                     part: tuple[int, int] | None = None) -> None:
        """Gather one chunk's blocks (of head group ``part``) into ``view`` (a slot or a staging
        slab) and write its header."""
        layout = self.layout
        slab = torch.frombuffer(view, dtype=torch.uint8)
        if part is None:
            layout.gather(blocks, layout.payload_view(slab, nb))
        else:
            layout.gather(blocks, layout.payload_view(slab, nb, part[1]), part)
        chunkfmt.write_header(view, layout.fingerprint, key_digest(key), toks, nb,
                              len(view) - chunkfmt.HEADER_SIZE, with_checksum=self.checksum)

    def _save_chunks(self, spec: SaveSpec, keys: list[str], last: int, to_store: bool,
                     group: int | None = None) -> tuple[int, int]:
        """Gather and put chunks [spec.first_chunk, last) of head ``group`` (default: this rank's
        first); (bytes, chunks the transport dropped)."""
        group = self.owned[0] if group is None else group
        part, store = self._part(group), self.stores.get(group)
        pool = self.pool
        blocks = torch.tensor(spec.block_ids, dtype=torch.long)
        spans = list(self._chunk_spans(len(spec.token_ids), spec.first_chunk, last))
        n_bytes, dropped = 0, 0
        # Zero-copy: one chunk at a time, each committed as soon as it is gathered (a reserved
        # slot cannot be evicted, so a batch of them could need more than the arena); copy
        # transports: a batch per call.
        step = 1 if self.zero_copy else pool.n_slabs
        for i in range(0, len(spans), step):
            batch = spans[i : i + step]
            sizes = [self._chunk_bytes(nb) for _, _, nb, _ in batch]
            xkeys = [transfer_key(spec.pd_id, keys[c]) for c, *_ in batch]
            slots = self.transport.reserve(xkeys, sizes) if self.zero_copy else [None] * len(batch)
            # Staging slabs only where there is no slot and the bytes must go somewhere.
            staged = [s is None and (not self.zero_copy or to_store) for s in slots]
            with pool.acquire(sum(staged)) as slabs:
                free = iter(slabs)
                views = []
                for (c, b0, nb, toks), slot, stage, size in zip(batch, slots, staged, sizes):
                    view = slot.view if slot is not None else (
                        memoryview(next(free).numpy())[:size] if stage else None)
                    if view is not None:
                        self._gather_into(view, blocks[b0 : b0 + nb], keys[c], toks, nb, part)
                        n_bytes += size
                    views.append(view)
                if to_store:  # the store copies the bytes (before a reader may free a slot)
                    for (c, *_), view in zip(batch, views):
                        if view is not None and not store.put(keys[c], view):
                            self.stats["store_puts_dropped"] += 1
                if self.transport is not None:
                    ok = (self.transport.commit(slots) if self.zero_copy
                          else self.transport.put(xkeys, views))
                    if not all(ok):
                        dropped += ok.count(False)
                        self.stats["transport_dropped"] += ok.count(False)
                        logger.warning("pd_id=%s: transport dropped %d of %d chunks", spec.pd_id,
                                       ok.count(False), len(ok))
        return n_bytes, dropped

    def shutdown(self) -> None:
        for ev in list(self._cancel.values()):
            ev.set()
        self._waits.shutdown(wait=True, cancel_futures=False)  # cancelled waits end within 1 s
        self._exec.shutdown(wait=True, cancel_futures=False)


def _with_physical(spec_fingerprint: bytes, physical: str) -> bytes:
    """The spec's fingerprint combined with the physical page layout."""
    from pd.connector.keys import layout_fingerprint

    return layout_fingerprint(spec=spec_fingerprint.hex(), physical=physical)
