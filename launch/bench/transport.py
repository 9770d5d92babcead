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
import logging
import os
import socket
import sys
import time
import uuid

import numpy as np

from common.config import ConfigError
from launch.bench.common import (
    LAT_SAMPLES,
    aligned_empty,
    alloc_on_peer,
    bench_size,
    connect,
    counts,
    format_table,
    format_tcp_table,
    free_ports,
    fs_type,
    measure_with_tcp,
    parse_size,
    print_header,
    recv_exact,
    recv_line,
    send_json,
    start_peer,
    stop_peer,
)
from launch.bench.infinistore import run_infinistore, serve_server
from transport.arena import slot_bytes
from transport.base import TransportError
from transport.config import MooncakeConfig, TransportConfig
from transport.mooncake import MooncakeTransport
from transport.mooncake_master import run_master
from transport.shm import ShmTransport, cleanup_pool

log = logging.getLogger(__name__)

TRANSPORTS = ("shm", "mooncake", "infinistore")
NOT_BUILT = ("tcp",)
PEER_PORT = 5610
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M"


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
    g = parser.add_argument_group("infinistore (the server on the peer's host; see launch/bench/infinistore.py)")
    g.add_argument("--transport-url", default="",
                   help="infinistore://HOST:PORT of a running server; default: the peer starts one on its host")
    g.add_argument("--connection-type", default="tcp", choices=("tcp", "rdma"),
                   help="InfiniStore's connection type (rdma: with --device-name)")
    g.add_argument("--link-type", default="IB", choices=("IB", "Ethernet"),
                   help="rdma: the NICs' link layer (Ethernet: RoCE v2), for the server and this client")
    g.add_argument("--serve-peer", action="store_true",
                   help="run the peer side (until the measuring side says quit)")


def _sizes(args: argparse.Namespace) -> list[int] | None:
    """The chunk sizes to measure; None (logged) when the arguments are bad."""
    if args.transport not in TRANSPORTS:
        log.error("unknown transport %r; allowed: %s (%s is not built yet)", args.transport,
                  ", ".join(TRANSPORTS), " and ".join(NOT_BUILT))
        return None
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        log.error("--sizes: %s", e)
        return None
    if not sizes or args.total_mb <= 0 or args.iters <= 0:
        log.error("--sizes must name at least one size; --total-mb and --iters must be positive")
        return None
    return sizes


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a header and the table; 0 on success, 2 on bad arguments."""
    if getattr(args, "serve_peer", False):
        return serve_peer(args.peer_host or "127.0.0.1", args.peer_port)
    sizes = _sizes(args)
    if sizes is None:
        return 2
    if args.transport == "mooncake":
        return run_mooncake(args, sizes)
    if args.transport == "infinistore":
        return run_infinistore(args, sizes)
    if not os.path.isdir(args.shm_dir):
        log.error("--shm-dir %s is not a directory", args.shm_dir)
        return 2
    return run_shm(args, sizes)


def run_shm(args: argparse.Namespace, sizes: list[int]) -> int:
    """``--transport shm``: producer and consumer in this process, the arena in ``--shm-dir``."""
    per_size, span = counts(args, sizes)
    arena = max(slot_bytes(s) * n for s, n in per_size.items())  # every chunk of a pass at once
    cfg = TransportConfig(kind="shm", pool_size_mb=-(-arena >> 20) + 16, shm_dir=args.shm_dir,
                          name=f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    print_header("transport")
    print(f"# transport={args.transport} dir={args.shm_dir} ({fs_type(os.path.realpath(args.shm_dir))})"
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
            rows.append(bench_size(transport, src, dst, size, per_size[size], args.iters, cfg.name))
    finally:
        transport.close()
        cleanup_pool(cfg)
    print(format_table(rows))
    print("# GB/s = 1e9 bytes/s, median of iters (one batched call per pass); zc = reserve + "
          "numpy.copyto into each view + commit / acquire + numpy.copyto out + release; p50/p99 = "
          "ms per single-chunk put/get call; cpy = numpy.copyto between the same buffers")
    return 0


# -- two endpoints: the peer (Mooncake segment, InfiniStore server, TCP streams); mooncake ---
def serve_peer(host: str, port: int) -> int:
    """The peer endpoint: on request it joins the Mooncake pool with a segment of its memory (so
    the measuring side's puts land here and its gets come from here), and it sinks / sources TCP
    streams into / from a preallocated buffer. Prints its address, then serves until ``quit``."""
    srv = socket.create_server((host, port))
    print(f"# peer listening on {host}:{srv.getsockname()[1]}", flush=True)
    transport, buf, servers = None, np.empty(0, np.uint8), []
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                req = recv_line(conn)
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
                        send_json(conn, {"ok": True, "client": transport._store.get_hostname()})
                    except Exception as e:  # noqa: BLE001 - reported to the measuring side
                        transport = None
                        send_json(conn, {"ok": False, "error": str(e)})
                elif op == "infinistore":  # an InfiniStore server on this host
                    send_json(conn, serve_server(host, req, servers))
                elif op == "sink":  # the stream into a preallocated buffer, then an ack
                    recv_exact(conn, memoryview(buf)[:total])
                    conn.sendall(b"k")
                elif op == "source":
                    size = int(req["size"])
                    for off in range(0, total, size):
                        conn.sendall(memoryview(buf)[off:min(total, off + size)])
                elif op == "alloc":  # the buffer, made before the timed streams
                    conn.sendall(b"k")
                elif op == "quit":
                    send_json(conn, {"ok": True})
                    return 0
    finally:
        srv.close()
        if transport is not None:
            transport.close()
        for p in servers:
            p.kill()


def _mooncake_master(args: argparse.Namespace, procs: list) -> str:
    """``--master``, or a mooncake_master started here on ``--local-host`` (its process in ``procs``)."""
    if args.master:
        return args.master
    rpc, metrics = free_ports(args.local_host, 2)
    mcfg = MooncakeConfig(master=f"{args.local_host}:{rpc}", metrics_port=metrics, start_master=True)
    procs.append(run_master(mcfg))
    return mcfg.master


def run_mooncake(args: argparse.Namespace, sizes: list[int]) -> int:
    """``--transport mooncake``: the table of ``bench_size`` through Mooncake between this
    process and the peer, with a TCP stream of the same bytes between the same two endpoints."""
    _, span = counts(args, sizes)
    pass_mb = -(-span >> 20)
    procs: list = []
    peer = (args.peer_host, args.peer_port)
    transport = None
    try:
        master = _mooncake_master(args, procs)
        if not args.peer_host:
            p, peer = start_peer()
            procs.append(p)
        common = {"master": master, "protocol": args.protocol, "device_name": args.device_name}
        with connect(peer) as c:  # the peer holds the pool: room for a pass under the eviction mark
            send_json(c, {"op": "join", "mooncake": {**common, "global_segment_size_mb": 2 * pass_mb + 64,
                                                     "local_buffer_size_mb": 16}})
            joined = recv_line(c)
        if not joined.get("ok"):
            log.error("the peer at %s:%d could not join the pool: %s", *peer, joined.get("error"))
            return 1
        alloc_on_peer(peer, span)
        transport = MooncakeTransport(TransportConfig(kind="mooncake", mooncake=MooncakeConfig(
            **common, local_hostname=args.local_host, global_segment_size_mb=0, local_buffer_size_mb=pass_mb + 16,
            op_timeout_s=120)))
        print_header("transport")
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
