"""The connector's two halves without vLLM: real coordinator (ZMQ), real shm transport, CPU caches.

A producer WorkerSide and a consumer WorkerSide share a pool directory, as a prefill and a decode
instance on one host do; the scheduler half is driven with scheduler outputs shaped like vLLM's.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from pd.config import ConnectorConfig, CoordinatorConfig
from pd.connector.scheduler import LoadSpec, PDMetadata, SaveSpec, SchedulerSide
from pd.connector.worker import WorkerConfig, WorkerSide
from pd.coordinator.client import CoordinatorClient
from pd.coordinator.server import Coordinator
from store.config import StoreConfig
from transport.config import TransportConfig
from transport.shm import ShmTransport

BLOCK, CHUNK, NUM_BLOCKS = 4, 8, 64  # 2 blocks per chunk


def _caches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.attn": torch.randn(NUM_BLOCKS, 2, BLOCK, 16, generator=g) for i in range(3)}


@pytest.fixture
def coord():
    c = Coordinator(CoordinatorConfig(port=0)).start_in_thread()
    yield c
    c.stop()


def _worker(tmp_path, coord, seed, store_writer: bool | None = None, **over) -> WorkerSide:
    over.setdefault("io_threads", 2)
    cfg = ConnectorConfig(coordinator=coord.address, chunk_size=CHUNK,
                          transport=TransportConfig(pool_size_mb=8, shm_dir=str(tmp_path), name="w"), **over)
    store = None
    if store_writer is not None:
        from store import make_store

        (tmp_path / "store").mkdir(exist_ok=True)
        cfg.store = StoreConfig(backend="local", paths=[str(tmp_path / "store")], size_gb=0.1)
        store = make_store(cfg.store, 0, writer=store_writer)
    w = WorkerSide(WorkerConfig(cfg, 0, "m", BLOCK, instance_id=f"inst-{seed}"), CoordinatorClient(coord.address),
                   ShmTransport(cfg.transport), {0: store})
    w.caches = _caches(seed)
    w.register_kv_caches(w.caches)
    return w


@pytest.fixture
def pair(tmp_path, coord):
    p, d = _worker(tmp_path, coord, 1), _worker(tmp_path, coord, 2, wait_timeout_s=5)
    yield p, d
    for w in (p, d):
        w.shutdown()
        w.transport.close()


def _until(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _close(*workers: WorkerSide) -> None:
    """Stop workers that have a store: threads, transport, store."""
    for w in workers:
        w.shutdown()
        w.transport.close()
        w.store.close()


def _same_blocks(p, d, src_blocks, dst_blocks) -> bool:
    return all(torch.equal(p.caches[n][src_blocks], d.caches[n][dst_blocks]) for n in p.caches)


PROMPT = list(range(100, 137))  # 37 tokens: 5 chunks, the last partial (5 tokens, 2 blocks)
SRC = list(range(10, 20))  # the producer's blocks of the prompt
DST = list(range(40, 50))


def _save(pd_id, first, last, final, req="p1"):
    return PDMetadata(saves=[SaveSpec(req, pd_id, PROMPT, SRC, first, last, final)])


def test_streamed_chunks_are_loaded_before_the_prompt_is_done(pair, coord):
    p, d = pair
    d.start_step(PDMetadata(loads=[LoadSpec("d1", "x1", PROMPT, DST, 0)]))
    p.after_forward(_save("x1", 0, 2, False))
    # Decode loads the first two chunks while "prefill" still runs, and waits for the rest.
    assert _until(lambda: d.stats["chunks_loaded"] == 0 and _same_blocks(p, d, SRC[:4], DST[:4]))
    assert not d.get_finished(set())[1]
    p.after_forward(_save("x1", 2, 4, False))
    p.after_forward(_save("x1", 4, 5, True))
    assert _until(lambda: "d1" in d.loads._done_recving)
    assert _same_blocks(p, d, SRC, DST)
    assert d.take_load_errors() == set()
    assert d.stats["chunks_loaded"] == 5 and d.stats["loads_ok"] == 1
    assert p.stats["ready_parts"] == 3 and p.stats["chunks_saved"] == 5
    # The consumer deleted what it read: the pool holds nothing of this transfer.
    assert not any(p.transport.exists([k]) [0] for k in [f"xfer/x1/{k}" for k in p.codec.keys(PROMPT)])
    rec = CoordinatorClient(coord.address).query("x1").transfer
    assert rec.ready and rec.done and rec.ok and rec.n_chunks == 5
    assert rec.n_ready_parts == 3 and rec.tail_ms > 0


def test_producer_reports_sending_only_when_finished_and_all_jobs_done(pair):
    p, _ = pair
    p.after_forward(_save("x2", 0, 2, False))
    assert _until(lambda: p._save_jobs["p1"].done())
    assert p.get_finished(set()) == (set(), set())  # not finished yet: blocks stay held
    # Aborted midway (no final save): once vLLM says it finished, its blocks are released.
    assert p.get_finished({"p1", "other"})[0] == {"p1"}
    assert p.get_finished(set())[0] == set() and not p._finished_seen


def test_ready_with_another_token_count_is_refused(pair):
    p, d = pair
    other = SaveSpec("p1", "x3", PROMPT + [1, 2, 3], SRC + [20], 0, -1, True)
    p.after_forward(PDMetadata(saves=[other]))
    d.start_step(PDMetadata(loads=[LoadSpec("d1", "x3", PROMPT, DST, 0)]))
    assert _until(lambda: "d1" in d.loads._done_recving)
    assert d.take_load_errors() == set(DST)
    assert d.stats["loads_failed"] == 1


def test_time_already_waited_in_vllms_queue_counts_against_the_wait_timeout(tmp_path, coord):
    """An early decode that waited in vLLM's queue (its lookup answered None) for the whole
    wait_timeout_s gives up at once when its load goes asynchronous: the decode recomputes."""
    d = _worker(tmp_path, coord, 4, wait_timeout_s=30)
    try:
        t = time.monotonic()
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "late", PROMPT, DST, 0, waited_s=30.0)]))
        assert _until(lambda: "d1" in d.loads._done_recving, 5) and time.monotonic() - t < 5
        assert d.take_load_errors() == set(DST) and d.stats["loads_failed"] == 1
    finally:
        d.shutdown()
        d.transport.close()


def test_wait_timeout_and_cancel_release_the_request(tmp_path, coord):
    d = _worker(tmp_path, coord, 3, wait_timeout_s=0.3)
    try:
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "never", PROMPT, DST, 0)]))
        assert _until(lambda: "d1" in d.loads._done_recving, 5)
        assert d.take_load_errors() == set(DST)
        d.cfg.wait_timeout_s = 60
        d.start_step(PDMetadata(loads=[LoadSpec("d2", "never2", PROMPT, DST, 0)]))
        time.sleep(0.2)
        t0 = time.monotonic()
        d.start_step(PDMetadata(cancels=["d2"]))
        assert _until(lambda: "d2" in d.loads._done_recving, 5)
        assert time.monotonic() - t0 < 3  # waits are 1 s slices
    finally:
        d.shutdown()
        d.transport.close()


def test_stream_broken_midway_recomputes_from_the_missing_chunk(pair):
    p, d = pair
    d.start_step(PDMetadata(loads=[LoadSpec("d1", "x4", PROMPT, DST, 0)]))
    p.after_forward(_save("x4", 0, 2, False))
    assert _until(lambda: _same_blocks(p, d, SRC[:4], DST[:4]))
    # Chunk 2 is lost (evicted, say) before decode reads it; the final READY names the rest.
    held, real = [], p.coord
    p.coord = SimpleNamespace(ready=lambda msg: held.append(msg) or True)
    p.after_forward(_save("x4", 2, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done()) and len(held) == 1
    assert p.transport.delete([f"xfer/x4/{p.codec.keys(PROMPT)[2]}"]) == 1
    real.ready(held[0])
    assert _until(lambda: "d1" in d.loads._done_recving)
    assert d.take_load_errors() == set(DST[4:])
    assert _same_blocks(p, d, SRC[:4], DST[:4])
    assert d.stats["loads_failed"] == 1 and d.stats["chunk_errors"] == 0


def test_local_prefix_hit_loads_only_the_rest(pair):
    p, d = pair
    p.after_forward(_save("x5", 0, 5, True))
    # Decode already holds the first 3 blocks (12 tokens): chunk 1 is loaded from its 2nd block.
    d.start_step(PDMetadata(loads=[LoadSpec("d1", "x5", PROMPT, DST, 12)]))
    assert _until(lambda: "d1" in d.loads._done_recving)
    assert d.take_load_errors() == set()
    assert _same_blocks(p, d, SRC[3:], DST[3:])
    assert not _same_blocks(p, d, SRC[:3], DST[:3])


def test_chunks_the_transport_dropped_are_in_the_store_before_ready(tmp_path, coord):
    """A transport that drops puts (full, its server down): READY waits for the store writes, so
    decode finds every chunk there."""
    p = _worker(tmp_path, coord, 6, store_writer=True)
    d = _worker(tmp_path, coord, 7, store_writer=False)
    real = p.transport.commit
    p.transport.commit = lambda slots, ok=None: (real(slots, [False] * len(slots)), [False] * len(slots))[1]
    write = p.store._write_item  # a slow disk: without the flush, decode would look too early
    p.store._write_item = lambda item: (time.sleep(0.2), write(item))[1]
    try:
        p.after_forward(_save("x6", 0, 5, True))
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "x6", PROMPT, DST, 0)]))
        assert _until(lambda: "d1" in d.loads._done_recving)
        assert d.take_load_errors() == set()
        assert _same_blocks(p, d, SRC, DST)
        assert p.stats["transport_dropped"] == 5 and d.stats["store_chunks_loaded"] == 5
    finally:
        _close(p, d)


def test_store_keys_carry_the_request_seed(tmp_path, coord):
    """KV written for one cache_salt / adapter / image is never loaded for another (prefix reuse)."""
    p = _worker(tmp_path, coord, 8, store_writer=True)
    d = _worker(tmp_path, coord, 9, store_writer=False)
    salt_a, salt_b = b"A" * 16, b"B" * 16
    try:
        p.after_forward(PDMetadata(saves=[SaveSpec("p1", "x8", PROMPT, SRC, 0, -1, True, salt_a)]))
        assert _until(lambda: p._save_jobs["p1"].done())
        p.store.flush(10)
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "", PROMPT, DST, 0, salt_b)]))  # another tenant
        assert _until(lambda: "d1" in d.loads._done_recving)
        assert d.take_load_errors() == set(DST) and not _same_blocks(p, d, SRC[:1], DST[:1])
        d.start_step(PDMetadata(loads=[LoadSpec("d2", "", PROMPT, DST, 0, salt_a)]))
        assert _until(lambda: "d2" in d.loads._done_recving)
        assert d.take_load_errors() == set() and _same_blocks(p, d, SRC, DST)
        # A request whose KV is not keyed by its tokens (seed None) is not written to the store.
        puts = p.store.stats.get("puts", None)
        p.after_forward(PDMetadata(saves=[SaveSpec("p2", "x9", PROMPT, SRC, 0, -1, True, None)]))
        assert _until(lambda: p._save_jobs["p2"].done())
        assert p.store.stats.get("puts", None) == puts
    finally:
        _close(p, d)


def test_scheduler_looks_up_the_store_with_the_request_seed():
    class Store:
        def __init__(self):
            self.asked = []

        def contains(self, keys):
            self.asked.append(keys)
            return 0

    store = Store()
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, store=store, namespace="ns", chunk_size=CHUNK)
    base = dict(prompt_token_ids=PROMPT, kv_transfer_params=None, lora_request=None, mm_features=[],
                prompt_embeds=None)
    s.get_num_new_matched_tokens(SimpleNamespace(request_id="a", cache_salt="t1", **base), 0)
    s.get_num_new_matched_tokens(SimpleNamespace(request_id="b", cache_salt="t2", **base), 0)
    s.get_num_new_matched_tokens(SimpleNamespace(request_id="c", cache_salt=None, **base), 0)
    assert len(store.asked) == 3 and len({tuple(k) for k in store.asked}) == 3
    s.get_num_new_matched_tokens(SimpleNamespace(request_id="e", cache_salt=None,
                                                 **{**base, "prompt_embeds": object()}), 0)
    assert len(store.asked) == 3  # prompt embeddings: no lookup


# ---- the scheduler half's chunked-prefill streaming -----------------------------------------


def _req(req_id, prompt, pd_id="x"):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=prompt,
                           kv_transfer_params={"pd_id": pd_id, "do_remote_decode": True})


def _step(new=(), cached=(), scheduled=None):
    ids = [c[0] for c in cached]
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=n) for r, b, n in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=ids, new_block_ids=[(b,) for _, b, _ in cached],
                                              resumed_req_ids=set(), num_computed_tokens=[n for *_, n in cached]),
        num_scheduled_tokens=scheduled or {}, preempted_req_ids=set())


def test_scheduler_streams_chunks_as_chunked_prefill_completes_them():
    s = SchedulerSide(BLOCK, is_producer=True, is_consumer=False, chunk_size=CHUNK)
    s.on_new_request(_req("r", PROMPT))
    m1 = s.build_connector_meta(_step(new=[("r", [0, 1, 2, 3], 0)], scheduled={"r": 16}))
    assert [(x.first_chunk, x.last_chunk, x.final, x.block_ids) for x in m1.saves] == [(0, 2, False, [0, 1, 2, 3])]
    assert s.request_finished(SimpleNamespace(request_id="other"), [])[0] is False
    m2 = s.build_connector_meta(_step(cached=[("r", [4, 5], 16)], scheduled={"r": 6}))  # 22 tokens: chunk 2 not done
    assert m2.saves == []
    m3 = s.build_connector_meta(_step(cached=[("r", [6, 7, 8, 9], 22)], scheduled={"r": 15}))
    assert [(x.first_chunk, x.last_chunk, x.final) for x in m3.saves] == [(2, 5, True)]
    assert m3.saves[0].block_ids == list(range(10))
    assert s.request_finished(SimpleNamespace(request_id="r"), [])[0] is True  # blocks held


def test_scheduler_holds_blocks_of_a_request_aborted_after_a_partial_save():
    s = SchedulerSide(BLOCK, is_producer=True, is_consumer=False, chunk_size=CHUNK)
    s.on_new_request(_req("r", PROMPT))
    assert s.build_connector_meta(_step(new=[("r", [0, 1], 0)], scheduled={"r": 8})).saves
    assert s.request_finished(SimpleNamespace(request_id="r"), [])[0] is True
    s.on_new_request(_req("q", PROMPT))
    assert not s.build_connector_meta(_step(new=[("q", [0], 0)], scheduled={"q": 4})).saves
    assert s.request_finished(SimpleNamespace(request_id="q"), [])[0] is False  # nothing read yet


def _decode_req(req_id, prompt, pd_id, kv=None):
    p = {"pd_id": pd_id, "do_remote_prefill": True, **({"kv_tokens": kv} if kv is not None else {})}
    return SimpleNamespace(request_id=req_id, prompt_token_ids=prompt, kv_transfer_params=p, lora_request=None,
                           mm_features=[], prompt_embeds=None, cache_salt=None)


def test_decode_loads_kv_tokens_of_a_prompt_that_ends_with_token_1():
    """First-token path: the prompt is the prefill's plus token 1; the transfer covers kv_tokens."""
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, chunk_size=CHUNK)
    prompt = PROMPT + [7]
    req = _decode_req("d", prompt, "p1", kv=len(PROMPT))
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT), True)
    s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (list(range(10)),)), len(PROMPT))
    (spec,) = s.build_connector_meta(_step()).loads
    assert spec.token_ids == PROMPT and spec.start_token == 0  # keys over the prefill's prompt
    bad = _decode_req("e", prompt, "p2", kv=len(prompt) + 5)  # out of range: the whole prompt
    assert s.get_num_new_matched_tokens(bad, 0) == (len(prompt), True)


