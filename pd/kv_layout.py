"""The paged KV cache as vLLM registered it, seen as raw pages, and chunk gather/scatter.

Each layer's cache is treated as ``num_blocks`` pages of ``page_bytes`` starting at the
tensor's first element (the block dimension must be the outermost one, as in every current
vLLM backend, CPU included). Blocks are copied as opaque bytes: the CPU backend packs K/V in an
ISA-specific format, so raw copies are only valid between identical layouts, which the layout
fingerprint guarantees.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from pd.chunk import HEADER_SIZE
from pd.keys import layout_fingerprint


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _as_pages(t: torch.Tensor, name: str) -> torch.Tensor:
    """A uint8 (num_blocks, page_bytes) view of one layer's cache."""
    num_blocks = t.shape[0]
    es = t.element_size()
    page_elems = t.stride(0)
    if any(t.stride(d) * (t.shape[d] - 1) >= page_elems for d in range(1, t.dim()) if t.shape[d] > 1):
        raise ValueError(
            f"KV cache of layer {name} has shape {tuple(t.shape)} strides {t.stride()}: the block "
            "dimension is not the outermost one; this layout is not supported by pdkv"
        )
    page_bytes = page_elems * es
    pages = torch.empty(0, dtype=torch.uint8, device=t.device)
    pages.set_(t.untyped_storage(), t.storage_offset() * es, (num_blocks, page_bytes), (page_bytes, 1))
    return pages


class KVLayout:
    """The registered caches of one worker, in a fixed layer order."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], block_size: int, extra: dict | None = None):
        if not kv_caches:
            raise ValueError("no KV caches were registered")
        self.layer_names = sorted(kv_caches, key=_natural)
        first = kv_caches[self.layer_names[0]]
        self.device = first.device
        self.block_size = block_size
        self.num_blocks = first.shape[0]
        self.pages = []
        for name in self.layer_names:
            t = kv_caches[name]
            if t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride():
                raise ValueError(f"layer {name} has a different KV shape/dtype/strides than {self.layer_names[0]}")
            self.pages.append(_as_pages(t, name))
        self.page_bytes = self.pages[0].shape[1]
        self.num_layers = len(self.pages)
        self.fingerprint = layout_fingerprint(
            dtype=str(first.dtype), shape=tuple(first.shape[1:]), strides=first.stride(),
            layers=self.num_layers, page_bytes=self.page_bytes, block_size=block_size,
            device=self.device.type, **(extra or {}),
        )

    def chunk_payload_bytes(self, n_blocks: int) -> int:
        return self.num_layers * n_blocks * self.page_bytes

    def payload_view(self, slab: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The (layers, n_blocks, page_bytes) payload region of a staging slab."""
        n = self.chunk_payload_bytes(n_blocks)
        return slab[HEADER_SIZE : HEADER_SIZE + n].view(self.num_layers, n_blocks, self.page_bytes)

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` of every layer into ``out`` (layers, n, page_bytes)."""
        for layer, pages in enumerate(self.pages):
            torch.index_select(pages, 0, block_ids, out=out[layer])

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (layers, n, page_bytes) into blocks ``block_ids`` of every layer."""
        for layer, pages in enumerate(self.pages):
            pages.index_copy_(0, block_ids, src[layer])


class StagingPool:
    """A fixed set of reusable chunk-sized host buffers (bounded memory, no per-call allocs)."""

    def __init__(self, slab_bytes: int, n_slabs: int):
        self.slab_bytes = slab_bytes
        self.n_slabs = n_slabs
        self._free = [torch.empty(slab_bytes, dtype=torch.uint8) for _ in range(n_slabs)]
        self._cv = threading.Condition()

    @contextmanager
    def acquire(self, n: int) -> Iterator[list[torch.Tensor]]:
        """Take ``n`` slabs (n <= n_slabs), waiting for other jobs to give theirs back."""
        n = min(n, self.n_slabs)
        with self._cv:
            self._cv.wait_for(lambda: len(self._free) >= n)
            slabs = [self._free.pop() for _ in range(n)]
        try:
            yield slabs
        finally:
            with self._cv:
                self._free.extend(slabs)
                self._cv.notify_all()
