"""``pd bench transport``: put/get throughput and latency per chunk size, next to memcpy.

For each chunk size, a set of preallocated source chunks is put (one batched call), read back
into preallocated destination chunks (one batched call) and deleted; then the same through the
zero-copy API (``reserve`` + a copy into each slot view + ``commit``; ``acquire`` + a copy out
of each view + ``release``) and deleted, ``--iters`` times; then up to ``LAT_SAMPLES`` chunks
are put and got one call each for per-chunk latency. A plain ``numpy.copyto`` between the same
buffers gives the memcpy baseline of this machine and run.

``--transport mooncake`` measures between two endpoints: this process (a Mooncake client that
contributes no memory) and a *peer* process that holds the pool's memory (its segment), so every
put crosses to the peer and every get comes back from it. The peer also runs a plain TCP socket
sink and source: the same bytes, in the same chunks, streamed over one connection each way into
a preallocated buffer, in the same run (the physical reference of that link). Without
``--peer-host`` the peer is started here on 127.0.0.1; across hosts (or network namespaces) start
it there first, ``pd bench transport --serve-peer --peer-host ITS_ADDRESS``, and point this side
at it with ``--peer-host`` and ``--local-host`` (this side's address the peer can reach). The
master is started here on ``--local-host`` unless ``--master`` names a running one.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
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

log = logging.getLogger(__name__)

TRANSPORTS = ("shm", "mooncake", "infinistore")
NOT_BUILT = ("tcp",)
PEER_PORT = 5610
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
                        help="transport to measure: shm, mooncake or infinistore (tcp is not built yet)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated chunk sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--total-mb", type=int, default=256,
                        help="bytes moved per pass and size, in MiB (at least 4 chunks; default 256)")
    parser.add_argument("--iters", type=int, default=3, help="timed passes per size (default 3)")
    parser.add_argument("--shm-dir", default="/dev/shm", help="tmpfs directory for the shm pool")
    g = parser.add_argument_group("mooncake (two endpoints: this process and a peer holding the pool's memory)")
    g.add_argument("--peer-host", default="",
                   help="address of a running peer (pd bench transport --serve-peer); default: start one "
                        "here on 127.0.0.1. With --serve-peer: the address to listen on")
    g.add_argument("--peer-port", type=int, default=PEER_PORT, help=f"the peer's port (default {PEER_PORT})")
    g.add_argument("--local-host", default="127.0.0.1",
                   help="this endpoint's address, as the peer reaches it (the master listens there too)")
    g.add_argument("--master", default="", help="HOST:PORT of a running mooncake_master; default: start one "
                                                "on --local-host")
    g.add_argument("--protocol", default="tcp", choices=("tcp", "rdma"), help="Mooncake's transfer protocol")
    g.add_argument("--device-name", default="", help="rdma: the NIC(s), e.g. mlx5_0")
    g = parser.add_argument_group("infinistore (the server on the peer's host; see transport/bench_infinistore.py)")
    g.add_argument("--transport-url", default="",
                   help="infinistore://HOST:PORT of a running server; default: the peer starts one on its host")
    g.add_argument("--connection-type", default="tcp", choices=("tcp", "rdma"),
                   help="InfiniStore's connection type (rdma: with --device-name)")
    g.add_argument("--link-type", default="IB", choices=("IB", "Ethernet"),
                   help="rdma: the NICs' link layer (Ethernet: RoCE v2), for the server and this client")
    g.add_argument("--serve-peer", action="store_true",
                   help="run the peer side (until the measuring side says quit)")


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
    if getattr(args, "serve_peer", False):
        return serve_peer(args.peer_host or "127.0.0.1", args.peer_port)
    if args.transport not in TRANSPORTS:
        log.error("unknown transport %r; allowed: %s (%s is not built yet)", args.transport,
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
    if args.transport == "mooncake":
        return run_mooncake(args, sizes)
    if args.transport == "infinistore":
        from launch.bench.infinistore import run_infinistore

        return run_infinistore(args, sizes)
    if not os.path.isdir(args.shm_dir):
        log.error("--shm-dir %s is not a directory", args.shm_dir)
        return 2

    from transport.arena import slot_bytes
    from transport.config import TransportConfig
    from transport.shm import ShmTransport, cleanup_pool

    counts, span = _counts(args, sizes)
    arena = max(slot_bytes(s) * n for s, n in counts.items())  # every chunk of a pass at once
    cfg = TransportConfig(kind="shm", pool_size_mb=-(-arena >> 20) + 16, shm_dir=args.shm_dir,
                          name=f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    _print_header()
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


def _counts(args: argparse.Namespace, sizes: list[int]) -> tuple[dict[int, int], int]:
    """Chunks per pass for each size (at least 4, about --total-mb in all) and the largest pass."""
    total = args.total_mb << 20
    counts = {s: max(4, total // s) for s in sizes}
    return counts, max(s * n for s, n in counts.items())


def _print_header() -> None:
    print(f"# pd bench transport  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"# cpu: {cpu_model()} ({os.cpu_count()} logical cores)  python {platform.python_version()}"
          f"  numpy {np.__version__}")
    print(f"# command: {shlex.join(sys.argv)}")


# -- mooncake: this endpoint and a peer -----------------------------------------------------
def _send_json(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _recv_line(conn: socket.socket) -> dict:
    """One JSON line, read byte by byte (so no stream data after it is consumed)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        b = conn.recv(1)
        if not b:
            raise ConnectionError("peer closed the connection")
        buf += b
    return json.loads(buf)


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"stream ended after {got} of {view.nbytes} bytes")
        got += n


