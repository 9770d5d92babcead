"""Chunks cut by KV-head group (pd.connector.heads, KVLayout parts): one TP size's pages into another's."""
import pytest
import torch

from common.config import ConfigError
from pd.connector.chunk import HEADER_SIZE
from pd.connector.heads import lcm, resolve
from pd.connector.kv_layout import KVLayout

N, D, L, NB = 4, 8, 3, 12  # tokens per block, head size, layers, blocks
# vLLM's per-layer layouts with h KV heads: build(h) -> one layer's tensor, (block dim, head dim)
BUILD = {
    "cpu": (lambda h: torch.empty(NB, h, N, 2 * D), 0, 1),
    "flashinfer": (lambda h: torch.empty(NB, 2, N, h, D), 0, 3),
    "flash_attn_blocks_outer": (lambda h: torch.empty(NB, 2, N, h, D).transpose(0, 1), 1, 3),
    "flash_attn_kv_split": (lambda h: torch.empty(2, NB, N, h, D), 1, 3),
    "flash_attn_kv_split_hnd": (lambda h: torch.empty(2, NB, h, N, D).transpose(2, 3), 1, 3),
    "heads_outer_LHBNC": (lambda h: torch.empty(h, NB, N, 2 * D).transpose(0, 1), 0, 1),
}


def _caches(kind: str, heads: int, seed: int) -> dict[str, torch.Tensor]:
    make = BUILD[kind][0]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(L):
        t = make(heads)
        t.copy_(torch.randn(t.shape, generator=g))
        out[f"model.layers.{i}.attn"] = t
    return out


def _heads(t: torch.Tensor, kind: str, blocks: list[int], lo: int, n: int) -> torch.Tensor:
    _, bd, hd = BUILD[kind]
    return t.index_select(bd, torch.tensor(blocks)).narrow(hd, lo, n)


SRC, DST = [7, 2, 11], [0, 5, 9]


def _slab(layout: KVLayout, parts: int) -> torch.Tensor:
    return torch.zeros(HEADER_SIZE + layout.chunk_payload_bytes(len(SRC), parts), dtype=torch.uint8)


