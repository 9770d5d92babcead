"""``pd bench store``: write/read GB/s and per-chunk latency of a KV store vs plain O_DIRECT I/O.

For each chunk size a batch of chunks (about ``--total-mb``, at least 4 chunks) is

* written through the store: ``put`` of every chunk, then ``flush``; write GB/s = bytes / (first
  put .. flush done); put p50/p99 = the time of each ``put`` call (the enqueue cost: a copy
  into the write queue), and read back with ``get`` into preallocated page-aligned buffers
  (read GB/s = bytes / time of all gets; get p50/p99 per call); the first and last chunk are
  compared byte for byte with what was put;
* written and read with plain sequential I/O, one file per chunk in the same directory
  (``O_DIRECT`` from/into page-aligned mmap buffers; if the filesystem refuses ``O_DIRECT``,
  buffered I/O with ``os.fsync`` per file, and the page cache of those files dropped before
  reading). p50/p99 there = open+write+close (open+read+close) of one chunk.

Both are measured in the same run, interleaved per iteration, and the table gives store/plain.

Page cache: with ``o_direct`` off the store's writes end in the page cache (``flush`` does not
fsync), so its write GB/s is the speed of filling the page cache, not the disk. Before its
reads, the benchmark (untimed) ``fdatasync``s each file and drops its cached pages with
``posix_fadvise(DONTNEED)`` so reads come from the device; the header says so. With
``o_direct`` on, neither writes nor reads go through the page cache.

Everything is written under a fresh sub-directory of ``--path`` (default ``<repo>/.bench-tmp``,
a disk filesystem, never /dev/shm) which is removed at the end.

``--dram-gb N`` puts the DRAM tier (store/dram.py, N GB in /dev/shm) in front of the store: puts copy
into it as well, and the gets are served from it (the header says so); its arena is removed at the end.

``--backend hf3fs`` measures store/hf3fs through whatever ``hf3fs_fuse.io`` imports: the real
USRBIO client (then ``--path`` must be on a 3FS mount), or the emulator from ``tests/doubles``
(``PYTHONPATH=tests/doubles``; the run directory is made an emulated mount, the header says
EMULATOR, and the figures are pdkv's store code over local files, not 3FS). The iovec is sized
so that the largest chunk fits a slab; the page cache is dropped before reads as for
``o_direct`` off.
"""
from __future__ import annotations

import argparse
import errno
import logging
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from launch.bench.common import counts, fmt_size, fs_type, parse_size, pct, print_header
from store import make_store
from store.config import Hf3fsConfig, StoreConfig
from store.dram_arena import remove_arena
from store.hf3fs import HDR, MISSING_MODULE
from store.tiered import TieredStore

log = logging.getLogger(__name__)

