"""The pods of ``pd launch --emit k8s``: each ``ProcSpec`` of the launcher's plan as a container.

A container runs the spec's command line (the image's ``python`` for the launcher's own
interpreter) with the spec's environment. The key and token files it reads (``files_read``) come
from Secrets mounted owner-only (0400) at the same paths as here, one file per mount
(``subPath``): a Secret volume's own files are symlinks in a directory others may write, which
pdkv's key checks (``pd.coordinator.keyfiles``) refuse; a file mounted alone is a regular file
of root's. A pool's pod gets only its own instance key: the pool's keys are one directory each
in the Secret, and the pod mounts its own (``subPathExpr`` with its index). Probes follow the spec's readiness
check. A pool's pods share one template: the instance's index comes from the pod's ordinal
(``$(POD_INDEX)``), the only place where the pods' command lines differ.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

from common.config import ConfigError
from launch import k8s_objects as k
from launch.procs import ProcSpec
from pd.config import DeploymentConfig
from pd.connector.heads import group_tp
from pd.coordinator.curve import API_KEY, AUTHORIZED, INSTANCES, SERVER
from store.base import parse_path

SHM_BASE_MB = 1024  # /dev/shm of a vLLM pod beside the transport's pool (vLLM's workers, NCCL)
DEV_SHM = "/dev/shm"
# The name of a control process's main port in its Service (the rest serve HTTP).
MAIN_PORT = {"coordinator": "zmq", "mooncake-master": "rpc", "infinistore": "service"}


@dataclass
class K8sOptions:
    image: str = "pdkv:latest"
    name: str = "pdkv"  # the objects' name prefix and app.kubernetes.io/instance
    model_claim: str = ""  # a PVC with the model, mounted read-only at its path
    store_claim: str = ""  # a ReadWriteMany PVC for the store's paths
    python: str = "python"  # the image's interpreter, for the launcher's own sys.executable


@dataclass(frozen=True)
class SecretFile:
    """One file a process reads, as a key of a Secret; it is at the same path here and in the pods."""

    secret: str
    key: str
    path: str


@dataclass
class Component:
    """One workload: ``name`` (its label: coordinator, proxy, mooncake-master, prefill, ...), its
    kind, and its processes (``templated``: one pod per spec, the pool's pods)."""

    name: str
    kind: str
    specs: list[ProcSpec]
    templated: bool = False


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def _client_files(keys_dir: str, client_key: str) -> list[str]:
    """What a coordinator client reads: the coordinator's public key and its own secret key."""
    own = client_key if "/" in client_key or client_key.endswith(".key_secret") else \
        os.path.join(keys_dir, f"{client_key}.key_secret")
    return [os.path.join(keys_dir, f"{SERVER}.key"), os.path.expanduser(own)]


def files_read(spec: ProcSpec) -> list[str]:
    """The key and token files ``spec``'s process reads, from its command line (the plan's):
    the coordinator its secret key and allow-list; a client (the proxy, an instance's connector)
    the coordinator's public key and its own key; the proxy its token files. The API token an
    instance reads into its environment is in ``spec.env_files``."""
    argv = spec.argv
    if spec.name == "coordinator" and "--keys-dir" in argv:
        d = _flag(argv, "--keys-dir")
        allowed = sorted(f for f in os.listdir(os.path.join(d, AUTHORIZED)) if f.endswith(".key"))
        return [os.path.join(d, f"{SERVER}.key_secret")] + [os.path.join(d, AUTHORIZED, f) for f in allowed]
    out = [_flag(argv, f) for f in ("--upstream-api-key-file", "--api-key-file") if _flag(argv, f)]
    if "--coordinator-keys-dir" in argv:
        out += _client_files(_flag(argv, "--coordinator-keys-dir"), _flag(argv, "--coordinator-client-key"))
    extra = json.loads(_flag(argv, "--kv-transfer-config") or "{}").get("kv_connector_extra_config", {})
    if extra.get("coordinator_keys_dir"):
        out += _client_files(extra["coordinator_keys_dir"], extra["coordinator_client_key"])
    return out


def secret_files(dep: DeploymentConfig, specs: list[ProcSpec], o: K8sOptions) -> list[SecretFile]:
    """Every file the processes of ``specs`` read, each in the Secret of who may hold it: the
    coordinator's (its secret key, the allow-list), the instances' own keys, the API tokens, and
    the clients' (the coordinator's public key, the control key), never one in another's."""
    out: dict[str, SecretFile] = {}
    n, c = o.name, dep.coordinator
    paths = [p for s in specs for p in files_read(s)] + [p for s in specs for p in s.env_files.values()]
    for path in paths:
        d, base = os.path.dirname(path), os.path.basename(path)
        if path == os.path.join(c.keys_dir, f"{SERVER}.key_secret") or d == os.path.join(c.keys_dir, AUTHORIZED):
            f = SecretFile(f"{n}-coordinator-keys", base if base.endswith("_secret") else f"{AUTHORIZED}-{base}", path)
        elif d == os.path.join(c.keys_dir, INSTANCES):
            f = SecretFile(f"{n}-instance-keys", base, path)
        elif path in (dep.vllm.api_key_file, dep.proxy.api_key_file):
            f = SecretFile(f"{n}-api-token" if path == dep.vllm.api_key_file else f"{n}-proxy-token", API_KEY, path)
        else:
            f = SecretFile(f"{n}-client-keys", base, path)
        out.setdefault(path, f)
    return list(out.values())


def container_argv(argv: list[str], o: K8sOptions) -> list[str]:
    """The plan's command line in the image: the launcher's interpreter is the image's ``python``."""
    return [o.python if argv[0] == sys.executable else argv[0], *argv[1:]]


def _templated_argv(spec: ProcSpec, group: str, o: K8sOptions) -> list[str]:
    """``spec``'s escaped command line with its instance id made ``<group>-$(POD_INDEX)`` (in
    ``instance_id`` and in the name of its own key file)."""
    argv = [k.escape(a) for a in container_argv(spec.argv, o)]
    if "--kv-transfer-config" in argv:
        i = argv.index("--kv-transfer-config") + 1
        cfg = json.loads(argv[i])
        extra = cfg["kv_connector_extra_config"]
        if extra["instance_id"] != spec.name:
            raise ConfigError(f"{spec.name}: its instance_id is {extra['instance_id']!r}; expected its name")
        name = re.compile(rf"(?<![\w.-]){re.escape(spec.name)}(?![\w-])")
        for key in ("instance_id", "coordinator_client_key"):
            extra[key] = name.sub(f"{group}-$({k.POD_INDEX_ENV})", extra[key])
        argv[i] = json.dumps(cfg)
    return argv


def pool_argv(comp: Component, o: K8sOptions) -> list[str]:
    """The one command line of a pool's pods; ConfigError if its instances differ beyond their index."""
    argvs = [_templated_argv(s, comp.name, o) for s in comp.specs]
    first = comp.specs[0]
    for s, argv in zip(comp.specs, argvs):
        if argv != argvs[0] or (s.env, s.env_files, s.port) != (first.env, first.env_files, first.port):
            what = next((f"{a!r} vs {b!r}" for a, b in zip(argvs[0], argv) if a != b), "their environment or port")
            raise ConfigError(f"{comp.name}: {first.name} and {s.name} differ beyond their index ({what}); one "
                              "StatefulSet cannot run both")
    return argvs[0]


def container_env(spec: ProcSpec, files: list[SecretFile], templated: bool) -> list[dict]:
    """The spec's environment; files it reads into a variable come from their Secret."""
    env = [k.env_pod_index()] if templated else []
    env += [k.env_value(name, value) for name, value in spec.env.items()]
    for name, path in spec.env_files.items():
        f = next((f for f in files if f.path == path), None)
        if f is None:
            raise ConfigError(f"{spec.name}: {name} is read from {path}, which no Secret provides")
        env.append(k.env_secret(name, f.secret, f.key))
    return env + [k.env_value("PYTHONUNBUFFERED", "1")]  # as the launcher's children have it


def spec_ports(kd: DeploymentConfig, spec: ProcSpec) -> list[tuple[str, int]]:
    """(name, port) of what ``spec`` listens on: its port, its health check's, the Mooncake
    master's metadata server."""
    ports = [(MAIN_PORT.get(spec.name, "http"), spec.port)] if spec.port else []
    health = k.http_probe(spec.health_url)["httpGet"]["port"] if spec.health_url else None
    if health and health != spec.port:
        ports.append(("health", health))
    m = kd.connector.transport.mooncake
    if spec.name == "mooncake-master" and m.metadata_server.strip().lower() == "master":
        ports.append(("metadata", m.metadata_port))
    return ports


def service_ports(ports: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The pod's ports once each, each name once (the containers of one pod listen on distinct
    ports; a second ``http`` is ``http-8101``)."""
    seen: dict[int, str] = {}
    for name, port in ports:
        seen.setdefault(port, name if name not in seen.values() else f"{name}-{port}")
    return [(name, port) for port, name in seen.items()]


def probes(spec: ProcSpec, startup_timeout_s: float) -> dict[str, dict]:
    """Readiness as the launcher checks it; liveness the same, except for the proxy (its /health
    answers 503 while an upstream pool is down: it should not be restarted for that); a startup
    probe allows the launcher's start-up timeout."""
    failures = k.startup_failures(startup_timeout_s)
    if spec.health_url and not spec.upstreams:
        return {"startupProbe": k.http_probe(spec.health_url, failures),
                "readinessProbe": k.http_probe(spec.health_url), "livenessProbe": k.http_probe(spec.health_url)}
    if not spec.port:
        return {}
    ready = k.http_probe(spec.health_url) if spec.health_url else k.tcp_probe(spec.port)
    return {"startupProbe": k.tcp_probe(spec.port, failures), "readinessProbe": ready,
            "livenessProbe": k.tcp_probe(spec.port)}


def instance_volumes(kd: DeploymentConfig, comp: Component, o: K8sOptions) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) every vLLM container of ``comp`` has: /dev/shm in memory (with the shm
    transport's pool: ``pool_size_mb`` per prefill rank; the store's DRAM tier: ``dram_gb``), the
    model's claim, the store's paths."""
    t, s = kd.connector.transport, kd.connector.store
    prefills = sum(1 for spec in comp.specs if spec.name.startswith("prefill-")) if not comp.templated else 0
    pool_mb = t.pool_size_mb * prefills * group_tp(kd, "prefill") \
        if kd.mode == "pd" and t.kind == "shm" and t.shm_memory == "host" else 0
    on_dev_shm = os.path.normpath(t.shm_dir) == DEV_SHM
    # the store's DRAM tier (store/dram_arena.py) is one file in /dev/shm shared by the pod's instances
    dram_mb = int(s.dram_gb * 1e9 / (1 << 20)) + 1 if kd.mode == "pd" and s.dram_gb > 0 else 0
    vols = [k.memory_volume("dshm", SHM_BASE_MB + dram_mb + (pool_mb if on_dev_shm else 0))]
    mounts = [k.mount("dshm", DEV_SHM)]
    if pool_mb and not on_dev_shm:
        vols.append(k.memory_volume("kv-pool", pool_mb))
        mounts.append(k.mount("kv-pool", t.shm_dir))
    if o.model_claim:
        vols.append(k.claim_volume("model", o.model_claim, True))
        mounts.append(k.mount("model", kd.model, read_only=True))
    if kd.mode == "pd" and s.backend == "local":
        paths = [parse_path(p) for p in s.paths]
        if o.store_claim:
            vols.append(k.claim_volume("store", o.store_claim, False))
            mounts += [k.mount("store", p, sub_path=f"store-{i}") for i, p in enumerate(paths)]
        else:  # the store's budget and a margin: a pod over its sizeLimit is evicted
            mb = int(s.size_gb * 1e9 / len(paths) / (1 << 20) * 1.1) + 64
            vols += [k.disk_volume(f"store-{i}", mb) for i in range(len(paths))]
            mounts += [k.mount(f"store-{i}", p) for i, p in enumerate(paths)]
    return vols, mounts


def _group(comp: Component, spec: ProcSpec) -> str:
    return comp.name if comp.templated else spec.name.rsplit("-", 1)[0]


def _secret_mounts(spec: ProcSpec, comp: Component, files: list[SecretFile],
                   o: K8sOptions) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the files ``spec`` reads; a pool's pod mounts its own key's directory."""
    by_path = {f.path: f for f in files}
    vols, mounts = {}, []
    for path in dict.fromkeys(files_read(spec)):
        f = by_path[path]
        vol = f.secret.removeprefix(f"{o.name}-")
        if comp.templated and f.secret == f"{o.name}-instance-keys":
            ids = [s.name for s in comp.specs]
            vols[vol] = k.secret_volume(vol, f.secret, [(f"{i}.key_secret", f"{i}/{i}.key_secret") for i in ids])
            mounts.append(k.mount(vol, os.path.dirname(path), read_only=True,
                                  sub_path_expr=f"{comp.name}-$({k.POD_INDEX_ENV})"))
            continue
        vols.setdefault(vol, k.secret_volume(vol, f.secret))
        mounts.append(k.mount(vol, path, read_only=True, sub_path=f.key))
    return list(vols.values()), mounts


