"""pd launch across hosts: roles and hosts: shares, bind vs advertised addresses, their validation,
keys, the preflight check of an instance host, and a control share whose proxy waits for
instances on "other hosts" (stand-in HTTP servers; no vLLM)."""
from __future__ import annotations

import http.server
import json
import shlex
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load, merge
from launch import auth, supervise
from launch.auth import preflight
from launch.cli import main
from launch.launcher import parse_set
from launch.procs import check_ports, plan
from launch.supervise import ChildDied, Deployment
from launch.topology import layout
from pd.config import CoordinatorConfig, DeploymentConfig
from pd.coordinator.curve import make_keys
from pd.coordinator.server import Coordinator

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "k"
    make_keys(d, ["hostb"])
    return d


def two_hosts(model: Path, keys: Path | None = None, **extra) -> dict:
    cfg = {"model": str(model), "connector": {"transport": {"kind": "none"}},
           "hosts": {"a": {"address": "10.0.0.1", "roles": ["control", "prefill"]},
                     "b": {"address": "10.0.0.2", "bind": "0.0.0.0", "roles": ["decode"]}}}
    if keys is not None:
        cfg["coordinator"] = {"auth": "curve", "keys_dir": str(keys)}
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_yaml(tmp_path: Path, cfg: dict) -> Path:
    f = tmp_path / "pd.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def parse(out: str) -> dict[str, dict[str, list[str]]]:
    """host header -> name -> argv, from --dry-run output (### host lines start a host)."""
    hosts: dict[str, dict[str, list[str]]] = {}
    host, name = "", None
    for line in out.splitlines():
        if line.startswith("### host "):
            host = line.split()[2]
        elif line.startswith("# "):
            name = line[2:].strip()
        elif line.strip():
            words = shlex.split(line)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)
            hosts.setdefault(host, {})[name] = words
    return hosts


def extra_config(argv: list[str]) -> dict:
    return json.loads(flag(argv, "--kv-transfer-config"))["kv_connector_extra_config"]


# ---- shares and addresses (dry run) -----------------------------------------------------


def test_roles_split_a_deployment_and_use_advertised_addresses(model, capsys):
    base = ["launch", "--model", str(model), "--transport", "none",
            "--set", "coordinator.host=0.0.0.0", "--set", "coordinator.advertise_host=10.0.0.1",
            "--set", "coordinator.allow_insecure=true",
            "--set", "decode.host=0.0.0.0", "--set", "decode.advertise_host=10.0.0.2",
            "--set", "prefill.urls=[http://10.0.0.1:8100]", "--dry-run"]
    assert main(base + ["--role", "control"]) == 0
    control = parse(capsys.readouterr().out)[""]
    assert list(control) == ["coordinator", "proxy"]
    assert flag(control["coordinator"], "--host") == "0.0.0.0" and "--allow-insecure" in control["coordinator"]
    proxy = control["proxy"]
    assert flag(proxy, "--coordinator") == "tcp://10.0.0.1:5570"
    assert flag(proxy, "--prefill") == "http://10.0.0.1:8100" and flag(proxy, "--decode") == "http://10.0.0.2:8200"
    assert main(base + ["--role", "decode", "--decode", "2"]) == 0
    dec = parse(capsys.readouterr().out)[""]
    assert list(dec) == ["decode-0", "decode-1"]
    for i, argv in enumerate(dec.values()):
        assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--port") == str(8200 + i)
        assert extra_config(argv)["coordinator"] == "tcp://10.0.0.1:5570"
    assert main(base + ["--role", "prefill,control"]) == 0
    assert list(parse(capsys.readouterr().out)[""]) == ["coordinator", "prefill-0", "proxy"]


