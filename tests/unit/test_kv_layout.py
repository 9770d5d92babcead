"""Gather/scatter of paged KV blocks through chunk slabs."""
import pytest
import torch

from pd.chunk import HEADER_SIZE
from pd.kv_layout import KVLayout, StagingPool


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


def test_block_dim_must_be_outermost():
    t = torch.zeros(4, 20, 2, 8).permute(1, 0, 2, 3)  # blocks not outermost in memory
    with pytest.raises(ValueError, match="outermost"):
        KVLayout({"l0": t}, 4)


def test_staging_pool_is_bounded_and_reused():
    pool = StagingPool(64, 2)
    with pool.acquire(5) as slabs:  # more than the pool: capped
        assert len(slabs) == 2
        ptrs = {s.data_ptr() for s in slabs}
    with pool.acquire(2) as slabs:
        assert {s.data_ptr() for s in slabs} == ptrs


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
