"""MooncakeTransport beyond the contract suite: configuration, the master's server spec, and
failure: no master, no metadata server, no module, a master that dies and comes back, a call that
hangs, a peer that dies, a full pool, a busy staging region. Real mooncake_master processes on
free ports (skipped with the reason when Mooncake is not installed)."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from test_transport_contract import close_all, free_ports, mooncake_installed

from common.config import ConfigError, load
from pd.config import DeploymentConfig
from transport import TransportError, make_transport, server_specs
from transport import mooncake as mc
from transport import mooncake_master as mm
from transport.config import MooncakeConfig, TransportConfig

MB = 1 << 20
SPAWN = mp.get_context("spawn")
needs_mooncake = pytest.mark.skipif(bool(mooncake_installed()), reason=f"Mooncake Store not installed "
                                    f"({mooncake_installed()}); scripts/setup.sh installs it")


def _mc(**kw) -> MooncakeConfig:
    rpc, metrics, meta = free_ports(3)
    kw = {"master": f"127.0.0.1:{rpc}", "metrics_port": metrics, "metadata_port": meta, "global_segment_size_mb": 16,
          "local_buffer_size_mb": 2, "op_timeout_s": 3.0, **kw}
    return MooncakeConfig(**kw)


def _tc(m: MooncakeConfig, **kw) -> TransportConfig:
    return TransportConfig(kind="mooncake", mooncake=dataclasses.replace(m, **kw))


@pytest.fixture(scope="module")
def master():
    """One master for the module: (config, transports to close before it stops)."""
    if mooncake_installed():
        pytest.skip("Mooncake Store not installed")
    m = _mc()
    p = mm.run_master(m)
    later: list = []
    yield m, later
    close_all(later)
    p.kill()
    p.wait(10)


def _open(master, **kw):
    m, later = master
    t = make_transport(_tc(m, **kw))
    later.append(t)
    return t


def _k(name: str) -> str:
    return f"mt/{uuid.uuid4().hex[:8]}/{name}"


# -- configuration ---------------------------------------------------------------------------
def test_config_keys_load_and_bad_values_name_the_key():
    d = load(DeploymentConfig, {"connector": {"transport": {"kind": "mooncake", "mooncake": {
        "master": "10.0.0.1:50051", "protocol": "rdma", "device_name": "mlx5_0", "start_master": True}}}})
    m = d.connector.transport.mooncake
    assert (m.master, m.protocol, m.device_name, m.metadata_url()) == ("10.0.0.1:50051", "rdma", "mlx5_0",
                                                                       "P2PHANDSHAKE")
    assert MooncakeConfig(master="[fd00::1]:7", metadata_server="master", metadata_port=81).metadata_url() == \
        "http://[fd00::1]:81/metadata"
    for bad in ("ctl", "ctl:0", ":50051", "ctl:port", "fd00::1:50051", "tcp://ctl:50051", "ctl:70000"):
        with pytest.raises(ConfigError, match=r"connector.transport.mooncake.master: .* expected host:port"):
            MooncakeConfig(master=bad).check()
    for bad in ("htp:/x", "http://ctl", "etcd://ctl:2379", ""):
        with pytest.raises(ConfigError, match="metadata_server: .* P2PHANDSHAKE, master"):
            MooncakeConfig(metadata_server=bad).check()
    with pytest.raises(ConfigError, match="device_name: 'mlx5_0' is only for protocol rdma"):
        MooncakeConfig(device_name="mlx5_0").check()
    with pytest.raises(ConfigError, match="global_segment_size_mb: 8 is not allowed; 0 .none. or at least 16"):
        MooncakeConfig(global_segment_size_mb=8).check()
    with pytest.raises(ConfigError, match="local_hostname: '10.0.0.2:1' is not a host"):
        MooncakeConfig(local_hostname="10.0.0.2:1").check()
    for data, needle in [
        ({"protocol": "ib"}, "connector.transport.mooncake.protocol: 'ib' is not allowed; choose one of tcp, rdma"),
        ({"local_buffer_size_mb": 0}, "connector.transport.mooncake.local_buffer_size_mb: 0 is out of range"),
        ({"eviction_ratio": 2}, "connector.transport.mooncake.eviction_ratio: 2.0 is out of range"),
        ({"masterr": "x"}, "unknown key connector.transport.mooncake.masterr"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            load(DeploymentConfig, {"connector": {"transport": {"mooncake": data}}})
    with pytest.raises(ConfigError, match="choose one of shm, mooncake, infinistore, none"):
        load(DeploymentConfig, {"connector": {"transport": {"kind": "tcp"}}})


def test_server_specs():
    assert server_specs(TransportConfig()) == [] and server_specs(TransportConfig(kind="none")) == []
    assert server_specs(TransportConfig(kind="mooncake")) == []  # start_master false: started elsewhere
    with pytest.raises(ConfigError, match="mooncake.master"):
        server_specs(TransportConfig(kind="mooncake", mooncake=MooncakeConfig(master="nope")))
    if mm.master_binary() is None:
        with pytest.raises(ConfigError, match="start_master: true, but mooncake_master is not installed"):
            server_specs(TransportConfig(kind="mooncake", mooncake=MooncakeConfig(start_master=True)))
        return
    m = MooncakeConfig(master="10.0.0.1:6000", start_master=True, metrics_port=6001, eviction_ratio=0.1)
    (spec,) = server_specs(TransportConfig(kind="mooncake", mooncake=m))
    assert spec["name"] == "mooncake-master" and spec["host"] == "10.0.0.1" and spec["port"] == 6000
    assert os.path.basename(spec["argv"][0]) == "mooncake_master" and os.access(spec["argv"][0], os.X_OK)
    assert {"--rpc_port=6000", "--rpc_address=10.0.0.1", "--metrics_port=6001", "--metrics_host=10.0.0.1",
            "--eviction_ratio=0.1", "--eviction_high_watermark_ratio=0.9"} <= set(spec["argv"])
    assert not any("http_metadata" in a for a in spec["argv"])  # P2PHANDSHAKE: no metadata server
    assert spec["health_url"] == "http://10.0.0.1:6001/health" and spec["env"] == {}
    (spec,) = server_specs(TransportConfig(kind="mooncake", mooncake=dataclasses.replace(
        m, bind_host="0.0.0.0", metadata_server="master", metadata_port=6002)))
    assert {"--rpc_address=0.0.0.0", "--enable_http_metadata_server=true",
            "--http_metadata_server_port=6002"} <= set(spec["argv"])
    assert spec["host"] == "0.0.0.0" and spec["health_url"] == "http://127.0.0.1:6001/health"


def test_missing_binary_and_module(monkeypatch):
    monkeypatch.setattr(mm, "master_binary", lambda: None)
    with pytest.raises(ConfigError, match="start_master: true, but mooncake_master is not installed"):
        server_specs(TransportConfig(kind="mooncake", mooncake=MooncakeConfig(start_master=True)))
    monkeypatch.setitem(sys.modules, "mooncake.store", None)  # import fails
    with pytest.raises(TransportError, match="scripts/setup.sh"):
        make_transport(TransportConfig(kind="mooncake"))


def test_route_address():
    assert mm.route_address("127.0.0.1", 50051) == "127.0.0.1"


# -- failure at start ------------------------------------------------------------------------
@needs_mooncake
def test_no_master_is_a_clear_error_at_once():
    m = _mc()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=rf"mooncake master {m.master} is not reachable .*start_master"):
        make_transport(_tc(m))
    assert time.monotonic() - t0 < 3  # not Mooncake's own ~90 s of retries


@needs_mooncake
def test_no_metadata_server_is_a_clear_error(master):
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/metadata"
    with pytest.raises(TransportError, match=f"metadata server {url} is not reachable"):
        make_transport(_tc(master[0], metadata_server=url))


# -- failure while serving -------------------------------------------------------------------
@needs_mooncake
def test_master_dies_calls_fail_fast_then_recover():
    """Master with its HTTP metadata server (metadata_server: master); killed mid-run; restarted."""
    m = _mc(metadata_server="master", op_timeout_s=2.0)
    p = mm.run_master(m)
    t = make_transport(_tc(m))
    try:
        keys, out = [_k("a"), _k("b")], bytearray(100)
        assert t.put(keys, [b"x" * 100, b"y" * 100]) == [True, True]
        p.kill()
        p.wait(10)
        t0 = time.monotonic()
        assert t.get(keys[:1], [out]) == [0]  # the call that finds out: an RPC error, or op_timeout_s
        assert time.monotonic() - t0 < m.op_timeout_s + 0.5
        t0 = time.monotonic()
        for _ in range(5):  # from then on every call answers at once: a miss / a drop, never raises
            assert t.get(keys[:1], [out]) == [0] and t.put([_k("c")], [b"z"]) == [False]
            assert t.exists(keys) == [False, False] and t.delete(keys) == 0 and t.acquire(keys) == [None, None]
            slot = t.reserve([_k("r")], [10])
            assert t.commit(slot) == [False]
            time.sleep(0.5)  # the background probe keeps trying meanwhile
        assert time.monotonic() - t0 < 5 * 0.5 + 0.5
        assert t.stats["master_down"] >= 20 and t.used_bytes() == 0
        p = mm.run_master(m)  # the same address: the client finds it again
        deadline = time.monotonic() + 20
        while t.put([_k("back")], [b"1"]) != [True]:
            assert time.monotonic() < deadline, f"no recovery: {t.stats}"
            time.sleep(0.5)
        key = _k("after")
        assert t.put([key], [b"after" * 20]) == [True] and t.get([key], [out]) == [100] and out == b"after" * 20
        assert t.get(keys[:1], [out]) == [0]  # what the dead master knew is gone: a miss, not old bytes
    finally:
        t.close()
        p.kill()
        p.wait(10)


def _child_put_after_restart(cfg, before, after, ready, restarted, put_again) -> None:
    """A second client: puts ``before`` into its own segment; once the master is back, puts
    ``after`` until it is stored (the client has re-mounted its segment)."""
    t = make_transport(cfg)
    ok = t.put([before], [np.full(100_000, 5, np.uint8)]) == [True]
    ready.set()
    if ok and restarted.wait(60):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if t.put([after], [np.full(100_000, 6, np.uint8)]) == [True]:
                put_again.set()
                break
            time.sleep(0.5)
    time.sleep(60)
    os._exit(0)


@needs_mooncake
def test_master_restarted_a_peer_s_values_flow_again():
    """Two clients (processes), P2P handshake: a value put into one's segment is read by the
    other before the master dies and, once it is back at the same address, again."""
    m = _mc(op_timeout_s=2.0)
    p = mm.run_master(m)
    t = make_transport(_tc(m))
    before, after = _k("before"), _k("after")
    ready, restarted, put_again = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_child_put_after_restart, args=(_tc(m), before, after, ready, restarted, put_again))
    child.start()
    try:
        assert ready.wait(60)
        out = np.zeros(100_000, np.uint8)
        assert t.get([before], [out]) == [100_000] and (out == 5).all()
        p.kill()
        p.wait(10)
        assert t.get([before], [out]) == [0]
        p = mm.run_master(m)
        restarted.set()
        assert put_again.wait(40), "the peer could not put into its own segment after the restart"
        deadline = time.monotonic() + 20
        while t.get([after], [out]) != [100_000]:
            assert time.monotonic() < deadline, f"no read from the peer after the restart: {t.stats}"
            time.sleep(0.5)
        assert (out == 6).all()
        assert t.get([before], [out]) == [0]  # the old master's values are gone: a miss
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        t.close()
        p.kill()
        p.wait(10)


class _SlowStore:
    """Delegates to the real client; batch_get_into first sleeps (a peer that does not answer)."""

    def __init__(self, real, delay: float) -> None:
        self._real, self._delay = real, delay

    def batch_get_into(self, *args):
        time.sleep(self._delay)
        return self._real.batch_get_into(*args)

    def __getattr__(self, name):
        return getattr(self._real, name)


@needs_mooncake
def test_a_hanging_call_is_a_miss_after_op_timeout_and_its_slot_waits(master):
    t = _open(master, op_timeout_s=0.3)
    key = _k("slow")
    assert t.put([key], [b"s" * 5000]) == [True]
    t._store = _SlowStore(t._store, 1.0)
    out = bytearray(5000)
    t0 = time.monotonic()
    assert t.get([key], [out]) == [0] and not any(out)
    assert 0.25 < time.monotonic() - t0 < 0.8 and t.stats["timeouts"] == 1
    assert t.used_bytes() > 0  # the engine may still write into the slot: not reused yet
    time.sleep(1.0)
    assert t.used_bytes() == 0
    t._store = t._store._real
    time.sleep(mc.DOWN_S)
    assert t.get([key], [out]) == [5000] and out == b"s" * 5000


def _child_put_then_wait(cfg, key, ready) -> None:
    t = make_transport(cfg)
    ok = t.put([key], [np.full(200_000, 9, np.uint8)])
    ready.set()
    time.sleep(60 if ok == [True] else 0)
    os._exit(0)


@needs_mooncake
def test_a_dead_peer_is_a_miss(master):
    """The value lives in a peer's segment (its own memory); the peer is SIGKILLed."""
    t = _open(master)
    key, ready = _k("peer"), SPAWN.Event()
    p = SPAWN.Process(target=_child_put_then_wait, args=(_tc(master[0]), key, ready))
    p.start()
    try:
        assert ready.wait(60)
        out = np.zeros(200_000, np.uint8)
        assert t.get([key], [out]) == [200_000] and (out == 9).all()
        out[:] = 0
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    t0 = time.monotonic()
    assert t.get([key], [out]) == [0] and not out.any()
    assert t.acquire([key]) == [None]
    assert time.monotonic() - t0 < 2 and t.stats["errors"] >= 1 and t.used_bytes() == 0


