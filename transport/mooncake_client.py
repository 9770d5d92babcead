"""The Mooncake Store client as ``transport.mooncake`` drives it: importing the module, the
start-up probes and setup (``connect``), the engine's return codes, batches split to what its TCP
transport takes (``in_parts``), and the worker threads every call runs on (``Workers``). The
transport itself (staging region, slots, master-down handling) is ``transport.mooncake``.
"""
from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from transport.base import TransportError
from transport.mooncake_master import route_address

# Return codes of mooncake-transfer-engine 0.3.13 (negative = an ErrorCode).
NO_SPACE, BAD_PARAMS, NOT_FOUND, RPC_FAILED = -200, -600, -704, -900  # -800: transfer failed (a dead peer)
DOWN_S = 1.0        # while the master is down, a background probe tries it this often
FULL_RETRY_S = 0.05  # a put refused for lack of space is retried once after this (the master evicts)
WORKERS = 4
MAX_KEYS = 1024     # keys per engine call (see in_parts)
CLOSE_WAIT_S = 30.0  # close waits this long for calls still in the engine


def import_store():
    """Mooncake's (store class, replicate-config class); TransportError saying how to install it."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # the engine logs several INFO lines per client
    try:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    except (ImportError, OSError) as e:
        raise TransportError(
            f"transport kind mooncake needs Mooncake Store's Python module ({e}); run scripts/setup.sh, "
            "or pip install 'pdkv[mooncake]' (mooncake-transfer-engine-non-cuda; mooncake-transfer-engine "
            "on CUDA hosts) and apt-get install libibverbs1") from None
    return MooncakeDistributedStore, ReplicateConfig


def in_parts(fn: Callable, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
    """``fn`` over at most MAX_KEYS keys at a time: the engine's TCP transport fails a whole
    batch of 4096 transfers to one peer (TRANSFER_FAIL after ~60 s; 2048 pass)."""
    out: list[int] = []
    for i in range(0, len(keys), MAX_KEYS):
        out += list(fn(keys[i:i + MAX_KEYS], ptrs[i:i + MAX_KEYS], sizes[i:i + MAX_KEYS]))
    return out


class Workers:
    """Daemon threads that run store calls, so a caller can stop waiting for one that hangs
    (a peer or master gone without a reset) and the process can still exit."""

    def __init__(self, n: int) -> None:
        self._q: SimpleQueue = SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._run, name=f"pdkv-mooncake-{i}", daemon=True).start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._q.put((fut, fn, args))
        return fut

    def stop(self, n: int) -> None:
        for _ in range(n):
            self._q.put(None)


def connect(store_cls, m):
    """A client of the pool ``m`` (a ``MooncakeConfig``) names, set up; TransportError (naming
    what to fix) when the master or the metadata server does not answer, or setup fails."""
    host, port = m.master_host_port()
    probe_s = m.connect_timeout_s
    try:
        socket.create_connection((host, port), timeout=probe_s).close()
    except OSError as e:
        raise TransportError(f"mooncake master {m.master} is not reachable ({e}); start it (pd launch with "
                             "connector.transport.mooncake.start_master: true, or mooncake_master "
                             f"--rpc_port={port}) or fix connector.transport.mooncake.master") from None
    url = m.metadata_url()
    if url != "P2PHANDSHAKE":
        try:
            urlopen(url + ("&" if "?" in url else "?") + "key=pdkv-probe", timeout=probe_s).close()
        except HTTPError:
            pass  # it answered (404: no such key)
        except (URLError, OSError, ValueError) as e:
            raise TransportError(f"mooncake metadata server {url} is not reachable ({e}); fix "
                                 "connector.transport.mooncake.metadata_server") from None
    local = m.local_hostname or route_address(host, port)
    store = store_cls()
    # setup holds the GIL (as close does) and retries for up to ~90 s when something is missing:
    # the probes above catch the usual causes first. The local buffer is 0: we register our own.
    rc = store.setup(local, url, int(m.global_segment_size_mb) << 20, 0, m.protocol, m.device_name, m.master)
    if rc != 0:
        raise TransportError(f"mooncake: setup failed (rc {rc}) with master {m.master}, metadata {url}, "
                             f"protocol {m.protocol}{' on ' + m.device_name if m.device_name else ''}, as "
                             f"{local}; the engine's log lines above say why")
    return store