@pytest.mark.parametrize("kind", list(BUILD))
def test_tp1_prefill_cut_into_groups_fills_two_tp2_decode_ranks(kind):
    H = 4
    prefill = _caches(kind, H, 1)
    ranks = [_caches(kind, H // 2, 10 + r) for r in range(2)]
    before = [{k: v.clone() for k, v in r.items()} for r in ranks]
    p = KVLayout(prefill, N, heads=H)
    d = [KVLayout(r, N, heads=H // 2) for r in ranks]
    assert p.group_layout(2) == d[0].group_layout(2) == d[1].group_layout(2)
    for r in range(2):
        slab = _slab(p, 2)
        p.gather(torch.tensor(SRC), p.payload_view(slab, len(SRC), 2), (r, 2))
        d[r].scatter(torch.tensor(DST), d[r].payload_view(slab, len(SRC)))  # the whole rank: full pages
    bd = BUILD[kind][1]
    for name in prefill:
        for r in range(2):
            assert torch.equal(_heads(ranks[r][name], kind, DST, 0, 2), _heads(prefill[name], kind, SRC, 2 * r, 2))
            others = torch.tensor([b for b in range(NB) if b not in DST])
            assert torch.equal(ranks[r][name].index_select(bd, others), before[r][name].index_select(bd, others))


@pytest.mark.parametrize("kind", list(BUILD))
def test_two_tp2_prefill_ranks_are_stitched_into_one_tp1_decode(kind):
    H = 2
    ranks = [_caches(kind, 1, 20 + r) for r in range(2)]
    decode = _caches(kind, H, 3)
    before = {k: v.clone() for k, v in decode.items()}
    p = [KVLayout(r, N, heads=1) for r in ranks]
    d = KVLayout(decode, N, heads=H)
    assert p[0].group_layout(1) == d.group_layout(1)
    for r in range(2):
        slab = _slab(p[r], 1)
        p[r].gather(torch.tensor(SRC), p[r].payload_view(slab, len(SRC)))
        # the worker skips blocks the local prefix cache holds: scatter a slice on dim 1 too
        d.scatter(torch.tensor(DST[1:]), d.payload_view(slab, len(SRC), 2)[:, 1:], (r, 2))
        d.scatter(torch.tensor(DST[:1]), d.payload_view(slab, len(SRC), 2)[:, :1], (r, 2))
    bd = BUILD[kind][1]
    for name in decode:
        for r in range(2):
            assert torch.equal(_heads(decode[name], kind, DST, r, 1), _heads(ranks[r][name], kind, SRC, 0, 1))
        others = torch.tensor([b for b in range(NB) if b not in DST])
        assert torch.equal(decode[name].index_select(bd, others), before[name].index_select(bd, others))


def test_group_layout_names_the_group_not_the_tp_size():
    one = KVLayout(_caches("cpu", 4, 0), N, heads=4)
    two = KVLayout(_caches("cpu", 2, 0), N, heads=2)
    assert one.group_layout(2) == two.group_layout(2) != one.group_layout(1)
    assert one.group_layout(4) != two.group_layout(2)


def test_a_layout_without_a_head_dim_has_no_groups():
    caches = {"l0": torch.zeros(NB, 3, N, 2 * D)}  # 3 != the 2 heads it is told
    layout = KVLayout(caches, N, heads=2)
    assert layout.head_pages is None
    with pytest.raises(ValueError, match="KV-head dim was not found"):
        layout.group_layout(1)


@pytest.mark.parametrize("prefill_tp, decode_tp", [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2), (2, 8)])
def test_every_group_has_one_writer_rank_and_one_reader_rank(prefill_tp, decode_tp):
    G, H = lcm(prefill_tp, decode_tp), 8
    for tp in (prefill_tp, decode_tp):
        owners = [r for r in range(tp) for _ in resolve(G, tp, H, r).owned]
        groups = [g for r in range(tp) for g in resolve(G, tp, H, r).owned]
        assert groups == list(range(G)) and len(owners) == G
        hg = resolve(G, tp, H, 0)
        assert hg.group_heads * G == H and hg.per_rank * tp == G


@pytest.mark.parametrize("groups, tp, heads, msg", [
    (0, 4, 2, "more than the model's 2 KV heads"),
    (0, 3, 4, "does not divide the model's 4 KV heads"),
    (3, 2, 6, "3 is not a multiple of this instance's tensor_parallel_size 2"),
    (6, 2, 4, "4 KV heads do not divide into 6 groups"),
])
def test_combinations_that_cannot_work_are_refused(groups, tp, heads, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(groups, tp, heads)


def test_default_is_one_group_per_rank():
    hg = resolve(0, 2, 8, rank=1)
    assert (hg.groups, hg.owned, hg.group_heads, hg.part(1)) == (2, [1], 4, (0, 1))


def test_model_kv_heads_reads_config_json(tmp_path):
    from pd.connector.heads import model_kv_heads

    (tmp_path / "config.json").write_text('{"text_config": {"num_key_value_heads": 8, "num_attention_heads": 32}}')
    assert model_kv_heads(str(tmp_path)) == 8
    (tmp_path / "config.json").write_text('{"num_attention_heads": 12}')  # no GQA: one KV head per head
    assert model_kv_heads(str(tmp_path)) == 12
    assert model_kv_heads(str(tmp_path / "missing")) is None


def test_bench_kv_times_head_groups(capsys):
    import argparse

    from launch.bench import kv as bench_kv

    p = argparse.ArgumentParser()
    bench_kv.add_arguments(p)
    args = p.parse_args(["--device", "cpu", "--layers", "2", "--kv-heads", "4", "--head-size", "16", "--cache-gb",
                         "0.01", "--block-sizes", "16", "--chunk-tokens", "64", "--iters", "1", "--head-groups", "2",
                         "--transfer", "off", "--dtype", "float32"])
    assert bench_kv.run(args) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    assert "gather as 2 groups GB/s" in header and len(row.split("|")) == len(header.split("|"))
    with pytest.raises(ValueError, match="--head-groups 3: must be >= 1 and divide --kv-heads 4"):
        bench_kv.run(p.parse_args(["--device", "cpu", "--kv-heads", "4", "--head-groups", "3"]))
