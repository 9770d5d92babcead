"""``pd bench transport``: put/get throughput and latency per chunk size, next to memcpy.

For each chunk size, a set of preallocated source chunks is put (one batched call), read back
into preallocated destination chunks (one batched call) and deleted; then the same through the
zero-copy API (``reserve`` + a copy into each slot view + ``commit``; ``acquire`` + a copy out
of each view + ``release``) and deleted, ``--iters`` times; then up to ``LAT_SAMPLES`` chunks
are put and got one call each for per-chunk latency. A plain ``numpy.copyto`` between the same
buffers gives the memcpy baseline of this machine and run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
import uuid

import numpy as np

log = logging.getLogger(__name__)

TRANSPORTS = ("shm",)
NOT_BUILT = ("tcp", "infinistore")
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M"
LAT_SAMPLES = 200
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``64K`` / ``1M`` / ``4096`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"bad size {text!r}; expected e.g. 64K, 1M, 4096")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _fmt_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pd bench transport``."""
    parser.add_argument("--transport", default="shm",
                        help="transport to measure: shm (tcp and infinistore are not built yet)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated chunk sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--total-mb", type=int, default=256,
                        help="bytes moved per pass and size, in MiB (at least 4 chunks; default 256)")
    parser.add_argument("--iters", type=int, default=3, help="timed passes per size (default 3)")
    parser.add_argument("--shm-dir", default="/dev/shm", help="tmpfs directory for the shm pool")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    """Uninitialised uint8 array starting on an ``align`` boundary.

    numpy's own buffers start 16 bytes past a boundary; on the dev machine (AMD EPYC VM) a
    ``read()`` from tmpfs into such a buffer runs at ~2.2 GB/s against ~6-7 GB/s into a
    32-byte-or-better aligned one, so the benchmark (like real staging buffers) aligns.
    """
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _bench_size(transport, src: np.ndarray, dst: np.ndarray, size: int, n: int, iters: int,
                tag: str) -> dict:
    srcs = [src[i * size:(i + 1) * size] for i in range(n)]
    dsts = [dst[i * size:(i + 1) * size] for i in range(n)]
    keys = [f"bench/{tag}/{size}/{i}" for i in range(n)]
    total = size * n
    put_bw, get_bw, zput_bw, zget_bw, cpy_bw = [], [], [], [], []
    for it in range(iters):
        for i in (0, n - 1):
            srcs[i][:8] = np.frombuffer(np.int64(it * n + i).tobytes(), np.uint8)
        t0 = time.perf_counter()
        ok = transport.put(keys, srcs)
        t1 = time.perf_counter()
        got = transport.get(keys, dsts)
        t2 = time.perf_counter()
        if not all(ok) or got != [size] * n:
            raise RuntimeError(f"size {size}: {ok.count(False)} puts dropped, "
                               f"{sum(1 for g in got if g != size)} gets missed")
        if not (np.array_equal(dsts[0], srcs[0]) and np.array_equal(dsts[-1], srcs[-1])):
            raise RuntimeError(f"size {size}: data read back differs from data put")
        transport.delete(keys)
        for d in (dsts[0], dsts[-1]):
            d[:8] = 0
        z0 = time.perf_counter()
        slots = transport.reserve(keys, [size] * n)
        for slot, s in zip(slots, srcs):  # the worker gathers KV into the slot view instead
            if slot is not None:
                np.copyto(np.frombuffer(slot.view, np.uint8), s)
        ok = transport.commit(slots)
        z1 = time.perf_counter()
        reads = transport.acquire(keys)
        for r, d in zip(reads, dsts):  # the worker scatters (or DMAs) from the view instead
            if r is not None:
                np.copyto(d, np.frombuffer(r.view, np.uint8))
        held = transport.release(reads)
        z2 = time.perf_counter()
        if not all(ok) or not all(held):
            raise RuntimeError(f"size {size}: zero-copy: {ok.count(False)} slots dropped, "
                               f"{held.count(False)} reads missed or lost")
        if not (np.array_equal(dsts[0], srcs[0]) and np.array_equal(dsts[-1], srcs[-1])):
            raise RuntimeError(f"size {size}: zero-copy data read back differs from data put")
        transport.delete(keys)
        t3 = time.perf_counter()
        for s, d in zip(srcs, dsts):
            np.copyto(d, s)
        t4 = time.perf_counter()
        put_bw.append(total / (t1 - t0))
        get_bw.append(total / (t2 - t1))
        zput_bw.append(total / (z1 - z0))
        zget_bw.append(total / (z2 - z1))
        cpy_bw.append(total / (t4 - t3))
    m = min(n, LAT_SAMPLES)
    put_ms, get_ms = [], []
    for i in range(m):
        t0 = time.perf_counter()
        transport.put(keys[i:i + 1], srcs[i:i + 1])
        t1 = time.perf_counter()
        transport.get(keys[i:i + 1], dsts[i:i + 1])
        t2 = time.perf_counter()
        put_ms.append((t1 - t0) * 1e3)
        get_ms.append((t2 - t1) * 1e3)
    transport.delete(keys[:m])
    put_gbs, get_gbs, zput_gbs, zget_gbs, cpy_gbs = (
        statistics.median(x) / 1e9 for x in (put_bw, get_bw, zput_bw, zget_bw, cpy_bw))
    return {
        "size": _fmt_size(size), "n": n, "put": put_gbs, "get": get_gbs,
        "zput": zput_gbs, "zget": zget_gbs,
        "put_p50": _pct(put_ms, .5), "put_p99": _pct(put_ms, .99),
        "get_p50": _pct(get_ms, .5), "get_p99": _pct(get_ms, .99),
        "memcpy": cpy_gbs, "put_ratio": put_gbs / cpy_gbs, "get_ratio": get_gbs / cpy_gbs,
        "zput_ratio": zput_gbs / cpy_gbs, "zget_ratio": zget_gbs / cpy_gbs,
    }


