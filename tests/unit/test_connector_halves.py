"""The connector's scheduler and worker halves driven through vLLM's own objects.

vLLM's ``Request``, ``SchedulerOutput``/``NewRequestData``/``CachedRequestData``, ``KVCacheBlocks``
and ``KVConnectorOutput`` carry each step to ``SchedulerSide``, whose metadata goes to real
``WorkerSide``s (real coordinator over ZMQ, real shm transport, CPU caches), in the order vLLM's
engine calls the hooks: preemption during a save, an abort while waiting for READY and while
loading, a load that times out.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from pd.connector.scheduler import LoadStatus, SchedulerSide
from pd.coordinator.client import CoordinatorClient
from tests.unit.test_connector_worker import (  # noqa: F401
    BLOCK,
    CHUNK,
    DST,
    PROMPT,
    SRC,
    _until,
    _worker,
    coord,
)

N_BLOCKS = -(-len(PROMPT) // BLOCK)  # 10


def _request(req_id: str, pd_id: str, role: str) -> Request:
    params = {"pd_id": pd_id, "do_remote_decode": True} if role == "prefill" else \
        {"pd_id": pd_id, "do_remote_prefill": True}
    return Request(req_id, list(PROMPT), SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params}),
                   None)


def _output(new=(), cached=(), resumed=(), preempted=()) -> SchedulerOutput:
    """A step: ``new`` [(request, blocks, computed, scheduled)], ``cached`` [(req_id, new blocks,
    computed, scheduled)] (``resumed``: those whose blocks are all new), ``preempted`` req ids."""
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = [NewRequestData.from_request(r, (list(b),)) for r, b, _, _ in new]
    for (r, _, computed, _), n in zip(new, so.scheduled_new_reqs):
        n.num_computed_tokens = computed
    c = CachedRequestData.make_empty()
    c.req_ids = [r for r, *_ in cached]
    c.resumed_req_ids = set(resumed)
    c.new_block_ids = [(list(b),) for _, b, _, _ in cached]
    c.num_computed_tokens = [n for _, _, n, _ in cached]
    c.num_output_tokens = [0] * len(cached)
    c.new_token_ids = [[] for _ in cached]
    so.scheduled_cached_reqs = c
    so.num_scheduled_tokens = {**{r.request_id: s for r, _, _, s in new}, **{r: s for r, _, _, s in cached}}
    so.total_num_scheduled_tokens = sum(so.num_scheduled_tokens.values())
    so.preempted_req_ids = set(preempted)
    return so


def _blocks(ids) -> KVCacheBlocks:
    return KVCacheBlocks((([KVCacheBlock(i) for i in ids]),))


@pytest.fixture
def workers(tmp_path, coord):  # noqa: F811 - the coordinator fixture
    made = []

    def make(seed, **over):
        w = _worker(tmp_path, coord, seed, **over)
        made.append(w)
        return w

    yield make
    for w in made:
        w.shutdown()
        w.transport.close()


def _slow(worker, what: str, seconds: float, first: threading.Event | None = None) -> list[float]:
    """Make ``worker.layout.<what>`` (gather or scatter: the device copy) take ``seconds`` per
    call; returns the times of the calls' ends."""
    real = getattr(worker.layout, what)
    ends: list[float] = []

    def slow(*a, **k):
        time.sleep(seconds)
        out = real(*a, **k)
        ends.append(time.monotonic())
        if first is not None:
            first.set()
        return out

    setattr(worker.layout, what, slow)
    return ends


def _consumer_load(s: SchedulerSide, req: Request):
    """The consumer scheduler's steps for a new remote-prefill request: its metadata."""
    n, is_async = s.get_num_new_matched_tokens(req, 0)
    assert (n, is_async) == (len(PROMPT), True)
    s.update_state_after_alloc(req, _blocks(DST), n)
    meta = s.build_connector_meta(_output())
    assert [(x.req_id, x.block_ids) for x in meta.loads] == [(req.request_id, DST)]
    return meta


