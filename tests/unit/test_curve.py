"""CurveZMQ authentication of the coordinator over real ZMQ sockets: pd keys, an authenticated
round trip (request client, instance agent, async client), refused keys, plaintext clients, the
refusal to listen beyond loopback without auth, and probe()'s diagnosis."""
from __future__ import annotations

import asyncio
import logging
import stat
import time
from pathlib import Path

import pytest
import zmq

from common.config import ConfigError
from launch.cli import main
from pd.config import ConnectorConfig, CoordinatorConfig
from pd.coordinator.client import (
    PROBE_HANDSHAKE,
    PROBE_OK,
    PROBE_REFUSED,
    PROBE_UNREACHABLE,
    AsyncCoordinatorClient,
    CoordinatorClient,
    InstanceAgent,
    probe,
)
from pd.coordinator.curve import (
    ClientKeys,
    check_bind,
    client_keys_for,
    is_loopback,
    load_client_keys,
    make_keys,
)
from pd.coordinator.protocol import Ack, Ready
from pd.coordinator.server import Coordinator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "k"
    make_keys(d, ["hostb"])
    return d


@pytest.fixture
def curve_coord(keys):
    coords = []

    def start(keys_dir: Path = keys) -> Coordinator:
        c = Coordinator(CoordinatorConfig(host="127.0.0.1", port=0, auth="curve", keys_dir=str(keys_dir))).start_in_thread()
        coords.append(c)
        return c

    yield start
    for c in coords:
        c.stop()


def test_pd_keys_writes_private_files_and_bundles(tmp_path, capsys):
    d = tmp_path / "keys"
    assert main(["keys", str(d), "--client", "hostb"]) == 0
    out = capsys.readouterr().out
    assert "hostb" in out and "authorized clients: client, hostb" in out
    for f in [d / "server.key", d / "server.key_secret", d / "client.key_secret", d / "authorized" / "client.key",
              d / "authorized" / "hostb.key", d / "clients" / "hostb" / "server.key",
              d / "clients" / "hostb" / "client.key_secret"]:
        assert f.is_file(), f
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "clients" / "hostb" / "server.key").read_bytes() == (d / "server.key").read_bytes()
    server = (d / "server.key_secret").read_bytes()
    # again: the server keypair is kept, a new client is added, an existing one refused
    assert main(["keys", str(d), "--client", "hostc"]) == 0
    assert (d / "server.key_secret").read_bytes() == server and (d / "authorized" / "hostc.key").is_file()
    assert main(["keys", str(d), "--client", "hostb"]) == 2
    assert "client 'hostb' exists" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not allowed"):
        make_keys(d, ["../evil"])
    with pytest.raises(ConfigError, match="instances' own keys"):  # it would be taken for instance prefill-0's key
        make_keys(d, ["instance.prefill-0"])
    assert not (d / "authorized" / "instance.prefill-0.key").exists()


def test_missing_key_files_say_which_and_how(tmp_path, keys):
    with pytest.raises(ConfigError, match=r"server.key does not exist; run `pd keys"):
        load_client_keys(str(tmp_path))
    with pytest.raises(ConfigError, match=r"this client's key 'nobody'.*nobody.key_secret does not exist"):
        load_client_keys(str(keys), "nobody")
    with pytest.raises(ConfigError, match="server.key_secret does not exist"):
        Coordinator(CoordinatorConfig(port=0, auth="curve", keys_dir=str(tmp_path)))
    assert client_keys_for(ConnectorConfig()) is None and client_keys_for(CoordinatorConfig()) is None
    k = client_keys_for(ConnectorConfig(coordinator_keys_dir=str(keys / "clients" / "hostb")))
    assert k.server_public == (keys / "server.key").read_bytes().split(b'public-key = "')[1][:40]


def test_non_loopback_without_auth_is_refused():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    with pytest.raises(ConfigError, match=r"coordinator.host: '0.0.0.0' is not a loopback address.*pd keys DIR.*"
                                          r"coordinator.auth: curve.*allow_insecure"):
        Coordinator(CoordinatorConfig(host="0.0.0.0", port=0))
    check_bind(CoordinatorConfig(host="0.0.0.0", allow_insecure=True))  # the escape hatch
    check_bind(CoordinatorConfig(host="0.0.0.0", auth="curve", keys_dir="x"))


