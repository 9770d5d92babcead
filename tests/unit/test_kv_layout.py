"""Gather/scatter of paged KV blocks through chunk slabs."""
import threading
import time

import pytest
import torch

from pd.connector.chunk import HEADER_SIZE
from pd.connector.kv_layout import KVLayout, StagingPool


def _caches(n_layers=3, num_blocks=20, heads=2, block=4, head=8, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(num_blocks, heads, block, 2 * head, generator=g).to(dtype)
            for i in range(n_layers)}


def test_gather_then_scatter_moves_exact_blocks_between_instances():
    src, dst = _caches(seed=1), _caches(seed=2)
    a, b = KVLayout(src, 4), KVLayout(dst, 4)
    assert a.fingerprint == b.fingerprint
    slab = torch.empty(HEADER_SIZE + a.chunk_payload_bytes(3), dtype=torch.uint8)
    a.gather(torch.tensor([7, 2, 11]), a.payload_view(slab, 3))
    b.scatter(torch.tensor([0, 5, 9]), b.payload_view(slab, 3))
    for name in src:
        assert torch.equal(dst[name][[0, 5, 9]], src[name][[7, 2, 11]])
        untouched = [i for i in range(20) if i not in (0, 5, 9)]
        assert not torch.equal(dst[name][untouched], src[name][untouched])


def test_layer_order_is_natural_not_lexicographic():
    caches = {f"model.layers.{i}.attn": torch.zeros(2, 1, 4, 8) for i in (10, 2, 1)}
    assert KVLayout(caches, 4).layer_names == ["model.layers.1.attn", "model.layers.2.attn", "model.layers.10.attn"]


def test_fingerprint_changes_with_layout():
    base = KVLayout(_caches(), 4).fingerprint
    assert KVLayout(_caches(dtype=torch.float16), 4).fingerprint != base
    assert KVLayout(_caches(n_layers=2), 4).fingerprint != base
    assert KVLayout(_caches(), 4, {"tp": 2}).fingerprint != base


def test_heads_outside_blocks_are_read_as_runs_not_refused():
    t = torch.zeros(4, 20, 2, 8).permute(1, 0, 2, 3)  # blocks not outermost in memory (vLLM's LHBNC)
    layout = KVLayout({"l0": t}, 4)
    assert (layout.num_blocks, layout.runs, layout.run_words * 8, layout.kind) == (20, 4, 16 * 4, "runs")


# vLLM's per-layer layouts, with their real shapes and strides: name -> (build(num_blocks, generator)
# -> caches, block dim, kind). H kv heads, N tokens per block, D head size, L layers.
H, N, D, L = 2, 4, 8, 3
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(L)]


def _r(g, *shape):
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


def _per_layer(make):
    return lambda nb, g: {name: make(nb, g) for name in NAMES}


def _cross_layer(make, dim):  # one buffer for all layers, each layer's view a slice of it
    return lambda nb, g: (lambda raw: {name: raw.select(dim, i) for i, name in enumerate(NAMES)})(make(nb, g))


LAYOUTS = {
    "cpu": (_per_layer(lambda nb, g: _r(g, nb, H, N, 2 * D)), 0, "blocks-outer"),
    "flashinfer": (_per_layer(lambda nb, g: _r(g, nb, 2, N, H, D)), 0, "blocks-outer"),
    # newer FLASH_ATTN: logical (2, num_blocks, ...) over memory allocated (num_blocks, 2, ...)
    "flash_attn_blocks_outer": (_per_layer(lambda nb, g: _r(g, nb, 2, N, H, D).transpose(0, 1)), 1, "blocks-outer"),
    # older FLASH_ATTN: contiguous (2, num_blocks, ...): K and V of a block are two runs
    "flash_attn_kv_split": (_per_layer(lambda nb, g: _r(g, 2, nb, N, H, D)), 1, "kv-split"),
    "flash_attn_kv_split_hnd": (_per_layer(lambda nb, g: _r(g, 2, nb, H, N, D).transpose(2, 3)), 1, "kv-split"),
    "heads_outer_LHBNC": (_per_layer(lambda nb, g: _r(g, H, nb, N, 2 * D).transpose(0, 1)), 0, "runs"),
    "cross_layer_BLHNC": (_cross_layer(lambda nb, g: _r(g, nb, L, H, N, 2 * D), 1), 0, "blocks-outer"),
    "cross_layer_BHLNC": (_cross_layer(lambda nb, g: _r(g, nb, H, L, N, 2 * D), 2), 0, "runs"),
}