def test_a_transfer_the_decode_has_in_its_prefix_cache_is_aborted_not_left_to_expire(tmp_path, coord):
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, chunk_size=CHUNK)
    whole = PROMPT[: 2 * BLOCK]  # whole blocks: the local prefix cache can hold all of it
    req = _decode_req("d", whole + [7], "cached", kv=len(whole))
    assert s.get_num_new_matched_tokens(req, len(whole)) == (0, False)
    assert s.get_num_new_matched_tokens(req, len(whole)) == (0, False)  # asked again next step: once
    meta = s.build_connector_meta(_step())
    assert meta.unneeded == ["cached"] and meta.loads == []
    assert s.build_connector_meta(_step()).unneeded == []
    d = _worker(tmp_path, coord, seed=2)
    try:
        d.start_step(meta)
        c = CoordinatorClient(coord.address)
        try:
            assert _until(lambda: c.query().counters.get("aborts", 0) >= 1)
        finally:
            c.close()
    finally:
        d.shutdown()


def test_store_chunks_keyed_with_another_secret_are_never_loaded(tmp_path, coord):
    """connector.chunk_secret_file (issue 18): chunks another client of a shared store wrote
    without this deployment's secret (here: with another) are misses, recomputed, never loaded."""
    secrets = {}
    for name in ("ours", "theirs"):
        secrets[name] = tmp_path / f"{name}.secret"
        secrets[name].write_bytes(name.encode() * 8)
        secrets[name].chmod(0o600)
    theirs = _worker(tmp_path, coord, 12, store_writer=True, chunk_secret_file=str(secrets["theirs"]))
    readers = [_worker(tmp_path, coord, 13 + i, store_writer=False, **over)
               for i, over in enumerate(({"chunk_secret_file": str(secrets["ours"])}, {},
                                         {"chunk_secret_file": str(secrets["theirs"])}))]
    try:
        theirs.after_forward(PDMetadata(saves=[SaveSpec("p1", "x12", PROMPT, SRC, 0, -1, True, b"S" * 16)]))
        assert _until(lambda: theirs._save_jobs["p1"].done())
        theirs.store.flush(10)
        for i, d in enumerate(readers):
            d.start_step(PDMetadata(loads=[LoadSpec("d1", "", PROMPT, DST, 0, b"S" * 16)]))
            assert _until(lambda: "d1" in d.loads._done_recving)
            if i < 2:  # another secret, or none: every block recomputed, none loaded
                assert d.take_load_errors() == set(DST) and d.stats["chunk_errors"] >= 1
                assert not _same_blocks(theirs, d, SRC[:1], DST[:1])
            else:  # the same secret: loaded
                assert d.take_load_errors() == set() and _same_blocks(theirs, d, SRC, DST)
    finally:
        _close(theirs, *readers)


