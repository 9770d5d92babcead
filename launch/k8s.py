"""``pd launch --emit k8s DIR``: Kubernetes manifests for a deployment, from the launcher's own plan.

``k8s_config`` places the YAML on a cluster through the launcher's own ``hosts:`` mechanism: the
control host is the coordinator's Service, and each instance is a host of its own (a pod of its
pool's StatefulSet, reached through the pool's headless Service), listening on 0.0.0.0. Then
``launch.procs.plan`` gives every process's command line and environment exactly as for a local
launch, and ``launch.k8s_pods`` turns them into containers. The shm transport moves KV through
one host's memory: with it both pools share one pod (a container per instance, one /dev/shm).
The manifests hold no key: ``create-secrets.sh`` makes the Secrets from the files ``pd keys``
wrote. docs/kubernetes.md walks through it; docs/design.md maps the pieces.
"""
from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path

import yaml

from common.config import ConfigError
from launch import k8s_objects as k
from launch.auth import check_keys, own_keys
from launch.k8s_pods import (
    Component,
    K8sOptions,
    SecretFile,
    pod,
    secret_files,
    service_ports,
)
from launch.kv_config import store_writers_per_path
from launch.procs import plan
from launch.topology import layout
from pd.config import HOST_ROLES, DeploymentConfig, HostConfig
from pd.coordinator.curve import effective_auth, local_keys_dir

