"""``pd bench transport --transport infinistore``: InfiniStore between this process (a client) and
the peer's host (where the server holds the values), beside a TCP socket stream of the same bytes
between the same two hosts, in the same run.

The peer (``pd bench transport --serve-peer``, started here on 127.0.0.1 unless ``--peer-host``
names a running one) starts the InfiniStore server on its host when asked (``op: infinistore``;
with the libibverbs test double where its host has no RDMA device) and serves the TCP sink and
source. ``--transport-url`` measures against a running server instead (the TCP columns then still
go to the peer). TCP mode (``--connection-type tcp``) is what runs without RDMA; rdma needs
``--device-name`` and a NIC on both hosts.
"""
from __future__ import annotations

import argparse
import logging
import sys

from common.config import ConfigError
from launch.bench.common import (
    LAT_SAMPLES,
    alloc_on_peer,
    connect,
    counts,
    format_tcp_table,
    free_ports,
    measure_with_tcp,
    print_header,
    recv_line,
    send_json,
    start_peer,
    stop_peer,
)
from transport.base import TransportError
from transport.config import InfinistoreConfig, TransportConfig
from transport.infinistore import InfinistoreTransport
from transport.infinistore_server import (
    VERBS_DOUBLE,
    rdma_devices,
    run_server,
    unavailable,
)

log = logging.getLogger(__name__)


def serve_server(host: str, req: dict, procs: list) -> dict:
    """The peer's side of ``op: infinistore``: start a server on ``host`` (free ports), keep its
    Popen in ``procs``; answers ``{"ok", "url"}`` or ``{"ok": False, "error"}``."""
    why = unavailable()
    if why:
        return {"ok": False, "error": why}
    service, manage = free_ports(host, 2)
    c = InfinistoreConfig(url=f"infinistore://{host}:{service}", connection_type="tcp", start_server=True,
                          server_prealloc_gb=int(req.get("prealloc_gb", 4)), server_manage_port=manage,
                          link_type=req.get("link_type", "IB"),
                          server_libibverbs="" if rdma_devices() else str(VERBS_DOUBLE))
    try:
        procs.append(run_server(c))
    except Exception as e:  # noqa: BLE001 - reported to the measuring side
        return {"ok": False, "error": str(e)}
    return {"ok": True, "url": c.url, "double": not rdma_devices()}


def _server_on_peer(peer: tuple[str, int], span: int, link_type: str) -> dict:
    """Ask the peer to start an InfiniStore server on its host with room for two passes of ``span``
    bytes; its answer (``serve_server``'s)."""
    with connect(peer) as c:
        send_json(c, {"op": "infinistore", "prealloc_gb": max(1, -(-2 * span >> 30) + 1), "link_type": link_type})
        return recv_line(c)


def run_infinistore(args: argparse.Namespace, sizes: list[int]) -> int:
    """The table of ``bench_size`` through InfiniStore, with the TCP stream columns."""
    _, span = counts(args, sizes)
    pass_mb = -(-span >> 20)
    procs: list = []
    peer = (args.peer_host, args.peer_port)
    transport, rows, where = None, [], "given"
    try:
        if not args.peer_host:
            p, peer = start_peer()
            procs.append(p)
        url = args.transport_url
        if not url:  # the server on the peer's host
            started = _server_on_peer(peer, span, args.link_type)
            if not started.get("ok"):
                log.error("the peer at %s:%d could not start an InfiniStore server: %s", *peer, started.get("error"))
                return 1
            url = started["url"]
            where = "started by the peer" + (" with the libibverbs test double" if started["double"] else "")
        alloc_on_peer(peer, span)
        if args.connection_type == "rdma":
            url += ("&" if "?" in url else "/?") + f"device={args.device_name}"
        cfg = InfinistoreConfig(url=url, connection_type=args.connection_type, link_type=args.link_type,
                                staging_mb=2 * pass_mb + 16,
                                max_value_mb=-(-max(sizes) >> 20), op_timeout_s=120)
        transport = InfinistoreTransport(TransportConfig(kind="infinistore", infinistore=cfg))
        print_header("transport")
        print(f"# transport=infinistore connection={args.connection_type} server={url} ({where})  "
              f"peer={peer[0]}:{peer[1]} ({'remote' if args.peer_host else 'started here'})  "
              f"bytes/pass~{args.total_mb} MiB iters={args.iters} latency samples<={LAT_SAMPLES}")
        sys.stdout.flush()
        rows = measure_with_tcp(transport, peer, args, sizes, "is")
    except (ConfigError, TransportError, OSError, RuntimeError) as e:
        log.error("pd bench transport --transport infinistore: %s", e)
        return 1
    finally:
        if transport is not None:
            transport.close()
        stop_peer(peer, procs)
    print(format_tcp_table(rows))
    print("# GB/s = 1e9 bytes/s, median of iters (one batched call per pass); put/get: copy API (a copy into/out "
          "of the staging region + the transfer); zc = reserve + numpy.copyto into each slot + commit / acquire + "
          "numpy.copyto out + release; p50/p99 = ms per single-chunk put/get call; cpy = numpy.copyto; tcp = one "
          "socket stream of the same chunks to / from the peer's host (to: until its ack; from: into a "
          "preallocated buffer)")
    return 0
