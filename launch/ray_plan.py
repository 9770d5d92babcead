"""What ``pd launch --ray`` asks of the Ray cluster, without Ray: checks of the ``ray:`` section,
each actor's resources (a placement group for a TP instance), the key and token files each node
gets, and the process specs, built by the local launcher's own functions (launch.procs) from a
layout of the nodes the instances were placed on. See docs/design.md ("A deployment on Ray").
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, url_host
from launch.auth import own_keys, resolve_auth
from launch.gpus import GpuSlot
from launch.procs import (
    ProcSpec,
    check_config,
    check_coordinator_security,
    coordinator_spec,
    proxy_spec,
    transport_servers,
    vllm_spec,
)
from launch.topology import Instance, Layout, is_wildcard
from pd.config import DeploymentConfig
from pd.connector.heads import group_tp
from pd.coordinator.curve import AUTHORIZED, INSTANCES, effective_auth, is_loopback
from pd.coordinator.keyfiles import read_checked

HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its node id
LOCATE = 0.001  # how much of the control resource the control actor takes (it only locates a node)
_RESOURCE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")
_CORES = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*(\|\d+(-\d+)?(,\d+(-\d+)?)*)*")
BIND_MODES = ("split", "auto", "nobind")
GROUPS = ("prefill", "decode")
SECRETS = "keys"  # the keys directory inside a node's secrets directory
CHUNK_SECRET = "chunk.secret"  # connector.chunk_secret_file there (the instances' nodes)
ALLOW_LIST = f"{SECRETS}/{AUTHORIZED}"  # the coordinator's allow-list there (the control node's)
ADMIN_TOKEN = "admin.token"


@dataclass(frozen=True)
class Slot:
    """One instance to place: prefill-1 is the prefill pool's instance 1, on port_base + 1."""

    name: str
    group: str
    index: int
    port: int


def check_ray(dep: DeploymentConfig) -> None:
    """Refuse what ``pd launch --ray`` cannot do, naming the key and what is allowed."""
    r = dep.ray
    if dep.mode != "pd":
        raise ConfigError(f"mode: {dep.mode!r} is not supported by pd launch --ray; allowed there: pd")
    if dep.hosts:
        raise ConfigError("hosts: pd launch --ray places the instances on the Ray cluster's nodes; remove the hosts: "
                          "section (or launch without --ray)")
    for key in ("control_resource", "prefill_resource", "decode_resource"):
        value = getattr(r, key)
        if value and not _RESOURCE.fullmatch(value):
            raise ConfigError(f"ray.{key}: {value!r} is not a Ray resource name; allowed: letters, digits, _ . : - "
                              "(e.g. prefill_node)")
    if not r.namespace or not _RESOURCE.fullmatch(r.namespace):
        raise ConfigError(f"ray.namespace: {r.namespace!r} is not allowed; give letters, digits, _ . : -")
    if dep.connector.transport.kind == "shm":
        raise ConfigError("connector.transport.kind: shm moves KV only within one host, and Ray places the "
                          "instances on any node; allowed with --ray: mooncake, infinistore, none")
    for group in GROUPS:
        pool_bind(dep, group)
        if getattr(dep, group).count > r.max_per_pool:
            raise ConfigError(f"{group}.count: {getattr(dep, group).count} is more than ray.max_per_pool "
                              f"({r.max_per_pool}); raise ray.max_per_pool")
    check_config(dep)


def pool_bind(dep: DeploymentConfig, group: str) -> str:
    """The cpu bind of every instance of ``group``: ``ray.<group>_cpu_bind`` or ``vllm.cpu_bind``."""
    own = getattr(dep.ray, f"{group}_cpu_bind")
    key = f"ray.{group}_cpu_bind" if own else "vllm.cpu_bind"
    value = (own or dep.vllm.cpu_bind).strip()
    if value in BIND_MODES:
        return value
    tp = group_tp(dep, group)
    if not _CORES.fullmatch(value) or len(value.split("|")) != tp:
        raise ConfigError(f"{key}: {value!r} is not allowed with pd launch --ray; give split, auto, nobind, or one "
                          f"core list for every {group} instance ({tp} list(s) separated by '|' for tp {tp}), e.g. 0-3 "
                          f"(set ray.prefill_cpu_bind and ray.decode_cpu_bind for the two pools)")
    return value


def control_options(dep: DeploymentConfig) -> dict:
    """The control actor's Ray options: on the node offering ``ray.control_resource`` (the head)."""
    return {"num_cpus": 0, "resources": {dep.ray.control_resource or HEAD_RESOURCE: LOCATE}}


