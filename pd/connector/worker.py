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

A worker is built from a ``WorkerConfig``; when vLLM registers its caches it fixes how they become
chunks (``pd.connector.codec``) and starts its ``Loads``.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pd.config import ConnectorConfig
from pd.connector.chunk import Chunking, read_secret
from pd.connector.codec import ChunkCodec
from pd.connector.heads import HeadGroups
from pd.connector.keys import layout_fingerprint, make_namespace, transfer_key
from pd.connector.kv_layout import KVLayout, StagingPool
from pd.connector.load import Loads
from pd.connector.scheduler import PDMetadata, SaveSpec
from pd.coordinator.protocol import Ready
from store.base import KVStore
from transport.base import Transport

logger = logging.getLogger("pd.connector")

# Staging memory per worker: enough slabs to keep one batch in flight per I/O thread.
SLABS_PER_THREAD = 8


@dataclass
class _Part:
    """One head group's part of a save job, for its READY: keys, bytes, chunks ready, timings (ms)."""

    xkeys: list[str] = field(default_factory=list)
    n_bytes: int = 0
    last: int = 0
    gather_ms: float = 0.0
    put_ms: float = 0.0  # transport put/commit (reserve included) and the store's enqueue or flush


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker half is built from (the facade fills it in from vLLM's config)."""

    connector: ConnectorConfig
    rank: int  # the TP rank
    model: str  # the model name, part of the key namespace
    block_size: int
    instance_id: str = ""  # the id its agent registered (FREE goes there); "": connector.instance_id
    # Head groups (pd.connector.heads): the groups this rank saves or loads, each its own chunks,
    # keys, READY/WAIT/DONE and store shard; None: one group, numbered as the rank.
    heads: HeadGroups | None = None
    fingerprint: bytes | None = None  # the KV cache spec's layout fingerprint (the keys use it alone)
    page_bytes: int | None = None  # the spec's page size, checked against the registered caches
    num_blocks: int | None = None  # the KV cache config's block count (locates the block dim)

    @property
    def owned(self) -> tuple[int, ...]:
        return tuple(self.heads.owned) if self.heads is not None else (self.rank,)

    @property
    def groups(self) -> int:
        return self.heads.groups if self.heads is not None else 1

    @property
    def agent_id(self) -> str:
        return self.instance_id or self.connector.instance_id


class WorkerSide:
    """``stores``: head group -> its store shard (missing or None: no store for that group)."""

    def __init__(self, config: WorkerConfig, coordinator, transport: Transport | None,
                 stores: dict[int, KVStore | None] | None = None):
        self.config = config
        self.cfg = config.connector  # read at each use (tests change timeouts of a running worker)
        self.rank = config.rank
        self.instance_id = config.agent_id
        self.coord = coordinator
        self.transport = transport
        # Zero-copy transports hand out slots of shared memory to gather into and scatter from.
        self.zero_copy = transport is not None and transport.zero_copy
        self.stores = {g: (stores or {}).get(g) for g in config.owned}
        self.store = self.stores[config.owned[0]]
        self.write_through = self.store is not None and self.cfg.store.write_through == "always"
        # chunk checksums keyed with the deployment's secret (None: plain xxh3; pd/connector/chunk.py)
        self.secret = read_secret(self.cfg.chunk_secret_file) if self.cfg.chunk_secret_file else None
        # Fixed by register_kv_caches (vLLM registers the caches before the first step).
        self.codec: ChunkCodec | None = None
        self.pool: StagingPool | None = None
        self.loads: Loads | None = None
        self._exec = ThreadPoolExecutor(self.cfg.io_threads, thread_name_prefix="pd-io")
        self._save_jobs: dict[str, Future] = {}  # req -> its latest save job (jobs run in order)
        self._finished_seen: set[str] = set()
        self.stats = {"saves": 0, "chunks_saved": 0, "loads_ok": 0, "loads_failed": 0,
                      "chunks_loaded": 0, "bytes_loaded": 0, "chunk_errors": 0,
                      "store_chunks_loaded": 0, "store_puts_dropped": 0, "transport_dropped": 0,
                      "prefix_loads_ok": 0, "prefix_loads_failed": 0, "ready_parts": 0,
                      "loads_aborted": 0, "load_timeouts": 0, "ready_undelivered": 0, "loads_sync": 0, "store_chunks_in_place": 0}

    @property
    def layout(self) -> KVLayout | None:
        return self.codec.layout if self.codec is not None else None

    # ---- setup -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        c, cfg = self.config, self.cfg
        layout, fingerprint = self._layout(kv_caches)
        on_gpu = layout.device.type == "cuda"
        # auto: no payload checksum only where the transport itself reports racing reads (shm's
        # slot sequence check) and checksumming would be the only CPU pass over GPU KV.
        guarded = self.transport is not None and self.transport.guards_reads
        checksum = (cfg.checksum == "always" or self.secret is not None
                    or (cfg.checksum == "auto" and not (guarded and on_gpu)))
        chunking = Chunking(cfg.chunk_size, c.block_size)
        namespace = make_namespace(c.model, c.fingerprint or fingerprint)  # = the scheduler's
        self.codec = ChunkCodec(layout, chunking, namespace, fingerprint, checksum, c.owned, c.groups, self.secret)
        slab = self.codec.chunk_bytes(chunking.blocks_per_chunk)
        self.pool = StagingPool(slab, SLABS_PER_THREAD * cfg.io_threads, pin=on_gpu)
        self.loads = Loads(self.codec, self.pool, self.coord, self.transport, self.stores, cfg=cfg,
                           instance_id=self.instance_id, io=self._exec, stats=self.stats)
        if self.write_through and slab > self.store.max_value:
            logger.error("pdkv worker rank %d: a chunk is %d B but the %s store holds at most %d B per "
                         "value: every store put will be dropped (counted too_large); lower "
                         "connector.chunk_size, or raise connector.store.size_gb (or, for hf3fs, "
                         "iov_size_mb)", self.rank, slab, self.store.location, self.store.max_value)
        logger.info("pdkv worker rank %d: %d layers, page %d B, chunk %d tokens = %d B, namespace %s%s%s",
                    self.rank, layout.num_layers, layout.page_bytes, cfg.chunk_size,
                    slab, namespace, ", zero-copy transport" if self.zero_copy else "",
                    "" if checksum else ", payload checksums off")

    def _layout(self, kv_caches: dict[str, torch.Tensor]) -> tuple[KVLayout, bytes]:
        """The registered caches and the fingerprint their chunk headers carry."""
        c = self.config
        heads = c.heads.total_heads // c.heads.tp if c.heads is not None else None
        layout = KVLayout(kv_caches, c.block_size, num_blocks=c.num_blocks or None, heads=heads)
        sliced = layout.head_pages is not None
        if len(c.owned) > 1 and not sliced:
            raise ValueError(f"this rank holds {len(c.owned)} KV-head groups but pdkv found no KV-head dim of "
                             f"{heads} heads in the registered caches (layout {layout.layout}); "
                             "cutting chunks by head group is not supported for this layout: use the same "
                             "tensor_parallel_size for prefill and decode")
        if c.fingerprint is None:
            return layout, layout.fingerprint
        if c.page_bytes is not None and layout.page_bytes != c.page_bytes:
            raise ValueError(f"registered KV pages are {layout.page_bytes} B but the KV cache spec "
                             f"says {c.page_bytes} B; this layout is not supported by pdkv")
        # Chunk headers carry the spec's fingerprint plus how the pages lie in memory (raw
        # bytes move as they are); keys keep the spec's alone, as the scheduler computes them.
        physical = layout.group_layout(c.heads.group_heads) if sliced else layout.layout
        return layout, _with_physical(c.fingerprint, physical) if physical else c.fingerprint

    # ---- per step ----------------------------------------------------------------------

    def start_step(self, meta: PDMetadata) -> None:
        self.loads.cancel(meta.cancels)
        for spec in meta.loads:
            if spec.sync:
                self.loads.load_now(spec)
            else:
                self.loads.start(spec)
        for pd_id in meta.unneeded if self.coord is not None else ():
            self._exec.submit(self.coord.abort, pd_id, "decode had the KV in its prefix cache")
        for keys in meta.dropped if self.transport is not None and self.rank == 0 else ():
            self._exec.submit(self._drop, keys)

    def _drop(self, keys: list[str]) -> None:
        """Delete the chunks of a transfer whose decode request ended before loading them."""
        try:
            n = self.transport.delete(keys)
        except Exception:  # (on an I/O thread: nobody reads the future)
            logger.exception("pdkv worker: deleting the chunks of a transfer nobody will load failed")
            return
        logger.info("pdkv worker: %d of %d chunks of a transfer whose request ended before loading them deleted",
                    n, len(keys))

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
        # A request that had saves is reported (once) when it has finished and its last
        # save job is done: its blocks can then be freed, final or aborted midway alike.
        self._finished_seen |= {r for r in finished_req_ids if r in self._save_jobs}
        sending = {r for r in self._finished_seen if self._save_jobs[r].done()}
        self._finished_seen -= sending
        for req_id in sending:
            self._save_jobs.pop(req_id, None)
        return sending, self.loads.take_finished() if self.loads is not None else set()

    def take_load_errors(self) -> set[int]:
        return self.loads.take_errors() if self.loads is not None else set()

    def shutdown(self) -> None:
        if self.loads is not None:
            self.loads.shutdown()
        self._exec.shutdown(wait=True, cancel_futures=False)
        if self.loads is not None:
            self.loads.close()

    # ---- save --------------------------------------------------------------------------

    def _run_save(self, spec: SaveSpec, event, prev: Future | None) -> None:
        t0 = time.monotonic()
        if event is not None:
            event.synchronize()
        # Each head group of this rank: its own chunks and its own READY (a consumer rank waits
        # for exactly the groups it holds).
        parts = [self._save_group(spec, group) for group in self.codec.owned]
        if prev is not None:
            prev.result()  # READYs of one request go out in order (jobs never raise)
        last = parts[0].last
        location = self.transport.location if self.transport is not None else "none"
        for group, part in zip(self.codec.owned, parts):
            ok = self.coord.ready(Ready(pd_id=spec.pd_id, rank=group, keys=part.xkeys,
                                        n_tokens=len(spec.token_ids), n_bytes=part.n_bytes,
                                        location=location,
                                        instance_id=self.instance_id, chunks_ready=last, final=spec.final,
                                        groups=self.codec.groups, part_chunks=last - spec.first_chunk,
                                        gather_ms=round(part.gather_ms, 3), put_ms=round(part.put_ms, 3),
                                        sent_ms=time.time() * 1e3))
            logger.debug("pd_id=%s: group %d: saved chunks %d..%d (%d B) in %.1f ms, %sready %s", spec.pd_id,
                         group, spec.first_chunk, last - 1, part.n_bytes, (time.monotonic() - t0) * 1e3,
                         "final " if spec.final else "", "sent" if ok else "NOT delivered")
            self.stats["ready_undelivered"] += not ok  # the coordinator was down: decode will time out
        self.stats["saves"] += spec.final
        self.stats["ready_parts"] += 1
        self.stats["chunks_saved"] += (last - spec.first_chunk) * self.codec.parts

    def _save_group(self, spec: SaveSpec, group: int) -> _Part:
        """Save head ``group``'s chunks of ``spec``; what its READY says."""
        keys = self.codec.keys(spec.token_ids, spec.seed, group)
        store = self.stores.get(group)
        to_store = self.write_through and store is not None and spec.seed is not None  # None: not keyed by tokens
        last = len(keys) if spec.last_chunk < 0 else spec.last_chunk
        part = _Part([transfer_key(spec.pd_id, keys[c]) for c in range(spec.first_chunk, last)]
                     if self.transport is not None else [], last=last)
        dropped = 0
        try:
            if self.transport is not None or to_store:
                dropped = self._save_chunks(spec, keys, part, to_store, group)
            if to_store and (self.transport is None or dropped):
                # Decode will read these chunks from the store (there is no transport, or it
                # dropped them: full, or its server down): READY must not overtake the writes.
                t = time.perf_counter()
                store.flush(self.cfg.load_timeout_s)
                part.put_ms += (time.perf_counter() - t) * 1e3
        except Exception:
            logger.exception("pd_id=%s: saving chunks %d..%d of head group %d failed; decode will recompute "
                             "them", spec.pd_id, spec.first_chunk, last - 1, group)
        return part

    def _save_chunks(self, spec: SaveSpec, keys: list[str], part: _Part, to_store: bool, group: int) -> int:
        """Gather and put chunks [spec.first_chunk, part.last) of head ``group`` (bytes and times
        into ``part``); how many the transport dropped."""
        codec, store, pool = self.codec, self.stores.get(group), self.pool
        blocks = torch.tensor(spec.block_ids, dtype=torch.long)
        spans = list(codec.chunking.spans(len(spec.token_ids), spec.first_chunk, part.last))
        dropped = 0
        # Zero-copy: one chunk at a time, each committed as soon as it is gathered (a reserved
        # slot cannot be evicted, so a batch of them could need more than the arena); copy
        # transports: a batch per call.
        step = 1 if self.zero_copy else pool.n_slabs
        for i in range(0, len(spans), step):
            batch = spans[i : i + step]
            sizes = [codec.chunk_bytes(nb) for _, _, nb, _ in batch]
            xkeys = [transfer_key(spec.pd_id, keys[c]) for c, *_ in batch]
            t0 = time.perf_counter()
            slots = self.transport.reserve(xkeys, sizes) if self.zero_copy else [None] * len(batch)
            # Staging slabs only where there is no slot and the bytes must go somewhere.
            staged = [s is None and (not self.zero_copy or to_store) for s in slots]
            with pool.acquire(sum(staged)) as slabs:
                free = iter(slabs)
                views = []
                t1 = time.perf_counter()
                for (c, b0, nb, toks), slot, stage, size in zip(batch, slots, staged, sizes):
                    view = slot.view if slot is not None else (
                        memoryview(next(free).numpy())[:size] if stage else None)
                    if view is not None:
                        codec.gather_into(view, blocks[b0 : b0 + nb], keys[c], toks, nb, group)
                        part.n_bytes += size
                    views.append(view)
                t2 = time.perf_counter()
                if to_store:  # the store copies the bytes (before a reader may free a slot)
                    for (c, *_), view in zip(batch, views):
                        if isinstance(view, torch.Tensor):  # a GPU arena's slot: the store wants host bytes
                            view = codec.layout.to_host(view)
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
            part.gather_ms += (t2 - t1) * 1e3  # the header's checksum included
            part.put_ms += (t1 - t0 + time.perf_counter() - t2) * 1e3
        return dropped


def _with_physical(spec_fingerprint: bytes, physical: str) -> bytes:
    """The spec's fingerprint combined with the physical page layout."""
    return layout_fingerprint(spec=spec_fingerprint.hex(), physical=physical)