def _connect(addr: tuple[str, int]) -> socket.socket:
    c = socket.create_connection(addr, timeout=120)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def serve_peer(host: str, port: int) -> int:
    """The peer endpoint: on request it joins the Mooncake pool with a segment of its memory (so
    the measuring side's puts land here and its gets come from here), and it sinks / sources TCP
    streams into / from a preallocated buffer. Prints its address, then serves until ``quit``."""
    from transport.config import MooncakeConfig, TransportConfig
    from transport.mooncake import MooncakeTransport

    srv = socket.create_server((host, port))
    print(f"# peer listening on {host}:{srv.getsockname()[1]}", flush=True)
    transport, buf, servers = None, np.empty(0, np.uint8), []
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                req = _recv_line(conn)
                op, total = req.get("op"), int(req.get("total", 0))
                if total > buf.nbytes:
                    buf = aligned_empty(total)
                    buf.fill(0x3C)  # fault the pages in outside the timed streams
                if op == "join":
                    if transport is not None:
                        transport.close()
                    try:
                        m = MooncakeConfig(**req["mooncake"])
                        transport = MooncakeTransport(TransportConfig(kind="mooncake", mooncake=m))
                        _send_json(conn, {"ok": True, "client": transport._store.get_hostname()})
                    except Exception as e:  # noqa: BLE001 - reported to the measuring side
                        transport = None
                        _send_json(conn, {"ok": False, "error": str(e)})
                elif op == "infinistore":  # an InfiniStore server on this host
                    from launch.bench.infinistore import serve_server

                    _send_json(conn, serve_server(host, req, servers))
                elif op == "sink":  # the stream into a preallocated buffer, then an ack
                    _recv_exact(conn, memoryview(buf)[:total])
                    conn.sendall(b"k")
                elif op == "source":
                    size = int(req["size"])
                    for off in range(0, total, size):
                        conn.sendall(memoryview(buf)[off:min(total, off + size)])
                elif op == "alloc":  # the buffer, made before the timed streams
                    conn.sendall(b"k")
                elif op == "quit":
                    _send_json(conn, {"ok": True})
                    return 0
    finally:
        srv.close()
        if transport is not None:
            transport.close()
        for p in servers:
            p.kill()


def _tcp_size(peer: tuple[str, int], src: np.ndarray, dst: np.ndarray, size: int, n: int,
              iters: int) -> tuple[float, float]:
    """GB/s of one TCP stream of ``n`` chunks of ``size`` bytes to the peer (until its ack) and
    back from it (into ``dst``); medians of ``iters``."""
    total = size * n
    out, back = [], []
    for _ in range(iters):
        with _connect(peer) as c:
            _send_json(c, {"op": "sink", "total": total})
            t0 = time.perf_counter()
            for i in range(n):
                c.sendall(memoryview(src)[i * size:(i + 1) * size])
            if c.recv(1) != b"k":
                raise ConnectionError("the peer did not acknowledge the stream")
            out.append(total / (time.perf_counter() - t0))
        with _connect(peer) as c:
            t0 = time.perf_counter()
            _send_json(c, {"op": "source", "total": total, "size": size})
            _recv_exact(c, memoryview(dst)[:total])
            back.append(total / (time.perf_counter() - t0))
    return statistics.median(out) / 1e9, statistics.median(back) / 1e9