@needs_mooncake
def test_pool_full_and_a_value_larger_than_the_pool(master):
    t = _open(master, local_buffer_size_mb=24)
    big = np.ones(20 * MB, np.uint8)  # larger than any segment of this pool (16 MiB each)
    assert t.put([_k("big")], [big]) == [False]
    assert t.stats["dropped"] == 1 and t.stats["pool_full"] == 1
    n = 100  # 100 MiB into a pool of a few 16 MiB segments
    keys = [_k(f"f{i}") for i in range(n)]
    vals = [np.full(MB, i, np.uint8) for i in range(n)]
    ok = [t.put([key], [v])[0] for key, v in zip(keys, vals)]
    assert ok.count(True) >= 8
    outs = [np.zeros(MB, np.uint8) for _ in keys]
    got = t.get(keys, outs)
    assert 0 < sum(1 for g in got if g) < n  # the master evicted some
    for g, o, i in zip(got, outs, range(n)):
        assert g == 0 or (g == MB and (o == i).all())  # the value, or a miss: never other bytes
    t.delete(keys)


@needs_mooncake
def test_a_busy_staging_region_waits_then_drops(master):
    t = _open(master, local_buffer_size_mb=1, op_timeout_s=0.5)
    (slot,) = t.reserve([_k("held")], [MB])  # the whole region
    t0 = time.monotonic()
    assert t.put([_k("waits")], [b"w" * 1000]) == [False]
    assert 0.4 < time.monotonic() - t0 < 1.5 and t.stats["dropped"] == 1
    assert t.get([_k("any")], [bytearray(10)]) == [0]
    res = []
    th = threading.Thread(target=lambda: res.append(t.put([_k("in-time")], [b"i" * 1000])))
    th.start()
    time.sleep(0.1)
    assert t.commit([slot], [False]) == [False]  # room again: the waiting put goes through
    th.join(5)
    assert res == [[True]] and t.used_bytes() == 0


@needs_mooncake
def test_bench_tiny_run(capsys):
    """pd bench transport --transport mooncake: a master and a peer started here, the TCP columns."""
    import argparse

    from launch.bench import transport as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--transport", "mooncake", "--sizes", "64K,1M", "--total-mb", "2", "--iters", "1"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "| 64K |" in out and "| 1M |" in out and "tcp to peer GB/s" in out and "transport=mooncake" in out
    assert "started here" in out