def test_authenticated_round_trip_agent_and_free(curve_coord, keys):
    coord = curve_coord()
    host_b = load_client_keys(str(keys / "clients" / "hostb"))
    client = CoordinatorClient(coord.address, timeout_s=3, keys=host_b)  # the consumer
    producer = CoordinatorClient(coord.address, timeout_s=3, keys=load_client_keys(str(keys)))  # the agent's key
    frees = []
    agent = InstanceAgent(coord.address, "prod-0", "prefill", interval_s=0.2, on_free=frees.append,
                          keys=load_client_keys(str(keys))).start()
    try:
        assert agent.wait_registered(5)
        assert producer.ready(Ready("p1", 0, ["a", "b"], 64, 10, "loc", "prod-0", 2, True))
        got = client.wait("p1", 0, 2.0)
        assert isinstance(got, Ready) and got.keys == ["a", "b"]
        assert client.abort("p2") and producer.ready(Ready("p2", 0, ["c"], 32, 1, "loc", "prod-0", 1, True))
        deadline = time.monotonic() + 5
        while not frees and time.monotonic() < deadline:  # FREE pushed to the agent over CURVE
            time.sleep(0.05)
        assert frees and frees[0].keys == ["c"]
        reply = client.query()
        assert reply.counters["auth_rejected"] == 0 and reply.counters["handshake_failed"] == 0
    finally:
        agent.stop()
        client.close()
        producer.close()


def test_async_client_with_keys(curve_coord, keys):
    coord = curve_coord()

    async def go():
        c = AsyncCoordinatorClient(coord.address, timeout_s=3, keys=load_client_keys(str(keys)))
        try:
            return await c.query()
        finally:
            c.close()

    assert asyncio.run(go()).counters["ready"] == 0


def test_unknown_key_gets_no_answer_and_is_counted_and_logged(curve_coord, keys, caplog):
    coord = curve_coord()
    public, secret = zmq.curve_keypair()
    server_public = load_client_keys(str(keys)).server_public
    bad = ClientKeys(public, secret, server_public, "test")
    client = CoordinatorClient(coord.address, timeout_s=0.5, keys=bad)
    with caplog.at_level(logging.WARNING):
        t0 = time.monotonic()
        assert client.heartbeat("x") is False  # no answer: times out, never raises or hangs
        assert time.monotonic() - t0 < 3
        assert isinstance(client.wait("p", 0, 0.3), type(client.wait("p", 0, 0.01)))  # WaitTimeout
    client.close()
    good = CoordinatorClient(coord.address, timeout_s=3, keys=load_client_keys(str(keys)))
    assert good.query().counters["auth_rejected"] >= 1
    good.close()
    text = caplog.text
    assert "rejected a client from 127.0.0.1" in text and public.decode() in text  # coordinator's log line
    assert "did not answer" in text and "authorized/" in text  # the client's hint about the keys
    assert probe(coord.address, bad, 2)[0] == PROBE_REFUSED


def test_revoked_and_added_keys_take_effect_without_restart(tmp_path, curve_coord):
    d = tmp_path / "k"
    make_keys(d, ["hostb"])
    coord = curve_coord(d)
    hostb = load_client_keys(str(d / "clients" / "hostb"))
    assert probe(coord.address, hostb, 2)[0] == PROBE_OK
    (d / "authorized" / "hostb.key").unlink()
    time.sleep(0.01)  # a new directory mtime
    assert probe(coord.address, hostb, 2)[0] == PROBE_REFUSED
    make_keys(d, ["hostc"])
    assert probe(coord.address, load_client_keys(str(d / "clients" / "hostc")), 2)[0] == PROBE_OK