def _round_trip(p_kind, d_kind, pass_num_blocks, device="cpu", p_nb=20, d_nb=24, kernel="auto"):
    (p_make, p_dim, _), (d_make, d_dim, _) = LAYOUTS[p_kind], LAYOUTS[d_kind]
    src = {k: v.to(device) for k, v in p_make(p_nb, torch.Generator().manual_seed(1)).items()}
    dst = {k: v.to(device) for k, v in d_make(d_nb, torch.Generator().manual_seed(2)).items()}
    before = {k: v.clone() for k, v in dst.items()}
    a = KVLayout(src, N, num_blocks=p_nb if pass_num_blocks else None, kernel=kernel)
    b = KVLayout(dst, N, num_blocks=d_nb if pass_num_blocks else None, kernel=kernel)
    assert (a.num_blocks, b.num_blocks, a.layout, a.fingerprint) == (p_nb, d_nb, b.layout, b.fingerprint)
    pool = StagingPool(HEADER_SIZE + a.chunk_payload_bytes(4), 1, pin=device != "cpu")
    with pool.acquire(1) as (slab,):
        a.gather(torch.tensor([7, 2, 11, 19]), a.payload_view(slab, 4))
        b.scatter(torch.tensor([5, 9, 23]), b.payload_view(slab, 4)[:, 1:])  # the worker skips blocks so
        b.scatter(torch.tensor([3]), b.payload_view(slab, 4)[:, :1])
    for name in NAMES:
        got = dst[name].index_select(d_dim, torch.tensor([3, 5, 9, 23], device=device))
        assert torch.equal(got, src[name].index_select(p_dim, torch.tensor([7, 2, 11, 19], device=device)))
        untouched = torch.tensor([i for i in range(d_nb) if i not in (3, 5, 9, 23)], device=device)
        assert torch.equal(dst[name].index_select(d_dim, untouched), before[name].index_select(d_dim, untouched))
    return a


@pytest.mark.parametrize("pass_num_blocks", [True, False])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_every_vllm_layout_round_trips_between_instances(kind, pass_num_blocks):
    a = _round_trip(kind, kind, pass_num_blocks)
    assert a.kind == LAYOUTS[kind][2]
    assert a.page_bytes == 2 * H * N * D * 2


def test_kv_split_and_block_outer_flash_attn_pages_are_the_same_bytes():
    # K run then V run per block is exactly a (2, N, H, D) page: both sides agree on the bytes.
    _round_trip("flash_attn_kv_split", "flash_attn_blocks_outer", True)


def test_fingerprint_differs_where_page_bytes_differ():
    def fp(kind):
        caches = {"l0": LAYOUTS[kind][0](10, torch.Generator().manual_seed(0))["model.layers.0.self_attn.attn"]}
        return KVLayout(caches, N).fingerprint
    # Equal where the pages hold the same bytes: each block's elements in memory order.
    same = [["cpu", "heads_outer_LHBNC", "cross_layer_BLHNC", "cross_layer_BHLNC"], ["flashinfer"],
            ["flash_attn_blocks_outer", "flash_attn_kv_split"], ["flash_attn_kv_split_hnd"]]
    assert [{fp(kind) for kind in group} for group in same] == [{fp(group[0])} for group in same]
    assert len({fp(group[0]) for group in same}) == len(same)
    # HND vs NHD with as many heads as tokens per block: same sizes, other bytes
    nhd = torch.zeros(2, 10, 4, 4, 8)
    assert KVLayout({"l0": nhd}, 4).fingerprint != KVLayout({"l0": nhd.transpose(2, 3).contiguous()
                                                              .transpose(2, 3)}, 4).fingerprint