BACKENDS = ("local", "hf3fs")
DEFAULT_SIZES = "256K,1M,4M,16M,64M"
ALIGN = 4096
REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO / ".bench-tmp"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pd bench store``."""
    parser.add_argument("--backend", default="local",
                        help="store backend to measure: local or hf3fs (hf3fs: through hf3fs_fuse.io, "
                             "the real client or, with PYTHONPATH=tests/doubles, the emulator)")
    parser.add_argument("--path", default=None,
                        help=f"directory on the disk to measure; a fresh sub-directory is made and "
                             f"removed (default {DEFAULT_PATH})")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated chunk sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--total-mb", type=int, default=256,
                        help="bytes per batch and size, in MiB (at least 4 chunks; default 256)")
    parser.add_argument("--iters", type=int, default=2,
                        help="timed batches per size and mode (GB/s: median; default 2)")
    parser.add_argument("--write-threads", type=int, default=1,
                        help="store.write_threads (default 1, the StoreConfig default)")
    parser.add_argument("--dram-gb", type=float, default=0.0,
                        help="connector.store.dram_gb: a DRAM tier of N GB (/dev/shm) in front of the store; "
                             "the gets then come from it (default 0: none). It must hold a batch (--total-mb)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--o-direct", dest="o_direct", action="store_const", const=True, default=None,
                   help="only the store with o_direct on (default: both off and on)")
    g.add_argument("--no-o-direct", dest="o_direct", action="store_const", const=False,
                   help="only the store with o_direct off")


# -- buffers and plain I/O ---------------------------------------------------------------------
def _aligned(nbytes: int) -> tuple[mmap.mmap, memoryview]:
    """A page-aligned anonymous mapping (and a byte view of it), every page touched."""
    m = mmap.mmap(-1, max(nbytes, ALIGN))
    mv = memoryview(m)[:nbytes]
    for off in range(0, nbytes, ALIGN):  # fault the pages in now, not in the timed loops
        mv[off] = 0
    return m, mv


def _fill(mv: memoryview, size: int, n: int, stamp: int) -> None:
    """Fill chunk i with a byte pattern and stamp (stamp, i) in its first 16 bytes."""
    pattern = bytes(range(256)) * (ALIGN // 256)
    block = pattern * max(1, min(size, 1 << 20) // len(pattern))
    for off in range(0, size * n, len(block)):
        end = min(off + len(block), size * n)
        mv[off:end] = block[:end - off]
    for i in range(n):
        mv[i * size:i * size + 16] = stamp.to_bytes(8, "little") + i.to_bytes(8, "little")


def _same(a: memoryview, b: memoryview) -> bool:
    return bool(np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)))


def _drop_cache(path: str) -> None:
    """fdatasync ``path`` and drop its pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _drop_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                _drop_cache(os.path.join(dirpath, name))
            except OSError:
                pass


