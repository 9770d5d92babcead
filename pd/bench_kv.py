"""`pd bench kv`: chunk gather (paged KV -> staging slab) and scatter (slab -> paged KV) speed.

The paged caches are laid out as vLLM registers them, (num_blocks, kv_heads, block_size,
2*head_size) per layer, and chunks gather *scattered* block ids (a shuffled free list, as in a
busy engine). Beside each figure, the same bytes are moved by one plain contiguous copy between
the same memories (device -> host for gather, host -> device for scatter, memcpy on the CPU),
measured in the same run, so the ratio is the cost of paging and per-layer indexing.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from pd.chunk import HEADER_SIZE
from pd.kv_layout import KVLayout, StagingPool


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--block-sizes", default="16,32,128", help="tokens per block, comma separated")
    p.add_argument("--chunk-tokens", default="256,1024,4096", help="tokens per chunk, comma separated")
    p.add_argument("--cache-gb", type=float, default=4.0, help="size of the paged cache")
    p.add_argument("--iters", type=int, default=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, iters: int) -> float:
    fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    dtype = getattr(torch, args.dtype)
    es = torch.tensor([], dtype=dtype).element_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# pd bench kv on {device} ({name}); {args.layers} layers, {args.kv_heads} kv heads, "
          f"head size {args.head_size}, {args.dtype}; cache {args.cache_gb} GB")
    print("| block | chunk tokens | chunk MB | gather GB/s | plain copy GB/s | gather/copy | scatter GB/s | "
          "plain copy GB/s | scatter/copy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bs in (int(x) for x in args.block_sizes.split(",")):
        page = args.kv_heads * bs * 2 * args.head_size * es
        num_blocks = max(64, int(args.cache_gb * 1e9 / (page * args.layers)))
        caches = {f"layers.{i}": torch.empty(num_blocks, args.kv_heads, bs, 2 * args.head_size, dtype=dtype,
                                             device=device).normal_() for i in range(args.layers)}
        layout = KVLayout(caches, bs)
        for tokens in (int(x) for x in args.chunk_tokens.split(",")):
            nb = tokens // bs
            if nb < 1 or nb > num_blocks:
                continue
            n_bytes = layout.chunk_payload_bytes(nb)
            pool = StagingPool(HEADER_SIZE + n_bytes, 1, pin=device.type == "cuda")
            ids = torch.randperm(num_blocks)[:nb]
            with pool.acquire(1) as (slab,):
                out = layout.payload_view(slab, nb)
                t_gather = _time(lambda: layout.gather(ids, out), device, args.iters)
                t_scatter = _time(lambda: layout.scatter(ids, out), device, args.iters)
                src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
                flat = slab[HEADER_SIZE:HEADER_SIZE + n_bytes]
                t_d2h = _time(lambda: flat.copy_(src, non_blocking=True), device, args.iters)
                t_h2d = _time(lambda: src.copy_(flat, non_blocking=True), device, args.iters)
            print(f"| {bs} | {tokens} | {n_bytes / 1e6:.1f} | {n_bytes / t_gather / 1e9:.2f} | "
                  f"{n_bytes / t_d2h / 1e9:.2f} | {t_d2h / t_gather:.2f} | {n_bytes / t_scatter / 1e9:.2f} | "
                  f"{n_bytes / t_h2d / 1e9:.2f} | {t_h2d / t_scatter:.2f} |")
        del caches, layout
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0
