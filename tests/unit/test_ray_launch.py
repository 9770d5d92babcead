"""pd launch --ray without a cluster: the ray: section's checks, placement (resources, placement
groups, core binds), the files each node gets, the process specs, the secrets directory, the
process host of an actor (real processes), the proxy's pool changes (real HTTP) and the
controls mailbox."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from common.config import ConfigError, load, merge
from launch.procs import ProcSpec
from launch.ray_actors import Controls, ProcHost, SecretsDirError, install_secrets
from launch.ray_plan import (
    ADMIN_TOKEN,
    HEAD_RESOURCE,
    LOCATE,
    NODE_ID_LABEL,
    Slot,
    away_from,
    check_ray,
    control_options,
    control_specs,
    instance_bundles,
    instance_options,
    instance_spec,
    layout_on,
    node_config,
    parse_scale,
    pool_bind,
    proxy_address,
    secret_files,
    slots,
)
from pd.config import DeploymentConfig
from pd.coordinator.curve import make_keys
from pd.proxy.pools import ADMIN_HEADER, PoolAdmin
from pd.proxy.server import Proxy

ROOT = Path(__file__).resolve().parents[2]

MODEL = {"model": "/m", "connector": {"transport": {"kind": "mooncake", "mooncake": {"start_master": True}}}}


def dep(**over) -> DeploymentConfig:
    return merge(load(DeploymentConfig, MODEL), over)


def test_ray_section_defaults_and_bad_values_name_the_key():
    d = dep()
    assert (d.ray.address, d.ray.namespace, d.ray.control_resource, d.ray.restarts) == ("auto", "pdkv", "", 5)
    with pytest.raises(ConfigError, match=r"unknown key ray\.adress"):
        dep(ray={"adress": "x"})
    with pytest.raises(ConfigError, match=r"ray\.restarts"):
        dep(ray={"restarts": -1})
    with pytest.raises(ConfigError, match=r"ray\.prefill_resource: 'gpu node' is not a Ray resource name"):
        check_ray(dep(ray={"prefill_resource": "gpu node"}))
    with pytest.raises(ConfigError, match=r"mode: 'colocated' is not supported by pd launch --ray"):
        check_ray(dep(mode="colocated"))
    with pytest.raises(ConfigError, match=r"kind: shm moves KV only within one host"):
        check_ray(dep(connector={"transport": {"kind": "shm"}}))
    with pytest.raises(ConfigError, match=r"decode\.count: 3 is more than ray\.max_per_pool \(2\)"):
        check_ray(dep(decode={"count": 3}, ray={"max_per_pool": 2}))
    with pytest.raises(ConfigError, match=r"hosts: pd launch --ray places"):
        check_ray(dep(hosts={"a": {"address": "10.0.0.1", "roles": ["control", "prefill", "decode"]}}))
    check_ray(dep(ray={"prefill_resource": "prefill_node", "decode_resource": "decode-node.v2"}))


def test_cpu_bind_is_one_list_per_pool_or_a_mode():
    assert pool_bind(dep(ray={"prefill_cpu_bind": "0-3"}), "prefill") == "0-3"
    assert pool_bind(dep(), "decode") == "split"  # vllm.cpu_bind's default
    assert pool_bind(dep(prefill={"tp": 2}, ray={"prefill_cpu_bind": "0|1"}), "prefill") == "0|1"
    with pytest.raises(ConfigError, match=r"vllm\.cpu_bind: '0;1' is not allowed with pd launch --ray"):
        pool_bind(dep(vllm={"cpu_bind": "0;1"}), "prefill")
    with pytest.raises(ConfigError, match=r"ray\.prefill_cpu_bind: '0' .*2 list\(s\) separated by '\|' for tp 2"):
        pool_bind(dep(prefill={"tp": 2}, ray={"prefill_cpu_bind": "0"}), "prefill")


def test_placement_resources_and_placement_group_bundles():
    d = dep(prefill={"tp": 2}, ray={"prefill_resource": "pnode", "decode_resource": "dnode", "instance_cpus": 2})
    assert control_options(d) == {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    assert control_options(dep(ray={"control_resource": "ctl"}))["resources"] == {"ctl": 0.001}
    cpu = instance_bundles(d, "prefill", "cpu")
    assert cpu == [{"CPU": 2, "pnode": 1}, {"CPU": 2}]  # one bundle per TP rank, the pool resource in the first
    assert instance_options(cpu) == {"num_cpus": 2, "num_gpus": 0, "resources": {"pnode": 1}}
    gpu = instance_bundles(d, "prefill", "cuda")
    assert gpu[0] == {"CPU": 2, "pnode": 1, "GPU": 2}  # the one vLLM process sees every GPU of the instance
    assert instance_bundles(d, "decode", "cuda") == [{"CPU": 2, "dnode": 1, "GPU": 1}]
    assert instance_options(instance_bundles(dep(ray={"instance_cpus": 0}), "decode", "cpu")) == \
        {"num_cpus": 0, "num_gpus": 0}
    # a TP group without ray.instance_cpus or a pool resource: no bundle empty (Ray refuses one)
    assert instance_bundles(dep(decode={"tp": 2}, ray={"instance_cpus": 0}), "decode", "cpu") == \
        [{"CPU": LOCATE}, {"CPU": LOCATE}]


def test_an_instance_lost_with_its_node_is_placed_off_that_node_while_another_offers_its_resources():
    bundles = [{"CPU": 1, "dnode": 1}, {"CPU": 1}]  # a TP 2 instance: one node must hold both bundles
    lost = {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2, "dnode": 2}}  # Ray does not know yet
    head = {"NodeID": "a", "Alive": True, "Resources": {"CPU": 8, "pnode": 2}}
    spare = {"NodeID": "c", "Alive": True, "Resources": {"CPU": 2, "dnode": 1}}
    assert away_from("b", [head, lost, spare], bundles) == {NODE_ID_LABEL: "!b"}
    # Only the lost node could take it: no selector (it goes back there once the node is up again).
    assert away_from("b", [head, lost], bundles) == {}
    assert away_from("b", [head, lost, {**spare, "Resources": {"CPU": 1, "dnode": 1}}], bundles) == {}
    assert away_from("b", [head, lost, {**spare, "Alive": False}], bundles) == {}
    assert away_from("", [head, lost, spare], bundles) == {}  # never placed: nothing to avoid


def test_slots_and_scale_requests():
    d = dep(prefill={"port_base": 9100})
    assert slots(d, "prefill", 3) == [Slot("prefill-0", "prefill", 0, 9100), Slot("prefill-1", "prefill", 1, 9101),
                                      Slot("prefill-2", "prefill", 2, 9102)]
    with pytest.raises(ConfigError, match=r"decode\.port_base: 65535 with 2 instances"):
        slots(dep(decode={"port_base": 65535}), "decode", 2)
    assert parse_scale(["prefill=2", "decode=1"]) == {"prefill": 2, "decode": 1}
    for bad in (["prefill=0"], ["router=2"], ["prefill=two"], ["prefill=1", "prefill=2"], ["prefill"]):
        with pytest.raises(ConfigError, match="give prefill=N and/or decode=M"):
            parse_scale(bad)
    with pytest.raises(ConfigError, match="say what to scale"):
        parse_scale([])


def _keyed(tmp_path: Path, **over) -> DeploymentConfig:
    keys = tmp_path / "keys"
    make_keys(keys, instances=["decode-0"])
    for name, token in (("api.key", "vtok\n"), ("proxy.key", "ptok\n")):
        (tmp_path / name).write_text(token)
        (tmp_path / name).chmod(0o600)
    base = {"coordinator": {"auth": "curve", "keys_dir": str(keys)}, "vllm": {"api_key_file": str(tmp_path / "api.key")},
            "proxy": {"api_key_file": str(tmp_path / "proxy.key")}}
    return merge(dep(**base), over)


def test_each_node_gets_only_the_keys_its_processes_need(tmp_path):
    d = _keyed(tmp_path)
    control = secret_files(d, True, "adm")
    instance = secret_files(d, False, "adm")
    assert set(instance) == {"vllm-api.key", "keys/server.key", "keys/client.key", "keys/client.key_secret"}
    assert set(control) == set(instance) | {"proxy-api.key", ADMIN_TOKEN, "keys/server.key_secret",
                                            "keys/authorized/client.key", "keys/authorized/instance.decode-0.key"}
    # an instance gets its own key (and no other instance's)
    assert set(secret_files(d, False, "adm", "decode-0")) == set(instance) | {"keys/instances/decode-0.key_secret"}
    assert control[ADMIN_TOKEN] == b"adm" and instance["vllm-api.key"] == b"vtok\n"
    assert not secret_files(dep(coordinator={"auth": "none"}), False, "adm")
    (tmp_path / "chunk.key").write_bytes(b"c" * 32)
    (tmp_path / "chunk.key").chmod(0o600)
    chunked = merge(d, {"connector": {"chunk_secret_file": str(tmp_path / "chunk.key")}})
    assert secret_files(chunked, False, "adm")["chunk.secret"] == b"c" * 32  # an instance's connector keys chunks
    assert "chunk.secret" not in secret_files(chunked, True, "adm")  # the control node runs no connector
    spec = instance_spec(node_config(chunked, "/s", "10.1.0.1"), Slot("decode-0", "decode", 0, 9200), "10.1.0.3", "1",
                         "tcp://10.1.0.1:5570")
    kv = json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert kv["chunk_secret_file"] == "/s/chunk.secret"  # the node's copy, not the driver's path


def test_key_files_a_node_could_not_trust_here_are_not_sent(tmp_path):
    """Each node writes its copies as ours and 0600: a token others can read, an allow-list key
    others can write or a symlink would otherwise arrive there as trusted files."""
    d = _keyed(tmp_path)
    (tmp_path / "proxy.key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"proxy.api_key_file: .*proxy.key .*mode 0644: group or others can read"):
        secret_files(d, True, "adm")
    assert secret_files(d, False, "adm")  # an instance node does not get the proxy's token
    (tmp_path / "proxy.key").chmod(0o600)
    extra = tmp_path / "keys" / "authorized" / "hostz.key"
    extra.write_bytes((tmp_path / "keys" / "authorized" / "client.key").read_bytes())
    extra.chmod(0o664)
    with pytest.raises(ConfigError, match=r"hostz.key is .*mode 0664: group or others can write"):
        secret_files(d, True, "adm")
    extra.unlink()
    extra.symlink_to(tmp_path / "keys" / "authorized" / "client.key")
    with pytest.raises(ConfigError, match=r"hostz.key: it is a symlink"):
        secret_files(d, True, "adm")


def test_nodes_run_the_local_launchers_commands_with_keys_in_their_secrets_dir(tmp_path):
    d = _keyed(tmp_path, proxy={"port": 8100}, prefill={"port_base": 9100}, decode={"port_base": 9200})
    n = node_config(d, "/s", "10.1.0.1")
    assert (n.coordinator.keys_dir, n.vllm.api_key_file, n.proxy.api_key_file) == \
        ("/s/keys", "/s/vllm-api.key", "/s/proxy-api.key")
    assert n.connector.transport.mooncake.master == "10.1.0.1:50051"  # loopback master: the control node's
    assert d.coordinator.keys_dir == str(tmp_path / "keys")  # the driver's copy is untouched
    placed = [(Slot("prefill-0", "prefill", 0, 9100), "10.1.0.2"), (Slot("decode-0", "decode", 0, 9200), "10.1.0.3")]
    lay = layout_on(n, placed, "10.1.0.1")
    assert lay.coordinator_address == "tcp://10.1.0.1:5570" and lay.coordinator_bind == "0.0.0.0"
    servers, proxy = control_specs(n, lay, "/s")
    assert [s.name for s in servers] == ["coordinator", "mooncake-master"]
    argv = " ".join(proxy.argv)
    assert "--prefill http://10.1.0.2:9100 --decode http://10.1.0.3:9200" in argv
    assert "--coordinator-keys-dir /s/keys" in argv and argv.endswith(f"--admin-token-file /s/{ADMIN_TOKEN}")
    spec = instance_spec(n, placed[1][0], "10.1.0.3", "1", lay.coordinator_address)
    assert spec.health_url == "http://10.1.0.3:9200/health" and spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    kv = json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert (kv["coordinator"], kv["coordinator_keys_dir"], kv["instance_id"], kv["coordinator_client_key"]) == \
        ("tcp://10.1.0.1:5570", "/s/keys", "decode-0", "client")
    own = instance_spec(n, placed[1][0], "10.1.0.3", "1", lay.coordinator_address, own_key=True)
    kv = json.loads(own.argv[own.argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert kv["coordinator_client_key"] == "/s/keys/instances/decode-0.key_secret"
    assert spec.env_files == {"VLLM_API_KEY": "/s/vllm-api.key"}
    gpu = instance_spec(n, placed[1][0], "10.1.0.3", "split", lay.coordinator_address, gpus="2,3")
    assert gpu.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert proxy_address(n, "10.1.0.1") == "http://127.0.0.1:8100"
    assert proxy_address(dep(proxy={"host": "0.0.0.0", "port": 8100}), "10.1.0.1") == "http://10.1.0.1:8100"


def test_a_coordinator_without_keys_is_refused_across_nodes():
    d = dep(coordinator={"auth": "none"})
    with pytest.raises(ConfigError, match="coordinator.host '0.0.0.0' is not a loopback address"):
        layout_on(d, [], "10.1.0.1")


def test_secrets_are_owner_only_and_a_foreign_dir_is_refused(tmp_path):
    root = tmp_path / "s"
    install_secrets(str(root), {"keys/server.key": b"pub", "api.key": b"tok"})
    install_secrets(str(root), {"api.key": b"tok2"})  # replaced whole
    assert (root / "api.key").read_bytes() == b"tok2" and (root / "keys/server.key").read_bytes() == b"pub"
    for p in (root, root / "keys"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    for p in (root / "api.key", root / "keys/server.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SecretsDirError, match="is a symlink"):
        install_secrets(str(tmp_path / "link"), {"api.key": b"x"})
    os.chmod(root, 0o755)
    install_secrets(str(root), {"api.key": b"x"})
    assert stat.S_IMODE(root.stat().st_mode) == 0o700



def test_a_key_revoked_since_the_last_launch_leaves_the_nodes_allow_list(tmp_path):
    root, allow = tmp_path / "s", "keys/authorized"
    install_secrets(str(root), {f"{allow}/client.key": b"c", f"{allow}/hostb.key": b"b", "keys/server.key": b"s"},
                    (allow,))
    install_secrets(str(root), {"keys/client.key": b"i"})  # an instance's install on the same node keeps it
    assert sorted(os.listdir(root / allow)) == ["client.key", "hostb.key"]
    install_secrets(str(root), {f"{allow}/client.key": b"c", "keys/server.key": b"s"}, (allow,))  # hostb revoked
    assert os.listdir(root / allow) == ["client.key"]
    assert sorted(os.listdir(root / "keys")) == ["authorized", "client.key", "server.key"]  # others stay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_proc_host_starts_waits_restarts_and_stops_real_processes(tmp_path):
    port = _free_port()
    host = ProcHost(str(tmp_path / "run"))
    spec = ProcSpec("web", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port=port)
    pid = host.start(spec)
    assert host.wait_ready("web", 30) >= 0 and host.poll() == {}
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while not host.poll() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"web (pid {pid}) was killed by SIGKILL" in host.poll()["web"]
    host.restart("web", 30)
    assert host.poll() == {} and host.pids()["web"] != pid
    bad = ProcSpec("bad", [sys.executable, "-c", "raise SystemExit(3)"], port=_free_port())
    host.start(bad)
    with pytest.raises(RuntimeError, match="bad .* exited with code 3"):
        host.wait_ready("bad", 30)
    host.stop_all(grace_s=5)
    assert host.procs == {}
    with pytest.raises(RuntimeError, match="the deployment is stopping"):
        host.start(spec)


ACTOR = """
import sys, time
from launch.procs import ProcSpec
from launch.ray_actors import ProcHost
host = ProcHost(sys.argv[1])
print(host.start(ProcSpec("child", [sys.executable, "-c", "import time; time.sleep(600)"])), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_actor_process_killed_takes_its_processes_with_it(tmp_path):
    """A Ray actor killed (or its node's raylet gone) must not leave its vLLM running: the
    children get SIGTERM when the actor's process ends."""
    actor = subprocess.Popen([sys.executable, "-c", ACTOR, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        child = int(actor.stdout.readline())
        assert _alive(child)
    finally:
        actor.kill()
        actor.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"pid {child} outlived its actor"


async def _pools_roundtrip() -> None:
    proxy = Proxy(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], coordinator=None)
    proxy.admin = PoolAdmin(proxy, "secret")
    runner, port = await proxy.start(port=0)
    url = f"http://127.0.0.1:{port}/pd/pools"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 401
            async with s.put(url, json={"prefill": []}, headers={ADMIN_HEADER: "secret"}) as r:
                view = await r.json()
                assert r.status == 200 and view["pools"]["prefill"]["urls"] == [] and view["oldest"] is None
            async with s.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 503 and "being restarted or added" in (await r.json())["error"]["message"]
            async with s.put(url, json={"decode": ["http://10.0.0.9:8200"], "prefill": ["ftp://x"]},
                             headers={ADMIN_HEADER: "secret"}) as r:
                assert r.status == 400
            async with s.put(url, json={"router": []}, headers={ADMIN_HEADER: "secret"}) as r:
                assert r.status == 400
            async with s.put(url, json={"decode": ["http://10.0.0.9:8200"]}, headers={ADMIN_HEADER: "secret"}) as r:
                assert (await r.json())["pools"]["decode"]["urls"] == ["http://10.0.0.9:8200"]
    finally:
        await runner.cleanup()


def test_proxy_pools_change_while_serving_over_http():
    asyncio.run(_pools_roundtrip())


def test_a_pool_change_keeps_the_count_of_requests_in_flight_on_a_removed_instance():
    proxy = Proxy(["http://a:1", "http://b:1"], ["http://d:1"], coordinator=None)
    pool = proxy.prefill
    with pool.track("http://b:1"):
        pool.set_urls(["http://a:1"])
        assert pool.outstanding == {"http://a:1": 0, "http://b:1": 1} and pool.pick() == "http://a:1"
    assert pool.outstanding == {"http://a:1": 0}


def test_controls_mailbox_orders_requests_and_lines():
    c = Controls(1, 1)
    assert c.wanted() == (0, {"prefill": 1, "decode": 1})
    assert c.request({"prefill": 2}) == 1 and c.request({"decode": 3}) == 2
    assert c.wanted() == (2, {"prefill": 2, "decode": 3})
    c.say("a")
    c.say("b")
    c.finished(1)
    assert c.progress(1) == (1, ["b"])
    c.finished(0)
    assert c.progress() == (1, ["a", "b"])