def test_kernel_blocks_are_grouped_into_cache_blocks():
    k = 2  # vLLM split each block of 2 * N tokens into 2 kernel blocks of N
    g = torch.Generator()
    src, dst = _r(g.manual_seed(1), 10 * k, H, N, 2 * D), _r(g.manual_seed(2), 12 * k, H, N, 2 * D)
    a, b = KVLayout({"l0": src}, k * N, num_blocks=10), KVLayout({"l0": dst}, k * N, num_blocks=12)
    assert (a.num_blocks, a.page_bytes, a.fingerprint) == (10, k * H * N * 2 * D * 2, b.fingerprint)
    slab = torch.empty(HEADER_SIZE + a.chunk_payload_bytes(2), dtype=torch.uint8)
    a.gather(torch.tensor([3, 1]), a.payload_view(slab, 2))
    b.scatter(torch.tensor([0, 11]), b.payload_view(slab, 2))
    assert torch.equal(dst.unflatten(0, (12, k))[[0, 11]], src.unflatten(0, (10, k))[[3, 1]])


@pytest.mark.parametrize("tensor, num_blocks, why", [
    (torch.zeros(1, H, N, 2 * D).expand(20, H, N, 2 * D), 20, "overlap"),
    (torch.zeros(20, H, N, 4 * D)[..., ::2], 20, "innermost dim is not contiguous"),
    (torch.zeros(20, H, N, 2 * D), 21, "no block dim of 21 blocks"),
    (torch.zeros(2, 20, N, H, D), 30, "no block dim of 30 blocks"),
    (torch.zeros(2, 2, N, H, D), 2, "either could be the block dim"),
    (torch.zeros(2, 2, N, H, D), None, "either could be the block dim"),
])
def test_unsupported_layouts_are_refused_with_the_layer_shape_and_strides(tensor, num_blocks, why):
    with pytest.raises(ValueError, match=why) as err:
        KVLayout({"model.layers.0.attn": tensor}, N, num_blocks=num_blocks)
    for part in ("model.layers.0.attn", str(tuple(tensor.shape)), str(tensor.stride()), "supported"):
        assert part in str(err.value)


def test_two_blocks_of_a_kv_pair_in_block_outer_memory_are_resolved_by_strides():
    t = torch.zeros(2, 2, N, H, D).transpose(0, 1)  # dim 1 is the outer one: the blocks
    assert KVLayout({"l0": t}, N, num_blocks=2).kind == "blocks-outer"


def test_layers_with_other_layouts_are_refused():
    caches = {"l0": torch.zeros(20, H, N, 2 * D), "l1": torch.zeros(20, H, N, 2 * D).transpose(1, 2)}
    with pytest.raises(ValueError, match="layer l1 .*layer l0 has shape"):
        KVLayout(caches, N)


def test_staging_pool_is_bounded_and_reused():
    pool = StagingPool(64, 2)
    with pool.acquire(5) as slabs:  # more than the pool: capped
        assert len(slabs) == 2
        ptrs = {s.data_ptr() for s in slabs}
    with pool.acquire(2) as slabs:
        assert {s.data_ptr() for s in slabs} == ptrs


def _waits(pool: StagingPool, n: int, got: list, name: str) -> threading.Thread:
    """A job on a thread that waits for ``n`` slabs, records ``name`` once served, then holds them
    until given ``got``'s event."""
    def job():
        slabs = pool.take(n)
        got.append(name)
        release[name].wait(10)
        pool.give(slabs)
    release = got[0]
    t = threading.Thread(target=job, daemon=True)
    t.start()
    return t


