"""pd launch --emit k8s: the manifests validate against the Kubernetes 1.30 API schemas (strict:
unknown fields refused), carry the launcher's own plan (commands, ports, environment), mount keys
owner-only without holding them, and the secrets script makes the Secrets they reference (through
a kubectl TEST DOUBLE: no cluster runs here)."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from common.config import ConfigError
from launch.cli import build_parser, main
from launch.k8s import components, k8s_config, manifests, options_from_args
from launch.k8s_objects import SECRET_MODE
from launch.k8s_pods import SHM_BASE_MB, Component, container_argv, pool_argv
from launch.launcher import config_from_args
from launch.procs import ProcSpec, plan
from pd.coordinator.curve import make_keys

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keys(tmp_path) -> Path:
    d = tmp_path / "keys"
    make_keys(d)
    return d


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_key_value_heads": 4}))
    (d / "tokenizer.json").write_text("{}")
    return d


def _args(model: Path, keys: Path | None, out: Path, cfg: dict, *extra: str):
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), **cfg}))
    argv = ["launch", "--config", str(path), "--emit", "k8s", str(out), *extra]
    if keys is not None:
        argv += ["--keys-dir", str(keys)]
    return argv


def _setup(model, keys, tmp_path, cfg, *extra):
    """(dep, options, placed config, {file: objects}, secret files) as ``pd launch --emit`` makes them."""
    argv = _args(model, keys, tmp_path / "out", cfg, *extra)
    args = build_parser(argv).parse_args(argv)
    dep = config_from_args(args)
    o = options_from_args(args)
    docs, files = manifests(dep, o)
    return dep, o, k8s_config(dep, o), docs, files


def _tokens(keys: Path) -> dict:
    return {"vllm": {"api_key_file": str(keys / "api.key")}, "proxy": {"api_key_file": str(keys / "api.key")}}


CONFIGS = {
    "shm-cpu": lambda keys: {"prefill": {"count": 2}, "decode": {"count": 1}, **_tokens(keys)},
    "mooncake-gpu-tp": lambda keys: {
        "prefill": {"count": 2, "tp": 2}, "decode": {"count": 2}, "vllm": {"device": "auto"},
        "connector": {"transport": {"kind": "mooncake", "mooncake": {
            "master": "10.0.0.1:50051", "start_master": True, "metadata_server": "master"}}}},
    "infinistore-gpu": lambda keys: {
        "vllm": {"device": "cuda", "api_key_file": str(keys / "api.key")},
        "connector": {"transport": {"kind": "infinistore", "infinistore": {
            "url": "infinistore://10.0.0.1:22345/?device=mlx5_0", "start_server": True}}}},
    "store-only": lambda keys: {
        "connector": {"transport": {"kind": "none"},
                      "store": {"backend": "local", "paths": ["/var/pdkv/a", "/var/pdkv/b"]}}},
    "colocated": lambda keys: {"mode": "colocated", "prefill": {"count": 2}, "decode": {"count": 1}},
}
EXTRA = {"store-only": ("--store-claim", "kv-store", "--model-claim", "models")}


def _all(docs: dict) -> list[dict]:
    return [obj for objs in docs.values() for obj in objs]


def _workload(docs: dict, name: str) -> dict:
    return next(o for o in _all(docs) if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == name)


def k8s_expand(s: str, env: dict[str, str]) -> str:
    """What Kubernetes makes of ``s`` in command, args and env values (its expansion rules: ``$$``
    is ``$``, ``$(NAME)`` the variable's value when it is defined, anything else as it is)."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("$$", i):
            out.append("$")
            i += 2
        elif s.startswith("$(", i) and s.find(")", i) > 0 and s[i + 2:s.find(")", i)] in env:
            j = s.find(")", i)
            out.append(env[s[i + 2:j]])
            i = j + 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_manifest_validates_against_the_api_schemas(name, model, keys, tmp_path):
    out = tmp_path / "out"
    assert main(_args(model, keys, out, CONFIGS[name](keys), *EXTRA.get(name, ()))) == 0
    files = sorted(out.glob("*.yaml"))
    assert files and (out / "create-secrets.sh").is_file()
    for f in files:
        for obj in yaml.safe_load_all(f.read_text()):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any error
        assert "&id" not in f.read_text()  # no YAML anchors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_containers_run_the_launchers_plan(name, model, keys, tmp_path):
    """Each container's command, environment and ports are the plan's of the placed config, for
    every pod of a pool once the pod's index is filled in."""
    dep, o, kd, docs, _ = _setup(model, keys, tmp_path, CONFIGS[name](keys), *EXTRA.get(name, ()))
    seen = 0
    for comp in components(kd):
        pod = _workload(docs, f"{o.name}-{comp.name}")["spec"]["template"]["spec"]
        by_name = {c["name"]: c for c in pod["containers"]}
        for i, spec in enumerate(comp.specs):
            c = by_name[comp.name if comp.templated else spec.name]
            env = {"POD_INDEX": str(i)} if comp.templated else {}
            assert [k8s_expand(a, env) for a in c["command"] + c["args"]] == container_argv(spec.argv, o)
            values = {e["name"]: k8s_expand(e["value"], {}) for e in c["env"] if "value" in e}
            assert values == {**spec.env, "PYTHONUNBUFFERED": "1"}
            refs = {e["name"]: e["valueFrom"] for e in c["env"] if "valueFrom" in e}
            assert set(refs) == set(spec.env_files) | ({"POD_INDEX"} if comp.templated else set())
            assert spec.port in [p["containerPort"] for p in c["ports"]]
            probe = c["readinessProbe"]
            if spec.health_url:
                assert spec.health_url.endswith(f":{probe['httpGet']['port']}{probe['httpGet']['path']}")
            else:
                assert probe["tcpSocket"]["port"] == spec.port
            seen += 1
    assert seen == len(plan(kd, host="control", elsewhere=True)) + dep.prefill.count + dep.decode.count


def _flags(argv: list[str]) -> dict[str, str]:
    return {a: (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "")
            for i, a in enumerate(argv) if a.startswith("--")}


def test_instances_keep_the_local_launchs_arguments_and_environment(model, keys, tmp_path):
    """Against the local launch of the same YAML: the same flags and values, the same connector
    config, except where the instance listens and how it reaches the coordinator and master."""
    cfg = CONFIGS["mooncake-gpu-tp"](keys)
    dep, o, _, docs, _ = _setup(model, keys, tmp_path, cfg)
    local = {s.name: s for s in plan(config_from_args(build_parser(["launch"]).parse_args(
        ["launch", "--config", str(tmp_path / "out.yaml"), "--keys-dir", str(keys), "--set", "vllm.device=cuda",
         "--set", "prefill.gpus=0,1;2,3", "--set", "decode.gpus=4;5"])))}
    for group in ("prefill", "decode"):
        c = _workload(docs, f"{o.name}-{group}")["spec"]["template"]["spec"]["containers"][0]
        there = _flags([k8s_expand(a, {"POD_INDEX": "0"}) for a in c["args"]])
        here = _flags(local[f"{group}-0"].argv[1:])
        assert set(there) == set(here)
        assert {k: v for k, v in there.items() if k not in ("--host", "--kv-transfer-config")} == \
            {k: v for k, v in here.items() if k not in ("--host", "--kv-transfer-config")}
        x_there = json.loads(there["--kv-transfer-config"])
        x_here = json.loads(here["--kv-transfer-config"])
        e_there, e_here = x_there.pop("kv_connector_extra_config"), x_here.pop("kv_connector_extra_config")
        assert x_there == x_here
        placed = {"coordinator"}
        assert {k: v for k, v in e_there.items() if k not in placed | {"transport"}} == \
            {k: v for k, v in e_here.items() if k not in placed | {"transport"}}
        assert e_there["coordinator"] == f"tcp://{o.name}-coordinator:5570"
        m_there, m_here = e_there["transport"].pop("mooncake"), e_here["transport"].pop("mooncake")
        assert e_there["transport"] == e_here["transport"]
        assert m_there.pop("master") == f"{o.name}-mooncake-master:50051" and m_there.pop("bind_host") == "0.0.0.0"
        assert {k: v for k, v in m_here.items() if k not in ("master", "bind_host")} == m_there
        env = {e["name"]: e.get("value") for e in c["env"] if "value" in e}
        assert {k: v for k, v in env.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED")} == \
            {k: v for k, v in local[f"{group}-0"].env.items() if k != "CUDA_VISIBLE_DEVICES"}
        tp = dep.prefill.tp if group == "prefill" else 1
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(tp))
        assert c["resources"] == {"limits": {"nvidia.com/gpu": tp}}
        assert e_there["instance_id"] == f"{group}-0"
        assert "$(POD_INDEX)" in json.dumps(c["args"]) and c["args"].count("$(POD_INDEX)") == 0


def test_a_pool_is_one_statefulset_whose_pods_differ_by_index(model, keys, tmp_path):
    _, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["mooncake-gpu-tp"](keys))
    sts = _workload(docs, f"{o.name}-prefill")
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == f"{o.name}-prefill"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["env"][0] == {"name": "POD_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}
    proxy = _workload(docs, f"{o.name}-proxy")["spec"]["template"]["spec"]["containers"][0]["args"]
    urls = proxy[proxy.index("--prefill") + 1].split(",")
    assert urls == [f"http://{o.name}-prefill-{i}.{o.name}-prefill:8100" for i in range(2)]
    # each pod mounts its own key's directory of the Secret, where its command line looks for it
    pod = sts["spec"]["template"]["spec"]
    m = next(m for m in c["volumeMounts"] if "subPathExpr" in m)
    items = next(v for v in pod["volumes"] if v["name"] == m["name"])["secret"]["items"]
    assert items == [{"key": f"prefill-{i}.key_secret", "path": f"prefill-{i}/prefill-{i}.key_secret"} for i in (0, 1)]
    for i in (0, 1):
        extra = json.loads(k8s_expand(c["args"][c["args"].index("--kv-transfer-config") + 1], {"POD_INDEX": str(i)}))
        own = extra["kv_connector_extra_config"]["coordinator_client_key"]
        sub = k8s_expand(m["subPathExpr"], {"POD_INDEX": str(i)})
        # the volume's directory <sub> is mounted at mountPath, so its file <sub>/<name> is at mountPath/<name>
        assert own == f"{m['mountPath']}/{os.path.basename(own)}"
        assert {"key": os.path.basename(own), "path": f"{sub}/{os.path.basename(own)}"} in items
        assert own == str(keys / "instances" / f"prefill-{i}.key_secret")
    spec = ProcSpec("prefill-0", [sys.executable, "-m", "x", "--port", "8100"])
    other = ProcSpec("prefill-1", [sys.executable, "-m", "x", "--port", "8101"])
    with pytest.raises(ConfigError, match="differ beyond their index.*'8100' vs '8101'"):
        pool_argv(Component("prefill", "StatefulSet", [spec, other], templated=True), o)


def test_shm_puts_both_pools_in_one_pod_with_the_pool_in_dev_shm(model, keys, tmp_path):
    dep, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["shm-cpu"](keys))
    assert sorted(docs) == ["coordinator.yaml", "pd.yaml", "proxy.yaml"]
    pod = _workload(docs, f"{o.name}-pd")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["prefill-0", "prefill-1", "decode-0"]
    assert pod["shareProcessNamespace"] is True
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": f"{SHM_BASE_MB + 2 * dep.connector.transport.pool_size_mb}Mi"}
    assert all({"name": "dshm", "mountPath": "/dev/shm", "readOnly": False} in c["volumeMounts"]
               for c in pod["containers"])
    assert all("resources" not in c for c in pod["containers"])  # cpu: no GPU request


