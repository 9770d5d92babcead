"""Worker halves of different TP sizes exchange KV: a real coordinator (ZMQ), real shm transport
and local store, CPU caches cut by KV head (pd.connector.heads). Each rank is a WorkerSide of its own."""
from __future__ import annotations

import pytest
import torch

from pd.config import ConnectorConfig, CoordinatorConfig
from pd.connector.heads import lcm, resolve
from pd.connector.scheduler import LoadSpec, PDMetadata, SaveSpec
from pd.connector.worker import WorkerConfig, WorkerSide
from pd.coordinator.client import CoordinatorClient
from pd.coordinator.server import Coordinator
from store.config import Hf3fsConfig, StoreConfig
from tests.unit.test_connector_worker import _until
from transport.config import TransportConfig
from transport.shm import ShmTransport

BLOCK, CHUNK, NUM_BLOCKS, HEADS = 4, 8, 64, 4
PROMPT = list(range(100, 137))  # 37 tokens: 5 chunks, the last partial
SRC, DST = list(range(10, 20)), list(range(40, 50))


@pytest.fixture
def coord():
    c = Coordinator(CoordinatorConfig(port=0)).start_in_thread()
    yield c
    c.stop()


def _caches(heads: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.attn": torch.randn(NUM_BLOCKS, heads, BLOCK, 16, generator=g) for i in range(3)}


def _store_config(tmp_path, backend: str) -> StoreConfig:
    if backend == "local":
        (tmp_path / "store").mkdir(exist_ok=True)
        return StoreConfig(backend="local", paths=[str(tmp_path / "store")], size_gb=0.1)
    from tests.doubles import usrbio_emulator

    mount = usrbio_emulator.emulate_mount(str(tmp_path / "3fs"))  # the USRBIO emulator over plain files
    return StoreConfig(backend="hf3fs", paths=["kv"], size_gb=0.1,
                       hf3fs=Hf3fsConfig(mount_point=str(mount), iov_size_mb=100, io_threads=2))


def _ranks(tmp_path, coord, tp: int, groups: int, seed: int, store: str | None = None, backend: str = "local",
           **over) -> list[WorkerSide]:
    out = []
    for rank in range(tp):
        cfg = ConnectorConfig(coordinator=coord.address, chunk_size=CHUNK, io_threads=2, head_groups=groups,
                              transport=TransportConfig(pool_size_mb=8, shm_dir=str(tmp_path), name="tp"), **over)
        heads = resolve(groups, tp, HEADS, rank)
        stores = None
        if store is not None:
            from store import make_store

            cfg.store = _store_config(tmp_path, backend)
            stores = {g: make_store(cfg.store, g, writer=store == "write") for g in heads.owned}
        config = WorkerConfig(cfg, rank, "m", BLOCK, instance_id=f"i{seed}-{rank}", heads=heads,
                              fingerprint=b"f" * 16)
        w = WorkerSide(config, CoordinatorClient(coord.address), ShmTransport(cfg.transport), stores)
        w.caches = _caches(HEADS // tp, seed * 10 + rank)
        w.register_kv_caches(w.caches)
        out.append(w)
    return out


def _close(*sides):
    for ranks in sides:
        for w in ranks:
            w.shutdown()
            w.transport.close()
            for s in w.stores.values():
                if s is not None:
                    s.close()


def _all_heads(ranks: list[WorkerSide], name: str, blocks: list[int]) -> torch.Tensor:
    """The blocks of layer ``name`` with every KV head, stitched from the ranks (head dim 1)."""
    return torch.cat([w.caches[name][blocks] for w in ranks], dim=1)


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 2), (2, 1), (1, 2), (4, 2), (1, 4)])
def test_streamed_transfer_between_tp_sizes(tmp_path, coord, prefill_tp, decode_tp):
    groups = lcm(prefill_tp, decode_tp)
    prefill = _ranks(tmp_path, coord, prefill_tp, groups, 1)
    decode = _ranks(tmp_path, coord, decode_tp, groups, 2, wait_timeout_s=5)
    try:
        for r, w in enumerate(decode):
            w.start_step(PDMetadata(loads=[LoadSpec(f"d{r}", "x1", PROMPT, DST, 0)]))
        for first, last, final in ((0, 2, False), (2, 5, True)):
            for w in prefill:
                w.after_forward(PDMetadata(saves=[SaveSpec("p1", "x1", PROMPT, SRC, first, last, final)]))
        assert _until(lambda: all(f"d{r}" in w.loads._done_recving for r, w in enumerate(decode)))
        for name in prefill[0].caches:
            assert torch.equal(_all_heads(decode, name, DST), _all_heads(prefill, name, SRC))
        assert all(w.take_load_errors() == set() for w in decode)
        # one DONE per group, each ok; every chunk read once and deleted by its reader
        assert sum(w.stats["loads_ok"] for w in decode) == groups
        assert sum(w.stats["chunks_loaded"] for w in decode) == 5 * groups
        for g in range(groups):
            keys = [f"xfer/x1/{k}" for k in prefill[0].codec.keys(PROMPT, group=g)]
            assert not any(prefill[0].transport.exists(keys))
        rec = CoordinatorClient(coord.address).query("x1").transfer
        assert rec.ready and rec.done and rec.ok and rec.n_chunks == 5
        assert rec.groups_ready == groups and rec.groups_done == groups
    finally:
        _close(prefill, decode)