_COLS = [("size", "{:>6}"), ("n", "{:>5}"), ("put", "{:>8.2f}"), ("get", "{:>8.2f}"),
         ("zput", "{:>8.2f}"), ("zget", "{:>8.2f}"),
         ("put_p50", "{:>8.3f}"), ("put_p99", "{:>8.3f}"), ("get_p50", "{:>8.3f}"),
         ("get_p99", "{:>8.3f}"), ("memcpy", "{:>8.2f}"), ("put_ratio", "{:>7.2f}"),
         ("get_ratio", "{:>7.2f}"), ("zput_ratio", "{:>7.2f}"), ("zget_ratio", "{:>7.2f}")]
_HEAD = ["size", "chunks", "put GB/s", "get GB/s", "zc put GB/s", "zc get GB/s", "put p50",
         "put p99", "get p50", "get p99", "memcpy GB/s", "put/cpy", "get/cpy", "zc put/cpy",
         "zc get/cpy"]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the measured rows (GB = 1e9 bytes, latencies in ms per chunk)."""
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "|".join("---:" for _ in _HEAD) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]).strip() for k, fmt in _COLS) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a header and the table; 0 on success, 2 on bad arguments."""
    if args.transport not in TRANSPORTS:
        log.error("unknown transport %r; allowed: %s (%s are not built yet)", args.transport,
                  ", ".join(TRANSPORTS), " and ".join(NOT_BUILT))
        return 2
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        log.error("--sizes: %s", e)
        return 2
    if not sizes or args.total_mb <= 0 or args.iters <= 0:
        log.error("--sizes must name at least one size; --total-mb and --iters must be positive")
        return 2
    if not os.path.isdir(args.shm_dir):
        log.error("--shm-dir %s is not a directory", args.shm_dir)
        return 2

    from pd.config import TransportConfig
    from transport.arena import slot_bytes
    from transport.shm import ShmTransport, cleanup_pool

    total = args.total_mb << 20
    counts = {s: max(4, total // s) for s in sizes}
    span = max(s * n for s, n in counts.items())
    arena = max(slot_bytes(s) * n for s, n in counts.items())  # every chunk of a pass at once
    cfg = TransportConfig(kind="shm", pool_size_mb=-(-arena >> 20) + 16, shm_dir=args.shm_dir,
                          name=f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    print(f"# pd bench transport  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"# cpu: {cpu_model()} ({os.cpu_count()} logical cores)  python {platform.python_version()}"
          f"  numpy {np.__version__}")
    print(f"# command: {shlex.join(sys.argv)}")
    print(f"# transport={args.transport} dir={args.shm_dir} ({_fs_type(os.path.realpath(args.shm_dir))})"
          f" bytes/pass~{args.total_mb} MiB iters={args.iters} latency samples<={LAT_SAMPLES}")
    sys.stdout.flush()
    src, dst = aligned_empty(span), aligned_empty(span)
    src.fill(0x5A)  # touch every page now, not in the timed loop
    dst.fill(0)
    transport = ShmTransport(cfg)
    rows = []
    try:
        t0 = time.perf_counter()  # the arena is made (allocated, faulted in) by the first write
        transport.commit(transport.reserve(["bench/warm-up"], [1]), [False])
        print(f"# arena: {transport.arena_bytes >> 20} MiB, made in {time.perf_counter() - t0:.2f} s"
              " (once per producer, not in the figures)")
        for size in sizes:
            rows.append(_bench_size(transport, src, dst, size, counts[size], args.iters, cfg.name))
    finally:
        transport.close()
        cleanup_pool(cfg)
    print(format_table(rows))
    print("# GB/s = 1e9 bytes/s, median of iters (one batched call per pass); zc = reserve + "
          "numpy.copyto into each view + commit / acquire + numpy.copyto out + release; p50/p99 = "
          "ms per single-chunk put/get call; cpy = numpy.copyto between the same buffers")
    return 0
