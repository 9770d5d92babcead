"""The paged KV cache as vLLM registered it, seen as raw pages, and chunk gather/scatter.

Each layer's layout is read from its tensor's shape and strides, never assumed. Supported:

* ``blocks-outer``: one contiguous page per block: the CPU backend's (num_blocks, kv_heads,
  block_size, 2*head) packing, FlashInfer's (num_blocks, 2, block_size, kv_heads, head), newer
  FLASH_ATTN's logical (2, num_blocks, block_size, kv_heads, head) over block-outermost memory,
  pages of one layer a stride of several layers' pages apart (vLLM's cross-layer layouts).
* ``kv-split``: older FlashAttention's contiguous (2, num_blocks, block_size, kv_heads, head): a
  block is two runs, K at [0, b] and V at [1, b].
* ``runs``: any other fixed set of equal contiguous runs per block (e.g. heads outside blocks).
* kernel blocks: given ``num_blocks``, a block dim of k * num_blocks (vLLM split each block into
  k kernel blocks) is read as num_blocks blocks of k kernel blocks.

The block dim is dim 0, or dim 1 when dim 0 is a K/V pair (size 2). Given ``num_blocks`` (the
KV cache config's block count) it must have that size; without it, dim 1 is taken only for 5-d
tensors of shape (2, n != 2, ...). Both dims of size 2 are told apart by strides (dim 1 if it
is the outer one in memory) or refused. Overlapping dims, a non-contiguous innermost dim or
layers that differ are refused with a ValueError.

Chunk payload: per layer, per block, the block's elements in memory order (a block's runs one
after another: K then V for ``kv-split``), viewed as (layers, blocks, runs, run words). Gaps
between pages or runs are never copied, so the payload depends only on ``layout`` (the per-block
dims in memory order, ``size@logical dim``); equal ``layout`` and dtype = interchangeable pages.
Blocks move as opaque bytes (the CPU backend packs K/V in an ISA-specific format).

Head groups (tensor parallelism, ``pd.connector.heads``): given ``heads`` (the KV heads of this rank),
the KV-head dim is found in vLLM's logical per-layer shape (dim 1 of the 4-d
[blocks, heads, tokens, content], dim 3 of the 5-d [2, blocks, tokens, heads, head] /
[blocks, 2, tokens, heads, head]) and a chunk may hold a contiguous range of heads: per layer,
per block, the block's elements in memory order with the head dim cut to the range. With the
whole range that is byte for byte the full page above, so a rank holding exactly one group
moves full pages while a rank of another TP size cuts or stitches the same bytes.
``group_layout(g)`` names that format for g heads per group without depending on the TP size.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import deque
from contextlib import contextmanager
from math import prod
from typing import Iterator

import torch

from pd.connector.chunk import HEADER_SIZE
from pd.connector.keys import layout_fingerprint

SUPPORTED = ("supported: a block dim 0 (or 1 after a K/V pair of size 2) of num_blocks entries, "
             "a contiguous innermost dim, non-overlapping dims, the same layout in every layer")
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
KERNELS = ("auto", "triton", "torch")
logger = logging.getLogger("pd.connector")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _refuse(name: str, t: torch.Tensor, why: str) -> ValueError:
    return ValueError(f"KV cache of layer {name} (shape {tuple(t.shape)}, strides {t.stride()}, "
                      f"{t.dtype}): {why}; this layout is not supported by pdkv ({SUPPORTED})")


def _block_dim(t: torch.Tensor, name: str, num_blocks: int | None) -> tuple[int, int]:
    """(block dim, kernel blocks per block)."""
    shape = t.shape
    pair = t.dim() >= 3 and shape[0] == 2  # dim 0 may be FlashAttention's K/V pair
    if num_blocks is None:
        cands = [0, 1] if pair and t.dim() == 5 else [0]
        if cands == [0, 1] and shape[1] != 2:
            return 1, 1  # vLLM's (2, num_blocks, block_size, kv_heads, head)
    else:
        cands = [d for d in ((0, 1) if pair else (0,)) if shape[d] == num_blocks]
        if not cands:
            if not pair and t.dim() > 0 and shape[0] > num_blocks > 0 and shape[0] % num_blocks == 0:
                return 0, shape[0] // num_blocks
            raise _refuse(name, t, f"no block dim of {num_blocks} blocks")
    if len(cands) == 1:
        return cands[0], 1
    if t.stride(1) > t.stride(0):  # (2, 2, ...): the pair lies inside each block
        return 1, 1
    raise _refuse(name, t, "dims 0 and 1 both have size 2, either could be the block dim")


def _geometry(t: torch.Tensor, name: str, num_blocks: int | None):
    """(byte offset, [(size, byte stride)]: blocks then the run grid, run bytes, layout string)."""
    d, k = _block_dim(t, name, num_blocks)
    if k > 1:
        t = t.unflatten(d, (num_blocks, k))
    dims = sorted((i for i in range(t.dim()) if i != d and t.shape[i] > 1), key=lambda i: -t.stride(i))
    extent = 0  # no overlap: in increasing stride order each dim steps past all the ones inside it
    for i in sorted(dims + [d] * (t.shape[d] > 1), key=t.stride):
        if t.stride(i) <= extent:
            raise _refuse(name, t, "its dims overlap in memory")
        extent += t.stride(i) * (t.shape[i] - 1)
    layout = ",".join(f"{t.shape[i]}@{i}" for i in dims)
    run = 1
    while dims and t.stride(dims[-1]) == run:
        run *= t.shape[dims.pop()]
    if run == 1 and dims:
        raise _refuse(name, t, "its innermost dim is not contiguous")
    es = t.element_size()
    sizes = [(t.shape[d], t.stride(d) * es)] + [(t.shape[i], t.stride(i) * es) for i in dims]
    return t.storage_offset() * es, sizes, run * es, layout


def _head_dim(t: torch.Tensor, heads: int) -> int | None:
    """The KV-head dim of vLLM's logical per-layer shape, if it has ``heads`` entries."""
    d = {4: 1, 5: 3}.get(t.dim())
    return d if d is not None and t.shape[d] == heads else None