def instance_bundles(dep: DeploymentConfig, group: str, device: str) -> list[dict]:
    """The resources of one instance of ``group``, one bundle per TP rank (bundle 0 also holds the
    pool resource, and on cuda every GPU: the instance's one process needs them all visible)."""
    tp = group_tp(dep, group)
    # Ray refuses an empty bundle: without ray.instance_cpus each rank of a group takes a token of CPU
    cpus = dep.ray.instance_cpus or (LOCATE if tp > 1 else 0)
    first: dict = {"CPU": cpus} if cpus else {}
    res = getattr(dep.ray, f"{group}_resource")
    if res:
        first[res] = 1
    if device == "cuda":
        first["GPU"] = tp
    return [first, *[{"CPU": cpus}] * (tp - 1)]


def instance_options(bundles: list[dict]) -> dict:
    """The instance actor's own Ray options from its first bundle."""
    first = dict(bundles[0])
    out: dict = {"num_cpus": first.pop("CPU", 0), "num_gpus": first.pop("GPU", 0)}
    if first:
        out["resources"] = first
    return out


def away_from(lost_node: str, nodes: list[dict], bundles: list[dict]) -> dict[str, str]:
    """The label selector that places an instance again off ``lost_node``, the node its actor was
    lost on, when another live node of ``nodes`` (``ray.nodes()``) offers in total what ``bundles``
    ask for; else {}. Ray marks a node dead only once its health checks have failed for a while
    (~15 s and more by default) and may place the new actor on the lost node until then."""
    want: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            want[k] = want.get(k, 0) + v
    for n in nodes:
        have = n.get("Resources") or {}
        if lost_node and n.get("Alive") and n.get("NodeID") != lost_node and \
                all(have.get(k, 0) >= v for k, v in want.items()):
            return {NODE_ID_LABEL: f"!{lost_node}"}
    return {}


def slots(dep: DeploymentConfig, group: str, count: int) -> list[Slot]:
    """The first ``count`` instances of ``group``."""
    g = getattr(dep, group)
    if g.port_base + count - 1 > 65535:
        raise ConfigError(f"{group}.port_base: {g.port_base} with {count} instances needs ports up to "
                          f"{g.port_base + count - 1}; allowed: ports up to 65535")
    return [Slot(f"{group}-{i}", group, i, g.port_base + i) for i in range(count)]


def parse_scale(words: list[str]) -> dict[str, int]:
    """``["prefill=2", "decode=1"]`` -> {"prefill": 2, "decode": 1}; ConfigError for anything else."""
    out: dict[str, int] = {}
    for w in words:
        group, sep, n = w.partition("=")
        if not sep or group not in GROUPS or not n.isdigit() or not 1 <= int(n) <= 64 or group in out:
            raise ConfigError(f"{w!r} is not allowed; give prefill=N and/or decode=M, each once, N and M in 1..64 "
                              "(a P/D deployment keeps at least one instance of each)")
        out[group] = int(n)
    if not out:
        raise ConfigError("say what to scale: prefill=N and/or decode=M")
    return out


def default_secrets_dir(dep: DeploymentConfig) -> str:
    return dep.ray.secrets_dir or os.path.join(tempfile.gettempdir(), f"pdkv-ray-{os.getuid()}-{dep.proxy.port}")


def own_ray_keys(dep: DeploymentConfig) -> None:
    """``coordinator.auth: auto`` settled as ``pd launch`` settles it (launch.auth), and the keys it
    then chose made here (where ``pd stats`` looks), with a key of its own for every instance a
    pool may have (``ray.max_per_pool``); Ray sends each node the keys it needs."""
    resolve_auth(dep)
    own_keys(dep, [s.name for g in GROUPS for s in slots(dep, g, dep.ray.max_per_pool)])


def secret_files(dep: DeploymentConfig, control: bool, admin_token: str, instance: str = "") -> dict[str, bytes]:
    """The files a node gets, by path relative to its secrets directory: the API tokens, an
    instance's node the chunk secret (``connector.chunk_secret_file``), and the CurveZMQ keys
    its processes need (the control node: the coordinator's secret key and the allow-list too;
    an instance: the coordinator's public key, the client keypair, and its own key if the
    launcher made one)."""
    out: dict[str, bytes] = {}
    if dep.vllm.api_key_file:
        out["vllm-api.key"] = _read(dep.vllm.api_key_file, "vllm.api_key_file", True)
    if control and dep.proxy.api_key_file:
        out["proxy-api.key"] = _read(dep.proxy.api_key_file, "proxy.api_key_file", True)
    if control:
        out[ADMIN_TOKEN] = admin_token.encode()
    elif dep.connector.chunk_secret_file:  # the instances' connectors key chunk checksums with it
        out[CHUNK_SECRET] = _read(dep.connector.chunk_secret_file, "connector.chunk_secret_file", True)
    c = dep.coordinator
    if effective_auth(c) == "curve":
        d = Path(c.keys_dir).expanduser()
        names = ["server.key", f"{c.client_key}.key", f"{c.client_key}.key_secret"]
        if instance:
            names.append(f"{INSTANCES}/{instance}.key_secret")
        if control:
            names += ["server.key_secret"] + [f"{AUTHORIZED}/{p.name}" for p in sorted((d / AUTHORIZED).glob("*.key"))]
        for n in names:
            if (d / n).is_file() or (d / n).is_symlink():
                out[f"{SECRETS}/{n}"] = _read(d / n, "coordinator.keys_dir", n.endswith(".key_secret"))
    return out