def pod(kd: DeploymentConfig, comp: Component, o: K8sOptions,
        files: list[SecretFile]) -> tuple[dict, list[tuple[str, int]]]:
    """The pod template of ``comp`` and the ports its containers listen on."""
    pool = comp.kind == "StatefulSet"
    inst_vols, inst_mounts = instance_volumes(kd, comp, o) if pool else ([], [])
    volumes = {v["name"]: v for v in inst_vols}
    containers, ports = [], []
    for spec in comp.specs[:1] if comp.templated else comp.specs:
        argv = pool_argv(comp, o) if comp.templated else [k.escape(a) for a in container_argv(spec.argv, o)]
        vols, mounts = _secret_mounts(spec, comp, files, o)
        volumes.update({v["name"]: v for v in vols})
        gpus = group_tp(kd, _group(comp, spec)) if pool and kd.vllm.device == "cuda" else 0
        c_ports = service_ports(ports + spec_ports(kd, spec))[len(ports):]  # names unique in the pod
        ports += c_ports
        containers.append(k.container(comp.name if comp.templated else spec.name, o.image, argv,
                                      container_env(spec, files, comp.templated), c_ports,
                                      probes(spec, kd.vllm.startup_timeout_s), inst_mounts + mounts, gpus))
    share_pids = pool and not comp.templated  # one pod for both pools: the shm transport checks pids
    return k.pod_template(k.labels(o.name, comp.name), containers, list(volumes.values()), share_pids), ports