class _Plain:
    """Plain one-file-per-chunk sequential I/O with O_DIRECT (or buffered + fsync)."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root)
        self.direct = True
        self.why = ""
        probe = os.path.join(root, "probe")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct, self.why = False, f"O_DIRECT refused ({e.strerror})"
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass

    def _write_all(self, fd: int, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            n = os.write(fd, mv[done:])
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def write(self, names: list[str], chunks: list[memoryview]) -> tuple[float, list[float]]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)
        lat = []
        t0 = time.perf_counter()
        for name, mv in zip(names, chunks):
            t = time.perf_counter()
            fd = os.open(os.path.join(self.root, name), flags, 0o644)
            try:
                self._write_all(fd, mv)
                if not self.direct:
                    os.fsync(fd)
            finally:
                os.close(fd)
            lat.append(time.perf_counter() - t)
        return time.perf_counter() - t0, lat

    def read(self, names: list[str], outs: list[memoryview]) -> tuple[float, list[float]]:
        if not self.direct:
            _drop_tree(self.root)
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        lat = []
        t0 = time.perf_counter()
        for name, mv in zip(names, outs):
            t = time.perf_counter()
            fd = os.open(os.path.join(self.root, name), flags)
            try:
                done = 0
                while done < len(mv):
                    n = os.preadv(fd, [mv[done:]], done)
                    if n <= 0:
                        raise OSError(errno.EIO, f"short read of {name}")
                    done += n
            finally:
                os.close(fd)
            lat.append(time.perf_counter() - t)
        return time.perf_counter() - t0, lat

    def clear(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(os.path.join(self.root, name))
            except FileNotFoundError:
                pass


# -- the store side ----------------------------------------------------------------------------
def _store_pass(store, root: str, keys: list[str], srcs: list[memoryview], dsts: list[memoryview],
                size: int, buffered: bool) -> dict:
    n = len(keys)
    put_lat, get_lat = [], []
    before = dict(store.stats)
    t0 = time.perf_counter()
    for key, mv in zip(keys, srcs):
        t = time.perf_counter()
        ok = store.put(key, mv)
        put_lat.append(time.perf_counter() - t)
        if not ok:
            raise RuntimeError(f"size {fmt_size(size)}: put of {key} was dropped ({store.stats})")
    if not store.flush(timeout_s=600.0):
        raise RuntimeError(f"size {fmt_size(size)}: flush did not finish in 600 s")
    t_write = time.perf_counter() - t0
    errs = {k: store.stats[k] - before[k] for k in ("write_errors", "budget_drops", "dropped")}
    if any(errs.values()) or store.stats["writes"] - before["writes"] != n:
        raise RuntimeError(f"size {fmt_size(size)}: the store lost writes: {errs}")
    if buffered:
        _drop_tree(root)  # untimed: the reads below come from the device, not the page cache
    t0 = time.perf_counter()
    for key, mv in zip(keys, dsts):
        t = time.perf_counter()
        got = store.get(key, mv)
        get_lat.append(time.perf_counter() - t)
        if got != size:
            raise RuntimeError(f"size {fmt_size(size)}: get of {key} returned {got} bytes")
    t_read = time.perf_counter() - t0
    for i in (0, n - 1):
        if not _same(dsts[i], srcs[i]):
            raise RuntimeError(f"size {fmt_size(size)}: chunk {i} read back differs from what was put")
    store.delete(keys)
    return {"write_s": t_write, "read_s": t_read, "put_lat": put_lat, "get_lat": get_lat}


def _summary(passes: list[dict], total: int) -> dict:
    put_lat = [x for p in passes for x in p["put_lat"]]
    get_lat = [x for p in passes for x in p["get_lat"]]
    return {
        "write": statistics.median(total / p["write_s"] for p in passes) / 1e9,
        "read": statistics.median(total / p["read_s"] for p in passes) / 1e9,
        "w_p50": pct(put_lat, .5) * 1e3, "w_p99": pct(put_lat, .99) * 1e3,
        "r_p50": pct(get_lat, .5) * 1e3, "r_p99": pct(get_lat, .99) * 1e3,
    }


_HEAD = ["o_direct", "size", "chunks", "write GB/s", "plain write GB/s", "write/plain",
         "read GB/s", "plain read GB/s", "read/plain", "put p50", "put p99", "get p50", "get p99",
         "plain wr p50", "plain wr p99", "plain rd p50", "plain rd p99"]


def format_table(rows: list[dict]) -> str:
    """A Markdown table (GB = 1e9 bytes; latencies in ms per chunk)."""
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "|".join(":---" if i == 0 else "---:"
                                                          for i in range(len(_HEAD))) + "|"]
    for r in rows:
        s, p = r["store"], r["plain"]
        cells = ["-" if r["o_direct"] is None else "on" if r["o_direct"] else "off", r["size"], str(r["n"]),
                 f"{s['write']:.2f}", f"{p['write']:.2f}", f"{s['write'] / p['write']:.2f}",
                 f"{s['read']:.2f}", f"{p['read']:.2f}", f"{s['read'] / p['read']:.2f}",
                 f"{s['w_p50']:.3f}", f"{s['w_p99']:.3f}", f"{s['r_p50']:.3f}", f"{s['r_p99']:.3f}",
                 f"{p['w_p50']:.3f}", f"{p['w_p99']:.3f}", f"{p['r_p50']:.3f}", f"{p['r_p99']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> list[int]:
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown store backend {args.backend!r} for pd bench store; "
                         f"choose {' or '.join(BACKENDS)}")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--sizes: {e}") from None
    if not sizes:
        raise ValueError("--sizes must name at least one size")
    bad = [fmt_size(s) for s in sizes if s % ALIGN]
    if bad:
        raise ValueError(f"--sizes must be multiples of {ALIGN} bytes (O_DIRECT); got {', '.join(bad)}")
    if args.total_mb <= 0 or args.iters <= 0 or args.write_threads <= 0:
        raise ValueError("--total-mb, --iters and --write-threads must be positive")
    if not args.dram_gb >= 0:
        raise ValueError(f"--dram-gb must be 0 (no DRAM tier) or a positive number of GB; got {args.dram_gb}")
    return sizes


def _usrbio():
    """``hf3fs_fuse.io`` (the real client or the emulator), or ValueError saying how to get one."""
    try:
        import hf3fs_fuse.io as io  # type: ignore[import-not-found]
    except Exception:
        raise ValueError(f"{MISSING_MODULE}; to measure pdkv's hf3fs code on the USRBIO emulator "
                         "(a test double, not 3FS) run with PYTHONPATH=tests/doubles") from None
    return io


def _hf3fs_config(io, d: str, budget_bytes: int, queue_mb: int, largest: int, dram_gb: float = 0.0):
    """A StoreConfig for ``d`` whose slabs hold the largest chunk (iovec = 2 x its slot class)."""
    mp = io.extract_mount_point(d)
    if not mp:
        raise ValueError(f"--path {d} is not on a 3FS mount (hf3fs_fuse.io.extract_mount_point)")
    slot = 1 << (largest + HDR - 1).bit_length()
    iov_mb = max(200, 2 * slot >> 20)
    if iov_mb > 2048:
        raise ValueError(f"--sizes: {fmt_size(largest)} needs an iovec of {iov_mb} MB; at most 2048")
    budget = max(budget_bytes, 4 * slot) + (64 << 20)
    return StoreConfig(backend="hf3fs", paths=[d], size_gb=budget / 1e9, queue_mb=queue_mb, dram_gb=dram_gb,
                       hf3fs=Hf3fsConfig(mount_point=mp, iov_size_mb=iov_mb))


def _base_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The directory to measure under, and whether it was made here (the default, removed at the end)."""
    base = Path(args.path) if args.path else DEFAULT_PATH
    made_base = False
    if args.path is None and not base.exists():
        base.mkdir()
        made_base = True
    if not base.is_dir():
        raise ValueError(f"--path {base} is not a directory")
    return base, made_base