def _head_geometry(t: torch.Tensor, name: str, num_blocks: int | None, heads: int):
    """(byte offset, [(size, byte stride, logical dim)] blocks first, then memory order, head dim
    kept even when of size 1 (right after the blocks), innermost contiguous) or None."""
    hd = _head_dim(t, heads)
    d, k = _block_dim(t, name, num_blocks)
    if hd is None or hd == d:
        return None
    if k > 1:
        t = t.unflatten(d, (num_blocks, k))
        hd += hd > d
    dims = sorted((i for i in range(t.dim()) if i != d and t.shape[i] > 1), key=lambda i: -t.stride(i))
    if t.shape[hd] == 1:
        dims.insert(0, hd)
    if not dims or t.stride(dims[-1]) != 1 or dims[-1] == hd:
        return None
    es = t.element_size()
    return t.storage_offset() * es, [(t.shape[i], t.stride(i) * es, i) for i in [d] + dims], hd


class KVLayout:
    """The registered caches of one worker, in a fixed layer order.

    ``num_blocks``: the block count of vLLM's KV cache config; it locates the block dim (see the
    module docstring) and is the attribute ``num_blocks``. ``layout`` names the page format,
    ``kind`` is ``blocks-outer``, ``kv-split`` or ``runs``. ``heads``: the KV heads of this rank;
    ``head_pages`` is then the per-layer view by KV head that chunks of a head group are cut from,
    None when no KV-head dim was found (or no ``heads`` given): only whole pages move.
    """

    def __init__(self, kv_caches: dict[str, torch.Tensor], block_size: int, extra: dict | None = None,
                 *, num_blocks: int | None = None, heads: int | None = None, kernel: str = "auto"):
        if not kv_caches:
            raise ValueError("no KV caches were registered")
        self.layer_names = sorted(kv_caches, key=_natural)
        first = kv_caches[self.layer_names[0]]
        for name in self.layer_names:
            t = kv_caches[name]
            if t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride():
                raise _refuse(name, t, f"layer {self.layer_names[0]} has shape {tuple(first.shape)}, "
                              f"strides {first.stride()}, {first.dtype}")
        geo = [_geometry(kv_caches[name], name, num_blocks) for name in self.layer_names]
        _, dims, run, layout = geo[0]
        self.layout: str = layout
        numbers = [g[0] for g in geo] + [s for _, s in dims] + [run]
        ws = next(w for w in _WORDS if all(x % w == 0 for x in numbers))
        # Indexed copies of 1-byte elements are ~100x slower on the CPU than of 8-byte words.
        self.word = _WORDS[ws]
        self.device = first.device
        self.block_size = block_size
        self.num_blocks = dims[0][0]
        self._grid = tuple(size for size, _ in dims[1:])
        self.runs, self.run_words = prod(self._grid), run // ws
        self.kind = "blocks-outer" if self.runs == 1 else (
            "kv-split" if self.layout.startswith("2@0,") and len(self._grid) == 1 else "runs")
        shape = [size for size, _ in dims] + [self.run_words]
        strides = [s // ws for _, s in dims] + [1]
        self.pages = [torch.empty(0, dtype=self.word, device=self.device).set_(
            kv_caches[name].untyped_storage(), g[0] // ws, shape, strides)
            for name, g in zip(self.layer_names, geo)]
        self.page_bytes = self.runs * run
        self.num_layers = len(self.pages)
        self._local = threading.local()
        self.heads = heads
        self.head_pages: list[torch.Tensor] | None = self._head_pages(kv_caches, num_blocks, heads) if heads else None
        self.fingerprint = layout_fingerprint(
            dtype=str(first.dtype), layout=self.layout, layers=self.num_layers, page_bytes=self.page_bytes,
            block_size=block_size, device=self.device.type, **(extra or {}),
        )
        self.copier = _block_copier(self.pages, kernel)
        self.kernel = "triton" if self.copier is not None else "torch"

    def _head_pages(self, kv_caches: dict[str, torch.Tensor], num_blocks: int | None, heads: int):
        """Per layer a word view (blocks, dims in memory order) with the head dim at ``_hpos``."""
        geo = [_head_geometry(kv_caches[n], n, num_blocks, heads) for n in self.layer_names]
        if any(g is None for g in geo):
            return None
        es = kv_caches[self.layer_names[0]].element_size()
        # offsets, strides and the innermost dim's bytes: all whole words
        numbers = [g[0] for g in geo] + [s for _, s, _ in geo[0][1]] + [geo[0][1][-1][0] * es]
        ws = next(w for w in _WORDS if all(x % w == 0 for x in numbers))
        self._hword, dims, hd = _WORDS[ws], geo[0][1], geo[0][2]
        self._hpos = [i for _, _, i in dims].index(hd)
        self._hdims = dims
        shape = [size for size, _, _ in dims[:-1]] + [dims[-1][0] * es // ws]
        strides = [s // ws for _, s, _ in dims[:-1]] + [1]
        return [torch.empty(0, dtype=self._hword, device=self.device).set_(
            kv_caches[name].untyped_storage(), g[0] // ws, shape, strides)
            for name, g in zip(self.layer_names, geo)]

    def group_layout(self, group_heads: int) -> str:
        """The payload format of a chunk of ``group_heads`` heads, the same at every TP size."""
        if self.head_pages is None:
            raise ValueError("no head groups: KVLayout was built without heads or its KV-head dim was not found")
        sizes = [(group_heads if i == self._hdims[self._hpos][2] else size, i) for size, _, i in self._hdims[1:]]
        hd = self._hdims[self._hpos][2]
        return ",".join(f"{n}{'h' if i == hd else ''}@{i}" for n, i in sizes if n > 1)

    def chunk_payload_bytes(self, n_blocks: int, parts: int = 1) -> int:
        """Payload bytes of ``n_blocks`` blocks; ``parts``: of one of that many head groups."""
        return self.num_layers * n_blocks * self.page_bytes // parts

    def payload_view(self, slab: torch.Tensor, n_blocks: int, parts: int = 1) -> torch.Tensor:
        """The payload region of a staging slab: (layers, n_blocks, runs, run words), or for one of
        ``parts`` head groups (layers, n_blocks, the block's dims with the head dim cut)."""
        n = self.chunk_payload_bytes(n_blocks, parts)
        raw = slab[HEADER_SIZE : HEADER_SIZE + n]
        if parts == 1:
            return raw.view(self.word).view(self.num_layers, n_blocks, self.runs, self.run_words)
        shape = list(self.head_pages[0].shape[1:])
        shape[self._hpos - 1] //= parts
        return raw.view(self._hword).view(self.num_layers, n_blocks, *shape)

    def _cut(self, pages: torch.Tensor, part: tuple[int, int] | None) -> torch.Tensor:
        index, parts = part
        g = self.heads // parts
        return pages.narrow(self._hpos, index * g, g)

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor, part: tuple[int, int] | None = None) -> None:
        """Copy blocks ``block_ids`` of every layer into host ``out`` (a ``payload_view``); ``part``
        = (group index, groups): only that head group's heads.

        One indexed copy per layer. On a GPU the blocks are first gathered on the device, then
        moved to the (pinned) host slab in one copy, on a side stream.
        """
        if self.device.type == "cpu":
            return self._gather(block_ids, out, part)
        with torch.cuda.stream(self._stream()):
            ids = block_ids.to(self.device, non_blocking=True)
            if out.device == self.device:  # a GPU arena's slot: gathered straight into it
                self._gather(ids, out, part)
            else:
                dev = torch.empty(out.shape, dtype=out.dtype, device=self.device)
                self._gather(ids, dev, part)
                out.copy_(dev, non_blocking=True)
            torch.cuda.current_stream().synchronize()

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor, part: tuple[int, int] | None = None) -> None:
        """Copy ``src`` (a ``payload_view``, maybe sliced on dim 1; in host memory, or device
        memory of this GPU: a GPU arena's slot, mapped here) into blocks ``block_ids``
        (``part``: into that head group's heads only)."""
        if self.device.type == "cpu":
            return self._scatter(block_ids, src, part)
        with torch.cuda.stream(self._stream()):
            self._scatter(block_ids.to(self.device, non_blocking=True), src.to(self.device, non_blocking=True),
                          part)
            torch.cuda.current_stream().synchronize()

    def to_host(self, src: torch.Tensor) -> memoryview:
        """The bytes of a uint8 tensor on this GPU (a chunk header, or a payload to checksum or
        to store), copied once, on the side stream (not behind the model's kernels)."""
        with torch.cuda.stream(self._stream()):
            out = src.to("cpu", non_blocking=False)
        return memoryview(out.numpy())

    def from_host(self, dst: torch.Tensor, data: bytes) -> None:
        """Write ``data`` into a uint8 tensor on this GPU, on the side stream; done on return."""
        with torch.cuda.stream(self._stream()):
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8), non_blocking=False)
            torch.cuda.current_stream().synchronize()

    def _gather(self, ids: torch.Tensor, out: torch.Tensor, part=None) -> None:
        if self.copier is not None and (part is None or part[1] == 1) and self._fast(ids, out, True):
            return
        if part is not None and part[1] > 1:
            for layer, pages in enumerate(self.head_pages):
                torch.index_select(self._cut(pages, part), 0, ids, out=out[layer])
            return
        for layer, pages in enumerate(self.pages):
            torch.index_select(pages, 0, ids, out=out[layer].view(len(ids), *self._grid, self.run_words))

    def _scatter(self, ids: torch.Tensor, src: torch.Tensor, part=None) -> None:
        if self.copier is not None and (part is None or part[1] == 1) and self._fast(ids, src, False):
            return
        if part is not None and part[1] > 1:
            for layer, pages in enumerate(self.head_pages):
                self._cut(pages, part).index_put_((ids,), src[layer])
            return
        for layer, pages in enumerate(self.pages):
            pages.index_put_((ids,), src[layer].reshape(len(ids), *self._grid, self.run_words))

    def _fast(self, ids: torch.Tensor, flat: torch.Tensor, to_flat: bool) -> bool:
        """The chunk moved by one Triton launch (``pd.connector.kv_triton``); False (and the
        per-layer path from then on, said once in the log) if that fails."""
        try:
            (self.copier.gather if to_flat else self.copier.scatter)(ids, flat)
            return True
        except Exception as e:  # a compile or launch failure: the per-layer copies still work
            logger.warning("pdkv: the one-launch Triton %s failed (%s: %s); using one indexed copy per layer "
                           "from now on", "gather" if to_flat else "scatter", type(e).__name__, e)
            self.copier, self.kernel = None, "torch"
            return False

    def _stream(self):
        stream = getattr(self._local, "stream", None)
        if stream is None:  # one side stream per I/O thread: copies overlap the model's kernels
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream


def _block_copier(pages: list[torch.Tensor], kernel: str):
    """A ``kv_triton.BlockCopier`` for ``pages`` where ``kernel`` asks for one (``auto``: on a
    CUDA device where Triton imports; ``triton``: anywhere, or a ValueError), else None."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: allowed {', '.join(KERNELS)}")
    if kernel == "torch" or (kernel == "auto" and pages[0].device.type != "cuda"):
        return None
    try:
        from pd.connector.kv_triton import BlockCopier  # imports Triton: only where it is used
        copier = BlockCopier(pages)
        if pages[0].device.type == "cuda":
            copier.warm_up()
        return copier
    except Exception as e:  # noqa: BLE001 - Triton's compile errors are not RuntimeErrors (TritonError, ptxas, OSError)
        if kernel == "triton":
            raise ValueError(f"kernel triton: {type(e).__name__}: {e}") from e
        logger.warning("pdkv: no one-launch Triton copies (%s: %s); one indexed copy per layer", type(e).__name__, e)
        return None


class StagingPool:
    """A fixed set of reusable chunk-sized host buffers (bounded memory, no per-call allocs).

    Served in order of asking: a job waiting for slabs is not overtaken by later ones, so a save
    that needs many slabs is not starved by loads that keep taking a few (a job never waits
    while it holds slabs, so the order cannot deadlock)."""

    def __init__(self, slab_bytes: int, n_slabs: int, pin: bool = False):
        self.slab_bytes = slab_bytes
        self.n_slabs = n_slabs
        # Pinned (page-locked) slabs when the KV lives on a GPU: DMA straight to/from them.
        self._free = [torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_slabs)]
        self._cv = threading.Condition()
        self._waiting: deque[object] = deque()  # the jobs waiting for slabs, first come first

    @contextmanager
    def acquire(self, n: int) -> Iterator[list[torch.Tensor]]:
        """Take ``n`` slabs (n <= n_slabs), waiting for other jobs to give theirs back."""
        slabs = self.take(n)
        try:
            yield slabs
        finally:
            self.give(slabs)

    def take(self, n: int, wait: bool = True) -> list[torch.Tensor] | None:
        """``n`` slabs (n <= n_slabs); without ``wait``, None unless they are free now (a job that
        holds slabs may only ask so: waiting while holding could deadlock two jobs)."""
        n = min(n, self.n_slabs)
        if n <= 0:  # nothing to take (a save whose chunks all went to the transport's slots): no line
            return []
        with self._cv:
            if not wait:  # never ahead of a job already waiting
                return None if self._waiting or len(self._free) < n else [self._free.pop() for _ in range(n)]
            me = object()
            self._waiting.append(me)
            try:
                self._cv.wait_for(lambda: self._waiting[0] is me and len(self._free) >= n)
                return [self._free.pop() for _ in range(n)]
            finally:  # served (or interrupted): the next in line may fit in what is left
                self._waiting.remove(me)
                self._cv.notify_all()

    def give(self, slabs: list[torch.Tensor]) -> None:
        with self._cv:
            self._free.extend(slabs)
            self._cv.notify_all()
