"""What the benchmarks share: sizes, percentiles, this machine's header, page-aligned buffers, the
token ids of the HTTP benchmarks' prompts; and for the transport benchmarks (``launch.bench.transport``,
``launch.bench.infinistore``) the timed passes of one chunk size, their tables and the client side
of the peer endpoint (a two-endpoint run: the peer holds the memory and serves TCP streams).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np

LAT_SAMPLES = 200  # chunks put and got one call each, for the per-chunk latency
VOCAB = (16, 4000)  # token ids used for prompts (the test model has 4096)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


# -- sizes, percentiles, this machine ----------------------------------------------------------
def parse_size(text: str) -> int:
    """``64K`` / ``1M`` / ``4096`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"bad size {text!r}; expected e.g. 64K, 1M, 4096")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def fmt_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def counts(args: argparse.Namespace, sizes: list[int]) -> tuple[dict[int, int], int]:
    """Chunks per pass for each size (at least 4, about --total-mb in all) and the largest pass."""
    total = args.total_mb << 20
    per_size = {s: max(4, total // s) for s in sizes}
    return per_size, max(s * n for s, n in per_size.items())


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


def fs_type(path: str) -> str:
    """The type of the filesystem ``path`` is on, from /proc/mounts ("?" if unknown)."""
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


def print_header(bench: str, numpy_too: bool = True) -> None:
    """``# pd bench BENCH`` with the time, this machine's CPU, Python's (and numpy's) version, the command."""
    print(f"# pd bench {bench}  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"# cpu: {cpu_model()} ({os.cpu_count()} logical cores)  python {platform.python_version()}"
          + (f"  numpy {np.__version__}" if numpy_too else ""))
    print(f"# command: {shlex.join(sys.argv)}")


def aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    """Uninitialised uint8 array starting on an ``align`` boundary.

    numpy's own buffers start 16 bytes past a boundary; on the dev machine (AMD EPYC VM) a
    ``read()`` from tmpfs into such a buffer runs at ~2.2 GB/s against ~6-7 GB/s into a
    32-byte-or-better aligned one, so the benchmark (like real staging buffers) aligns.
    """
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


def free_ports(host: str, n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# -- one chunk size through a transport --------------------------------------------------------
def _copy_pass(transport, keys: list[str], srcs: list, dsts: list, size: int) -> tuple[float, float]:
    """Seconds of one batched ``put`` and one batched ``get``; checked, then deleted."""
    n = len(keys)
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
    return t1 - t0, t2 - t1


def _zero_copy_pass(transport, keys: list[str], srcs: list, dsts: list, size: int) -> tuple[float, float]:
    """Seconds of reserve + copies + commit and of acquire + copies + release; checked, then deleted."""
    n = len(keys)
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
    return z1 - z0, z2 - z1


def _memcpy_pass(srcs: list, dsts: list) -> float:
    t0 = time.perf_counter()
    for s, d in zip(srcs, dsts):
        np.copyto(d, s)
    return time.perf_counter() - t0


def _latencies(transport, keys: list[str], srcs: list, dsts: list) -> tuple[list[float], list[float]]:
    """Milliseconds of single-chunk put and get calls, up to LAT_SAMPLES of each."""
    m = min(len(keys), LAT_SAMPLES)
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
    return put_ms, get_ms


def bench_size(transport, src: np.ndarray, dst: np.ndarray, size: int, n: int, iters: int,
               tag: str) -> dict:
    """A table row: ``n`` chunks of ``size`` bytes put and got through ``transport`` (copy API and
    zero-copy API, GB/s medians of ``iters`` passes), per-chunk latencies, and memcpy beside them."""
    srcs = [src[i * size:(i + 1) * size] for i in range(n)]
    dsts = [dst[i * size:(i + 1) * size] for i in range(n)]
    keys = [f"bench/{tag}/{size}/{i}" for i in range(n)]
    total = size * n
    put_bw, get_bw, zput_bw, zget_bw, cpy_bw = [], [], [], [], []
    for it in range(iters):
        for i in (0, n - 1):
            srcs[i][:8] = np.frombuffer(np.int64(it * n + i).tobytes(), np.uint8)
        put_s, get_s = _copy_pass(transport, keys, srcs, dsts, size)
        zput_s, zget_s = _zero_copy_pass(transport, keys, srcs, dsts, size)
        cpy_s = _memcpy_pass(srcs, dsts)
        for bw, s in ((put_bw, put_s), (get_bw, get_s), (zput_bw, zput_s), (zget_bw, zget_s), (cpy_bw, cpy_s)):
            bw.append(total / s)
    put_ms, get_ms = _latencies(transport, keys, srcs, dsts)
    put_gbs, get_gbs, zput_gbs, zget_gbs, cpy_gbs = (
        statistics.median(x) / 1e9 for x in (put_bw, get_bw, zput_bw, zget_bw, cpy_bw))
    return {
        "size": fmt_size(size), "n": n, "put": put_gbs, "get": get_gbs,
        "zput": zput_gbs, "zget": zget_gbs,
        "put_p50": pct(put_ms, .5), "put_p99": pct(put_ms, .99),
        "get_p50": pct(get_ms, .5), "get_p99": pct(get_ms, .99),
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
_TCP_HEAD = ["tcp to peer GB/s", "tcp from peer GB/s", "put/tcp", "get/tcp"]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the measured rows (GB = 1e9 bytes, latencies in ms per chunk)."""
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "|".join("---:" for _ in _HEAD) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]).strip() for k, fmt in _COLS) + " |")
    return "\n".join(lines)


def format_tcp_table(rows: list[dict]) -> str:
    """``format_table`` with the TCP stream columns of a two-endpoint run."""
    table = format_table(rows).splitlines()
    extra = [("tcp_out", "{:.2f}"), ("tcp_back", "{:.2f}"), ("put_tcp", "{:.2f}"), ("get_tcp", "{:.2f}")]
    table[0] = table[0] + " " + " | ".join(_TCP_HEAD) + " |"
    table[1] = table[1] + "---:|" * len(_TCP_HEAD)
    for i, r in enumerate(rows):
        table[2 + i] += " " + " | ".join(f.format(r[k]) for k, f in extra) + " |"
    return "\n".join(table)


# -- the peer endpoint, from the measuring side ------------------------------------------------
def send_json(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def recv_line(conn: socket.socket) -> dict:
    """One JSON line, read byte by byte (so no stream data after it is consumed)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        b = conn.recv(1)
        if not b:
            raise ConnectionError("peer closed the connection")
        buf += b
    return json.loads(buf)


def recv_exact(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"stream ended after {got} of {view.nbytes} bytes")
        got += n


def connect(addr: tuple[str, int]) -> socket.socket:
    c = socket.create_connection(addr, timeout=120)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def start_peer() -> tuple[subprocess.Popen, tuple[str, int]]:
    """A peer endpoint (``pd bench transport --serve-peer``) on 127.0.0.1; (process, address)."""
    p = subprocess.Popen([sys.executable, "-m", "launch.cli", "bench", "transport", "--serve-peer", "--peer-host",
                          "127.0.0.1", "--peer-port", "0"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on (\S+):(\d+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"the peer did not start: {line!r}")
    return p, (m.group(1), int(m.group(2)))


def stop_peer(peer: tuple[str, int], procs: list[subprocess.Popen]) -> None:
    """Tell the peer to quit (it stops what it started), then end the processes started here."""
    try:
        with connect(peer) as c:
            send_json(c, {"op": "quit"})
            recv_line(c)
    except OSError:
        pass
    for p in procs:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def alloc_on_peer(peer: tuple[str, int], total: int) -> None:
    """Have the peer make its stream buffer of ``total`` bytes now, before the timed streams."""
    with connect(peer) as c:
        send_json(c, {"op": "alloc", "total": total})
        c.recv(1)


def _tcp_size(peer: tuple[str, int], src: np.ndarray, dst: np.ndarray, size: int, n: int,
              iters: int) -> tuple[float, float]:
    """GB/s of one TCP stream of ``n`` chunks of ``size`` bytes to the peer (until its ack) and
    back from it (into ``dst``); medians of ``iters``."""
    total = size * n
    out, back = [], []
    for _ in range(iters):
        with connect(peer) as c:
            send_json(c, {"op": "sink", "total": total})
            t0 = time.perf_counter()
            for i in range(n):
                c.sendall(memoryview(src)[i * size:(i + 1) * size])
            if c.recv(1) != b"k":
                raise ConnectionError("the peer did not acknowledge the stream")
            out.append(total / (time.perf_counter() - t0))
        with connect(peer) as c:
            t0 = time.perf_counter()
            send_json(c, {"op": "source", "total": total, "size": size})
            recv_exact(c, memoryview(dst)[:total])
            back.append(total / (time.perf_counter() - t0))
    return statistics.median(out) / 1e9, statistics.median(back) / 1e9


def measure_with_tcp(transport, peer: tuple[str, int], args: argparse.Namespace, sizes: list[int],
                     tag: str) -> list[dict]:
    """``bench_size`` through ``transport`` for each size, with the TCP stream columns to and
    from ``peer`` for the same chunks (a two-endpoint run)."""
    per_size, span = counts(args, sizes)
    src, dst = aligned_empty(span), aligned_empty(span)
    src.fill(0x5A)  # touch every page now, not in the timed loop
    dst.fill(0)
    rows = []
    for size in sizes:
        row = bench_size(transport, src, dst, size, per_size[size], args.iters, f"{tag}-{uuid.uuid4().hex[:6]}")
        row["tcp_out"], row["tcp_back"] = _tcp_size(peer, src, dst, size, per_size[size], args.iters)
        row["put_tcp"], row["get_tcp"] = row["put"] / row["tcp_out"], row["get"] / row["tcp_back"]
        rows.append(row)
    return rows