def test_dev_shm_holds_the_stores_dram_tier_too(model, keys, tmp_path):
    cfg = CONFIGS["store-only"](keys)
    cfg["connector"]["store"]["dram_gb"] = 2
    _, o, _, docs, _ = _setup(model, keys, tmp_path, cfg, *EXTRA["store-only"])
    pod = _workload(docs, f"{o.name}-decode")["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["sizeLimit"] == f"{SHM_BASE_MB + int(2e9 / (1 << 20)) + 1}Mi"


def test_secrets_are_mounted_owner_only_and_never_written_out(model, keys, tmp_path):
    _, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["shm-cpu"](keys))
    main(_args(model, keys, tmp_path / "out", CONFIGS["shm-cpu"](keys)))
    secret_texts = [(keys / n).read_text() for n in ("server.key_secret", "client.key_secret", "api.key")]
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    for text in secret_texts:
        assert text.strip() not in written
    for key in re.findall(r'secret-key = "([^"]+)"', "".join(secret_texts)):
        assert key not in written
    for obj in _all(docs):
        for v in obj.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in v:
                assert v["secret"]["defaultMode"] == SECRET_MODE == 0o400
    pods = {o_["metadata"]["name"]: o_["spec"]["template"]["spec"] for o_ in _all(docs) if "template" in o_["spec"]}
    coord = pods[f"{o.name}-coordinator"]["containers"][0]["volumeMounts"]
    allowed = ["client", "instance.decode-0", "instance.prefill-0", "instance.prefill-1"]
    assert {(m["mountPath"], m["subPath"]) for m in coord} == {
        (str(keys / "server.key_secret"), "server.key_secret"),
        *((str(keys / "authorized" / f"{a}.key"), f"authorized-{a}.key") for a in allowed)}
    proxy = {m["mountPath"] for m in pods[f"{o.name}-proxy"]["containers"][0]["volumeMounts"]}
    assert proxy == {str(keys / f) for f in ("server.key", "client.key_secret", "api.key")}
    for c in pods[f"{o.name}-pd"]["containers"]:  # each instance: its own key, not the control key
        paths = {m["mountPath"] for m in c["volumeMounts"] if m.get("subPath")}
        assert paths == {str(keys / "server.key"), str(keys / "instances" / f"{c['name']}.key_secret")}
    instance = pods[f"{o.name}-pd"]["containers"][0]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": f"{o.name}-api-token", "key": "api.key"}}} \
        in instance["env"]


