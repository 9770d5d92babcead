"""What only the infinistore transport does: its config, its server's spec and the launcher's
stop without RDMA, the server going away and coming back, its client process dying, the libibverbs
test double, and the RDMA path (run where ``ibv_devices`` lists a device, skipped elsewhere).

The behaviour every transport shares runs in test_transport_contract.py. The server here is the
real InfiniStore server; on a host without RDMA it loads the libibverbs test double
(tests/doubles/verbs), which lets it start and serve TCP and refuses everything RDMA.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from test_transport_contract import free_ports

from common.config import ConfigError, load
from launch.cli import main
from pd.config import DeploymentConfig
from transport import TransportError, make_transport, server_specs
from transport.config import InfinistoreConfig, TransportConfig
from transport.infinistore_server import (
    ROOT,
    VERBS_DOUBLE,
    rdma_devices,
    run_server,
    unavailable,
)

NO_RDMA = "" if rdma_devices() else "no RDMA device here (ibv_devices lists none)"


def _server_cfg(**kw) -> InfinistoreConfig:
    service, manage = free_ports(2)
    base = dict(url=f"infinistore://127.0.0.1:{service}", connection_type="tcp", start_server=True,
                server_prealloc_gb=1, server_manage_port=manage, staging_mb=4, max_value_mb=1, op_timeout_s=3,
                connect_timeout_s=1, server_libibverbs="" if rdma_devices() else str(VERBS_DOUBLE))
    return InfinistoreConfig(**{**base, **kw})


@pytest.fixture
def server(tmp_path):
    """A real InfiniStore server of this test: (its config, a function that (re)starts it, the Popen box)."""
    why = unavailable()
    if why:
        pytest.skip(f"InfiniStore not usable here ({why}); scripts/setup.sh installs it")
    c = _server_cfg()
    box: list = []

    def start():
        box.append(run_server(c, open(tmp_path / f"server-{len(box)}.log", "w")))
        return box[-1]

    start()
    yield c, start, box
    for p in box:
        p.kill()
        p.wait(10)


def test_config_url_and_bad_values_name_the_key():
    assert InfinistoreConfig(url="infinistore://10.0.0.1:12345/?device=mlx5_0").server() == ("10.0.0.1", 12345, "mlx5_0")
    assert InfinistoreConfig(url="infinistore://host-a:1").server() == ("host-a", 1, "")
    for bad in ("10.0.0.1:12345", "infinistore://h", "tcp://h:1", "infinistore://h:1/x", "infinistore://h:99999"):
        with pytest.raises(ConfigError, match="infinistore.url: .* infinistore://host:port/.device=mlx5_0"):
            InfinistoreConfig(url=bad).server()
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['dev'\] .* allowed: device"):
        InfinistoreConfig(url="infinistore://h:1/?dev=mlx5_0").server()
    with pytest.raises(ConfigError, match="names no RDMA device; connection_type rdma needs .device="):
        InfinistoreConfig(url="infinistore://h:1").check()
    InfinistoreConfig(url="infinistore://h:1", connection_type="tcp").check()
    with pytest.raises(ConfigError, match="max_value_mb: 64 is larger than staging_mb 8"):
        InfinistoreConfig(connection_type="tcp", staging_mb=8).check()
    for data, needle in [
        ({"connection_type": "udp"}, "infinistore.connection_type: 'udp' is not allowed; choose one of rdma, tcp"),
        ({"link_type": "RoCE"}, "infinistore.link_type: 'RoCE' is not allowed; choose one of IB, Ethernet"),
        ({"max_inflight": 129}, "infinistore.max_inflight: 129 is out of range"),
        ({"urll": "x"}, "unknown key connector.transport.infinistore.urll"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load(DeploymentConfig, {"connector": {"transport": {"infinistore": data}}})


def test_server_specs(tmp_path):
    tcp = dict(url="infinistore://10.0.0.1:23456", connection_type="tcp")
    assert server_specs(TransportConfig(kind="infinistore", infinistore=InfinistoreConfig(**tcp))) == []
    with pytest.raises(ConfigError, match="holds no libibverbs.so.1"):
        server_specs(TransportConfig(kind="infinistore", infinistore=InfinistoreConfig(
            **tcp, start_server=True, server_libibverbs=str(tmp_path))))
    (tmp_path / "libibverbs.so.1").write_bytes(b"")
    (spec,) = server_specs(TransportConfig(kind="infinistore", infinistore=InfinistoreConfig(
        **tcp, start_server=True, server_libibverbs=str(tmp_path), server_prealloc_gb=2, server_manage_port=23457)))
    argv = spec["argv"]
    assert argv[:3] == [sys.executable, "-m", "transport.infinistore_server"] and spec["port"] == 23456
    for flag, value in (("--service-port", "23456"), ("--manage-port", "23457"), ("--prealloc-size", "2"),
                        ("--link-type", "IB")):
        assert argv[argv.index(flag) + 1] == value
    assert spec["env"]["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(tmp_path)
    assert spec["env"]["PYTHONPATH"].split(os.pathsep)[0].endswith("build/infinistore-server")
    assert spec["health_url"] == "http://127.0.0.1:23457/kvmap_len"


@pytest.mark.skipif(not NO_RDMA, reason="this host has an RDMA device")
def test_without_rdma_the_launcher_stops_with_one_line(tmp_path, capsys):
    model = ROOT / "models" / "tiny-llama"
    if not model.is_dir():
        pytest.skip(f"no test model at {model}")
    rc = main(["launch", "--model", str(model), "--transport", "infinistore", "--transport-url",
               "infinistore://127.0.0.1:23456", "--set", "connector.transport.infinistore.connection_type=tcp",
               "--set", "connector.transport.infinistore.start_server=true", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "needs an RDMA device, even to serve TCP" in err and "mooncake" in err and "shm" in err
    assert main(["launch", "--model", str(model), "--transport", "shm", "--transport-url", "infinistore://h:1",
                 "--dry-run"]) == 2
    assert "--transport-url: only for --transport infinistore" in capsys.readouterr().err


def test_the_server_going_away_and_coming_back(server):
    c, start, box = server
    t = make_transport(TransportConfig(kind="infinistore", infinistore=c))
    try:
        assert t.put(["a"], [b"x" * 100]) == [True]
        box[-1].kill()
        box[-1].wait(10)
        t0 = time.monotonic()
        out = bytearray(100)
        assert t.get(["a"], [out]) == [0] and not any(out)  # a miss, nothing written
        assert t.put(["b"], [b"y"]) == [False] and t.exists(["a"]) == [False]
        assert time.monotonic() - t0 < 2 * c.op_timeout_s
        assert t.stats["server_down"] >= 1 and t.stats["dropped"] == 1
        start()  # a new, empty server on the same port: the transport connects again
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and t.put(["c"], [b"z" * 10]) != [True]:
            time.sleep(0.2)
        assert t.stats["restarts"] >= 1 and t.get(["c", "a"], [bytearray(10), out]) == [10, 0]
    finally:
        t.close()


def test_a_dead_client_process_is_a_miss_then_a_new_one(server):
    c, _, _ = server
    t = make_transport(TransportConfig(kind="infinistore", infinistore=c))
    try:
        key = f"k/{uuid.uuid4().hex}"
        assert t.put([key], [np.arange(1000, dtype=np.uint8)]) == [True]
        os.kill(t._client.proc.pid, signal.SIGKILL)  # what a crash of InfiniStore's client would do
        t._client.proc.wait(10)
        assert t.get([key], [bytearray(1000)]) == [0]  # this process lives on
        deadline = time.monotonic() + 20
        out = np.zeros(1000, np.uint8)
        while time.monotonic() < deadline and t.get([key], [out]) != [1000]:
            time.sleep(0.2)
        assert np.array_equal(out, np.arange(1000, dtype=np.uint8)) and t.stats["restarts"] >= 1
        assert t.used_bytes() == 0  # the slots of the calls in flight when it died were given back
    finally:
        t.close()


def test_start_errors_name_the_cause(server):
    c, _, _ = server
    dead = _server_cfg()
    with pytest.raises(TransportError, match="infinistore server 127.0.0.1:.* is not reachable"):
        make_transport(TransportConfig(kind="infinistore", infinistore=dead))
    with pytest.raises(TransportError, match="gid_index 3 needs an InfiniStore with hint_gid_index"):
        make_transport(TransportConfig(kind="infinistore", infinistore=dataclasses.replace(c, gid_index=3)))
    if NO_RDMA:  # the client of an RDMA connection finds no device here
        with pytest.raises(TransportError, match="infinistore: "):
            make_transport(TransportConfig(kind="infinistore", infinistore=dataclasses.replace(
                c, connection_type="rdma", url=c.url + "/?device=mlx5_0")))


def test_the_server_refuses_a_uvloop_that_would_abort_it():
    """uvloop 0.23 (libuv 1.52) aborts the 0.2.35 server at its first connection: refused at start."""
    import uvloop.loop

    v = uvloop.loop.libuv_get_version()
    if (v >> 16, (v >> 8) & 0xFF) <= (1, 48):
        pytest.skip("this environment's uvloop is one the server works with")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "transport.infinistore_server", "--service-port", "1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "install uvloop 0.21.0 where the server runs" in r.stderr


def test_the_verbs_double_lists_a_device_and_refuses_rdma():
    so = VERBS_DOUBLE / "libibverbs.so.1"
    if not so.is_file():
        pytest.skip(f"the libibverbs test double is not built ({so}); scripts/setup.sh builds it")
    lib = ctypes.CDLL(str(so), use_errno=True)
    lib.ibv_get_device_list.restype = ctypes.POINTER(ctypes.c_void_p)
    lib.ibv_get_device_name.restype = ctypes.c_char_p
    lib.ibv_open_device.restype = ctypes.c_void_p
    lib.ibv_alloc_pd.restype = ctypes.c_void_p
    lib.ibv_create_cq.restype = ctypes.c_void_p
    n = ctypes.c_int()
    devs = lib.ibv_get_device_list(ctypes.byref(n))
    assert n.value == 1 and lib.ibv_get_device_name(ctypes.c_void_p(devs[0])) == b"pdkv_double0"
    ctx = lib.ibv_open_device(ctypes.c_void_p(devs[0]))
    assert ctx and lib.ibv_alloc_pd(ctypes.c_void_p(ctx))
    assert not lib.ibv_create_cq(ctypes.c_void_p(ctx), 16, None, None, 0)
    assert ctypes.get_errno() == 95  # EOPNOTSUPP: no RDMA data path, ever
    lib.ibv_free_device_list(devs)


@pytest.mark.skipif(bool(NO_RDMA), reason=NO_RDMA)
def test_rdma_round_trip_through_a_real_device(tmp_path):
    """RDMA mode end to end (register_mr, batched one-sided writes and reads, misses per key)."""
    why = unavailable()
    if why:
        pytest.skip(why)
    dev = rdma_devices()[0]
    c = _server_cfg(connection_type="rdma", server_libibverbs="", staging_mb=64, max_value_mb=4)
    c = dataclasses.replace(c, url=f"{c.url}/?device={dev}")
    p = run_server(c, open(tmp_path / "server.log", "w"))
    t = make_transport(TransportConfig(kind="infinistore", infinistore=c))
    try:
        keys = [f"r/{uuid.uuid4().hex}/{i}" for i in range(300)]
        vals = [np.full(4096 * (1 + i % 3), i % 251, np.uint8) for i in range(300)]  # three block sizes
        assert t.put(keys, vals) == [True] * 300
        outs = [np.zeros(3 * 4096, np.uint8) for _ in keys]
        assert t.get(keys + ["absent"], outs + [np.zeros(10, np.uint8)]) == [v.nbytes for v in vals] + [0]
        assert all(np.array_equal(o[:v.nbytes], v) for o, v in zip(outs, vals))
        reads = t.acquire(keys[:3])
        assert [bytes(r.view) for r in reads] == [v.tobytes() for v in vals[:3]] and all(t.release(reads))
        assert t.delete(keys) == 300
    finally:
        t.close()
        p.kill()


def test_zero_copy_reads_of_more_keys_than_max_value_slots_fit(server):
    """acquire reserves max_value_mb per read until it is answered, then shrinks the slot: 40 small
    values come back through 4 MiB of staging with 1 MiB reserved per read (rounds)."""
    c, _, _ = server
    t = make_transport(TransportConfig(kind="infinistore", infinistore=c))
    try:
        keys = [f"zc/{uuid.uuid4().hex}/{i}" for i in range(40)]
        vals = [np.full(10_000 + i, i, np.uint8) for i in range(40)]
        assert t.put(keys, vals) == [True] * 40
        reads = t.acquire(keys + ["absent"])
        assert reads[-1] is None and all(bytes(r.view) == v.tobytes() for r, v in zip(reads, vals))
        assert t.release(reads) == [True] * 40 + [False] and t.used_bytes() == 0
    finally:
        t.close()


def test_bench_tiny_run(capsys):
    """pd bench transport --transport infinistore: the peer (started here) starts the server; TCP columns."""
    import argparse

    from launch.bench import transport as bench

    why = unavailable()
    if why:
        pytest.skip(f"InfiniStore not usable here ({why})")
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--transport", "infinistore", "--sizes", "64K,1M", "--total-mb", "2", "--iters", "1"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "| 64K |" in out and "| 1M |" in out and "tcp to peer GB/s" in out
    assert "transport=infinistore connection=tcp" in out and "started by the peer" in out


class RdmaConnectionDouble:
    """TEST DOUBLE of InfiniStore 0.2.35's ``InfinityConnection`` in RDMA mode (no RDMA here), as
    its code behaves: ``register_mr`` once per base; a call's blocks share one ``block_size`` and
    must address the registered base; a write stores ``block_size`` bytes per key; a read fails as
    a whole when a key is absent (``InfiniStoreKeyNotFound``) or holds more than ``block_size``
    (400), else copies what each key holds to ``ptr + offset``; more than 128 calls in flight or a
    request message over 4 MiB is refused. Counts calls, keys per call and calls in flight."""

    class KeyNotFound(Exception):
        pass

    def __init__(self, config=None) -> None:
        self.kv: dict[str, bytes] = {}
        self.base = self.size = None
        self.calls, self.max_keys, self.inflight, self.max_inflight = 0, 0, 0, 0

    def connect(self) -> None:
        pass

    def register_mr(self, ptr: int, size: int) -> int:
        self.base, self.size = ptr, size
        return 0

    async def _call(self, blocks, block_size: int, ptr: int, op) -> int:
        import asyncio

        if ptr != self.base:
            raise Exception("Please register memory first")
        if sum(len(k) + 16 for k, _ in blocks) > 4 << 20 or self.inflight >= 128:
            raise Exception("request refused")
        self.calls, self.max_keys = self.calls + 1, max(self.max_keys, len(blocks))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0.001)  # the completion arrives later, on the library's CQ thread
            for _, off in blocks:
                assert 0 <= off and off + block_size <= self.size
            op(blocks, block_size)
            return 200
        finally:
            self.inflight -= 1

    async def rdma_write_cache_async(self, blocks, block_size: int, ptr: int) -> int:
        def write(blocks, n):
            for k, off in blocks:
                self.kv[k] = ctypes.string_at(self.base + off, n)
        return await self._call(blocks, block_size, ptr, write)

    async def rdma_read_cache_async(self, blocks, block_size: int, ptr: int) -> int:
        def read(blocks, n):
            if any(k not in self.kv for k, _ in blocks):
                raise self.KeyNotFound("some keys not found")
            if any(len(self.kv[k]) > n for k, _ in blocks):
                raise Exception("Failed to read to infinistore, ret = 400")
            for k, off in blocks:
                ctypes.memmove(self.base + off, self.kv[k], len(self.kv[k]))
        return await self._call(blocks, block_size, ptr, read)

    def check_exist(self, key: str) -> bool:
        return key in self.kv

    def delete_keys(self, keys) -> int:
        return sum(self.kv.pop(k, None) is not None for k in keys)


def test_rdma_batching_over_a_connection_double():
    """The client's RDMA path (transport/infinistore_client.py ``_Rdma``) over the double: values
    grouped by size, at most 1024 keys a call, bounded in flight, a failed batch read retried key
    by key (a missing key and one too large for the block are misses, the rest hits). What the
    double cannot show (the NIC, the server) is for test_rdma_round_trip_through_a_real_device."""
    import mmap
    import socket
    import types

    from transport import infinistore_client as ic

    conn = RdmaConnectionDouble()
    isl = types.SimpleNamespace(TYPE_RDMA="RDMA", InfinityConnection=lambda cfg: conn,
                                ClientConfig=lambda **kw: types.SimpleNamespace(**kw))
    listener = socket.create_server(("127.0.0.1", 0))  # the start-up probe dials the server
    size = 80 << 20
    mm = mmap.mmap(-1, size)
    mv = memoryview(mm)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    c = {"host": "127.0.0.1", "port": listener.getsockname()[1], "device": "mlx5_0", "ib_port": 1,
         "link_type": "IB", "gid_index": -1, "max_inflight": 4, "connect_timeout_s": 1}
    r = ic._Rdma(isl, c, mv, base, size)
    try:
        sizes = [4096, 8192, 4096 * 3]
        items = [(f"k/{i}", i * 16384, sizes[i % 3]) for i in range(4000)]  # 1334 a size: 2 calls each
        for key, off, n in items:
            mv[off:off + n] = bytes([int(key[2:]) % 251]) * n
        assert r.put(items) == [True] * 4000 and conn.kv["k/5"] == bytes([5]) * sizes[2]
        assert conn.max_keys <= 1024 and conn.calls == 6 and conn.max_inflight == 4
        mv[:] = bytes(size)
        reads = [(k, off, 16384) for k, off, _ in items] + [("absent", 4000 * 16384, 16384)]
        got = r.get(reads)
        assert got[:4000] == [16384] * 4000 and got[4000] == ic.ABSENT
        assert all(mv[off:off + n] == bytes([i % 251]) * n for i, (_, off, n) in enumerate(items))
        calls = conn.calls
        small = [(k, off, 4096) for k, off, _ in items[:6]]  # k/1, k/2, k/4, k/5 hold more than 4096
        assert r.get(small) == [4096, 0, 0, 4096, 0, 0] and conn.calls == calls + 1 + 6
        assert r.exists(["k/0", "absent"]) == [True, False] and r.delete(["k/0", "absent"]) == 1
    finally:
        r.loop.call_soon_threadsafe(r.loop.stop)
        listener.close()
        mv.release()
        mm.close()


_RAW_WRITER = """
import struct, sys, numpy as np, infinistore as isl
port, key, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = isl.InfinityConnection(isl.ClientConfig(connection_type=isl.TYPE_TCP, host_addr="127.0.0.1",
                                                service_port=port))