def _open_stores(args: argparse.Namespace, io, root: str, modes: list[bool], per_size: dict[int, int],
                 span: int, stores: dict[bool, tuple]) -> StoreConfig:
    """A store per o_direct mode, each in its own directory under ``root``, into ``stores``; the last config."""
    for od in modes:
        d = os.path.join(root, f"store-odirect-{'on' if od else 'off'}")
        os.makedirs(d)
        padded = span + max(per_size.values()) * 2 * ALIGN
        if io is not None:
            # Slots are powers of two: a batch needs up to twice its bytes.
            cfg = _hf3fs_config(io, d, 2 * padded, (padded >> 20) + 64, max(per_size), args.dram_gb)
        else:
            cfg = StoreConfig(backend=args.backend, paths=[d], o_direct=od,
                              size_gb=max(0.01, (padded + (64 << 20)) / 1e9),
                              queue_mb=(padded >> 20) + 64, write_threads=args.write_threads,
                              dram_gb=args.dram_gb)
        stores[od] = (make_store(cfg), d)
    return cfg


def _print_setup(args: argparse.Namespace, real: str, cfg: StoreConfig, io, modes: list[bool], plain: _Plain) -> None:
    hf3fs = io is not None
    print_header("store", numpy_too=False)
    print(f"# backend={args.backend} dir={real} ({fs_type(real)}) bytes/batch~{args.total_mb} MiB"
          f" iters={args.iters} write_threads={args.write_threads}"
          + (f" iov_size_mb={cfg.hf3fs.iov_size_mb} io_threads={cfg.hf3fs.io_threads}"
             f" usrbio={getattr(io, '__file__', io)}" if hf3fs else
             f" store o_direct: {', '.join('on' if m else 'off' for m in modes)}"))
    if cfg.dram_gb:
        print(f"# DRAM tier: {cfg.dram_gb} GB in /dev/shm in front of the store: puts also copy into it, "
              "gets are served from it (store/dram.py)")
    if getattr(io, "EMULATOR", False):
        print("# USRBIO EMULATOR (tests/doubles: a test double over local files): these figures "
              "measure pdkv's hf3fs store code over local files, NOT 3FS")
    print("# plain baseline: one file per chunk, sequential, "
          + ("O_DIRECT" if plain.direct else f"buffered + fsync per file, page cache dropped "
             f"before reads ({plain.why})"))
    if hf3fs:
        print("# hf3fs: write GB/s = first put .. flush done; before reading, the data files "
              "are fdatasync'ed and their pages dropped (untimed)")
    elif False in modes:
        print("# o_direct off: write GB/s = filling the page cache (flush does not fsync); "
              "before reading, each file is fdatasync'ed and its pages dropped (untimed), so "
              "reads come from the device")
    sys.stdout.flush()