def _abort(s: SchedulerSide, req: Request):
    """vLLM aborts a request waiting for remote KV: ``request_finished``, then the next step."""
    assert s.request_finished(req, DST) == (False, None)  # vLLM itself holds WAITING_FOR_REMOTE_KVS blocks
    meta = s.build_connector_meta(_output())
    assert meta.cancels == [req.request_id]
    return meta


def _received(d, s, req_id: str, timeout: float = 10.0) -> float:
    """Wait until the worker reports ``req_id`` received; pass it to the scheduler (as vLLM's
    KVConnectorOutput); the time it was seen."""
    got: set[str] = set()
    assert _until(lambda: bool(got.update(d.get_finished(set())[1]) or req_id in got), timeout)
    s.update_connector_output(KVConnectorOutput(finished_recving={req_id}))
    assert req_id not in s._reqs or s._reqs[req_id].load is not LoadStatus.LOADING
    return time.monotonic()


def _record(coord, pd_id: str):  # noqa: F811
    """The coordinator's record of ``pd_id`` once its DONE is in (sent just after the release)."""
    client = CoordinatorClient(coord.address)
    assert _until(lambda: (r := client.query(pd_id).transfer) is not None and r.done, 5)
    return client.query(pd_id).transfer


def test_preemption_during_a_save_holds_the_blocks_and_resume_publishes_fresh_chunks(workers, coord):  # noqa: F811
    p, d = workers(1), workers(2, wait_timeout_s=10)
    s = SchedulerSide(BLOCK, is_producer=True, is_consumer=False, chunk_size=CHUNK)
    req = _request("r", "pre1", "prefill")
    truth = {n: t[SRC].clone() for n, t in p.caches.items()}  # the prompt's KV, wherever it is computed
    s.on_new_request(req)
    m1 = s.build_connector_meta(_output(new=[(req, SRC[:4], 0, 16)]))  # chunks 0-1 computed
    assert [(x.first_chunk, x.last_chunk, x.block_ids) for x in m1.saves] == [(0, 2, SRC[:4])]
    gate = threading.Event()
    real_gather = p.layout.gather
    p.layout.gather = lambda *a, **k: (gate.wait(10), real_gather(*a, **k))[1]  # a slow device copy
    p.after_forward(m1)
    # The next step preempts r: vLLM frees its blocks, the worker must finish reading them first.
    m2 = s.build_connector_meta(_output(preempted=["r"]))
    assert m2.preempted == ["r"] and not m2.saves
    th = threading.Thread(target=p.handle_preemptions, args=(m2,))
    th.start()
    th.join(0.5)
    assert th.is_alive()  # still reading the blocks: the step (and their reuse) waits
    gate.set()
    th.join(10)
    assert not th.is_alive() and p._save_jobs["r"].done()
    for t in p.caches.values():  # the blocks now hold another request's KV
        t[SRC] = torch.randn_like(t[SRC])
    # Resumed in new blocks, recomputed from token 0: only the chunks not yet sent are saved, from
    # the new blocks.
    new_blocks = list(range(20, 30))
    for n, t in p.caches.items():
        t[new_blocks] = truth[n]
    m3 = s.build_connector_meta(_output(cached=[("r", new_blocks[:4], 0, 16)], resumed=["r"]))
    assert not m3.saves  # chunks 0-1 went out before the preemption: not again, from these blocks
    p.after_forward(m3)
    m4 = s.build_connector_meta(_output(cached=[("r", new_blocks[4:], 16, len(PROMPT) - 16)]))
    assert [(x.first_chunk, x.last_chunk, x.final, x.block_ids) for x in m4.saves] == [(2, 5, True, new_blocks)]
    p.after_forward(m4)
    assert s.request_finished(req, new_blocks) == (True, None)  # held until the sends are done
    assert _until(lambda: "r" in p.get_finished({"r"})[0])
    dreq = _request("d", "pre1", "decode")
    sd = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, chunk_size=CHUNK)
    d.start_step(_consumer_load(sd, dreq))
    _received(d, sd, "d")
    assert d.take_load_errors() == set()
    assert all(torch.equal(d.caches[n][DST], truth[n]) for n in truth)  # every chunk is the prompt's KV


