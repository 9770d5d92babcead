"""The InfiniStore server of a deployment: its command line (``transport.server_specs``), the
RDMA check, and the server's start (``python -m transport.infinistore_server``, InfiniStore's
own ``infinistore`` entry point with two start-up fixes).

The released server (infinistore 0.2.35) opens an RDMA device and registers its pool with it
before it serves anything, TCP included. Without a device the launcher stops with one line
saying so, unless ``server_libibverbs`` names a libibverbs to load instead of the system's (the
test double of tests/doubles/verbs, which lets the real server serve its TCP path).

Three fixes, all in how the server starts, none in what it serves:
* It drives uvloop's libuv loop with the libuv 1.41 it bundles; with uvloop 0.23 (libuv 1.52)
  the first connection aborts the server (``uv__io_cb: unreachable``). uvloop 0.21.0 (libuv 1.48)
  works: scripts/setup.sh installs it in build/infinistore-server, which the server's PYTHONPATH
  puts first; a uvloop newer than that is refused here with the reason.
* It sets its ``oom_score_adj`` to -1000, which a container without CAP_SYS_RESOURCE refuses
  (PermissionError, the server exits): there it logs a warning and goes on.
* Its listening socket gets TCP_NODELAY (accepted connections inherit it): a TCP read is
  answered in two writes, and with Nagle the second waited ~40 ms for the reader's delayed ACK
  (measured: 44 ms -> 0.03 ms per read of 544 bytes on loopback).
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import sys
from pathlib import Path

from common.config import ConfigError
from transport.process import run_spec

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SERVER_PY = ROOT / "build" / "infinistore-server"   # uvloop 0.21.0 (scripts/setup.sh)
VERBS_DOUBLE = ROOT / "build" / "verbs-double"       # the libibverbs test double (scripts/setup.sh)
LIBUV_KNOWN_GOOD = (1, 48)                           # newest libuv seen to work under the 0.2.35 server
NO_RDMA_TRANSPORTS = "mooncake (TCP or RDMA) or shm (one host), or kind none with a store every host shares"


def rdma_devices() -> list[str]:
    """The RDMA devices of this host (what ``ibv_devices`` lists)."""
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def unavailable() -> str:
    """'' when the real InfiniStore server and client can run on this host (with the test double
    where there is no RDMA device), else why not."""
    try:
        import infinistore  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the reason
        return f"infinistore does not import ({e})"
    if not (SERVER_PY / "uvloop").is_dir():
        return f"uvloop 0.21.0 for the server is not in {SERVER_PY}"
    if not rdma_devices() and not (VERBS_DOUBLE / "libibverbs.so.1").is_file():
        return f"no RDMA device and no libibverbs test double in {VERBS_DOUBLE}"
    return ""


def server_spec(c, here: bool = True) -> dict:
    """The entry of ``transport.server_specs`` for an ``InfinistoreConfig`` with start_server
    (``here`` False: for another machine, which needs its own RDMA device and uvloop 0.21.0 on
    its Python path; neither this host's devices nor its paths are looked at)."""
    c.check()
    _, port, device = c.server()
    lib = os.path.abspath(c.server_libibverbs) if c.server_libibverbs and here else ""
    if lib and not os.path.isfile(os.path.join(lib, "libibverbs.so.1")):
        raise ConfigError(f"connector.transport.infinistore.server_libibverbs: {lib!r} holds no libibverbs.so.1; "
                          f"give a directory with one (scripts/setup.sh builds the test double in {VERBS_DOUBLE})")
    if here and not lib and not rdma_devices():
        raise ConfigError("connector.transport.infinistore.start_server: the InfiniStore server needs an RDMA device, "
                          "even to serve TCP, and this host has none (ibv_devices lists nothing); transports that "
                          f"work without RDMA: {NO_RDMA_TRANSPORTS}")
    argv = [sys.executable, "-m", "transport.infinistore_server", "--service-port", str(port),
            "--manage-port", str(c.server_manage_port), "--prealloc-size", str(c.server_prealloc_gb),
            "--minimal-allocate-size", str(c.server_minimal_allocate_kb), "--link-type", c.link_type,
            "--ib-port", str(c.ib_port), "--log-level", "warning"]
    if device:
        argv += ["--dev-name", device]
    paths = [str(SERVER_PY), str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p))} if here else {}
    if lib:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    # The server listens on every interface whatever --host says (InfiniStore ignores it).
    return {"name": "infinistore", "argv": argv, "host": "0.0.0.0", "port": port, "env": env,
            "health_url": f"http://127.0.0.1:{c.server_manage_port}/kvmap_len"}


def run_server(c, log_file=None, timeout_s: float = 60.0):
    """Start the server as ``server_specs`` describes it (tests, ``pd bench transport``; it is
    terminated if this process dies) and wait until its service port accepts."""
    _, port, _ = c.server()
    return run_spec(server_spec(c), "127.0.0.1", port, log_file, timeout_s)


def _uvloop_problem() -> str:
    try:
        import uvloop.loop
    except ImportError as e:
        return f"uvloop does not import ({e})"
    v = int(uvloop.loop.libuv_get_version())
    have = (v >> 16, (v >> 8) & 0xFF)
    if have > LIBUV_KNOWN_GOOD:
        return (f"uvloop {uvloop.__version__} carries libuv {have[0]}.{have[1]}.{v & 0xFF}, which aborts the "
                "InfiniStore 0.2.35 server at its first connection (it drives the loop with its own libuv 1.41); "
                f"install uvloop 0.21.0 where the server runs (scripts/setup.sh puts it in {SERVER_PY}, first on "
                "the server's PYTHONPATH)")
    return ""


def _nodelay_listener(port: int) -> None:
    """TCP_NODELAY on the server's listening socket (connections accepted from it inherit it).
    InfiniStore answers a TCP read with a header and the value in two writes; with Nagle on, the
    second waits for the reader's delayed ACK: ~40 ms per read."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            s = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6) \
                    and s.getsockname()[1] == port:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        finally:
            s.detach()


def main(argv: list[str] | None = None) -> int:
    why = _uvloop_problem()
    if why:
        print(f"infinistore server: {why}", file=sys.stderr)
        return 2
    import infinistore.server as server

    keep = server.prevent_oom

    def prevent_oom() -> None:
        try:
            keep()
        except PermissionError as e:
            server.Logger.warn(f"oom_score_adj -1000 refused here ({e}); the kernel may pick this server when "
                               "memory runs out")

    server.prevent_oom = prevent_oom
    register = server.register_server

    def register_server(loop, config) -> None:
        register(loop, config)
        _nodelay_listener(config.service_port)

    server.register_server = register_server
    sys.argv = ["infinistore", *(sys.argv[1:] if argv is None else argv)]
    server.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
