"""The one-launch Triton gather/scatter (pd/connector/kv_triton.py), run by Triton's interpreter
on the CPU: the same bytes as the per-layer copies for every vLLM layout, sliced payloads, the
bad-input errors, and the fall-back to the per-layer copies."""
import pytest
import torch

pytest.importorskip("triton")

from pd.connector.chunk import HEADER_SIZE  # noqa: E402
from pd.connector.kv_layout import KVLayout  # noqa: E402
from tests.unit.test_kv_layout import LAYOUTS, N, NAMES, _round_trip  # noqa: E402


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_every_vllm_layout_round_trips_with_one_launch(kind):
    a = _round_trip(kind, kind, True, kernel="triton")
    assert a.kernel == "triton" and a.copier is not None


def test_between_layouts_with_the_same_bytes():
    _round_trip("flash_attn_kv_split", "flash_attn_blocks_outer", True, kernel="triton")


def test_same_payload_bytes_as_the_per_layer_copies():
    for kind in ("flash_attn_kv_split", "heads_outer_LHBNC", "cross_layer_BHLNC"):
        caches = LAYOUTS[kind][0](16, torch.Generator().manual_seed(3))
        fast, slow = KVLayout(caches, N, num_blocks=16, kernel="triton"), KVLayout(caches, N, num_blocks=16,
                                                                                   kernel="torch")
        ids = torch.tensor([15, 0, 7, 3, 9])
        slabs = [torch.zeros(HEADER_SIZE + fast.chunk_payload_bytes(5), dtype=torch.uint8) for _ in range(2)]
        fast.gather(ids, fast.payload_view(slabs[0], 5))
        slow.gather(ids, slow.payload_view(slabs[1], 5))
        assert torch.equal(slabs[0], slabs[1]) and slabs[0][HEADER_SIZE:].any(), kind


def test_bad_payload_views_are_refused_with_what_was_expected():
    caches = LAYOUTS["flash_attn_kv_split"][0](8, torch.Generator().manual_seed(0))
    layout = KVLayout(caches, N, num_blocks=8, kernel="triton")
    flat = torch.zeros(len(NAMES), 2, layout.runs, layout.run_words, dtype=layout.word)
    with pytest.raises(ValueError, match="expected"):
        layout.copier.gather(torch.tensor([1, 2, 3]), flat)  # 3 ids, 2 blocks of room
    with pytest.raises(ValueError, match="expected"):
        layout.copier.gather(torch.tensor([1, 2]), flat.to(torch.int32))


def test_a_failing_kernel_falls_back_to_the_per_layer_copies(caplog):
    caches = LAYOUTS["flashinfer"][0](8, torch.Generator().manual_seed(0))
    layout = KVLayout(caches, N, num_blocks=8, kernel="triton")

    class Broken:
        def gather(self, ids, out):
            raise RuntimeError("no kernel image for this device (a double for a failed launch)")

    layout.copier = Broken()
    slab = torch.zeros(HEADER_SIZE + layout.chunk_payload_bytes(2), dtype=torch.uint8)
    layout.gather(torch.tensor([4, 1]), layout.payload_view(slab, 2))
    out = layout.payload_view(slab, 2)
    assert torch.equal(out[0, 0].reshape(-1), layout.pages[0][4].reshape(-1)) and layout.kernel == "torch"
    assert "one indexed copy per layer" in caplog.text


def test_unknown_kernel_names_are_refused():
    with pytest.raises(ValueError, match="allowed auto, triton, torch"):
        KVLayout(LAYOUTS["cpu"][0](4, torch.Generator()), N, kernel="cuda")
