"""The ``--kv-transfer-config`` of each vLLM instance a deployment starts."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import ConfigError
from pd.config import DeploymentConfig
from pd.connector.heads import lcm
from pd.coordinator.curve import INSTANCES, SERVER, effective_auth, local_keys_dir

CONNECTOR_CLASS = "PDConnector"
CONNECTOR_MODULE = "pd.connector"
ROLE_TO_KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


def store_writers_per_path(dep: DeploymentConfig) -> int:
    """The most prefill store writers of one store path: a prefill worker rank writes each KV-head
    group g it holds (pd.connector.heads) to path g % len(paths), so every prefill instance has one writer
    per group and the writers of a path share its part of ``store.size_gb``."""
    s = dep.connector.store
    n_paths = max(1, len((s.hf3fs.base_paths or s.paths) if s.backend == "hf3fs" else s.paths))
    groups = dep.connector.head_groups or lcm(dep.prefill.tp_size(dep.vllm), dep.decode.tp_size(dep.vllm))
    return max(1, dep.prefill.count) * -(-groups // n_paths)


def makes_instance_keys(dep: DeploymentConfig) -> bool:
    """Whether this host's launcher can authorize keys of its own making (its keys directory holds
    the coordinator's keys, or is the one ``pd launch`` makes for a one-host deployment): then it
    gives each instance it starts a key of its own (``launch.auth.own_keys``)."""
    c = dep.coordinator
    return bool(c.keys_dir) and (c.keys_dir == str(local_keys_dir(c.advertise_port or c.port))
                                 or (Path(c.keys_dir).expanduser() / f"{SERVER}.key_secret").exists())


def instance_key_file(dep: DeploymentConfig, instance_id: str) -> str:
    """``<keys_dir>/instances/<id>.key_secret``, ``instance_id``'s own coordinator key, if it exists
    (``pd launch`` made it, or ``pd keys DIR --instance NAME`` and a copy); "" otherwise: the
    instance uses the host's key (``coordinator.client_key``)."""
    if not dep.coordinator.keys_dir:
        return ""
    f = Path(dep.coordinator.keys_dir).expanduser() / INSTANCES / f"{instance_id}.key_secret"
    return str(f) if f.exists() else ""


def kv_transfer_config(dep: DeploymentConfig, role: str, instance_id: str, coordinator: str = "") -> dict:
    """The ``--kv-transfer-config`` JSON (as a dict) for one vLLM instance of ``dep``; it reaches the
    coordinator at ``coordinator`` (default: ``dep.coordinator.address``, the advertised one)."""
    if role not in ROLE_TO_KV_ROLE:
        raise ConfigError(f"role {role!r} is not allowed; choose one of {', '.join(ROLE_TO_KV_ROLE)}")
    conn = dataclasses.asdict(dep.connector)
    conn["coordinator"] = coordinator or dep.coordinator.address
    curve = effective_auth(dep.coordinator) == "curve"
    conn["coordinator_keys_dir"] = dep.coordinator.keys_dir if curve else ""
    conn["coordinator_client_key"] = (instance_key_file(dep, instance_id) if curve else "") \
        or dep.coordinator.client_key
    conn["instance_id"] = instance_id
    conn["heartbeat_interval_s"] = dep.coordinator.heartbeat_interval_s
    conn["store"]["writers"] = max(dep.connector.store.writers, store_writers_per_path(dep))
    if not conn["head_groups"]:  # both sides cut KV heads the same way (pd.connector.heads)
            conn["head_groups"] = lcm(dep.prefill.tp_size(dep.vllm), dep.decode.tp_size(dep.vllm))
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": ROLE_TO_KV_ROLE[role],
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": conn,
    }