@pytest.mark.parametrize("name", ["shm-cpu", "mooncake-gpu-tp"])
def test_the_secrets_script_makes_every_secret_the_pods_use(name, model, keys, tmp_path):
    out = tmp_path / "out"
    assert main(_args(model, keys, out, CONFIGS[name](keys))) == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests/doubles/kubectl.py"} "$@"\n')
    (bin_dir / "kubectl").chmod(0o755)
    store = tmp_path / "applied.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "KUBECTL_DOUBLE_STORE": str(store)}
    r = subprocess.run(["sh", str(out / "create-secrets.sh"), "-n", "serving"], env=env, capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    secrets = {s["metadata"]["name"]: s for s in map(json.loads, store.read_text().splitlines())}
    for s in secrets.values():
        kubernetes_validate.validate(s, K8S_VERSION, strict=True)
    used = set()
    for f in out.glob("*.yaml"):
        for obj in yaml.safe_load_all(f.read_text()):
            pod = obj["spec"].get("template", {}).get("spec", {})
            vols = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
            for c in pod.get("containers", []):
                for m in c["volumeMounts"]:
                    if m["name"] in vols:
                        v = vols[m["name"]]
                        keys_of = [i["key"] for i in v["items"]] if "subPathExpr" in m else [m["subPath"]]
                        used |= {(v["secretName"], key) for key in keys_of}
                used |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                         for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    made = {(name, key) for name, s in secrets.items() for key in s["data"]}
    assert used == made
    assert base64.b64decode(secrets["pdkv-client-keys"]["data"]["client.key_secret"]) == \
        (keys / "client.key_secret").read_bytes()


def test_network_policies_admit_only_the_deployments_pods_but_clients_reach_the_proxy(model, keys, tmp_path):
    _, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["mooncake-gpu-tp"](keys))
    objs = _all(docs)
    policies = {p["metadata"]["name"]: p["spec"] for p in objs if p["kind"] == "NetworkPolicy"}
    pods = [w for w in objs if w["kind"] in ("Deployment", "StatefulSet")]
    assert set(policies) == {w["metadata"]["name"] for w in pods}  # every pod is behind a policy
    own = [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": o.name}}}]
    for name, spec in policies.items():
        rule = spec["ingress"][0]
        if name == f"{o.name}-proxy":
            assert "from" not in rule and rule["ports"] == [{"protocol": "TCP", "port": 8000}]
        else:
            assert rule["from"] == own
    assert policies[f"{o.name}-coordinator"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5570}]
    master_ports = {p["port"] for p in policies[f"{o.name}-mooncake-master"]["ingress"][0]["ports"]}
    assert master_ports == {50051, 9003, 8080}


