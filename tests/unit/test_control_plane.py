"""The closed control plane (issue 9, item 4): a one-host deployment's coordinator admits only
clients with the keys pd launch made for it; forged peers cannot publish, abort or free KV
transfers; shm pools must be ours and private; decode never loads another request's chunks.

Real coordinator, real ZMQ (CurveZMQ) sockets, real shm transport and connector worker halves."""
from __future__ import annotations

import os

import pytest
import zmq

from common.config import ConfigError, load
from launch.auth import own_keys, resolve_auth
from launch.kv_config import kv_transfer_config
from launch.procs import plan
from pd.config import CoordinatorConfig, DeploymentConfig
from pd.connector.scheduler import LoadSpec, PDMetadata, SaveSpec
from pd.coordinator.client import CoordinatorClient
from pd.coordinator.curve import ClientKeys, load_client_keys, local_keys_dir, make_keys
from pd.coordinator.protocol import Ready
from pd.coordinator.server import Coordinator
from tests.unit.test_connector_worker import (  # noqa: F401  (fixtures)
    DST,
    PROMPT,
    SRC,
    _same_blocks,
    _until,
    coord,
    pair,
)
from transport.base import TransportError
from transport.config import TransportConfig
from transport.shm import ShmTransport


@pytest.fixture
def keys_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PDKV_KEYS_HOME", str(tmp_path / "keys-home"))
    return tmp_path / "keys-home"


def _dep(model_dir, **over) -> DeploymentConfig:
    return load(DeploymentConfig, {"model": str(model_dir), **over})


def test_one_host_deployment_gets_keys_of_its_own(keys_home, tmp_path):
    dep = _dep(tmp_path)
    resolve_auth(dep)
    c = dep.coordinator
    assert c.auth == "curve" and c.keys_dir == str(keys_home / "coordinator-5570") == str(local_keys_dir(5570))
    own_keys(dep)
    d = keys_home / "coordinator-5570"
    assert d.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in d.glob("*.key_secret"))
    argv = {s.name: s.argv for s in plan(dep)}
    assert argv["coordinator"][argv["coordinator"].index("--auth") + 1] == "curve"
    assert argv["proxy"][argv["proxy"].index("--coordinator-keys-dir") + 1] == str(d)
    assert kv_transfer_config(dep, "prefill", "p0")["kv_connector_extra_config"]["coordinator_keys_dir"] == str(d)
    server = (d / "server.key_secret").read_bytes()
    own_keys(dep)  # a second launch keeps them: running clients stay valid
    assert (d / "server.key_secret").read_bytes() == server


def test_auth_auto_elsewhere(keys_home, tmp_path):
    dep = _dep(tmp_path, coordinator={"keys_dir": str(tmp_path / "k")})
    resolve_auth(dep)
    assert dep.coordinator.auth == "curve" and dep.coordinator.keys_dir == str(tmp_path / "k")
    dep = _dep(tmp_path, mode="colocated")
    resolve_auth(dep)
    assert dep.coordinator.auth == "none"
    dep = _dep(tmp_path, coordinator={"host": "0.0.0.0", "advertise_host": "10.0.0.1"})
    resolve_auth(dep)  # beyond loopback keys must be shared between hosts: none, which is refused
    with pytest.raises(ConfigError, match="not a loopback address and coordinator.auth is none"):
        plan(dep)
    dep = _dep(tmp_path, coordinator={"auth": "none"})
    resolve_auth(dep)
    assert dep.coordinator.auth == "none"


@pytest.fixture
def closed(keys_home, tmp_path):
    """A coordinator with keys made as pd launch makes them (auth auto), and a legitimate client."""
    keys_dir = str(keys_home / "closed")
    make_keys(keys_dir)
    coord = Coordinator(CoordinatorConfig(port=0, auth="auto", keys_dir=keys_dir)).start_in_thread()
    good = CoordinatorClient(coord.address, timeout_s=5, keys=load_client_keys(keys_dir))
    yield coord, good
    good.close()
    coord.stop()


def _forged_keys(server_public: bytes) -> ClientKeys:
    public, secret = zmq.curve_keypair()
    return ClientKeys(public, secret, server_public, "forged")


def test_forged_peers_cannot_abort_or_replace_a_transfer(closed):
    coord, good = closed
    keys = [f"xfer/victim/{i}" for i in range(3)]
    assert good.ready(Ready("victim", 0, keys, 96, instance_id="prefill-0", final=True))
    forgers = [CoordinatorClient(coord.address, timeout_s=1.0),  # no keys at all
               CoordinatorClient(coord.address, timeout_s=1.0, keys=_forged_keys(coord._curve.public))]
    for f in forgers:
        assert not f.abort("victim", "forged")  # no answer: nothing was done
        assert not f.ready(Ready("victim", 0, ["xfer/victim/evil"], 96, instance_id="evil", final=True))
        assert f.query() is None
        f.close()
    got = good.wait("victim", 0, timeout_s=2)
    assert isinstance(got, Ready) and got.keys == keys and got.instance_id == "prefill-0"
    counters = good.query().counters
    assert counters["aborts"] == 0 and counters["ready"] == 1 and counters["freed_keys"] == 0
    # the keypair not in authorized/ is refused by ZAP and counted; a keyless client fails the
    # handshake, which the coordinator sees only if the client stays long enough (test_curve.py)
    assert counters["auth_rejected"] >= 1


def test_shm_pool_of_another_mode_or_owner_is_refused(tmp_path):
    cfg = TransportConfig(kind="shm", pool_size_mb=8, shm_dir=str(tmp_path), name="priv")
    ShmTransport(cfg).close()
    pool = tmp_path / "pdkv-priv"
    assert pool.stat().st_mode & 0o777 == 0o700
    pool.chmod(0o755)
    with pytest.raises(TransportError, match="mode 0755.*must be ours"):
        ShmTransport(cfg)
    pool.chmod(0o700)
    if os.geteuid() == 0:  # only root can give a directory away
        os.chown(pool, 12345, 12345)
        with pytest.raises(TransportError, match="owned by uid 12345"):
            ShmTransport(cfg)


def test_decode_never_loads_another_requests_chunks(pair):
    """A decode request that names another request's pd_id (a client guessing or replaying one)
    derives its keys from its own prompt: none match, nothing is loaded, it recomputes."""
    p, d = pair
    p.after_forward(PDMetadata(saves=[SaveSpec("p1", "theirs", PROMPT, SRC, 0, -1, True)]))
    mine = [t + 1 for t in PROMPT]  # same length, other tokens
    before = {n: c[DST].clone() for n, c in d.caches.items()}
    d.start_step(PDMetadata(loads=[LoadSpec("d1", "theirs", mine, DST, 0)]))
    assert _until(lambda: "d1" in d.loads._done_recving)
    assert d.take_load_errors() == set(DST)  # recomputed, every block
    assert d.stats["chunks_loaded"] == 0
    assert all(d.caches[n][DST].equal(before[n]) for n in before)  # not one byte of theirs
    assert not _same_blocks(p, d, SRC, DST)


def test_no_pickle_on_any_wire():
    """Every message and chunk is msgspec/msgpack or raw bytes: no module can unpickle peer input."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    users = [str(f.relative_to(root)) for pkg in ("pd", "transport", "store", "launch") for f in (root / pkg).rglob("*.py")
             if any(w in f.read_text() for w in ("import pickle", "cloudpickle", "recv_pyobj", "send_pyobj"))]
    assert users == []