def _tiered_worker(tmp_path, coord, seed, writer: bool, **over) -> WorkerSide:
    """A worker whose store has the DRAM tier (in ``tmp_path``/shm, shared by the workers of a test)."""
    from store.local import LocalStore
    from store.tiered import TieredStore, make_dram

    (tmp_path / "store").mkdir(exist_ok=True)
    over.setdefault("io_threads", 2)
    cfg = ConnectorConfig(coordinator=coord.address, chunk_size=CHUNK,
                          transport=TransportConfig(pool_size_mb=8, shm_dir=str(tmp_path), name="w"), **over)
    cfg.store = StoreConfig(backend="local", paths=[str(tmp_path / "store")], size_gb=0.1, dram_gb=0.004)
    store = TieredStore(LocalStore(cfg.store, writer=writer), make_dram(cfg.store, str(tmp_path / "shm")), 2)
    w = WorkerSide(WorkerConfig(cfg, 0, "m", BLOCK, instance_id=f"inst-{seed}"), CoordinatorClient(coord.address),
                   ShmTransport(cfg.transport), {0: store})
    w.caches = _caches(seed)
    w.register_kv_caches(w.caches)
    return w


def _dropping_transport(p: WorkerSide) -> None:
    real = p.transport.commit
    p.transport.commit = lambda slots, ok=None: (real(slots, [False] * len(slots)), [False] * len(slots))[1]


