"""Kubernetes objects as plain dicts (apps/v1, v1, networking.k8s.io/v1): the pieces ``launch.k8s``
builds a deployment's manifests from. Nothing here contacts a cluster; docs/kubernetes.md says
how the pieces map onto the deployment.
"""
from __future__ import annotations

from urllib.parse import urlparse

APP = "pdkv"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
# Set by the StatefulSet controller on each pod (Kubernetes 1.28 and later): its ordinal.
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
POD_INDEX_ENV = "POD_INDEX"
SECRET_MODE = 0o400  # key files: readable by their owner only
GPU_RESOURCE = "nvidia.com/gpu"
PROBE_PERIOD_S = 10


def labels(name: str, component: str) -> dict[str, str]:
    return {LABEL_NAME: APP, LABEL_INSTANCE: name, LABEL_COMPONENT: component}


def selector(name: str, component: str) -> dict[str, str]:
    return {LABEL_INSTANCE: name, LABEL_COMPONENT: component}


def escape(arg: str) -> str:
    """``arg`` as Kubernetes must see it to pass it on unchanged: it expands ``$(VAR)`` in a
    container's command, args and env values and reads ``$$`` as ``$``, so every ``$`` is doubled."""
    return arg.replace("$", "$$")


# ---- volumes and environment -----------------------------------------------------------


def secret_volume(name: str, secret: str, items: list[tuple[str, str]] = ()) -> dict:
    """A Secret as files, owner-only (0400): one per key, or ``items`` (key, path in the volume)."""
    src = {"secretName": secret, "defaultMode": SECRET_MODE}
    if items:
        src["items"] = [{"key": key, "path": path} for key, path in items]
    return {"name": name, "secret": src}


def memory_volume(name: str, size_mb: int) -> dict:
    """A tmpfs of at most ``size_mb`` MiB (counted against the pod's memory)."""
    return {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": f"{size_mb}Mi"}}


def disk_volume(name: str, size_mb: int) -> dict:
    return {"name": name, "emptyDir": {"sizeLimit": f"{size_mb}Mi"}}


def claim_volume(name: str, claim: str, read_only: bool) -> dict:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def mount(volume: str, path: str, read_only: bool = False, sub_path: str = "", sub_path_expr: str = "") -> dict:
    """``sub_path``: one file or directory of the volume; ``sub_path_expr``: the same with ``$(VAR)``s."""
    m = {"name": volume, "mountPath": path, "readOnly": read_only}
    if sub_path:
        m["subPath"] = sub_path
    if sub_path_expr:
        m["subPathExpr"] = sub_path_expr
    return m


def env_value(name: str, value: str) -> dict:
    return {"name": name, "value": escape(value)}


def env_secret(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def env_pod_index() -> dict:
    return {"name": POD_INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}}


# ---- probes and containers -------------------------------------------------------------


def http_probe(url: str, failures: int = 3) -> dict:
    """GET the path and port of ``url`` (``http://host:port/path``; the host is the pod's)."""
    u = urlparse(url)
    return {"httpGet": {"path": u.path or "/", "port": u.port or 80}, "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 5, "failureThreshold": failures}


def tcp_probe(port: int, failures: int = 3) -> dict:
    return {"tcpSocket": {"port": port}, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5,
            "failureThreshold": failures}


def startup_failures(startup_timeout_s: float) -> int:
    """Startup probe failures allowed: the launcher's start-up timeout in probe periods."""
    return max(1, -(-int(startup_timeout_s) // PROBE_PERIOD_S))


def container(name: str, image: str, argv: list[str], env: list[dict], ports: list[tuple[str, int]],
              probes: dict[str, dict], mounts: list[dict], gpus: int = 0) -> dict:
    """One container running ``argv`` (already escaped where it must be) with ``env``."""
    c = {"name": name, "image": image, "command": argv[:1], "args": argv[1:], "env": env,
         "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
         "volumeMounts": mounts, **probes}
    if gpus:
        c["resources"] = {"limits": {GPU_RESOURCE: gpus}}
    return c


# ---- workloads, services, policies ------------------------------------------------------


def _meta(name: str, lbls: dict[str, str]) -> dict:
    return {"name": name, "labels": dict(lbls)}


def pod_template(lbls: dict[str, str], containers: list[dict], volumes: list[dict],
                 share_pids: bool = False) -> dict:
    spec = {"containers": containers, "volumes": volumes, "enableServiceLinks": False}
    if share_pids:  # the shm transport tells live producers from dead ones by pid
        spec["shareProcessNamespace"] = True
    return {"metadata": {"labels": dict(lbls)}, "spec": spec}


def deployment(name: str, lbls: dict[str, str], sel: dict[str, str], template: dict) -> dict:
    """One replica, replaced (not rolled) on update: the coordinator and transport servers keep
    state a second copy would split."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, lbls),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": sel},
                     "template": template}}


def statefulset(name: str, lbls: dict[str, str], sel: dict[str, str], template: dict, replicas: int,
                service: str) -> dict:
    """``replicas`` pods ``name-0``.. with stable names under the headless ``service``, started together."""
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(name, lbls),
            "spec": {"replicas": replicas, "serviceName": service, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": sel}, "template": template}}


def service(name: str, lbls: dict[str, str], sel: dict[str, str], ports: list[tuple[str, int, int]],
            headless: bool = False) -> dict:
    """``ports``: (name, port, target port). Headless: DNS names for each pod, no virtual IP."""
    spec = {"selector": sel, "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"}
                                       for n, p, t in ports]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, lbls), "spec": spec}


def network_policy(name: str, lbls: dict[str, str], sel: dict[str, str], peers: dict[str, str] | None,
                   ports: list[int] | None) -> dict:
    """Ingress to the pods of ``sel`` only from pods labelled ``peers`` (None: from anywhere), on
    ``ports`` (None: any port)."""
    rule: dict = {}
    if peers is not None:
        rule["from"] = [{"podSelector": {"matchLabels": peers}}]
    if ports is not None:
        rule["ports"] = [{"protocol": "TCP", "port": p} for p in ports]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, lbls),
            "spec": {"podSelector": {"matchLabels": sel}, "policyTypes": ["Ingress"], "ingress": [rule]}}