def test_store_and_model_claims_are_mounted_at_the_configs_paths(model, keys, tmp_path):
    _, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["store-only"](keys), *EXTRA["store-only"])
    pod = _workload(docs, f"{o.name}-decode")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/var/pdkv/a"]["subPath"] == "store-0" and mounts["/var/pdkv/b"]["subPath"] == "store-1"
    assert mounts[str(model.resolve())]["readOnly"] is True
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"model": {"claimName": "models", "readOnly": True},
                      "store": {"claimName": "kv-store", "readOnly": False}}


@pytest.mark.parametrize("cfg, extra, needle", [
    ({}, ("--set", "coordinator.auth=none"), "pd keys DIR"),
    ({"connector": {"transport": {"kind": "none"}, "store": {"backend": "local", "paths": ["/x"]}}}, (),
     "--store-claim"),
    ({}, ("--k8s-name", "Bad_Name"), "--k8s-name"),
    ({"vllm": {"device": "cuda"}, "connector": {"transport": {"shm_memory": "gpu"}}}, (), "allowed with --emit k8s: host"),
    ({"connector": {"store": {"backend": "hf3fs"}}}, (), "hf3fs is not supported by --emit k8s"),
    ({"connector": {"chunk_secret_file": "/etc/pdkv/chunk.secret"}}, (), "chunk_secret_file is not supported"),
    ({}, ("--role", "decode"), "drop --role"),
    ({}, ("--model-claim", "UPPER"), "--model-claim"),
])
def test_what_cannot_run_is_refused_with_the_reason(cfg, extra, needle, model, keys, tmp_path, capsys):
    with_keys = keys if "coordinator.auth=none" not in extra else None
    assert main(_args(model, with_keys, tmp_path / "out", cfg, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pd launch: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_unknown_emit_format_is_refused(model, keys, tmp_path, capsys):
    argv = _args(model, keys, tmp_path / "out", {})
    argv[argv.index("k8s")] = "helm"
    assert main(argv) == 2
    assert "'helm' is not allowed; choose k8s" in capsys.readouterr().err


def test_a_second_emit_replaces_the_first_ones_components(model, keys, tmp_path):
    """Switching from shm (one pod for both pools) to mooncake leaves no stale pd.yaml for
    `kubectl apply -f DIR` to apply; a file the emit did not make is left alone."""
    out = tmp_path / "out"
    assert main(_args(model, keys, out, CONFIGS["shm-cpu"](keys))) == 0
    (out / "mine.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mine}\n")
    assert (out / "pd.yaml").exists()
    assert main(_args(model, keys, out, CONFIGS["mooncake-gpu-tp"](keys))) == 0
    assert sorted(p.name for p in out.glob("*.yaml")) == [
        "coordinator.yaml", "decode.yaml", "mine.yaml", "mooncake-master.yaml", "prefill.yaml", "proxy.yaml"]


def test_containers_of_one_pod_name_their_ports_apart(model, keys, tmp_path):
    _, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["shm-cpu"](keys))
    pod = _workload(docs, f"{o.name}-pd")["spec"]["template"]["spec"]
    names = [p["name"] for c in pod["containers"] for p in c["ports"]]
    assert names == ["http", "http-8101", "http-8200"]
    svc = next(x for x in _all(docs) if x["kind"] == "Service" and x["metadata"]["name"] == f"{o.name}-pd")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("http", 8100), ("http-8101", 8101),
                                                                     ("http-8200", 8200)]