def test_plaintext_client_and_wrong_server_key_are_refused(curve_coord, keys, caplog):
    coord = curve_coord()
    plain = CoordinatorClient(coord.address, timeout_s=0.5)
    assert plain.query() is None
    plain.close()
    status, why = probe(coord.address, None, 2)
    assert status == PROBE_HANDSHAKE and "no CurveZMQ keys" in why
    mine = load_client_keys(str(keys))
    other_server = ClientKeys(mine.public, mine.secret, zmq.curve_keypair()[0], "test")
    assert probe(coord.address, other_server, 2)[0] == PROBE_HANDSHAKE
    good = CoordinatorClient(coord.address, timeout_s=3, keys=mine)
    ctx = zmq.Context()

    def failures() -> float:
        return good.query().counters["handshake_failed"]

    # The coordinator counts failed handshakes it sees (a client that hangs up first may leave only
    # a disconnect behind): clients that keep trying are counted.
    sockets = []
    try:
        before = failures()
        deadline = time.monotonic() + 10
        while failures() <= before and time.monotonic() < deadline:
            for keys_ in (None, other_server):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                if keys_ is not None:
                    keys_.apply(s)
                s.connect(coord.address)
                s.send(b"x")
                sockets.append(s)
            time.sleep(0.2)
        assert failures() > before
        assert not any(s.poll(0) for s in sockets)  # and none got an answer
    finally:
        for s in sockets:
            s.close()
        good.close()
        ctx.destroy(linger=0)
    assert "failed the CURVE handshake" in caplog.text


def test_probe_plain_coordinator_and_nothing_listening(keys):
    coord = Coordinator(CoordinatorConfig(host="127.0.0.1", port=0)).start_in_thread()
    try:
        assert probe(coord.address, None, 2)[0] == PROBE_OK
        assert probe(coord.address, load_client_keys(str(keys)), 2)[0] == PROBE_HANDSHAKE
    finally:
        coord.stop()
    status, why = probe(coord.address, None, 0.5)
    assert status == PROBE_UNREACHABLE and "no connection" in why
    assert probe("tcp://nonsense", None, 0.5)[0] == PROBE_UNREACHABLE


def test_pd_coordinator_cli_refuses_insecure_bind_in_one_line(capsys):
    from pd.coordinator.server import main as coord_main

    assert coord_main(["--host", "0.0.0.0", "--port", "5571"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coordinator: coordinator.host: '0.0.0.0' is not a loopback address") and "\n" not in err


def test_pd_stats_with_keys_and_without(curve_coord, keys, capsys, tmp_path):
    coord = curve_coord()
    assert main(["stats", "--coordinator", coord.address, "--keys-dir", str(keys / "clients" / "hostb")]) == 0
    assert "(CurveZMQ)" in capsys.readouterr().out
    assert main(["stats", "--coordinator", coord.address]) == 2
    err = capsys.readouterr().err
    assert "no answer from the coordinator" in err and "no CurveZMQ keys" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"coordinator: {{port: {coord.port}, auth: curve, keys_dir: {keys}}}\n")
    assert main(["stats", "--config", str(cfg)]) == 0


def test_ipv6_loopback_coordinator_and_client():
    coord = Coordinator(CoordinatorConfig(host="::1", port=0)).start_in_thread()
    try:
        assert coord.address.startswith("tcp://[::1]:")
        assert CoordinatorConfig(host="::1", port=coord.port).address == coord.address
        client = CoordinatorClient(coord.address, timeout_s=3)
        assert client.query() is not None
        client.close()
    finally:
        coord.stop()


def test_a_fresh_key_per_handshake_does_not_flood_the_log(tmp_path, caplog):
    """Issue 18, item 8: 1,500 handshakes with new keys logged 1,500 lines in 1.7 s (the limit was
    per key). Now at most LOG_BURST lines a minute; the rest are counted."""
    import logging

    import zmq

    from pd.coordinator import curve

    (tmp_path / "keys").mkdir()
    allow = curve._AllowList(tmp_path / "keys")
    with caplog.at_level(logging.WARNING, logger=curve.logger.name):
        for _ in range(1500):
            public, _secret = zmq.curve_keypair()
            assert allow.callback("global", public) is False
    lines = [r for r in caplog.records if "rejected a client" in r.getMessage()]
    assert len(lines) == curve.LOG_BURST and allow.rejected == 1500