@pytest.mark.parametrize("evicted", [False, True])
def test_store_chunks_in_the_dram_tier_are_scattered_in_place(tmp_path, coord, evicted):
    """The decode's fallback reads the DRAM tier's chunks in place (no copy into a staging slab);
    a chunk whose entry changed while it was scattered (an eviction raced the read) fails the
    load from that chunk on, and vLLM recomputes those blocks."""
    p = _tiered_worker(tmp_path, coord, 8, writer=True)
    d = _tiered_worker(tmp_path, coord, 9, writer=False, wait_timeout_s=5)
    _dropping_transport(p)
    dram, acquire = d.store.dram, d.store.dram.acquire
    held = []

    def watch(key):
        r = acquire(key)
        held.append(r)
        if evicted and r is not None and len(held) == 3:
            dram._stamp[r.entry] += 4  # a writer took the entry meanwhile: a new seq
        return r

    dram.acquire = watch
    copies = d.store.dram.stats["dram_get_bytes"]
    try:
        p.after_forward(_save("x8", 0, 5, True))
        d.start_step(PDMetadata(loads=[LoadSpec("d8", "x8", PROMPT, DST, 0)]))
        assert _until(lambda: "d8" in d.loads._done_recving)
        assert len([r for r in held if r is not None]) == 5 and d.store.disk.stats["hits"] == 0
        if evicted:
            assert d.take_load_errors() == set(DST[4:])  # chunks 0-1 good; from chunk 2 on: recomputed
            assert _same_blocks(p, d, SRC[:4], DST[:4]) and dram.stats["dram_torn"] == 1
        else:
            assert d.take_load_errors() == set() and _same_blocks(p, d, SRC, DST)
            assert d.stats["store_chunks_loaded"] == d.stats["store_chunks_in_place"] == 5
            assert dram.stats["dram_hits"] == 5
            assert dram.stats["dram_get_bytes"] - copies == sum(len(r.view) for r in held)
    finally:
        _close(p, d)