def test_missing_keys_are_named_before_anything_is_written(model, tmp_path, capsys):
    assert main(_args(model, tmp_path / "no-keys", tmp_path / "out", {})) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'no-keys' / 'server.key_secret'} does not exist" in err and "pd keys" in err
    assert not (tmp_path / "out").exists()


def test_transport_servers_are_named_as_in_the_image_not_as_here(model, keys, tmp_path):
    """The Mooncake master is the image's `mooncake_master`; the InfiniStore server needs no RDMA
    device here (this machine has none) and carries none of this machine's paths."""
    _, o, _, docs, _ = _setup(model, keys, tmp_path, CONFIGS["mooncake-gpu-tp"](keys))
    master = _workload(docs, f"{o.name}-mooncake-master")["spec"]["template"]["spec"]["containers"][0]
    assert master["command"] == ["mooncake_master"] and "--rpc_address=0.0.0.0" in master["args"]
    (tmp_path / "b").mkdir()
    _, o, _, docs, _ = _setup(model, keys, tmp_path / "b", CONFIGS["infinistore-gpu"](keys))
    server = _workload(docs, f"{o.name}-infinistore")["spec"]["template"]["spec"]["containers"][0]
    assert server["command"] == ["python"] and server["args"][:2] == ["-m", "transport.infinistore_server"]
    assert [e["name"] for e in server["env"]] == ["PYTHONUNBUFFERED"]
    assert str(ROOT) not in json.dumps(server)
