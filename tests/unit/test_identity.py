"""Per-instance identity at the coordinator (issue 18, "Identity" and item 9) over real CurveZMQ.

pd launch gives each instance a key of its own; the coordinator binds an instance id to the key
that first spoke for it and a pd_id to its producer's and consumer's keys, so another key can
neither take an instance's FREEs nor publish, wait for, finish or abort its transfers; each key
has a cap on instance ids and a message rate. ``pd keys`` refuses directories and files other
users own or can write, and key and token files others can read, and never follows a symlink.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec
import pytest

from common.config import ConfigError, load
from launch.auth import own_keys, resolve_auth
from launch.kv_config import kv_transfer_config
from launch.procs import plan
from pd.config import CoordinatorConfig, DeploymentConfig
from pd.coordinator.client import CoordinatorClient, InstanceAgent
from pd.coordinator.curve import load_client_keys, load_server_keys, make_instance_keys, make_keys, read_token
from pd.coordinator.protocol import (
    PROTOCOL_TAG,
    Ack,
    Done,
    Error,
    Heartbeat,
    ProtocolError,
    Query,
    QueryReply,
    Ready,
    Register,
    Wait,
    decode_client,
    valid_id,
)
from pd.coordinator.server import Coordinator

pytestmark = pytest.mark.timeout(60)
ROOT = os.geteuid() == 0


@pytest.fixture
def keys(tmp_path) -> Path:
    d = tmp_path / "k"
    make_keys(d, ["hostb"], ["prefill-0", "decode-0", "decode-1"])
    return d


@pytest.fixture
def coord(keys):
    c = Coordinator(CoordinatorConfig(port=0, auth="curve", keys_dir=str(keys))).start_in_thread()
    clients: list[CoordinatorClient] = []

    def client(key: str = "client", bundle: str = "") -> CoordinatorClient:
        where = keys / "clients" / bundle if bundle else keys
        path = str(keys / "instances" / f"{key}.key_secret") if key != "client" else key
        clients.append(CoordinatorClient(c.address, timeout_s=3, keys=load_client_keys(str(where), path)))
        return clients[-1]

    yield c, client
    for cl in clients:
        cl.close()
    c.stop()


def _until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_pd_launch_gives_each_instance_a_key_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("PDKV_KEYS_HOME", str(tmp_path / "home"))
    dep = load(DeploymentConfig, {"model": str(tmp_path), "prefill": {"count": 2}})
    resolve_auth(dep)
    names = [s.name for s in plan(dep) if "--kv-transfer-config" in s.argv]
    assert kv_transfer_config(dep, "decode", "decode-0")["kv_connector_extra_config"]["coordinator_client_key"] \
        == "client"  # no key of its own yet: the host's
    own_keys(dep, names)  # pd launch, before it plans the commands again
    d = Path(dep.coordinator.keys_dir)
    files = {name: kv_transfer_config(dep, role, name)["kv_connector_extra_config"]["coordinator_client_key"]
             for name, role in (("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode"))}
    assert files == {n: str(d / "instances" / f"{n}.key_secret") for n in files}
    publics = {load_client_keys(str(d), f).public for f in files.values()}
    assert len(publics) == 3  # three keys, none the proxy's
    assert load_client_keys(str(d)).public not in publics
    assert sorted(p.name for p in (d / "authorized").glob("instance.*")) == [
        f"instance.{n}.key" for n in sorted(files)]
    assert all(Path(f).stat().st_mode & 0o777 == 0o600 for f in files.values())
    before = Path(files["decode-0"]).read_bytes()
    own_keys(dep, names)  # a second launch keeps them
    assert Path(files["decode-0"]).read_bytes() == before


def test_another_key_cannot_take_an_instances_frees(coord, keys):
    c, client = coord
    frees = []
    agent = InstanceAgent(c.address, "prefill-0", "prefill", interval_s=0.2, on_free=frees.append,
                          keys=load_client_keys(str(keys), str(keys / "instances" / "prefill-0.key_secret"))).start()
    try:
        assert agent.wait_registered(5)
        thief = client("decode-0")
        for msg in (Heartbeat("prefill-0", "prefill"), Register("prefill-0", "decode"),
                    Ready("x", 0, ["theirs"], 32, instance_id="prefill-0")):
            reply = thief.call(msg)
            assert isinstance(reply, Error), reply
            assert "may not speak for" in reply.reason or "speaks only for" in reply.reason
        hostb = client(bundle="hostb")  # a host's key may not speak for an instance with a key of its own
        reply = hostb.call(Heartbeat("prefill-0/tp1", "prefill"))
        assert isinstance(reply, Error) and "has a key of its own" in reply.reason
        own = client("prefill-0")
        assert isinstance(own.call(Register("prefill-0/tp1", "prefill")), Ack)  # its TP ranks are its own
        assert own.ready(Ready("p1", 0, ["a", "b"], 64, instance_id="prefill-0", final=True))
        assert client().abort("p1", "the proxy's key aborts any transfer")
        assert _until(lambda: frees)  # the FREE still went to prefill-0's own agent
        assert frees[0].keys == ["a", "b"]
        counters = own.query().counters
        assert counters["identity_refused"] == 4 and counters["freed_keys"] == 2
    finally:
        agent.stop()


def test_a_transfer_belongs_to_its_producer_and_consumer_keys(coord):
    c, client = coord
    producer, consumer, other = client("prefill-0"), client("decode-0"), client("decode-1")
    assert producer.ready(Ready("t1", 0, ["k0"], 32, instance_id="prefill-0", final=True))
    got = consumer.wait("t1", 0, 2)
    assert isinstance(got, Ready) and got.keys == ["k0"]
    for msg in (Wait("t1", 0, 0.5), Done("t1", 0, False, instance_id="decode-1", error="x")):
        reply = other.call(msg)
        assert isinstance(reply, Error) and "belongs to other keys" in reply.reason
    assert not other.abort("t1")  # an Error, not an Ack
    assert not other.ready(Ready("t1", 0, ["evil"], 32, instance_id="decode-1", final=True))
    assert consumer.wait("t1", 0, 2).keys == ["k0"]  # untouched: still its producer's chunks
    assert consumer.done(Done("t1", 0, True, instance_id="decode-0"))
    counters = consumer.query().counters
    assert counters["done_failed"] == 0 and counters["aborts"] == 0 and counters["identity_refused"] == 4
    assert counters["ready_conflicts"] == 1  # decode-1's own READY: refused, its chunks freed at decode-1


def test_per_key_limits_on_instances_and_message_rate(coord, caplog):
    c, client = coord
    c.state.identity.max_instances = 3
    hostb = client(bundle="hostb")
    replies = [hostb.call(Register(f"b-{i}", "decode")) for i in range(5)]
    assert [type(r) for r in replies] == [Ack, Ack, Ack, Error, Error]
    assert "already speaks for 3 instances" in replies[3].reason
    assert isinstance(client().call(Register("c-0", "decode")), Ack)  # another key's cap is its own
    ident = c.state.identity
    ident.instances["b-0"] = (ident.instances["b-0"][0], time.monotonic() - 60)  # down (silent past its TTL)
    assert isinstance(hostb.call(Register("b-9", "decode")), Ack)  # ... so it no longer counts
    assert isinstance(hostb.call(Register("b-10", "decode")), Error)
    c.state.identity.rate_per_s = 1.0
    with caplog.at_level(logging.WARNING, "pd.coordinator"):
        replies = [hostb.call(Query()) for _ in range(20)]
    refused = [r for r in replies if isinstance(r, Error)]
    assert len(refused) >= 15 and "messages a second" in refused[0].reason
    assert sum("refused a Query" in r.getMessage() for r in caplog.records) == 1  # logged once a minute
    c.state.identity.rate_per_s = 5000.0
    assert isinstance(client().call(Query()), QueryReply)  # the other key was never limited
    assert client().query().counters["rate_limited"] == len(refused)


def test_metrics_stay_one_series_per_role_and_known_name(coord):
    c, client = coord
    own = client("decode-0")
    stats = {"Bad.Name": 1.0} | {f"n{i}": 1.0 for i in range(600)}
    assert isinstance(own.call(Heartbeat("decode-0", "decode", stats=stats)), Ack)
    counters = own.query().counters
    per_role = [k for k in counters if k.startswith("decode.")]
    assert len(per_role) == 255  # of the first MAX_INSTANCE_STATS of one heartbeat, the plain names
    assert "decode.Bad.Name" not in counters and counters["stats_dropped"] == 601 - 255
    for rank, letter in ((1, "m"), (2, "o")):
        stats = {f"{letter}{i}": 1.0 for i in range(256)}
        assert isinstance(own.call(Heartbeat(f"decode-0/tp{rank}", "decode", stats=stats)), Ack)
    names = {k for k in own.query().counters if k.startswith("decode.")}
    assert len(names) == 512  # MAX_STAT_NAMES over all instances, whatever names peers choose


# ---- pd keys: directories and files of other users (item 9) ------------------------------


def test_a_keys_directory_others_can_write_or_a_symlink_is_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(ConfigError, match=rf"{d} is owned by uid {os.geteuid()}.* with mode 0777.*writable by no one"):
        make_keys(d)
    real = tmp_path / "real"
    make_keys(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="is a symlink"):
        make_keys(link)
    with pytest.raises(ConfigError, match="is a symlink"):
        load_server_keys(str(link))
    (real / "api.key").unlink()
    (real / "api.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symlink"):
        make_keys(real)
    assert not (tmp_path / "elsewhere").exists()  # nothing written through the link
    (real / "api.key").unlink()
    (tmp_path / "other").mkdir()
    (real / "authorized").rename(tmp_path / "moved")
    (real / "authorized").symlink_to(tmp_path / "other")  # instance keys alone (pd launch), no make_keys first
    with pytest.raises(ConfigError, match="authorized/.*is a symlink"):
        make_instance_keys(real, ["prefill-0"])
    assert not list((tmp_path / "other").iterdir())


@pytest.mark.skipif(not ROOT, reason="only root can give a directory or file to another user")
def test_pd_keys_as_root_into_a_directory_another_user_made(tmp_path):
    d = tmp_path / "theirs"
    (d / "authorized").mkdir(parents=True)
    os.chown(d, 12345, 12345)
    with pytest.raises(ConfigError, match=rf"{d} is owned by uid 12345 with mode 0755"):
        make_keys(d)
    os.chown(d, 0, 0)
    evil = d / "authorized" / "evil.key"
    evil.write_bytes(b"x")
    os.chown(evil, 12345, 12345)
    with pytest.raises(ConfigError, match=rf"{evil} in the allow-list is a file owned by uid 12345 with mode"):
        make_keys(d)
    assert not (d / "server.key_secret").exists()


def test_key_and_token_files_others_can_read_are_refused(keys):
    secret = keys / "client.key_secret"
    secret.chmod(0o666)
    with pytest.raises(ConfigError, match=rf"{secret} is owned by .* with mode 0666: group or others can read or "
                                          rf"write it; run `chmod 600 {secret}`"):
        load_client_keys(str(keys))
    secret.chmod(0o600)
    load_client_keys(str(keys))
    token = keys / "api.key"
    token.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"vllm.api_key_file: {token} .* mode 0644.*chmod 600"):
        read_token(str(token))
    token.chmod(0o600)
    assert read_token(str(token))
    server = keys / "server.key_secret"
    server.chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640"):
        load_server_keys(str(keys))


def test_an_authorized_key_others_can_write_lets_no_one_in(keys, coord, caplog):
    c, client = coord
    (keys / "authorized" / "hostb.key").chmod(0o666)
    with caplog.at_level(logging.WARNING, "pd.coordinator.auth"):
        hostb = CoordinatorClient(c.address, timeout_s=0.5, keys=load_client_keys(str(keys / "clients" / "hostb")))
        assert hostb.query() is None  # refused at the handshake: no answer
        hostb.close()
    assert "ignoring" in caplog.text and "mode 0666" in caplog.text
    assert isinstance(client().call(Query()), QueryReply)


def test_ids_are_plain_to_their_last_character():
    """pd_ids and instance ids: at most 128 of ``[A-Za-z0-9_.:/-]``; a trailing newline (which a
    ``$`` pattern lets through) would put a line of the peer's choosing into the log."""
    for bad in ("abc\n", "a" * 129, "a b", "é"):
        with pytest.raises(ProtocolError, match="pd_id"):
            decode_client([PROTOCOL_TAG, msgspec.msgpack.encode({"type": "wait", "pd_id": bad, "rank": 0,
                                                                 "timeout_s": 1})])
        assert not valid_id(bad)
    assert valid_id("f" * 128) and valid_id("prefill-0/tp1")