def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_staging_pool_serves_in_order_of_asking():
    """A job that waits for the whole pool is not overtaken by later jobs wanting a few slabs
    (loads kept taking slabs while a save waited for all of them: the save starved), and a take
    without waiting yields to a job already waiting."""
    pool = StagingPool(64, 4)
    held = pool.take(2)  # a load in progress holds half the pool
    events = {"save": threading.Event(), "load": threading.Event()}
    got: list = [events]
    save = _waits(pool, 4, got, "save")  # wants every slab: waits
    _until(lambda: len(pool._waiting) == 1)
    load = _waits(pool, 2, got, "load")  # 2 slabs are free, but the save asked first
    _until(lambda: len(pool._waiting) == 2)
    assert pool.take(1, wait=False) is None  # free slabs, but jobs are waiting: not taken past them
    time.sleep(0.05)
    assert got[1:] == []
    pool.give(held)
    _until(lambda: got[1:] == ["save"])
    assert pool.take(1, wait=False) is None  # the save holds them all
    events["save"].set()
    _until(lambda: got[1:] == ["save", "load"])
    events["load"].set()
    save.join(5), load.join(5)
    assert not pool._waiting and len(pool._free) == 4
    assert len(pool.take(4, wait=False)) == 4


def test_staging_pool_asked_for_no_slabs_never_waits():
    """A save whose chunks all went to the transport's own slots asks for 0 slabs: it gets them at
    once, also while jobs wait in line and none is free."""
    pool = StagingPool(64, 2)
    held = pool.take(2)
    events = {"big": threading.Event()}
    got: list = [events]
    big = _waits(pool, 2, got, "big")
    _until(lambda: len(pool._waiting) == 1)
    answers: list = []

    def zero():
        answers.extend([pool.take(0), pool.take(0, wait=False)])
        with pool.acquire(0) as slabs:
            answers.append(slabs)
    t = threading.Thread(target=zero, daemon=True)
    t.start()
    t.join(5)  # (on a pool that puts it in line it would wait behind "big", which waits for ``held``)
    assert not t.is_alive() and answers == [[], [], []]
    pool.give(held)
    _until(lambda: got[1:] == ["big"])
    events["big"].set()
    big.join(5)


def test_staging_pool_waiter_interrupted_leaves_the_line():
    """A wait that ends in an exception leaves the line, so those behind it are served."""
    pool = StagingPool(64, 1)
    held = pool.take(1)
    boom = RuntimeError("interrupted")
    real = pool._cv.wait_for
    pool._cv.wait_for = lambda pred: (_ for _ in ()).throw(boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        pool.take(1)
    pool._cv.wait_for = real
    assert not pool._waiting
    pool.give(held)
    assert len(pool.take(1, wait=False)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_gather_scatter_on_gpu_through_pinned_slabs():
    src = {k: v.cuda() for k, v in _caches(seed=1, num_blocks=64).items()}
    dst = {k: v.cuda() for k, v in _caches(seed=2, num_blocks=64).items()}
    a, b = KVLayout(src, 4), KVLayout(dst, 4)
    pool = StagingPool(HEADER_SIZE + a.chunk_payload_bytes(5), 1, pin=True)
    with pool.acquire(1) as (slab,):
        assert slab.is_pinned()
        a.gather(torch.tensor([60, 3, 17, 4, 40]), a.payload_view(slab, 5))
        b.scatter(torch.tensor([1, 2, 30, 31, 63]), b.payload_view(slab, 5))
    torch.cuda.synchronize()
    for name in src:
        assert torch.equal(dst[name][[1, 2, 30, 31, 63]], src[name][[60, 3, 17, 4, 40]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("kernel", ["triton", "torch"])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_every_vllm_layout_round_trips_on_gpu(kind, kernel):
    a = _round_trip(kind, kind, True, device="cuda", kernel=kernel)
    assert a.kernel == kernel  # "triton": a kernel that does not compile or launch fails here