def test_abort_while_waiting_releases_the_blocks_and_tells_the_coordinator(workers, coord):  # noqa: F811
    p, d = workers(1), workers(2, wait_timeout_s=60)
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, chunk_size=CHUNK)
    req = _request("d", "ab1", "decode")
    before = {n: t[DST].clone() for n, t in d.caches.items()}
    d.start_step(_consumer_load(s, req))
    time.sleep(0.3)  # parked at the coordinator
    t0 = time.monotonic()
    d.start_step(_abort(s, req))
    assert _received(d, s, "d", 5) - t0 < 3
    assert d.take_load_errors() == set(DST)
    rec = _record(coord, "ab1")
    assert rec.done and not rec.ok and "aborted" in rec.error
    # The prefill's READY comes late: nothing is loaded into the (freed) blocks.
    from tests.unit.test_connector_worker import _save

    p.after_forward(_save("ab1", 0, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done())
    time.sleep(0.5)
    assert all(torch.equal(d.caches[n][DST], before[n]) for n in before)
    assert d.stats["chunks_loaded"] == 0 and d.stats["loads_failed"] == 1


def test_abort_during_a_load_stops_it_and_nothing_is_loaded_after(workers, coord):  # noqa: F811
    p, d = workers(1), workers(2, wait_timeout_s=10)
    from tests.unit.test_connector_worker import _save

    p.after_forward(_save("ab2", 0, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done())
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, chunk_size=CHUNK)
    req = _request("d", "ab2", "decode")
    first = threading.Event()
    ends = _slow(d, "scatter", 0.5, first)  # 5 chunks: 2.5 s in all
    d.start_step(_consumer_load(s, req))
    assert first.wait(5)
    t0 = time.monotonic()
    d.start_step(_abort(s, req))
    done_at = _received(d, s, "d", 5)
    n_done = len(ends)
    assert done_at - t0 < 1.2 and n_done <= 2  # stopped at the next chunk, not after all five
    time.sleep(1.2)
    assert len(ends) == n_done and max(ends) <= done_at  # no copy into the blocks once released
    loaded = n_done * CHUNK // BLOCK
    assert d.take_load_errors() == set(DST[loaded:])
    assert d.stats["loads_aborted"] == 1 and d.stats["loads_ok"] == 0
    rec = _record(coord, "ab2")
    assert rec.done and not rec.ok and "aborted" in rec.error


def test_load_timeout_recomputes_the_rest_and_is_counted(workers, coord):  # noqa: F811
    p, d = workers(1), workers(2, wait_timeout_s=10, load_timeout_s=0.4)
    from tests.unit.test_connector_worker import _same_blocks, _save

    p.after_forward(_save("lt1", 0, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done())
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, chunk_size=CHUNK)
    _slow(d, "scatter", 0.25)  # a slow device: 5 chunks take 1.25 s, the budget is 0.4 s
    d.start_step(_consumer_load(s, _request("d", "lt1", "decode")))
    _received(d, s, "d")
    bad = d.take_load_errors()
    assert bad and bad == set(DST[DST.index(min(bad)):])  # a tail of the blocks: recomputed by vLLM
    good = DST.index(min(bad))
    assert good >= CHUNK // BLOCK and _same_blocks(p, d, SRC[:good], DST[:good])
    assert d.stats["load_timeouts"] == 1 and d.stats["loads_failed"] == 1
    rec = _record(coord, "lt1")
    assert rec.done and not rec.ok and "timed out" in rec.error
    assert CoordinatorClient(coord.address).query("").counters["done_failed"] == 1


# ---- synchronous loads (connector.sync_load: ready) -------------------------------------------

def _first_token_request(req_id: str, pd_id: str) -> Request:
    """A decode request of the first-token path: the prompt plus token 1, KV for the prompt."""
    params = {"pd_id": pd_id, "do_remote_prefill": True, "kv_tokens": len(PROMPT)}
    return Request(req_id, list(PROMPT) + [7], SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": params}),
                   None)


def _sync_scheduler(d) -> SchedulerSide:
    """A decode scheduler half that checks the worker's shm pool, as the facade builds it."""
    from transport import published_check
    from transport.config import TransportConfig

    shm_dir, name = d.transport.path.rsplit("/pdkv-", 1)  # <shm_dir>/pdkv-<name>
    return SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace=d.codec.namespace, chunk_size=CHUNK,
                         published=published_check(TransportConfig(shm_dir=shm_dir, name=name)))