def test_hosts_dry_run_prints_every_host_then_one(model, tmp_path, keys, capsys):
    f = write_yaml(tmp_path, two_hosts(model, keys))
    assert main(["launch", "--config", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "### host a (10.0.0.1): control, prefill; run there: pd launch --config FILE --host a" in out
    hosts = parse(out)
    assert {h: list(p) for h, p in hosts.items()} == {"a": ["coordinator", "prefill-0", "proxy"], "b": ["decode-0"]}
    a, b = hosts["a"], hosts["b"]
    assert flag(a["coordinator"], "--host") == "10.0.0.1"  # bind defaults to the address
    assert flag(a["coordinator"], "--keys-dir") == str(keys) and flag(a["coordinator"], "--auth") == "curve"
    assert flag(a["prefill-0"], "--host") == "10.0.0.1" and flag(b["decode-0"], "--host") == "0.0.0.0"
    assert flag(a["proxy"], "--decode") == "http://10.0.0.2:8200"
    assert flag(a["proxy"], "--coordinator-keys-dir") == str(keys)
    for argv in (a["prefill-0"], b["decode-0"]):
        extra = extra_config(argv)
        assert extra["coordinator"] == "tcp://10.0.0.1:5570" and extra["coordinator_keys_dir"] == str(keys)
    assert main(["launch", "--config", str(f), "--host", "b", "--dry-run", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["host"], r["name"], r["bind"], r["health_url"]) for r in rows] == [
        ("b", "decode-0", "0.0.0.0", "http://127.0.0.1:8200/health")]


def test_a_pool_on_two_hosts(model, tmp_path):
    cfg = two_hosts(model, vllm={"cpu_bind": "3"}, coordinator={"allow_insecure": True})
    cfg["hosts"]["c"] = {"address": "10.0.0.3", "roles": ["decode"]}
    dep = load(DeploymentConfig, cfg)
    lay = layout(dep)
    assert [(i.name, i.host, i.url) for i in lay.instances] == [
        ("prefill-0", "a", "http://10.0.0.1:8100"), ("decode-0", "b", "http://10.0.0.2:8200"),
        ("decode-1", "c", "http://10.0.0.3:8200")]
    c = plan(dep, host="c")
    assert [s.name for s in c] == ["decode-1"] and c[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "3"
    assert flag(c[0].argv, "--host") == "10.0.0.3"
    proxy = plan(dep, host="a")[-1]
    assert flag(proxy.argv, "--decode") == "http://10.0.0.2:8200,http://10.0.0.3:8200"


def test_advertise_port_and_instance_urls(model):
    dep = load(DeploymentConfig, {"model": str(model), "coordinator": {"advertise_port": 6000},
                                  "decode": {"count": 2, "urls": ["http://127.0.0.1:9001", "http://localhost:9002"]}})
    specs = {s.name: s for s in plan(dep)}
    assert flag(specs["proxy"].argv, "--decode") == "http://127.0.0.1:9001,http://localhost:9002"
    assert flag(specs["proxy"].argv, "--coordinator") == "tcp://127.0.0.1:6000"
    assert flag(specs["coordinator"].argv, "--port") == "5570"
    assert extra_config(specs["decode-0"].argv)["coordinator"] == "tcp://127.0.0.1:6000"
    # an instance bound to one address is checked there
    dep = merge(dep, {"prefill": {"host": "127.0.0.2"}})
    assert {s.name: s for s in plan(dep)}["prefill-0"].health_url == "http://127.0.0.2:8100/health"


BAD = [
    ({"coordinator": {"host": "0.0.0.0"}}, "coordinator.advertise_host: '0.0.0.0' is not an address"),
    ({"coordinator": {"host": "0.0.0.0", "advertise_host": "10.0.0.1"}},
     "coordinator.host '0.0.0.0' is not a loopback address and coordinator.auth is none"),
    ({"coordinator": {"advertise_host": "10.0.0.1"}}, "coordinator.advertise_host '10.0.0.1' is not a loopback"),
    ({"coordinator": {"advertise_host": "tcp://x"}}, "is not a host name or IP address"),
    ({"decode": {"host": "0.0.0.0"}}, "decode.advertise_host: '0.0.0.0' is not an address"),
    ({"decode": {"urls": ["http://a:1", "http://b:2"]}}, r"decode.urls: 2 URL\(s\) for decode.count 1"),
    ({"decode": {"urls": ["10.0.0.2:8200"]}}, "decode.urls: '10.0.0.2:8200' is not an instance URL"),
    ({"prefill": {"advertise_host": "10.0.0.1"}, "decode": {"advertise_host": "10.0.0.2"}},
     "shm moves KV only within one host, but the instances run on 10.0.0.1, 10.0.0.2"),
]


@pytest.mark.parametrize("over,needle", BAD)
def test_address_errors_name_the_key(model, over, needle):
    with pytest.raises(ConfigError, match=needle):
        plan(load(DeploymentConfig, {"model": str(model), **over}))


HOSTS_BAD = [
    (lambda c: c["hosts"]["b"]["roles"].append("control"), "2 hosts have the control role"),
    (lambda c: c["hosts"]["b"].update(roles=["decoder"]), "hosts.b.roles: 'decoder' is not allowed"),
    (lambda c: c["hosts"]["b"].update(roles=["prefill"]), "no host has the decode role"),
    (lambda c: c["hosts"]["b"].update(address="0.0.0.0"), "hosts.b.address: '0.0.0.0' is not an address"),
    (lambda c: c["hosts"]["b"].pop("address"), "hosts.b.address: missing"),
    (lambda c: c.update(coordinator={"host": "10.0.0.1"}), "coordinator.host: '10.0.0.1' cannot be combined"),
    (lambda c: c.update(decode={"urls": ["http://x:1"]}), "decode.urls: .* cannot be combined with a hosts"),
    (lambda c: c.update(connector={"transport": {"kind": "shm"}}, coordinator={"allow_insecure": True}),
     "shm moves KV only within one host.*a, b"),
    (lambda c: None, "10.0.0.1' is not a loopback address and coordinator.auth is none"),
]


@pytest.mark.parametrize("change,needle", HOSTS_BAD)
def test_hosts_errors(model, change, needle):
    cfg = two_hosts(model)
    change(cfg)
    with pytest.raises(ConfigError, match=needle):
        plan(load(DeploymentConfig, cfg), host="a")


def test_share_selection_errors(model, tmp_path, keys, capsys):
    f = write_yaml(tmp_path, two_hosts(model, keys))
    for args, needle in ((["--host", "z", "--dry-run"], "--host: 'z' is not in hosts:; choose one of a, b"),
                         ([], "say which host this is with --host (a, b)"),  # (--dry-run alone prints all)
                         (["--role", "decode", "--dry-run"], "with --host (a, b) instead of --role"),
                         (["--host", "a", "--role", "decode"], "give --host or --role, not both")):
        assert main(["launch", "--config", str(f), *args]) == 2
        assert needle in capsys.readouterr().err
    assert main(["launch", "--model", str(model), "--host", "a", "--dry-run"]) == 2
    assert "no hosts: section; use --role" in capsys.readouterr().err


def test_parse_set():
    assert parse_set(["a.b=1", "a.c=[x, y]", "d=", "e=true"]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": "", "e": True}
    # a string key keeps the text as given (cpu_bind 0 is the core list "0", not a number)
    assert parse_set(["vllm.cpu_bind=0", "hosts.a.address=10.0.0.1", "coordinator.port=6000"]) == {
        "vllm": {"cpu_bind": "0"}, "hosts": {"a": {"address": "10.0.0.1"}}, "coordinator": {"port": 6000}}
    for bad in ("nokey", "=1", "a..b=1"):
        with pytest.raises(ConfigError, match="not KEY=VALUE"):
            parse_set([bad])


def test_a_listener_on_an_address_of_another_host(model):
    dep = load(DeploymentConfig, {"model": str(model), "connector": {"transport": {"kind": "none"}},
                                  "decode": {"host": "192.0.2.7", "port_base": free_port()}})
    with pytest.raises(ConfigError, match=r"decode-0 cannot listen on 192.0.2.7:\d+: 192.0.2.7 is not an address of "
                                          r"this host \(is this the right --host/--role"):
        check_ports(dep, "decode")


# ---- keys and the instance host's preflight ---------------------------------------------


def test_missing_keys_stop_the_launch_before_anything_starts(model, tmp_path, capsys):
    ports = free_ports(4)
    cfg = {"model": str(model), "run_dir": str(tmp_path / "run"),
           "coordinator": {"auth": "curve", "keys_dir": str(tmp_path / "nokeys"), "port": ports[0]},
           "prefill": {"port_base": ports[1]}, "decode": {"port_base": ports[2]}, "proxy": {"port": ports[3]}}
    assert main(["launch", "--config", str(write_yaml(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "server.key_secret does not exist; run `pd keys" in err
    assert not (tmp_path / "run").exists()


def test_preflight_refuses_keys_the_coordinator_does_not_know(model, tmp_path, keys, capsys):
    coord = Coordinator(CoordinatorConfig(port=0, auth="curve", keys_dir=str(keys))).start_in_thread()
    try:
        other = tmp_path / "other"
        make_keys(other, ["x"])  # a second deployment's keys: another server key, another client
        base = {"model": str(model), "coordinator": {"port": coord.port, "auth": "curve"}}
        lines: list[str] = []
        dep = load(DeploymentConfig, {**base, "coordinator": {**base["coordinator"], "keys_dir": str(keys)}})
        preflight(dep, ["decode"], lines.append)
        assert lines == [f"pdkv: the coordinator at {coord.address} answers"]
        dep = load(DeploymentConfig, {**base, "coordinator": {**base["coordinator"], "keys_dir": str(other)}})
        with pytest.raises(ConfigError, match="handshake with the coordinator .* failed"):
            preflight(dep, ["decode"], lines.append)
        # right server key, unknown client key
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
        (stranger / "client.key_secret").write_bytes((other / "client.key_secret").read_bytes())
        (stranger / "client.key_secret").chmod(0o600)  # a secret others can read is refused (test_identity.py)
        dep = load(DeploymentConfig, {**base, "coordinator": {**base["coordinator"], "keys_dir": str(stranger)}})
        with pytest.raises(ConfigError, match="refused this client's key"):
            preflight(dep, ["prefill"], lines.append)
        preflight(dep, ["control", "prefill"], lines.append)  # the control host starts its own coordinator
    finally:
        coord.stop()
    dep = load(DeploymentConfig, {"model": str(model), "coordinator": {"port": free_port()}})
    preflight(dep, ["decode"], lines.append, timeout_s=0.3)  # not up (yet): reported, not refused
    assert "no connection to the coordinator" in lines[-1] and "starting the instances anyway" in lines[-1]


# ---- a control share with instances elsewhere -------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def remote_instance():
    """Factory: a stand-in instance answering /health on a free port (as if on another host)."""
    servers = []

    def start(port: int) -> None:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_control_share_waits_for_remote_instances_and_names_them(model, tmp_path, keys, remote_instance,
                                                                  monkeypatch):
    monkeypatch.setattr(supervise, "REPORT_EVERY_S", 0.5)
    p_port, d_port = free_port(), free_port()
    cfg = {"model": str(model), "run_dir": str(tmp_path / "run"), "vllm": {"startup_timeout_s": 4},
           "coordinator": {"auth": "curve", "keys_dir": str(keys), "port": free_port()},
           "proxy": {"port": free_port()}, "connector": {"transport": {"kind": "none"}},
           "prefill": {"urls": [f"http://127.0.0.1:{p_port}"]}, "decode": {"urls": [f"http://127.0.0.1:{d_port}"]}}
    dep = load(DeploymentConfig, cfg)
    remote_instance(d_port)
    lines: list[str] = []
    d = Deployment(dep, roles="control")
    assert [s.name for s in d.specs] == ["coordinator", "proxy"]
    try:
        with pytest.raises(ChildDied, match=rf"not ready after 4s .*: proxy\nproxy: instances not answering "
                                            rf"/health: prefill http://127.0.0.1:{p_port}"):
            d.start(progress=lines.append)
        assert any(f"proxy          waiting: instances not answering /health: prefill http://127.0.0.1:{p_port}"
                   in line for line in lines), lines
        assert (tmp_path / "run" / "config.control.yaml").is_file()
        remote_instance(p_port)  # the other host comes up: now the proxy is ready
        d.wait_ready(progress=lines.append, timeout_s=20)
        with urllib.request.urlopen(d.proxy_url + "/metrics", timeout=5) as r:  # the proxy's CURVE client works
            assert "pdkv_coordinator_auth_rejected" in r.read().decode()
    finally:
        d.stop(grace_s=5)


# ---- the instances' API token -----------------------------------------------------------


def test_api_token_reaches_instances_from_a_file_and_the_proxy(model, tmp_path, keys, capsys):
    token = keys / "api.key"
    assert (keys / "clients" / "hostb" / "api.key").read_bytes() == token.read_bytes()
    base = ["launch", "--model", str(model), "--set", f"vllm.api_key_file={token}", "--dry-run"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert f'VLLM_API_KEY="$(cat {token})"' in out and token.read_text().strip() not in out  # never the secret
    dep = load(DeploymentConfig, {"model": str(model), "vllm": {"api_key_file": str(token)}})
    specs = {s.name: s for s in plan(dep)}
    assert flag(specs["proxy"].argv, "--upstream-api-key-file") == str(token)
    from launch.procs import child_env

    assert child_env(specs["decode-0"])["VLLM_API_KEY"] == token.read_text().strip()
    missing = load(DeploymentConfig, {"model": str(model), "vllm": {"api_key_file": str(tmp_path / "none")}})
    with pytest.raises(ConfigError, match="vllm.api_key_file: cannot read .*pd keys DIR"):
        auth.check_keys(missing, ["decode"])
    exposed = load(DeploymentConfig, {"model": str(model), "decode": {"host": "0.0.0.0", "advertise_host": "127.0.0.1"}})
    assert [w.split(" ")[0] for w in auth.exposure_warnings(exposed, plan(exposed))] == ["decode-0"]


# ---- transport servers and the 2-host example ---------------------------------------------


def test_transport_servers_run_with_the_control_share(model, monkeypatch):
    from launch import procs

    seen = []

    def fake_server_specs(cfg):
        seen.append(cfg.kind)
        return [{"name": "kv-master", "argv": ["kv-master", "--port", "7001"], "host": "0.0.0.0", "port": 7001,
                 "env": {"A": "1"}}]

    monkeypatch.setattr(procs, "server_specs", fake_server_specs)
    dep = load(DeploymentConfig, {"model": str(model), "connector": {"transport": {"kind": "none"}}})
    specs = plan(dep, "control")
    assert [s.name for s in specs] == ["coordinator", "kv-master", "proxy"] and seen
    master = specs[1]
    assert (master.argv, master.env, master.port, master.bind, master.host, master.critical) == (
        ["kv-master", "--port", "7001"], {"A": "1"}, 7001, "0.0.0.0", "127.0.0.1", False)
    assert [s.name for s in plan(dep, "prefill,decode")] == ["prefill-0", "decode-0"]  # not on instance hosts
    from launch.procs import wanted_ports

    assert ("kv-master", "0.0.0.0", 7001) in wanted_ports(dep, "control")
    monkeypatch.setattr(procs, "server_specs", lambda cfg: [])
    assert [s.name for s in plan(dep, "control")] == ["coordinator", "proxy"]


def test_two_host_example(model):
    from launch.procs import plan_hosts
    from pd.config import load_yaml

    example = Path(__file__).resolve().parents[2] / "examples" / "pd-2host.yaml"
    try:
        dep = merge(load_yaml(example), {"model": str(model)})
    except ConfigError as e:  # the transport keys it uses are not in this checkout (yet)
        pytest.skip(f"examples/pd-2host.yaml does not load here: {e}")
    hosts = {name: [s.name for s in specs] for name, _, specs in plan_hosts(dep)}
    assert hosts["a"][0] == "coordinator" and hosts["a"][-2:] == ["prefill-0", "proxy"]
    assert hosts["b"] == ["decode-0"]
    a = {s.name: s for s in plan(dep, host="a")}
    assert flag(a["proxy"].argv, "--decode") == "http://10.0.0.2:8200"
    assert flag(a["coordinator"].argv, "--auth") == "curve"
    assert extra_config(plan(dep, host="b")[0].argv)["coordinator"] == "tcp://10.0.0.1:5570"


def test_a_transport_server_that_exits_after_start_is_reported_not_fatal(model, tmp_path, capsys):
    import sys
    import time

    from launch.procs import ProcSpec

    def listener(port: int, live_s: float) -> list[str]:
        code = (f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); "
                f"time.sleep({live_s})")
        return [sys.executable, "-c", code]

    ports = free_ports(4)
    dep = load(DeploymentConfig, {"model": str(model), "run_dir": str(tmp_path / "run"),  # ports free of others'
                                  "coordinator": {"port": ports[0]}, "proxy": {"port": ports[1]},
                                  "prefill": {"port_base": ports[2]}, "decode": {"port_base": ports[3]}})
    p1, p2 = free_port(), free_port()
    d = Deployment(dep)
    d.specs = [ProcSpec("kv-master", listener(p1, 1.0), port=p1, critical=False),
               ProcSpec("other", listener(p2, 60), port=p2)]
    try:
        d.start(progress=lambda _: None)
        deadline = time.monotonic() + 10
        while d.procs["kv-master"][1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        d.check_children()  # no ChildDied: the rest goes on
        d.check_children()
        err = capsys.readouterr().err
        assert err.count("kv-master (pid") == 1 and "the rest goes on without it" in err
    finally:
        d.stop(grace_s=2)
    # at startup the same exit is fatal
    d = Deployment(dep)
    d.specs = [ProcSpec("kv-master", [sys.executable, "-c", "import sys; sys.exit(3)"], port=free_port(),
                        critical=False)]
    try:
        with pytest.raises(ChildDied, match="kv-master .* exited with code 3"):
            d.start(progress=lambda _: None)
    finally:
        d.stop(grace_s=2)
