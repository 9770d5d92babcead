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
    """One layer's cache as (num_blocks, page) in the widest integer word dividing the page."""
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
    # Indexed copies of 1-byte elements are ~100x slower on the CPU than of 8-byte words.
    for word in (torch.int64, torch.int32, torch.int16):
        size = torch.tensor([], dtype=word).element_size()
        if page_bytes % size == 0 and (t.storage_offset() * es) % size == 0:
            return pages.view(word)
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
        self.word = self.pages[0].dtype
        self.page_words = self.pages[0].shape[1]
        self.page_bytes = self.page_words * self.pages[0].element_size()
        self._local = threading.local()
        self.num_layers = len(self.pages)
        self.fingerprint = layout_fingerprint(
            dtype=str(first.dtype), shape=tuple(first.shape[1:]), strides=first.stride(),
            layers=self.num_layers, page_bytes=self.page_bytes, block_size=block_size,
            device=self.device.type, **(extra or {}),
        )

    def chunk_payload_bytes(self, n_blocks: int) -> int:
        return self.num_layers * n_blocks * self.page_bytes

    def payload_view(self, slab: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The (layers, n_blocks, page words) payload region of a staging slab."""
        n = self.chunk_payload_bytes(n_blocks)
        return slab[HEADER_SIZE : HEADER_SIZE + n].view(self.word).view(self.num_layers, n_blocks, self.page_words)

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` of every layer into host ``out`` (a ``payload_view``).

        On a GPU the blocks are first gathered on the device (one indexed copy per layer), then
        moved to the (pinned) host slab in one copy, on a side stream.
        """
        if self.device.type == "cpu":
            for layer, pages in enumerate(self.pages):
                torch.index_select(pages, 0, block_ids, out=out[layer])
            return
        with torch.cuda.stream(self._stream()):
            ids = block_ids.to(self.device, non_blocking=True)
            dev = torch.empty(out.shape, dtype=out.dtype, device=self.device)
            for layer, pages in enumerate(self.pages):
                torch.index_select(pages, 0, ids, out=dev[layer])
            out.copy_(dev, non_blocking=True)
            torch.cuda.current_stream().synchronize()

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host ``src`` (a ``payload_view``) into blocks ``block_ids`` of every layer."""
        if self.device.type == "cpu":
            for layer, pages in enumerate(self.pages):
                pages.index_put_((block_ids,), src[layer])
            return
        with torch.cuda.stream(self._stream()):
            ids = block_ids.to(self.device, non_blocking=True)
            dev = src.to(self.device, non_blocking=True)
            for layer, pages in enumerate(self.pages):
                pages.index_put_((ids,), dev[layer])
            torch.cuda.current_stream().synchronize()

    def _stream(self):
        stream = getattr(self._local, "stream", None)
        if stream is None:  # one side stream per I/O thread: copies overlap the model's kernels
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream


class StagingPool:
    """A fixed set of reusable chunk-sized host buffers (bounded memory, no per-call allocs)."""

    def __init__(self, slab_bytes: int, n_slabs: int, pin: bool = False):
        self.slab_bytes = slab_bytes
        self.n_slabs = n_slabs
        # Pinned (page-locked) slabs when the KV lives on a GPU: DMA straight to/from them.
        self._free = [torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_slabs)]
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