def test_a_published_transfer_loads_within_the_step_without_a_wait(workers, coord):  # noqa: F811
    from tests.unit.test_connector_worker import _same_blocks, _save

    p, d = workers(1), workers(2, wait_timeout_s=10)
    s = _sync_scheduler(d)
    req = _first_token_request("d", "sy1")
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT), True)  # nothing published yet: async
    p.after_forward(_save("sy1", 0, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done())
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT), False)  # all published: in the step
    s.update_state_after_alloc(req, _blocks(DST), len(PROMPT))
    meta = s.build_connector_meta(_output())
    assert [(x.req_id, x.sync) for x in meta.loads] == [("d", True)]
    assert s._reqs["d"].load is LoadStatus.LOADED  # no finished_recving will come for it
    d.start_step(meta)  # returns once the KV is in the blocks (the forward comes next)
    assert _same_blocks(p, d, SRC, DST)
    assert d.get_finished(set()) == (set(), set()) and d.take_load_errors() == set()
    assert d.stats["loads_sync"] == 1 and d.stats["loads_ok"] == 1
    rec = _record(coord, "sy1")
    assert rec.ok and rec.sync_load and rec.n_chunks == 5 and "wait_first" not in [e.name for e in rec.timeline]
    assert s.request_finished(req, DST) == (False, None)
    assert s.build_connector_meta(_output()).cancels == []


def test_a_synchronous_load_that_misses_reports_its_blocks_in_the_same_step(workers, coord):  # noqa: F811
    """A chunk evicted between the scheduler's look and the load: the blocks from it on are
    errors before the forward's output is taken (vLLM then recomputes them)."""
    from tests.unit.test_connector_worker import _save

    p, d = workers(1), workers(2, wait_timeout_s=10)
    p.after_forward(_save("sy2", 0, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done())
    s = _sync_scheduler(d)
    req = _first_token_request("d", "sy2")
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT), False)
    from pd.connector.keys import transfer_key

    third = transfer_key("sy2", d.codec.keys(PROMPT, b"")[2])
    assert p.transport.delete([third]) == 1
    s.update_state_after_alloc(req, _blocks(DST), len(PROMPT))
    d.start_step(s.build_connector_meta(_output()))
    assert d.take_load_errors() == set(DST[4:])  # chunks 0 and 1 (4 blocks) loaded
    assert d.get_finished(set())[1] == set()
    rec = _record(coord, "sy2")
    assert not rec.ok and "chunk 2" in rec.error


