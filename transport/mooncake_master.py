"""The Mooncake master for a deployment: where its binary is, its command line
(``transport.server_specs``), starting it for tests and benchmarks, and the address a
client advertises on the route to it."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys

from common.config import WILDCARD_HOSTS, ConfigError, url_host
from transport.process import run_spec


def route_address(host: str, port: int) -> str:
    """This host's address on the route to ``host`` (what peers there can reach us at)."""
    try:
        fam = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(fam[0], socket.SOCK_DGRAM) as s:
            s.connect(fam[4])  # no packet is sent
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def master_binary() -> str | None:
    """The ``mooncake_master`` executable: in the wheel's package directory, beside this Python,
    or on PATH."""
    spec = importlib.util.find_spec("mooncake")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for p in [os.path.join(d, "mooncake_master") for d in dirs] + [
            os.path.join(os.path.dirname(sys.executable), "mooncake_master"), shutil.which("mooncake_master")]:
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def master_spec(m, here: bool = True) -> dict:
    """The server entry of ``transport.server_specs`` for a ``MooncakeConfig`` (``here`` False:
    the binary as another machine's PATH names it)."""
    host, port = m.master_host_port()
    binary = master_binary() if here else "mooncake_master"
    if binary is None:
        raise ConfigError("connector.transport.mooncake.start_master: true, but mooncake_master is not installed "
                          "here; run scripts/setup.sh (pip install 'pdkv[mooncake]'), or start the master yourself "
                          "and set start_master: false")
    bind = m.bind_host or host
    argv = [binary, f"--rpc_port={port}", f"--rpc_address={bind}", f"--metrics_port={m.metrics_port}",
            f"--metrics_host={bind}", f"--eviction_high_watermark_ratio={m.eviction_high_watermark_ratio}",
            f"--eviction_ratio={m.eviction_ratio}"]
    if m.metadata_server.strip().lower() == "master":
        argv += ["--enable_http_metadata_server=true", f"--http_metadata_server_host={bind}",
                 f"--http_metadata_server_port={m.metadata_port}"]
    near = "127.0.0.1" if bind in WILDCARD_HOSTS else bind
    return {"name": "mooncake-master", "argv": argv, "host": bind, "port": port, "env": {},
            "health_url": f"http://{url_host(near)}:{m.metrics_port}/health"}


def run_master(m, log_file=None, timeout_s: float = 20.0):
    """Start ``mooncake_master`` as ``server_specs`` describes it (tests, ``pd bench transport``;
    it is terminated if this process dies) and wait until its RPC port accepts; returns the
    ``subprocess.Popen``."""
    host, port = m.master_host_port()
    return run_spec(master_spec(m), host, port, log_file, timeout_s)