conn.connect()
payload = np.full(1000, 7, np.uint8)
head = struct.pack("<4sHHQQ", b"PDIS", 1, 0, 1000, 42)
tail = struct.pack("<Q", 43 if kind == "torn" else 42)  # the nonce again (torn: the tail is not this write's)
raw = np.frombuffer(head + payload.tobytes() + (tail if kind != "short" else b""), np.uint8).copy()
conn.tcp_write_cache(key, raw.ctypes.data, raw.nbytes)
"""


def test_a_value_not_framed_as_written_is_a_miss(server):
    """Values written to the real server by InfiniStore's own client, not through pdkv: one framed
    as pdkv frames them reads back; one whose trailing nonce is another write's (as when a reader
    sees a TCP put before all its bytes arrived) and one cut short are misses, nothing written."""
    c, _, _ = server
    _, port, _ = c.server()
    keys = {kind: f"raw/{kind}/{uuid.uuid4().hex}" for kind in ("whole", "torn", "short")}
    for kind, key in keys.items():
        r = subprocess.run([sys.executable, "-c", _RAW_WRITER, str(port), key, kind], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    t = make_transport(TransportConfig(kind="infinistore", infinistore=c))
    try:
        outs = [np.zeros(2000, np.uint8) for _ in keys]
        assert t.get(list(keys.values()), outs) == [1000, 0, 0]
        assert (outs[0][:1000] == 7).all() and not outs[1].any() and not outs[2].any()
        reads = t.acquire(list(keys.values()))
        assert reads[0] is not None and reads[1:] == [None, None]
        t.release(reads)
    finally:
        t.close()