EMIT_FORMATS = ("k8s",)
DEFAULT_IMAGE = "pdkv:latest"
SECRETS_SCRIPT = "create-secrets.sh"
HEADER = "# Made by `pd launch --emit k8s` from the launcher's plan; made again, not edited (docs/kubernetes.md)\n"
ANY = "0.0.0.0"
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,28}[a-z0-9])?")
POOLS = ("prefill", "decode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd launch --emit k8s``."""
    p.add_argument("--emit", nargs=2, metavar=("FORMAT", "DIR"),
                   help="write manifests for the deployment instead of starting it: k8s DIR (Kubernetes "
                        "manifests and create-secrets.sh; docs/kubernetes.md)")
    p.add_argument("--image", default=DEFAULT_IMAGE,
                   help=f"with --emit k8s: the container image with pdkv and vLLM installed (default {DEFAULT_IMAGE})")
    p.add_argument("--k8s-name", default="pdkv", metavar="NAME",
                   help="with --emit k8s: prefix of every object's name and the app.kubernetes.io/instance label")
    p.add_argument("--model-claim", default="", metavar="PVC",
                   help="with --emit k8s: a PersistentVolumeClaim holding the model, mounted read-only at the "
                        "model's path (default: the image holds the model at that path)")
    p.add_argument("--store-claim", default="", metavar="PVC",
                   help="with --emit k8s: a ReadWriteMany PersistentVolumeClaim for connector.store.paths, shared "
                        "by every instance (default: a disk emptyDir per pod)")


def options_from_args(args: argparse.Namespace) -> K8sOptions:
    fmt = args.emit[0]
    if fmt not in EMIT_FORMATS:
        raise ConfigError(f"--emit: {fmt!r} is not allowed; choose {', '.join(EMIT_FORMATS)} (then a directory)")
    if (getattr(args, "role", None) is not None or getattr(args, "host", None) is not None or args.dry_run
            or getattr(args, "ray", None) is not None):
        raise ConfigError("--emit k8s: the manifests place every part of the deployment; drop --role, --host, "
                          "--ray and --dry-run")
    o = K8sOptions(image=args.image, name=args.k8s_name, model_claim=args.model_claim, store_claim=args.store_claim)
    check_options(o)
    return o


def check_options(o: K8sOptions) -> None:
    if not _NAME.fullmatch(o.name):
        raise ConfigError(f"--k8s-name: {o.name!r} is not allowed; give 1-30 lowercase letters, digits or '-', "
                          "starting with a letter and not ending with '-'")
    if not o.image.strip() or any(c.isspace() for c in o.image):
        raise ConfigError(f"--image: {o.image!r} is not an image reference (e.g. registry.example/pdkv:0.1)")
    for key, claim in (("--model-claim", o.model_claim), ("--store-claim", o.store_claim)):
        if claim and not re.fullmatch(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?", claim):
            raise ConfigError(f"{key}: {claim!r} is not a PersistentVolumeClaim name (lowercase letters, digits, "
                              "'-', '.')")


def shared_pod(dep: DeploymentConfig) -> bool:
    """Whether both pools run in one pod: the shm transport reaches only within one host."""
    return dep.mode == "pd" and dep.connector.transport.kind == "shm"


def check_placeable(dep: DeploymentConfig, o: K8sOptions) -> None:
    """Refuse what the manifests cannot run, naming the key and what works."""
    c = dep.coordinator
    if dep.mode == "pd" and not c.allow_insecure and (
            effective_auth(c) != "curve" or c.keys_dir == str(local_keys_dir(c.advertise_port or c.port))):
        raise ConfigError("--emit k8s: the instances reach the coordinator over the cluster's network, so it needs "
                          "keys of its own: run `pd keys DIR` and pass --keys-dir DIR (coordinator.keys_dir); or, "
                          "on a network you trust, set coordinator.allow_insecure: true")
    t = dep.connector.transport
    if shared_pod(dep) and t.shm_memory == "gpu":
        raise ConfigError("connector.transport.shm_memory: gpu maps a prefill's GPU memory into the decode through "
                          "CUDA IPC, and in a pod each container sees only its own GPUs; allowed with --emit k8s: host")
    if dep.mode == "pd" and dep.connector.chunk_secret_file:
        raise ConfigError("connector.chunk_secret_file is not supported by --emit k8s yet (the manifests mount "
                          "only the coordinator's keys and the API token): leave it unset")
    s = dep.connector.store
    if dep.mode == "pd" and s.backend == "hf3fs":
        raise ConfigError("connector.store.backend: hf3fs is not supported by --emit k8s (USRBIO needs the node's "
                          "3FS mount and its /dev/shm); allowed: local (with --store-claim for a shared volume), none")
    if (dep.mode == "pd" and dep.connector.transport.kind == "none" and s.backend == "local"
            and not o.store_claim):
        raise ConfigError("connector.transport.kind none moves KV through the store alone, and each pod's own "
                          "volume is not shared: pass --store-claim PVC (a ReadWriteMany claim), or use "
                          "transport kind mooncake or infinistore")


def _place_transport(kd: DeploymentConfig, name: str) -> None:
    """The transport's servers as Services of their own, listening on every interface."""
    t = kd.connector.transport
    if kd.mode != "pd":
        return
    if t.kind == "mooncake":
        t.mooncake.local_hostname = ""  # each pod advertises its own address on the route to the master
        if t.mooncake.start_master:
            _, port = t.mooncake.master_host_port()
            t.mooncake.master, t.mooncake.bind_host = f"{name}-mooncake-master:{port}", ANY
    elif t.kind == "infinistore" and t.infinistore.start_server:
        _, port, device = t.infinistore.server()
        t.infinistore.url = f"infinistore://{name}-infinistore:{port}" + (f"/?device={device}" if device else "")


def k8s_config(dep: DeploymentConfig, o: K8sOptions) -> DeploymentConfig:
    """``dep`` placed on a cluster: a ``hosts:`` section (control = the coordinator's Service; each
    instance a pod of its own, or one pod for both pools with shm), every listener on 0.0.0.0,
    the transport servers behind Services, GPUs as each container sees them (``vllm.device``
    auto = cuda), no core binding (the kubelet places pods); the store keeps the pool's writer
    count (``store.writers``). Nothing else changes: the model, keys and tokens stay at their
    paths (the pods mount them there)."""
    check_placeable(dep, o)
    kd = copy.deepcopy(dep)
    d = DeploymentConfig()
    n = o.name
    if kd.vllm.device == "auto":
        kd.vllm.device = "cuda"
    kd.vllm.cpu_bind = "nobind"
    kd.coordinator.host, kd.coordinator.advertise_host, kd.coordinator.advertise_port = d.coordinator.host, "", 0
    kd.proxy.host = ANY
    kd.connector.store.writers = max(kd.connector.store.writers, store_writers_per_path(dep))
    kd.hosts = {"control": HostConfig(address=f"{n}-coordinator", bind=ANY, roles=["control"])}
    for g in POOLS:
        grp, dg = getattr(kd, g), getattr(d, g)
        grp.host, grp.advertise_host, grp.urls = dg.host, dg.advertise_host, []
    if shared_pod(dep):
        kd.hosts["pd"] = HostConfig(address=f"{n}-pd-0.{n}-pd", bind=ANY, roles=list(POOLS))
    else:
        for g in POOLS:
            for i in range(getattr(dep, g).count):
                kd.hosts[f"{g}-{i}"] = HostConfig(address=f"{n}-{g}-{i}.{n}-{g}", bind=ANY, roles=[g])
            getattr(kd, g).count = min(1, getattr(dep, g).count)  # one instance per pod
    _place_transport(kd, n)
    return kd


def components(kd: DeploymentConfig) -> list[Component]:
    """The launcher's plan of ``kd`` (``k8s_config``) as workloads: each control process a
    Deployment; the pools StatefulSets (one pod per instance, or one pod for both with shm)."""
    out = [Component(s.name, "Deployment", [s]) for s in plan(kd, host="control", elsewhere=True)]
    if "pd" in kd.hosts:
        return out + [Component("pd", "StatefulSet", plan(kd, host="pd", elsewhere=True))]
    for g in POOLS:
        specs = [plan(kd, host=h, elsewhere=True)[0] for h, hc in kd.hosts.items() if hc.roles == [g]]
        if specs:
            out.append(Component(g, "StatefulSet", specs, templated=True))
    return out


def objects(kd: DeploymentConfig, comp: Component, o: K8sOptions, files: list[SecretFile]) -> list[dict]:
    """The workload, Service and NetworkPolicy of one component."""
    name = f"{o.name}-{comp.name}"
    lbls, sel = k.labels(o.name, comp.name), k.selector(o.name, comp.name)
    template, ports = pod(kd, comp, o, files)
    svc_ports = [(n, p, p) for n, p in service_ports(ports)]
    if comp.kind == "Deployment":
        workload = k.deployment(name, lbls, sel, template)
    else:
        workload = k.statefulset(name, lbls, sel, template, len(comp.specs) if comp.templated else 1, name)
    peers = None if comp.name == "proxy" else {k.LABEL_INSTANCE: o.name}  # clients reach the proxy
    policy_ports = [p for _, p in ports] if comp.kind == "Deployment" else None  # KV peers: ports of run time
    return [workload, k.service(name, lbls, sel, svc_ports, headless=comp.kind == "StatefulSet"),
            k.network_policy(name, lbls, sel, peers, policy_ports)]


def manifests(dep: DeploymentConfig, o: K8sOptions) -> tuple[dict[str, list[dict]], list[SecretFile]]:
    """{file name: objects} of the deployment, and the secret files the pods mount."""
    kd = k8s_config(dep, o)
    check_keys(dep, list(HOST_ROLES))  # the key and token files are here and sound, as a launch checks
    if kd.mode == "pd":  # each instance's own coordinator key, made (or kept) as `pd launch` does
        own_keys(kd, [i.name for i in layout(kd).instances])
    comps = components(kd)
    specs = [s for c in comps for s in c.specs]
    files = secret_files(kd, specs, o)
    return {f"{c.name}.yaml": objects(kd, c, o, files) for c in comps}, files


def secrets_script(files: list[SecretFile]) -> str:
    """A shell script making (or updating) every Secret from the files on this machine."""
    lines = ["#!/bin/sh",
             "# Made by `pd launch --emit k8s`: creates or updates the Secrets the manifests mount, from the",
             "# key and token files on this machine (`pd keys DIR` wrote them). The manifests hold no key.",
             "# Run it where kubectl reaches the cluster, before `kubectl apply -f` on this directory:",
             f"#   sh {SECRETS_SCRIPT} [-n NAMESPACE]",
             "set -eu"]
    secrets: dict[str, list[SecretFile]] = {}
    for f in files:
        secrets.setdefault(f.secret, []).append(f)
    for secret, fs in secrets.items():
        args = " ".join("\\\n    --from-file=" + shlex.quote(f"{f.key}={f.path}") for f in fs)
        lines.append(f'kubectl "$@" create secret generic {secret} {args} \\\n'
                     f'    --dry-run=client -o yaml | kubectl "$@" apply -f -')
    if not secrets:
        lines.append("echo 'no keys or tokens: this deployment mounts no Secret'")
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Every object written out in full: kubectl and other readers need no YAML anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def emit(dep: DeploymentConfig, o: K8sOptions, out_dir: str | Path) -> list[Path]:
    """Write the manifests (one file per component) and ``create-secrets.sh`` into ``out_dir``."""
    docs, files = manifests(dep, o)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--emit k8s: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):  # an earlier emit's component that this one has not (kubectl apply -f DIR)
        if old.name not in docs and old.read_text().startswith(HEADER):
            old.unlink()
    written = []
    for fname, objs in docs.items():
        path = out / fname
        path.write_text(HEADER + yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    script = out / SECRETS_SCRIPT
    script.write_text(secrets_script(files))
    script.chmod(0o755)
    return written + [script]


def run_emit(dep: DeploymentConfig, args: argparse.Namespace) -> int:
    """``pd launch --emit k8s DIR``: write, then say what to run."""
    o = options_from_args(args)
    out = args.emit[1]
    for path in emit(dep, o, out):
        kinds = ", ".join(d["kind"] for d in yaml.safe_load_all(path.read_text())) if path.suffix == ".yaml" else \
            "the Secrets, from the key files here"
        print(f"wrote {path} ({kinds})")
    if not dep.proxy.api_key_file:
        print(f"pdkv: warning: proxy.api_key_file is not set: any client that reaches the {o.name}-proxy Service "
              "can send it requests")
    print(f"then: sh {Path(out) / SECRETS_SCRIPT} [-n NAMESPACE] && kubectl apply [-n NAMESPACE] -f {out} "
          "(docs/kubernetes.md; no cluster ran these manifests where they were made)")
    return 0
