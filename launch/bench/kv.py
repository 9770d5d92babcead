"""`pd bench kv`: chunk gather (paged KV -> staging slab) and scatter (slab -> paged KV) speed.

The paged caches are laid out as vLLM registers them, (num_blocks, kv_heads, block_size,
2*head_size) per layer, and chunks gather *scattered* block ids (a shuffled free list, as in a
busy engine). Beside each figure, the same bytes are moved by one plain contiguous copy between
the same memories (device -> host for gather, host -> device for scatter, memcpy on the CPU),
measured in the same run, so the ratio is the cost of paging and per-layer indexing.

``--transfer`` (on by default) also moves each chunk end to end the way the connector does with
the shm transport: gather into a reserved slot of a producer's shared arena (registered with
CUDA on a GPU), write the chunk header, commit; then a consumer transport (its own mapping of
that arena, as a decode process has) acquires the slot, checks the header, scatters into a
second paged cache and releases it. Its reference is the same bytes copied device -> pinned
host -> device by two plain copies (memcpy twice on the CPU). With two GPUs it also prints a
plain GPU 0 -> GPU 1 copy of the chunk (peer access, no host), the next step's ceiling.

``--head-groups G`` (G > 1) also times the chunk cut into G KV-head groups (what a prefill rank
holding G groups saves when decode runs at a higher TP size) and stitched back from them (a
decode rank at a lower TP size): the same bytes in G chunks, each one indexed copy per layer of
a head-narrowed view; the ratio to the full-page gather/scatter is the cost of re-slicing.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from pd.connector.chunk import HEADER_SIZE, Chunking
from pd.connector.codec import ChunkCodec
from pd.connector.keys import chunk_key, layout_fingerprint
from pd.connector.kv_layout import KVLayout, StagingPool
from transport.config import TransportConfig
from transport.shm import ShmTransport


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
    p.add_argument("--transfer", default="on", choices=("on", "off"),
                   help="also time gather -> shm slot -> scatter end to end (default on)")
    p.add_argument("--head-groups", type=int, default=1,
                   help="also time gather/scatter cut into this many KV-head groups (pd/connector/heads.py); 1 = off")
    p.add_argument("--checksum", default="auto", choices=("auto", "always", "never"),
                   help="payload checksums in the end-to-end path, as connector.checksum (default auto)")


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# pd bench kv on {device} ({name}); {args.layers} layers, {args.kv_heads} kv heads, "
          f"head size {args.head_size}, {args.dtype}; cache {args.cache_gb} GB")
    xfer = args.transfer == "on"
    groups = args.head_groups
    if groups < 1 or args.kv_heads % groups:
        raise ValueError(f"--head-groups {groups}: must be >= 1 and divide --kv-heads {args.kv_heads}")
    checksum = args.checksum == "always" or (args.checksum == "auto" and device.type != "cuda")
    gpu_row = xfer and device.type == "cuda"
    if xfer:
        print(f"# end to end: gather -> shm slot -> scatter, payload checksums {'on' if checksum else 'off'}")
    if gpu_row:
        print("# GPU memory: the same through a GPU arena (connector.transport.shm_memory gpu), device to device; "
              "both ends in this process, so the reader uses the producer's buffer, not its CUDA IPC mapping; "
              "gather and scatter by one Triton launch a chunk (pd/connector/kv_triton.py), and by one indexed "
              "copy per layer (the path before it, and where Triton is missing)")
    print("| block | chunk tokens | chunk MB | gather GB/s | plain copy GB/s | gather/copy | scatter GB/s | "
          "plain copy GB/s | scatter/copy |" + (" transfer GB/s | plain 2 copies GB/s | transfer/copies |" if xfer else "")
          + (" GPU-memory transfer GB/s | plain D2D copy_ GB/s | /1 copy_ | /2 copies_ | device gather GB/s | "
             "/1 copy_ | the same with per-layer copies: transfer GB/s | /1 copy_ | device gather GB/s | /1 copy_ |"
             if gpu_row else "")
          + (f" gather as {groups} groups GB/s | /full gather | scatter from {groups} groups GB/s | /full scatter |"
             if groups > 1 else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if xfer else "")
          + ("---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" if gpu_row else "")
          + ("---:|---:|---:|---:|" if groups > 1 else ""))
    for bs in (int(x) for x in args.block_sizes.split(",")):
        _block_size(args, bs, device, dtype, checksum)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def _block_size(args, bs: int, device: torch.device, dtype: torch.dtype, checksum: bool) -> None:
    """The table rows of one block size: paged caches of about ``--cache-gb``, each chunk size timed."""
    xfer, groups = args.transfer == "on", args.head_groups
    page = args.kv_heads * bs * 2 * args.head_size * torch.tensor([], dtype=dtype).element_size()
    num_blocks = max(64, int(args.cache_gb * 1e9 / (page * args.layers)))
    caches = {f"layers.{i}": torch.empty(num_blocks, args.kv_heads, bs, 2 * args.head_size, dtype=dtype,
                                         device=device).normal_() for i in range(args.layers)}
    layout = KVLayout(caches, bs, heads=args.kv_heads if groups > 1 else None)
    if device.type == "cuda" and bs == args_first(args):
        print(f"# gather/scatter kernel of the first columns: {layout.kernel}", flush=True)
    dst = ({n: torch.empty_like(t) for n, t in caches.items()} if xfer else None)
    dst_layout = KVLayout(dst, bs) if xfer else None
    for tokens in (int(x) for x in args.chunk_tokens.split(",")):
        nb = tokens // bs
        if nb < 1 or nb > num_blocks:
            continue
        n_bytes = layout.chunk_payload_bytes(nb)
        ids = torch.randperm(num_blocks)[:nb]
        row, t_gather, t_scatter, t_copies = _plain_row(layout, ids, nb, n_bytes, bs, tokens, device, args.iters)
        if xfer:
            t_xfer, ok = _time_transfer(layout, dst_layout, ids, nb, n_bytes, device, args.iters, checksum)
            if not ok:
                raise RuntimeError("end-to-end transfer moved wrong bytes")
            row += f" {n_bytes / t_xfer / 1e9:.2f} | {n_bytes / t_copies / 1e9:.2f} | {t_copies / t_xfer:.2f} |"
            if device.type == "cuda":
                row += _gpu_memory_cells(layout, dst_layout, ids, nb, n_bytes, device, args.iters, checksum)
                per_layer = (KVLayout(caches, bs, kernel="torch"), KVLayout(dst, bs, kernel="torch"))
                row += _gpu_memory_cells(*per_layer, ids, nb, n_bytes, device, args.iters, checksum, plain=False)
        if groups > 1:
            row += _grouped(layout, ids, nb, n_bytes, groups, t_gather, t_scatter, device, args.iters)
        print(row)
        if xfer and device.type == "cuda" and torch.cuda.device_count() > 1 and bs == args_first(args):
            _peer_copy(n_bytes, args.iters, tokens)


def _plain_row(layout: KVLayout, ids: torch.Tensor, nb: int, n_bytes: int, bs: int, tokens: int,
               device: torch.device, iters: int) -> tuple[str, float, float, float]:
    """The row's first cells (gather and scatter beside one plain copy each way), the gather and
    scatter seconds, and the seconds of the two plain copies."""
    pool = StagingPool(HEADER_SIZE + n_bytes, 1, pin=device.type == "cuda")
    with pool.acquire(1) as (slab,):
        out = layout.payload_view(slab, nb)
        t_gather = _time(lambda: layout.gather(ids, out), device, iters)
        t_scatter = _time(lambda: layout.scatter(ids, out), device, iters)
        src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
        flat = slab[HEADER_SIZE:HEADER_SIZE + n_bytes]
        t_d2h = _time(lambda: flat.copy_(src, non_blocking=True), device, iters)
        t_h2d = _time(lambda: src.copy_(flat, non_blocking=True), device, iters)
    row = (f"| {bs} | {tokens} | {n_bytes / 1e6:.1f} | {n_bytes / t_gather / 1e9:.2f} | "
           f"{n_bytes / t_d2h / 1e9:.2f} | {t_d2h / t_gather:.2f} | {n_bytes / t_scatter / 1e9:.2f} | "
           f"{n_bytes / t_h2d / 1e9:.2f} | {t_h2d / t_scatter:.2f} |")
    return row, t_gather, t_scatter, t_d2h + t_h2d


def _grouped(layout: KVLayout, ids: torch.Tensor, nb: int, n_bytes: int, groups: int, t_gather: float,
             t_scatter: float, device: torch.device, iters: int) -> str:
    """Table cells: the chunk gathered into, and scattered from, ``groups`` head-group chunks."""
    pool = StagingPool(HEADER_SIZE + layout.chunk_payload_bytes(nb, groups), groups, pin=device.type == "cuda")
    with pool.acquire(groups) as slabs:
        outs = [layout.payload_view(slab, nb, groups) for slab in slabs]
        t_g = _time(lambda: [layout.gather(ids, out, (g, groups)) for g, out in enumerate(outs)], device, iters)
        t_s = _time(lambda: [layout.scatter(ids, out, (g, groups)) for g, out in enumerate(outs)], device, iters)
    return f" {n_bytes / t_g / 1e9:.2f} | {t_gather / t_g:.2f} | {n_bytes / t_s / 1e9:.2f} | {t_scatter / t_s:.2f} |"


def args_first(args) -> int:
    return int(args.block_sizes.split(",")[0])


def _time_transfer(src: KVLayout, dst: KVLayout, ids: torch.Tensor, nb: int, n_bytes: int,
                   device: torch.device, iters: int, checksum: bool, memory: str = "host") -> tuple[float, bool]:
    """Median seconds of one chunk moved as the connector moves it through the shm transport
    (its ``ChunkCodec``: gather into a reserved slot, header, commit; acquire, check, scatter,
    release), the slots in shared host memory or (``memory`` gpu) in a GPU arena."""
    size = HEADER_SIZE + n_bytes
    fp, key = layout_fingerprint(bench="kv"), chunk_key("bench", 0, b"K" * 16)
    dst_ids = ids.flip(0)
    chunking = Chunking(nb * src.block_size, src.block_size)
    put, get = (ChunkCodec(lay, chunking, "bench", fp, checksum, (0,), 1) for lay in (src, dst))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm_dir:
        cfg = TransportConfig(pool_size_mb=max(64, -(-2 * size // (1 << 20))), shm_dir=shm_dir, name="bench-kv",
                              shm_memory=memory)
        pin = {"pin_cuda": True, "device": device} if device.type == "cuda" else {}
        prod, cons = ShmTransport(cfg, **pin), ShmTransport(cfg, **pin)
        try:
            def once() -> None:
                (slot,) = prod.reserve([key], [size])
                put.gather_into(slot.view, ids, key, nb * src.block_size, nb, 0)
                assert prod.commit([slot]) == [True]
                (read,) = cons.acquire([key])
                get.verify(read.view, key, size, nb)
                get.scatter_from(read.view, dst_ids, nb, 0, 0)
                assert cons.release([read]) == [True]
                cons.delete([key])

            t = _time(once, device, iters)
            ok = all(torch.equal(a[ids], b[dst_ids]) for a, b in zip(src.pages, dst.pages))
        finally:
            cons.close()
            prod.close()
    return t, ok


def _gpu_memory_cells(src: KVLayout, dst: KVLayout, ids: torch.Tensor, nb: int, n_bytes: int,
                      device: torch.device, iters: int, checksum: bool, plain: bool = True) -> str:
    """Table cells: the chunk moved through a GPU arena (``shm_memory: gpu``) beside one plain
    device-to-device ``copy_`` of the same bytes and (``plain``) beside two (a gather and a
    scatter each move the bytes once), with the copy's own cell."""
    t_xfer, ok = _time_transfer(src, dst, ids, nb, n_bytes, device, iters, checksum, memory="gpu")
    if not ok:
        raise RuntimeError(f"end-to-end transfer through GPU memory ({src.kernel} copies) moved wrong bytes")
    a = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t_copy = _time(lambda: b.copy_(a), device, iters)
    dev = torch.empty(HEADER_SIZE + n_bytes, dtype=torch.uint8, device=device)
    t_gather = _time(lambda: src.gather(ids, src.payload_view(dev, nb)), device, iters)
    gather = f" {n_bytes / t_gather / 1e9:.2f} | {t_copy / t_gather:.2f} |"
    if not plain:
        return f" {n_bytes / t_xfer / 1e9:.2f} | {t_copy / t_xfer:.2f} |" + gather
    return (f" {n_bytes / t_xfer / 1e9:.2f} | {n_bytes / t_copy / 1e9:.2f} | {t_copy / t_xfer:.2f} | "
            f"{2 * t_copy / t_xfer:.2f} |" + gather)


def _peer_copy(n_bytes: int, iters: int, tokens: int) -> None:
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(n_bytes, dtype=torch.uint8, device="cuda:1")
    peer = torch.cuda.can_device_access_peer(0, 1)

    def copy() -> None:
        b.copy_(a, non_blocking=True)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)

    t = _time(copy, torch.device("cuda:0"), iters)
    print(f"#   {tokens}-token chunk GPU0 -> GPU1 device copy: {n_bytes / t / 1e9:.2f} GB/s (peer access {peer})")