def _free_ports(host: str, n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_peer() -> tuple[subprocess.Popen, tuple[str, int]]:
    p = subprocess.Popen([sys.executable, "-m", "launch.cli", "bench", "transport", "--serve-peer", "--peer-host",
                          "127.0.0.1", "--peer-port", "0"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on (\S+):(\d+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"the peer did not start: {line!r}")
    return p, (m.group(1), int(m.group(2)))


_TCP_HEAD = ["tcp to peer GB/s", "tcp from peer GB/s", "put/tcp", "get/tcp"]


def format_tcp_table(rows: list[dict]) -> str:
    """``format_table`` with the TCP stream columns of a two-endpoint run."""
    table = format_table(rows).splitlines()
    extra = [("tcp_out", "{:.2f}"), ("tcp_back", "{:.2f}"), ("put_tcp", "{:.2f}"), ("get_tcp", "{:.2f}")]
    table[0] = table[0] + " " + " | ".join(_TCP_HEAD) + " |"
    table[1] = table[1] + "---:|" * len(_TCP_HEAD)
    for i, r in enumerate(rows):
        table[2 + i] += " " + " | ".join(f.format(r[k]) for k, f in extra) + " |"
    return "\n".join(table)


def measure_with_tcp(transport, peer: tuple[str, int], args: argparse.Namespace, sizes: list[int],
                     tag: str) -> list[dict]:
    """``_bench_size`` through ``transport`` for each size, with the TCP stream columns to and
    from ``peer`` for the same chunks (a two-endpoint run)."""
    counts, span = _counts(args, sizes)
    src, dst = aligned_empty(span), aligned_empty(span)
    src.fill(0x5A)  # touch every page now, not in the timed loop
    dst.fill(0)
    rows = []
    for size in sizes:
        row = _bench_size(transport, src, dst, size, counts[size], args.iters, f"{tag}-{uuid.uuid4().hex[:6]}")
        row["tcp_out"], row["tcp_back"] = _tcp_size(peer, src, dst, size, counts[size], args.iters)
        row["put_tcp"], row["get_tcp"] = row["put"] / row["tcp_out"], row["get"] / row["tcp_back"]
        rows.append(row)
    return rows


def stop_peer(peer: tuple[str, int], procs: list[subprocess.Popen]) -> None:
    """Tell the peer to quit (it stops what it started), then end the processes started here."""
    try:
        with _connect(peer) as c:
            _send_json(c, {"op": "quit"})
            _recv_line(c)
    except OSError:
        pass
    for p in procs:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def run_mooncake(args: argparse.Namespace, sizes: list[int]) -> int:
    """``--transport mooncake``: the table of ``_bench_size`` through Mooncake between this
    process and the peer, with a TCP stream of the same bytes between the same two endpoints."""
    from common.config import ConfigError
    from transport.base import TransportError
    from transport.config import MooncakeConfig, TransportConfig
    from transport.mooncake import MooncakeTransport
    from transport.mooncake_master import run_master

    _, span = _counts(args, sizes)
    pass_mb = -(-span >> 20)
    procs: list[subprocess.Popen] = []
    peer = (args.peer_host, args.peer_port)
    transport = None
    try:
        if args.master:
            master = args.master
        else:
            rpc, metrics = _free_ports(args.local_host, 2)
            mcfg = MooncakeConfig(master=f"{args.local_host}:{rpc}", metrics_port=metrics, start_master=True)
            procs.append(run_master(mcfg))
            master = mcfg.master
        if not args.peer_host:
            p, peer = _start_peer()
            procs.append(p)
        common = {"master": master, "protocol": args.protocol, "device_name": args.device_name}
        with _connect(peer) as c:  # the peer holds the pool: room for a pass under the eviction mark
            _send_json(c, {"op": "join", "mooncake": {**common, "global_segment_size_mb": 2 * pass_mb + 64,
                                                      "local_buffer_size_mb": 16}})
            joined = _recv_line(c)
        if not joined.get("ok"):
            log.error("the peer at %s:%d could not join the pool: %s", *peer, joined.get("error"))
            return 1
        with _connect(peer) as c:
            _send_json(c, {"op": "alloc", "total": span})
            c.recv(1)
        transport = MooncakeTransport(TransportConfig(kind="mooncake", mooncake=MooncakeConfig(
            **common, local_hostname=args.local_host, global_segment_size_mb=0, local_buffer_size_mb=pass_mb + 16,
            op_timeout_s=120)))
        _print_header()
        print(f"# transport=mooncake protocol={args.protocol} master={master} ({'given' if args.master else 'started here'})"
              f"  this endpoint={transport._store.get_hostname()} (no segment)  peer={peer[0]}:{peer[1]} "
              f"({'remote' if args.peer_host else 'started here'}, client {joined['client']}, segment "
              f"{2 * pass_mb + 64} MiB)  bytes/pass~{args.total_mb} MiB iters={args.iters}"
              f" latency samples<={LAT_SAMPLES}")
        sys.stdout.flush()
        rows = measure_with_tcp(transport, peer, args, sizes, "mc")
    except (ConfigError, TransportError, OSError, RuntimeError) as e:
        log.error("pd bench transport --transport mooncake: %s", e)
        return 1
    finally:
        if transport is not None:
            transport.close()
        stop_peer(peer, procs)
    print(format_tcp_table(rows))
    print("# GB/s = 1e9 bytes/s, median of iters (one batched call per pass); put/get: copy API (a copy into/out "
          "of registered staging + the transfer); zc = reserve + numpy.copyto into each slot + commit / acquire + "
          "numpy.copyto out + release; p50/p99 = ms per single-chunk put/get call; cpy = numpy.copyto; tcp = one "
          "socket stream of the same chunks between the same two endpoints (to the peer: until its ack; from "
          "the peer: into a preallocated buffer)")
    return 0