def test_sync_needs_every_group_published_and_a_token_left_to_compute():
    asked: list[list[str]] = []

    def published(keys):
        asked.append(list(keys))
        return True

    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace="ns", chunk_size=CHUNK,
                      published=published, groups=2)
    assert s.get_num_new_matched_tokens(_first_token_request("a", "g1"), 0) == (len(PROMPT), False)
    n_chunks = -(-len(PROMPT) // CHUNK)
    assert len(asked[0]) == 2 * n_chunks and {k.split("/")[-2] for k in asked[0]} == {"0", "1"}
    assert all(k.startswith("xfer/g1/ns/") for k in asked[0])
    # A whole-prompt transfer (the early decode, the old flow; no kv_tokens): synchronous too,
    # vLLM told one token fewer, the prompt's last, which it computes itself.
    assert s.get_num_new_matched_tokens(_request("b", "g2", "decode"), 0) == (len(PROMPT) - 1, False)
    assert len(asked) == 2
    # A local prefix hit of all but the last token: nothing to load, the transfer is not needed.
    s2 = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace="ns", chunk_size=8,
                       published=published)
    req = Request("e", list(range(9)), SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {
        "pd_id": "g5", "do_remote_prefill": True}}), None)
    assert s2.get_num_new_matched_tokens(req, 8) == (0, False) and s2.build_connector_meta(_output()).unneeded == ["g5"]
    s.published = lambda keys: False
    assert s.get_num_new_matched_tokens(_first_token_request("c", "g3"), 0) == (len(PROMPT), True)


def test_a_whole_prompt_transfer_not_yet_published_waits_queued_then_goes_asynchronous():
    now = [100.0]
    done = {"g1": False}
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace="ns", chunk_size=CHUNK,
                      published=lambda keys: done["g1"], sync_wait_s=5.0, sync_wait_tokens=len(PROMPT),
                      clock=lambda: now[0])
    req = _request("a", "g1", "decode")
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # vLLM asks again next step
    now[0] += 4.9
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    done["g1"] = True  # the prefill's last chunk is in: loaded within this step
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT) - 1, False)
    late = _request("b", "g2", "decode")
    done["g1"] = False
    assert s.get_num_new_matched_tokens(late, 0) == (None, False)
    now[0] += 5.0  # waited sync_wait_s: loaded asynchronously, over the coordinator, as chunks come
    assert s.get_num_new_matched_tokens(late, 0) == (len(PROMPT), True)
    s.update_state_after_alloc(late, _blocks(DST), len(PROMPT))
    (spec,) = s.build_connector_meta(_output()).loads
    assert not spec.sync and spec.waited_s == 5.0  # the wait for READY counts them (wait_timeout_s)
    # The first-token path (kv_tokens) never waits queued: its prefill has answered already.
    assert s.get_num_new_matched_tokens(_first_token_request("c", "g3"), 0) == (len(PROMPT), True)
    never = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace="ns", chunk_size=CHUNK,
                          published=lambda keys: False, sync_wait_s=0.0, sync_wait_tokens=len(PROMPT))
    assert never.get_num_new_matched_tokens(_request("d", "g4", "decode"), 0) == (len(PROMPT), True)
    # A transfer over half the pool (sync_wait_tokens) is read as it comes: its first chunks could
    # be evicted before its last are written.
    big = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace="ns", chunk_size=CHUNK,
                        published=lambda keys: False, sync_wait_s=5.0, sync_wait_tokens=len(PROMPT) - 1)
    assert big.get_num_new_matched_tokens(_request("f", "g6", "decode"), 0) == (len(PROMPT), True)


def test_the_keys_of_a_waiting_transfer_are_made_once_and_a_transfer_vllm_does_not_load_is_let_go():
    asked: list[list[str]] = []
    s = SchedulerSide(BLOCK, is_producer=False, is_consumer=True, namespace="ns", chunk_size=CHUNK,
                      published=lambda keys: asked.append(keys) or False, sync_wait_s=5.0,
                      sync_wait_tokens=len(PROMPT))
    req = _request("a", "g1", "decode")
    assert [s.get_num_new_matched_tokens(req, 0) for _ in range(3)] == [(None, False)] * 3
    assert asked[0] is asked[1] is asked[2]  # one list, not three hashings of the prompt
    # vLLM kept a sub-block local hit of its own and loads nothing external: the transfer is let go.
    s.published = lambda keys: True
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT) - 1, False)
    s.update_state_after_alloc(req, _blocks(DST), 0)
    meta = s.build_connector_meta(_output())
    assert meta.unneeded == ["g1"] and s._reqs["a"].load is LoadStatus.LOADED
    assert meta.dropped == [asked[0]]  # its chunks are deleted as well (a restarted coordinator forgot them)
    assert s.request_finished(req, DST) == (False, None) and s.build_connector_meta(_output()).dropped == []


