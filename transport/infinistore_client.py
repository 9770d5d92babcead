"""The InfiniStore client process of one ``InfinistoreTransport``: ``main`` is the process
(``python -m transport.infinistore_client``), ``ClientProcess`` the transport's handle on it.

Why a process of its own: InfiniStore 0.2.35's client crashes the process that holds it when a
TCP read gets no value (``r_tcp`` dereferences a null result: a missing key, a server that died
mid-read), and its connect installs process-wide SIGSEGV/SIGABRT/SIGBUS/SIGFPE/SIGILL handlers.
In a vLLM worker either would take the engine down. Here a crash ends only this process: the
transport sees its pipe close, answers misses / drops, and starts a new one.

Memory: the staging region is a memfd the transport created and passed in; both processes map
it, so what this process reads (r_tcp copies, RDMA writes by the server) the transport sees
without another copy, and what the transport gathers there this process sends. RDMA mode
registers the whole region once (``register_mr``).

Requests (pickled over a socketpair): ``(id, op, args)``; answers ``(id, result)``, or
``(id, ("error", text))``. Ops: put [(key, off, size)] -> [bool]; get [(key, off, cap)] -> [bytes
written at off; 0 absent; -1 larger than cap; -2 failed]; exists [key] -> [bool]; delete [key] -> n.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.connection import Connection
from typing import Any, Callable

from transport.base import TransportError

MAX_KEYS = 1024            # keys per RDMA call (the server posts one work request per key)
MAX_MSG_BYTES = 3 << 20    # keys+offsets per RDMA call, under the server's 4 MiB request message
ABSENT, TOO_LARGE, FAILED = 0, -1, -2


def _client_config(infinistore, c: dict, kind: str):
    cfg = infinistore.ClientConfig(connection_type=kind, host_addr=c["host"], service_port=c["port"],
                                   dev_name=c["device"] or "mlx5_0", ib_port=c["ib_port"],
                                   link_type=c["link_type"], log_level="warning")
    if c["gid_index"] >= 0:
        if not hasattr(infinistore._infinistore.ClientConfig, "hint_gid_index"):
            raise RuntimeError(f"connector.transport.infinistore.gid_index {c['gid_index']} needs an InfiniStore "
                               f"with hint_gid_index (newer than the installed {_version()}); leave it -1")
        cfg.hint_gid_index = c["gid_index"]
    return cfg


def _version() -> str:
    try:
        return version("infinistore")
    except PackageNotFoundError:
        return "unknown version"


def _probe(c: dict) -> None:
    socket.create_connection((c["host"], c["port"]), timeout=c["connect_timeout_s"]).close()


class _Tcp:
    """TCP mode: one connection per thread (a connection's socket is not thread-safe); a call's
    keys are spread over the threads. A connection that failed is dropped and made again."""

    def __init__(self, infinistore, c: dict, mv: memoryview, base: int) -> None:
        self.isl, self.c, self.mv, self.base = infinistore, c, mv, base
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(c["threads"], thread_name_prefix="infinistore-tcp")
        self.conn()  # fail at start if the server does not answer

    def conn(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            _probe(self.c)
            conn = self.isl.InfinityConnection(_client_config(self.isl, self.c, self.isl.TYPE_TCP))
            conn.connect()  # prints "connecting to ..." on stdout: /dev/null here
            self.local.conn = conn
        return conn

    def drop(self) -> None:
        conn, self.local.conn = getattr(self.local, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def _each(self, fn, items: list) -> list:
        n = min(len(items), self.c["threads"])
        parts = [items[i::n] for i in range(n)]
        outs = list(self.pool.map(lambda part: [fn(it) for it in part], parts))
        res: list = [None] * len(items)
        for i, out in enumerate(outs):
            res[i::n] = out
        return res

    def _guard(self, fn, failed):
        """``fn`` for one key; when it fails, the key is ``failed`` and the connection is made again,
        and when that fails too the whole call fails (the transport marks the server down)."""
        def run(it):
            try:
                return fn(self.conn(), it)
            except Exception as e:  # noqa: BLE001 - one key's failure
                print(f"infinistore client: {e}", file=sys.stderr, flush=True)
                self.drop()
                self.conn()
                return failed
        return run

    def put(self, items: list) -> list:
        def one(conn, it):
            key, off, size = it
            conn.tcp_write_cache(key, self.base + off, size)
            return True
        return self._each(self._guard(one, False), items)

    def get(self, items: list) -> list:
        def one(conn, it):
            key, off, cap = it
            # r_tcp of an absent key crashes this process: ask first (a delete or an eviction
            # between the two still can; the transport then restarts this process).
            if not conn.check_exist(key):
                return ABSENT
            arr = conn.tcp_read_cache(key)
            n = int(arr.nbytes)
            if n > cap:
                return TOO_LARGE
            self.mv[off:off + n] = memoryview(arr).cast("B")
            return n
        return self._each(self._guard(one, FAILED), items)

    def exists(self, keys: list) -> list:
        return self._each(self._guard(lambda conn, k: bool(conn.check_exist(k)), False), keys)

    def delete(self, keys: list) -> int:
        return self.pool.submit(self._guard(lambda conn, ks: int(conn.delete_keys(ks)), 0), keys).result()


class _Rdma:
    """RDMA mode: one connection, the region registered once, batched one-sided reads and writes
    from an asyncio loop of its own (completions arrive on the library's CQ thread)."""

    def __init__(self, infinistore, c: dict, mv: memoryview, base: int, size: int) -> None:
        self.isl, self.c, self.mv, self.base = infinistore, c, mv, base
        _probe(c)
        self.conn = infinistore.InfinityConnection(_client_config(infinistore, c, infinistore.TYPE_RDMA))
        self.conn.connect()
        self.conn.register_mr(base, size)
        self.ctl = threading.Lock()  # exists/delete share the connection's TCP socket
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="infinistore-rdma", daemon=True).start()
        self.inflight = asyncio.Semaphore(c["max_inflight"])  # used on self.loop only

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @staticmethod
    def _calls(items: list) -> list[list]:
        """Items grouped by size (one block_size per call), then cut to the per-call limits."""
        groups: dict[int, list] = defaultdict(list)
        for it in items:
            groups[it[2]].append(it)
        calls = []
        for group in groups.values():
            cur, nbytes = [], 0
            for it in group:
                need = len(it[0].encode()) + 24
                if cur and (len(cur) >= MAX_KEYS or nbytes + need > MAX_MSG_BYTES):
                    calls.append(cur)
                    cur, nbytes = [], 0
                cur.append(it)
                nbytes += need
            calls.append(cur)
        return calls

    async def _one(self, fn, call: list) -> bool:
        async with self.inflight:
            try:
                await fn([(k, off) for k, off, _ in call], call[0][2], self.base)
                return True
            except Exception:  # noqa: BLE001 - the caller decides (a miss, a drop, a retry per key)
                return False

    async def _put(self, items: list) -> list:
        calls = self._calls(items)
        oks = await asyncio.gather(*(self._one(self.conn.rdma_write_cache_async, c) for c in calls))
        done = {k: ok for call, ok in zip(calls, oks) for k, _, _ in call}
        return [done[k] for k, _, _ in items]

    async def _get(self, items: list) -> list:
        """A batch read fails as a whole if one key is absent (404) or larger than the block (400):
        the keys of a failed call are read again one by one, so each is a hit or a miss."""
        calls = self._calls(items)
        oks = await asyncio.gather(*(self._one(self.conn.rdma_read_cache_async, c) for c in calls))
        got = {}
        again = [it for call, ok in zip(calls, oks) if not ok for it in call]
        for call, ok in zip(calls, oks):
            if ok:
                got.update({k: cap for k, _, cap in call})
        singles = await asyncio.gather(*(self._one(self.conn.rdma_read_cache_async, [it]) for it in again))
        got.update({it[0]: (it[2] if ok else ABSENT) for it, ok in zip(again, singles)})
        return [got[k] for k, _, _ in items]

    def put(self, items: list) -> list:
        return self._run(self._put(items))

    def get(self, items: list) -> list:
        return self._run(self._get(items))

    def exists(self, keys: list) -> list:
        with self.ctl:
            return [bool(self.conn.check_exist(k)) for k in keys]

    def delete(self, keys: list) -> int:
        with self.ctl:
            return int(self.conn.delete_keys(keys))


class ClientProcess:
    """The transport's side: the client process (started here) and the requests in flight to it."""

    def __init__(self, cfg_json: str, region_fd: int, region_size: int, timeout_s: float) -> None:
        mine, theirs = socket.socketpair()
        self.sock = mine  # shut down by stop(): that wakes our reader and ends the process (EOF)
        self.chan = Connection(os.dup(mine.fileno()))
        argv = [sys.executable, "-m", "transport.infinistore_client", "--chan-fd", str(theirs.fileno()),
                "--region-fd", str(region_fd), "--region-size", str(region_size), "--config", cfg_json]
        self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), region_fd), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
        theirs.close()
        self.pending: dict[int, tuple[Future, Callable[[], None] | None]] = {}
        self.lock, self.next_id, self.dead = threading.Lock(), 1, False
        if not self.chan.poll(timeout_s):
            self.stop()
            self.chan.close()
            raise TransportError(f"infinistore: the client process did not start within {timeout_s:.0f} s")
        try:
            _, first = self.chan.recv()
        except (EOFError, OSError):
            first = ("error", f"the client process exited with {self.proc.wait(5)}")
        if first != "ready":
            self.stop()
            self.chan.close()
            raise TransportError(f"infinistore: {first[1]}")
        threading.Thread(target=self._read, name="pdkv-infinistore-reader", daemon=True).start()

    def submit(self, op: str, args: Any, after: Callable[[], None] | None) -> Future:
        fut: Future = Future()
        with self.lock:
            if self.dead:
                raise EOFError("the client process is gone")
            rid, self.next_id = self.next_id, self.next_id + 1
            self.pending[rid] = (fut, after)
            try:
                self.chan.send((rid, op, args))
            except OSError as e:
                del self.pending[rid]
                raise EOFError(str(e)) from None
        return fut

    def _read(self) -> None:
        while True:
            try:
                rid, res = self.chan.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                fut, after = self.pending.pop(rid, (None, None))
            if after:
                after()
            if fut is not None:
                if isinstance(res, tuple) and res and res[0] == "error":
                    fut.set_exception(RuntimeError(res[1]))
                else:
                    fut.set_result(res)
        try:  # our end closed or the process ended: wait until it is gone (it exits at EOF)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with self.lock:  # the process is gone: nothing it held is in use any more
            self.dead = True
            left, self.pending = list(self.pending.values()), {}
        self.chan.close()
        for fut, after in left:
            if after:
                after()
            fut.set_exception(EOFError(f"the client process exited ({self.proc.poll()})"))

    def stop(self) -> None:
        """End the process: it exits at EOF on its channel (killed if it has not within 5 s)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.sock.close()


def serve(chan: Connection, client) -> None:
    """Answer requests until the transport closes its end; each request on a thread of its own
    (a slow one does not hold up the others)."""
    send_lock = threading.Lock()
    reqs = ThreadPoolExecutor(16, thread_name_prefix="infinistore-req")

    def handle(rid: int, op: str, args) -> None:
        try:
            res = getattr(client, op)(args)
        except Exception as e:  # noqa: BLE001 - sent back to the caller
            res = ("error", f"{type(e).__name__}: {e}")
        try:
            with send_lock:
                chan.send((rid, res))
        except OSError:  # the transport is gone
            pass

    while True:
        try:
            rid, op, args = chan.recv()
        except (EOFError, OSError):
            return
        reqs.submit(handle, rid, op, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chan-fd", type=int, required=True)
    p.add_argument("--region-fd", type=int, required=True)
    p.add_argument("--region-size", type=int, required=True)
    p.add_argument("--config", required=True, help="JSON: host, port, mode, device, ib_port, link_type, ...")
    a = p.parse_args(argv)
    chan = Connection(a.chan_fd)
    c = json.loads(a.config)
    mm = mmap.mmap(a.region_fd, a.region_size)
    mv = memoryview(mm)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    try:
        import infinistore

        client = (_Rdma(infinistore, c, mv, base, a.region_size) if c["mode"] == "rdma"
                  else _Tcp(infinistore, c, mv, base))
    except Exception as e:  # noqa: BLE001 - the transport raises it as a TransportError
        chan.send((0, ("error", f"{type(e).__name__}: {e}")))
        return 1
    chan.send((0, "ready"))
    serve(chan, client)  # returns when the transport closed its end or its process died
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stderr.flush()
    os._exit(rc)  # now, even with a request stuck in the library