def _read(path: str | Path, what: str, secret: bool) -> bytes:
    """A key or token file, checked as its readers check it (``keyfiles.read_checked``: ours, not a
    symlink, a secret 0600), since each node writes its copy as ours and 0600 whatever it was here."""
    try:
        return read_checked(Path(path).expanduser(), what, secret)
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def node_config(dep: DeploymentConfig, secrets_dir: str, control_ip: str) -> DeploymentConfig:
    """``dep`` as the nodes run it: key and token paths in ``secrets_dir``, a loopback Mooncake
    master moved to the control node's address."""
    out = copy.deepcopy(dep)
    if out.vllm.api_key_file:
        out.vllm.api_key_file = os.path.join(secrets_dir, "vllm-api.key")
    if out.proxy.api_key_file:
        out.proxy.api_key_file = os.path.join(secrets_dir, "proxy-api.key")
    if out.connector.chunk_secret_file:
        out.connector.chunk_secret_file = os.path.join(secrets_dir, CHUNK_SECRET)
    if effective_auth(out.coordinator) == "curve":
        out.coordinator.keys_dir = os.path.join(secrets_dir, SECRETS)
    m = out.connector.transport.mooncake
    host, _, port = m.master.rpartition(":")
    if out.connector.transport.kind == "mooncake" and is_loopback(host.strip("[]")):
        m.master = f"{url_host(control_ip)}:{port}"
    return out


def layout_on(dep: DeploymentConfig, placed: list[tuple[Slot, str]], control_ip: str) -> Layout:
    """The layout of the instances ``placed`` as (slot, node address): each listens on its node's
    address; the coordinator on every interface of the control node, advertised at its address."""
    insts = [Instance(s.name, s.group, s.group, s.port, ip, f"http://{url_host(ip)}:{s.port}", ip) for s, ip in placed]
    c = dep.coordinator
    lay = Layout(insts, "0.0.0.0", f"tcp://{url_host(control_ip)}:{c.advertise_port or c.port}")
    check_coordinator_security(dep, lay)
    return lay


def instance_spec(ndep: DeploymentConfig, slot: Slot, node_ip: str, bind: str, coordinator: str,
                  gpus: str = "", own_key: bool = False) -> ProcSpec:
    """The vLLM process of ``slot`` on the node at ``node_ip`` (the local launcher's command): on
    cuda its GPUs are those Ray gave its actor (``gpus``), else it runs on the cores ``bind``;
    ``own_key``: it speaks to the coordinator with its own key (``secret_files``)."""
    gpu = GpuSlot(gpus, None, 1) if gpus else None
    spec = vllm_spec(ndep, slot.name, slot.group, slot.port, slot.group, bind=bind, slot=gpu, host=node_ip,
                     coordinator=coordinator)
    if own_key:  # the key sent to its node (the planner cannot look there for it)
        i = spec.argv.index("--kv-transfer-config") + 1
        kv = json.loads(spec.argv[i])
        kv["kv_connector_extra_config"]["coordinator_client_key"] = \
            os.path.join(ndep.coordinator.keys_dir, INSTANCES, f"{slot.name}.key_secret")
        spec.argv[i] = json.dumps(kv)
    return spec


def control_specs(ndep: DeploymentConfig, lay: Layout, secrets_dir: str) -> tuple[list[ProcSpec], ProcSpec]:
    """(coordinator and transport servers, proxy) of the control node; the proxy takes pool
    changes (``pd.proxy.pools``) with the admin token."""
    proxy = proxy_spec(ndep, lay)
    proxy.argv += ["--admin-token-file", os.path.join(secrets_dir, ADMIN_TOKEN)]
    return [coordinator_spec(ndep, lay), *transport_servers(ndep)], proxy


def proxy_address(dep: DeploymentConfig, control_ip: str) -> str:
    """Where clients reach the proxy: its host, or the control node's address for a wildcard."""
    host = control_ip if is_wildcard(dep.proxy.host) else dep.proxy.host
    return f"http://{url_host(host)}:{dep.proxy.port}"