LONG = list(range(300, 400))  # 100 tokens: 13 chunks (25 blocks), in 7 batches of 2 with io_threads 1
LSRC, LDST = list(range(0, 25)), list(range(30, 55))


def _write_long_prefix(w: WorkerSide, pd_id: str) -> None:
    w.after_forward(PDMetadata(saves=[SaveSpec("p1", pd_id, LONG, LSRC, 0, -1, True, b"L" * 16)]))
    assert _until(lambda: w._save_jobs["p1"].done())
    w.store.flush(10)


@pytest.mark.parametrize("tiered", [False, True])
def test_a_prefix_from_the_store_loads_batches_read_while_the_last_is_scattered(tmp_path, coord, tiered):
    """Prefix reuse (no transfer): the store's chunks come in batches, each read by a helper
    thread while the one before is scattered; the blocks are the writer's, in place from the DRAM
    tier or copied from disk."""
    make = (lambda s, wr, **o: _tiered_worker(tmp_path, coord, s, wr, io_threads=1, **o)) if tiered else \
        (lambda s, wr, **o: _worker(tmp_path, coord, s, store_writer=wr, io_threads=1, **o))
    p, d = make(20, True), make(21, False)
    threads: dict[str, list[str]] = {"read": [], "scatter": []}
    for what, name in (("read", "_read_store"), ("scatter", "_scatter")):
        real = getattr(d.loads, name)
        setattr(d.loads, name, lambda *a, _r=real, _w=what: (threads[_w].append(threading.current_thread().name), _r(*a))[1])
    try:
        assert d.pool.n_slabs == 8  # 2 chunks a batch (a quarter of the pool), two batches in flight
        _write_long_prefix(p, "x20")
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "", LONG, LDST, 0, b"L" * 16)]))
        assert _until(lambda: "d1" in d.loads._done_recving)
        assert d.take_load_errors() == set() and _same_blocks(p, d, LSRC, LDST)
        assert d.stats["store_chunks_loaded"] == 13 and d.stats["prefix_loads_ok"] == 1
        assert d.stats["store_chunks_in_place"] == (13 if tiered else 0)
        # the first batch read by the load's own I/O thread, the 6 others by the helper thread
        # (the pool had their slabs free), 13 chunks scattered by the load's thread
        assert len(threads["read"]) == 7 and threads["read"][0].startswith("pd-io")
        assert all(n.startswith("pd-prefetch") for n in threads["read"][1:])
        assert len(threads["scatter"]) == 13 and all(n.startswith("pd-io") for n in threads["scatter"])
    finally:
        _close(p, d)