def test_a_published_whole_prompt_transfer_loads_every_token_within_the_step(workers, coord):  # noqa: F811
    """The early decode's load: vLLM computes the prompt's last token itself, but the chunks hold
    it too and are loaded whole (its slot is rewritten by the forward that follows)."""
    from tests.unit.test_connector_worker import _same_blocks, _save

    p, d = workers(1), workers(2, wait_timeout_s=10)
    s = _sync_scheduler(d)
    s.sync_wait_s, s.sync_wait_tokens = 30.0, len(PROMPT)
    req = _request("d", "sy3", "decode")
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    p.after_forward(_save("sy3", 0, 5, True))
    assert _until(lambda: p._save_jobs["p1"].done())
    assert s.get_num_new_matched_tokens(req, 0) == (len(PROMPT) - 1, False)
    s.update_state_after_alloc(req, _blocks(DST), len(PROMPT) - 1)
    meta = s.build_connector_meta(_output())
    assert [(x.req_id, x.start_token, x.sync, len(x.token_ids)) for x in meta.loads] == [("d", 0, True, len(PROMPT))]
    d.start_step(meta)
    assert _same_blocks(p, d, SRC, DST)
    assert d.stats["loads_sync"] == 1 and d.take_load_errors() == set()
    rec = _record(coord, "sy3")
    assert rec.ok and rec.sync_load and rec.n_chunks == 5


def test_a_decode_request_that_ends_before_its_load_began_has_its_chunks_deleted(workers, coord):  # noqa: F811
    """An early decode the proxy closed while it waited (for its last chunks here; for token 1 in
    pd.connector.handoff's flow) never reads its transfer, and the coordinator may not know the
    chunks (restarted since their READY): the decode's worker deletes them from the transport."""
    from tests.unit.test_connector_worker import _save

    p, d = workers(1), workers(2, wait_timeout_s=10)
    s = _sync_scheduler(d)
    s.sync_wait_s, s.sync_wait_tokens = 60.0, 1 << 20
    p.after_forward(_save("dr1", 0, 4, False))  # four of five chunks out: the request waits queued
    assert _until(lambda: p._save_jobs["p1"].done())
    keys = [f"xfer/dr1/{k}" for k in p.codec.keys(PROMPT)]
    assert p.transport.exists(keys) == [True] * 4 + [False]
    req = _request("d", "dr1", "decode")
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    assert s.request_finished(req, []) == (False, None)  # closed by the proxy while waiting
    meta = s.build_connector_meta(_output())
    assert meta.dropped == [keys] and meta.cancels == [] and meta.loads == []
    d.start_step(meta)
    assert _until(lambda: not any(p.transport.exists(keys)))
    assert s.build_connector_meta(_output()).dropped == []
    # A request that loaded (or is loading) is not dropped: its load deletes what it read.
    p.after_forward(_save("dr2", 0, 5, True, req="p2"))
    assert _until(lambda: p._save_jobs["p2"].done())
    req2 = _request("e", "dr2", "decode")
    assert s.get_num_new_matched_tokens(req2, 0) == (len(PROMPT) - 1, False)
    s.update_state_after_alloc(req2, _blocks(DST), len(PROMPT) - 1)
    s.build_connector_meta(_output())
    assert s.request_finished(req2, DST) == (False, None)
    assert s.build_connector_meta(_output()).dropped == []
    # One closed before vLLM ever looked it up (queued behind a full batch) is dropped too.
    s.request_finished(_request("f", "dr3", "decode"), [])
    assert s.build_connector_meta(_output()).dropped == [[f"xfer/dr3/{k}" for k in p.codec.keys(PROMPT)]]