def test_a_missing_group_recomputes_the_blocks_of_every_head(tmp_path, coord):
    prefill = _ranks(tmp_path, coord, 2, 2, 1)
    decode = _ranks(tmp_path, coord, 1, 2, 2, wait_timeout_s=1)
    try:
        decode[0].start_step(PDMetadata(loads=[LoadSpec("d0", "x2", PROMPT, DST, 0)]))
        prefill[0].after_forward(PDMetadata(saves=[SaveSpec("p1", "x2", PROMPT, SRC)]))  # rank 1 never saves
        assert _until(lambda: "d0" in decode[0].loads._done_recving, 15)
        assert decode[0].take_load_errors() == set(DST)
        assert decode[0].stats["loads_ok"] == 1 and decode[0].stats["loads_failed"] == 1
        rec = CoordinatorClient(coord.address).query("x2").transfer
        # one group's READY never came: the transfer is neither ready nor ok
        assert rec.done and not rec.ready and not rec.ok and rec.groups_ready == 1, rec
    finally:
        _close(prefill, decode)


@pytest.fixture(params=["local", "hf3fs"])
def backend(request):
    if request.param == "hf3fs":
        request.getfixturevalue("usrbio_double")
    return request.param


def test_store_written_at_one_tp_size_is_read_at_another(tmp_path, coord, backend):
    """Prefix reuse across TP sizes: chunks stored by TP=2 prefill ranks, loaded by a TP=1 rank
    (and the reverse) from the store alone, with the same head groups."""
    prefill = _ranks(tmp_path, coord, 2, 2, 1, store="write", backend=backend)
    try:
        for w in prefill:
            w.after_forward(PDMetadata(saves=[SaveSpec("p1", "x3", PROMPT, SRC)]))
        assert _until(lambda: all(w.stats["saves"] == 1 for w in prefill))
        for w in prefill:
            for s in w.stores.values():
                s.flush(10)
    finally:
        _close(prefill)
    for tp in (1, 2):
        decode = _ranks(tmp_path, coord, tp, 2, 3 + tp, store="read", backend=backend)
        try:
            for r, w in enumerate(decode):
                w.start_step(PDMetadata(loads=[LoadSpec(f"q{r}", "", PROMPT, DST, 0)]))  # no pd_id: store only
            assert _until(lambda: all(f"q{r}" in w.loads._done_recving for r, w in enumerate(decode)))
            assert all(w.take_load_errors() == set() for w in decode)
            for name in prefill[0].caches:
                assert torch.equal(_all_heads(decode, name, DST), _all_heads(prefill, name, SRC))
        finally:
            _close(decode)


def test_decode_falls_back_to_the_store_across_tp_sizes(tmp_path, coord, backend):
    """Prefill TP=1 (both head groups in one rank) writes through; its transport chunks are gone
    before decode TP=2 reads them: each decode rank takes its group from the store."""
    prefill = _ranks(tmp_path, coord, 1, 2, 1, store="write", backend=backend)
    decode = _ranks(tmp_path, coord, 2, 2, 2, store="read", backend=backend, wait_timeout_s=5)
    try:
        prefill[0].after_forward(PDMetadata(saves=[SaveSpec("p1", "x4", PROMPT, SRC)]))
        assert _until(lambda: prefill[0].stats["saves"] == 1)
        for g in (0, 1):
            prefill[0].transport.delete([f"xfer/x4/{k}" for k in prefill[0].codec.keys(PROMPT, group=g)])
        for r, w in enumerate(decode):
            w.start_step(PDMetadata(loads=[LoadSpec(f"d{r}", "x4", PROMPT, DST, 0)]))
        assert _until(lambda: all(f"d{r}" in w.loads._done_recving for r, w in enumerate(decode)))
        assert all(w.take_load_errors() == set() for w in decode)
        assert [w.stats["store_chunks_loaded"] for w in decode] == [5, 5]
        for name in prefill[0].caches:
            assert torch.equal(_all_heads(decode, name, DST), _all_heads(prefill, name, SRC))
    finally:
        _close(prefill, decode)