@pytest.mark.parametrize("bad_chunk", [1, 6, 12])
def test_a_bad_chunk_stops_a_store_load_there_and_every_in_place_read_is_released(tmp_path, coord, bad_chunk):
    """A chunk that fails its checks mid-load: the chunks before it stay loaded, its blocks and
    the rest are recomputed, and the DRAM tier's in-place reads of the batch being scattered and
    of the one being read meanwhile are all given back (none left holding an entry)."""
    p = _tiered_worker(tmp_path, coord, 22, True)
    d = _tiered_worker(tmp_path, coord, 23, False, io_threads=1)
    acquired, released = [], []
    acquire, release = d.store.acquire, d.store.release

    def watch(keys):
        got = acquire(keys)
        acquired.extend(r for r in got if r is not None)
        return got

    d.store.acquire = watch
    d.store.release = lambda reads: (released.extend(reads), release(reads))[1]
    bad_key = d.codec.keys(LONG, b"L" * 16)[bad_chunk]
    check = d.loads._check
    d.loads._check = lambda view, key, size, nb: "planted" if key == bad_key else check(view, key, size, nb)
    try:
        _write_long_prefix(p, "x22")
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "", LONG, LDST, 0, b"L" * 16)]))
        assert _until(lambda: "d1" in d.loads._done_recving)
        first_bad = 2 * bad_chunk  # 2 blocks a chunk
        assert d.take_load_errors() == set(LDST[first_bad:])
        assert _same_blocks(p, d, LSRC[:first_bad], LDST[:first_bad])
        assert len(acquired) >= min(13, 2 * (bad_chunk // 2 + 1)) and sorted(map(id, released)) == sorted(map(id, acquired))
        assert _until(lambda: len(d.pool._free) == d.pool.n_slabs)  # every staging slab back
    finally:
        _close(p, d)


def test_the_next_batch_is_read_while_this_one_is_scattered(tmp_path, coord):
    """The overlap itself: the first scatter waits (up to 10 s) for the second batch's read to
    end; batch after batch, that read would only start after this scatter."""
    p, d = _worker(tmp_path, coord, 24, store_writer=True), _worker(tmp_path, coord, 25, store_writer=False,
                                                                     io_threads=1)
    reads, second_read = [], threading.Event()
    read_store, scatter = d.loads._read_store, d.loads._scatter
    waited: list[bool] = []

    def counting_read(*a):
        read_store(*a)
        reads.append(1)
        if len(reads) == 2:
            second_read.set()

    def waiting_scatter(*a):
        if not waited:
            waited.append(second_read.wait(10))
        return scatter(*a)

    d.loads._read_store, d.loads._scatter = counting_read, waiting_scatter
    try:
        _write_long_prefix(p, "x24")
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "", LONG, LDST, 0, b"L" * 16)]))
        assert _until(lambda: "d1" in d.loads._done_recving, 30)
        assert waited == [True] and d.take_load_errors() == set() and _same_blocks(p, d, LSRC, LDST)
    finally:
        _close(p, d)


def test_a_store_load_with_no_free_slabs_for_the_next_batch_reads_it_after_the_scatter(tmp_path, coord):
    """Slabs held by other jobs: the load does not wait for them while it holds its own (no
    deadlock between jobs sharing the pool); it reads the next batch once this one is done."""
    p, d = _worker(tmp_path, coord, 26, store_writer=True), _worker(tmp_path, coord, 27, store_writer=False,
                                                                     io_threads=1)
    try:
        _write_long_prefix(p, "x26")
        others = d.pool.take(6)  # another job's: 2 of 8 left, one batch
        try:
            d.start_step(PDMetadata(loads=[LoadSpec("d1", "", LONG, LDST, 0, b"L" * 16)]))
            assert _until(lambda: "d1" in d.loads._done_recving, 30)
        finally:
            d.pool.give(others)  # (a load stuck waiting for them would hang the shutdown below)
        assert d.take_load_errors() == set() and _same_blocks(p, d, LSRC, LDST)
        assert len(d.pool._free) == 8
    finally:
        _close(p, d)
