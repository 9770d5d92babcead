"""A chunk's blocks of every layer gathered or scattered by one kernel launch (Triton), on a GPU.

``KVLayout``'s own path issues one indexed copy per layer: 32 launches each way for a 32-layer
model, each costing tens of microseconds of Python and driver time in the connector's I/O
thread (the GIL the model runner needs too), which dominated a chunk's move through GPU memory
(about 1.1 ms of fixed cost per chunk on an H100 against 0.1 ms for the bytes). Here one
launch moves the whole chunk: program (layer, block, run, tile) copies one tile of one
contiguous run between a layer's page and the chunk's payload.

The layers' caches are separate allocations; the kernel addresses them from the first layer's
pages through a table of each layer's offset from it (in words), so no pointer table and no
pointer casts are needed. A run table holds the word offset of each run of a block (the
``runs`` grid of ``KVLayout``, K then V for ``kv-split``); the payload side is addressed by its
strides (layer, block, run; words within a run contiguous), so a payload sliced on the block
dim (blocks already in the local cache) works as it is.

Runs under ``TRITON_INTERPRET=1`` on the CPU (the unit tests compare it with the per-layer
copies). Only whole pages: head-group cuts keep ``KVLayout``'s per-layer path.
"""
from __future__ import annotations

import logging
import os
import threading

import torch
import triton
import triton.language as tl

logger = logging.getLogger("pd.connector")

MAX_TILE_WORDS = 1024  # words per program: 8 KiB of 8-byte words
_kernels: dict[bool, object] = {}  # interpreted or not -> the jitted kernel
# Launches one at a time: a launch may compile a new variant (another pointer alignment), and
# Triton's JIT is not thread-safe (triton-lang/triton#5933). A launch only queues the kernel.
_launch_lock = threading.Lock()


def _copy_runs(paged, layer_off, run_off, ids, flat, nb, runs, run_words, block_stride,
               flat_layer, flat_block, flat_run, TO_FLAT: tl.constexpr, TILE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    per_layer = nb * runs
    layer = pid // per_layer
    rem = pid - layer * per_layer
    i = rem // runs
    r = rem - i * runs
    p = tl.load(layer_off + layer) + tl.load(ids + i) * block_stride + tl.load(run_off + r)
    f = layer * flat_layer + i * flat_block + r * flat_run
    offs = tile * TILE + tl.arange(0, TILE)
    m = offs < run_words
    if TO_FLAT:
        tl.store(flat + f + offs, tl.load(paged + p + offs, mask=m), mask=m)
    else:
        tl.store(paged + p + offs, tl.load(flat + f + offs, mask=m), mask=m)


def _kernel():
    """The jitted kernel (interpreted where ``TRITON_INTERPRET=1`` is set when first used)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    k = _kernels.get(interpret)
    if k is None:
        # Sizes vary per chunk (a last chunk is shorter): one compiled kernel for all of them.
        k = _kernels[interpret] = triton.jit(do_not_specialize=[
            "nb", "runs", "run_words", "block_stride", "flat_layer", "flat_block", "flat_run"])(_copy_runs)
    return k


class BlockCopier:
    """Gather/scatter of whole pages for the layer views ``pages`` (``KVLayout.pages``: per layer
    (num_blocks, *grid, run words), one word dtype, the same shape and strides in every layer)."""

    def __init__(self, pages: list[torch.Tensor]):
        first = pages[0]
        ws = first.element_size()
        deltas = [p.data_ptr() - first.data_ptr() for p in pages]
        if any(d % ws for d in deltas):
            raise ValueError("layer caches are not a whole number of words apart")
        self.device = first.device
        self.base = first
        self.layers = len(pages)
        self.layer_off = torch.tensor([d // ws for d in deltas], dtype=torch.int64, device=self.device)
        grid, gstrides = first.shape[1:-1], first.stride()[1:-1]
        offs = torch.zeros(1, dtype=torch.int64)
        for size, stride in zip(grid, gstrides):  # row-major over the grid: the payload's run order
            offs = (offs[:, None] + torch.arange(size, dtype=torch.int64)[None, :] * stride).reshape(-1)
        self.run_off = offs.to(self.device)
        self.runs, self.run_words = len(offs), first.shape[-1]
        self.block_stride = first.stride(0)
        self.tile = min(MAX_TILE_WORDS, triton.next_power_of_2(self.run_words))

    def warm_up(self) -> None:
        """Compile the kernel now (a second or two, at start-up, not in the first request's
        transfer): block 0 of every layer read out and written back unchanged."""
        ids = torch.zeros(1, dtype=torch.int64, device=self.device)
        tmp = torch.empty(self.layers, 1, self.runs, self.run_words, dtype=self.base.dtype, device=self.device)
        self.gather(ids, tmp)
        self.scatter(ids, tmp)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Blocks ``ids`` (int64 on this device) of every layer into ``out`` (layers, n, runs, run
        words) on this device, on the current stream."""
        self._launch(ids, out, True)

    def scatter(self, ids: torch.Tensor, src: torch.Tensor) -> None:
        """``src`` (layers, n, runs, run words; any strides on the first three dims) into blocks ``ids``."""
        self._launch(ids, src, False)

    def _launch(self, ids: torch.Tensor, flat: torch.Tensor, to_flat: bool) -> None:
        n = len(ids)
        if n == 0:
            return
        want = (self.layers, n, self.runs, self.run_words)
        if tuple(flat.shape) != want or flat.stride(3) != 1 or flat.dtype != self.base.dtype:
            raise ValueError(f"payload view {tuple(flat.shape)} {flat.dtype} strides {flat.stride()}: "
                             f"expected {want} {self.base.dtype} with contiguous runs")
        if flat.device != self.device or ids.device != self.device:
            raise ValueError(f"payload on {flat.device}, ids on {ids.device}: both must be on {self.device}")
        grid = (self.layers * n * self.runs, triton.cdiv(self.run_words, self.tile))
        with _launch_lock:
            _kernel()[grid](self.base, self.layer_off, self.run_off, ids, flat, n, self.runs, self.run_words,
                            self.block_stride, flat.stride(0), flat.stride(1), flat.stride(2),
                            TO_FLAT=to_flat, TILE=self.tile)