def _measure_size(args: argparse.Namespace, size: int, n: int, src: memoryview, dst: memoryview,
                  modes: list[bool], stores: dict[bool, tuple], plain: _Plain) -> tuple[list[dict], dict]:
    """``args.iters`` passes of ``n`` chunks of ``size`` bytes, plain I/O then each store, interleaved:
    (the plain passes, the store passes per o_direct mode)."""
    srcs = [src[i * size:(i + 1) * size] for i in range(n)]
    dsts = [dst[i * size:(i + 1) * size] for i in range(n)]
    plain_passes: list[dict] = []
    store_passes: dict[bool, list[dict]] = {od: [] for od in modes}
    for it in range(args.iters):
        _fill(src, size, n, stamp=it + 1)
        names = [f"{size}-{it}-{i}.bin" for i in range(n)]
        w, wl = plain.write(names, srcs)
        r, rl = plain.read(names, dsts)
        if not (_same(dsts[0], srcs[0]) and _same(dsts[-1], srcs[-1])):
            raise RuntimeError(f"size {fmt_size(size)}: plain read back differs")
        plain.clear(names)
        plain_passes.append({"write_s": w, "read_s": r, "put_lat": wl, "get_lat": rl})
        for od in modes:
            store, d = stores[od]
            keys = [f"bench-{os.getpid()}/0/{size:x}{it:04x}{i:08x}" for i in range(n)]
            dsts[0][:16] = dsts[-1][:16] = bytes(16)  # a stale buffer cannot pass
            store_passes[od].append(_store_pass(store, d, keys, srcs, dsts, size,
                                                buffered=not store.usage().get("o_direct")))
    return plain_passes, store_passes


def _print_results(rows: list[dict], stores: dict[bool, tuple]) -> None:
    fallbacks = []
    for od, (store, _d) in stores.items():
        if od and not store.usage().get("o_direct", True):
            fallbacks.append("the store's o_direct on rows ran buffered: the filesystem "
                             "refused O_DIRECT")
    print(format_table(rows))
    print("# GB/s = 1e9 bytes/s, median of iters; write = first put .. flush done; read = all "
          "gets into preallocated page-aligned buffers; p50/p99 = ms per call (put = enqueue "
          "copy; plain = open+write/read+close of one chunk); ratios = store/plain")
    for f in fallbacks:
        print(f"# NOTE: {f}")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a header and the table. Bad arguments raise ValueError (exit 2)."""
    sizes = _check_args(args)
    base, made_base = _base_dir(args)
    hf3fs = args.backend == "hf3fs"
    io = _usrbio() if hf3fs else None
    modes = [False] if hf3fs else [False, True] if args.o_direct is None else [args.o_direct]
    per_size, span = counts(args, sizes)
    stores: dict[bool, tuple] = {}
    root = tempfile.mkdtemp(prefix=f"pd-bench-store-{os.getpid()}-", dir=str(base))
    try:
        real = os.path.realpath(root)
        if getattr(io, "EMULATOR", False):
            io.emulate_mount(root)
        plain = _Plain(os.path.join(root, "plain"))
        cfg = _open_stores(args, io, root, modes, per_size, span, stores)
        _print_setup(args, real, cfg, io, modes, plain)
        _src_map, src = _aligned(span)
        _dst_map, dst = _aligned(span)
        rows: dict[tuple[bool, int], dict] = {}
        for size in sizes:
            n = per_size[size]
            plain_passes, store_passes = _measure_size(args, size, n, src, dst, modes, stores, plain)
            p = _summary(plain_passes, size * n)
            for od in modes:
                rows[(od, size)] = {"o_direct": None if hf3fs else od, "size": fmt_size(size), "n": n,
                                    "store": _summary(store_passes[od], size * n), "plain": p}
        _print_results([rows[(od, s)] for od in modes for s in sizes], stores)
        return 0
    finally:
        for store, _d in stores.values():
            store.close()
            if isinstance(store, TieredStore):
                remove_arena(store.dram.path)
        shutil.rmtree(root, ignore_errors=True)
        if made_base:
            try:
                base.rmdir()
            except OSError:
                pass
