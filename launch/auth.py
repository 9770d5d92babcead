"""Who may talk to a deployment: coordinator keys (CurveZMQ) chosen and made, API tokens checked.

``resolve_auth`` settles ``coordinator.auth: auto``; ``own_keys`` makes the keys of a one-host
deployment; ``check_keys`` refuses a share whose key files are missing; ``exposure_warnings`` names
what listens beyond loopback without a token; ``preflight`` asks a remote coordinator whether it
takes this host's keys. The threat model is in docs/design.md.
"""
from __future__ import annotations

from collections.abc import Callable

from common.config import ConfigError
from launch.kv_config import makes_instance_keys
from launch.procs import ProcSpec
from launch.topology import layout
from pd.config import DeploymentConfig
from pd.coordinator.client import PROBE_HANDSHAKE, PROBE_OK, PROBE_REFUSED, probe
from pd.coordinator.curve import (
    client_keys_for,
    effective_auth,
    is_loopback,
    load_client_keys,
    load_server_keys,
    local_keys_dir,
    make_instance_keys,
    make_keys,
    read_token,
)


def resolve_auth(dep: DeploymentConfig) -> None:
    """``coordinator.auth: auto`` made ``curve`` or ``none``: curve with ``keys_dir`` when it is set;
    a one-host P/D deployment on loopback gets keys of its own (``pd.coordinator.curve.local_keys_dir``, made
    by ``own_keys`` at start), so no other user's process can publish, consume, abort or free KV
    transfers; otherwise none (which ``check_coordinator_security`` refuses beyond loopback)."""
    c = dep.coordinator
    if c.auth != "auto":
        return
    if c.keys_dir:
        c.auth = "curve"
    elif dep.mode == "pd" and not dep.hosts and is_loopback(c.host) and is_loopback(c.advertise_host or c.host):
        c.auth, c.keys_dir = "curve", str(local_keys_dir(c.advertise_port or c.port))
    else:
        c.auth = "none"


def own_keys(dep: DeploymentConfig, instances: list[str] = ()) -> bool:
    """Make the keys ``resolve_auth`` chose for a one-host deployment, and where this host
    authorizes keys (``launch.kv_config.makes_instance_keys``) one key of its own per instance in
    ``instances`` (the P/D instances started here); all kept across launches. True if instance
    keys were made or kept (their commands are then planned again, to name them)."""
    c = dep.coordinator
    if dep.mode != "pd" or c.auth != "curve":
        return False
    if c.keys_dir == str(local_keys_dir(c.advertise_port or c.port)):
        make_keys(c.keys_dir)
    if not instances or not makes_instance_keys(dep):
        return False
    make_instance_keys(c.keys_dir, list(instances))
    return True


def check_keys(dep: DeploymentConfig, roles: list[str]) -> None:
    """The key files this host's share needs exist (ConfigError): the API token, and with
    ``coordinator.auth: curve`` the coordinator's and the clients' keys."""
    if dep.vllm.api_key_file:
        read_token(dep.vllm.api_key_file)
    if dep.proxy.api_key_file and "control" in roles:
        read_token(dep.proxy.api_key_file, "proxy.api_key_file")
    if dep.mode != "pd" or effective_auth(dep.coordinator) != "curve":
        return

    c = dep.coordinator
    if "control" in roles:
        load_server_keys(c.keys_dir)
    load_client_keys(c.keys_dir, c.client_key)  # the proxy, the instances' connectors


def exposure_warnings(dep: DeploymentConfig, specs: list[ProcSpec]) -> list[str]:
    """Instances (and the proxy) that listen beyond loopback without an API token."""
    out = [] if dep.vllm.api_key_file else [
        f"{s.name} listens on {s.bind} without vllm.api_key_file: anyone who reaches {s.bind}:{s.port} can "
        "send it requests (pd keys DIR writes DIR/api.key)"
        for s in specs if "vllm.entrypoints" in " ".join(s.argv) and not is_loopback(s.bind or s.host)]
    out += [f"the proxy listens on {s.bind} without proxy.api_key_file: anyone who reaches {s.bind}:{s.port} "
            "can send it requests" for s in specs
            if s.name == "proxy" and not dep.proxy.api_key_file and not is_loopback(s.bind or s.host)]
    return out


def preflight(dep: DeploymentConfig, roles: list[str], progress: Callable[[str], None] = print, timeout_s: float = 3.0) -> None:
    """An instance share without the control role: does the coordinator answer, and take our keys?

    Refused keys or a failed handshake: ConfigError (nothing starts). Not answering yet: reported
    only (the control host may start later; the instances connect when it is up).
    """
    if dep.mode != "pd" or "control" in roles or not any(r in roles for r in ("prefill", "decode")):
        return
    address = layout(dep).coordinator_address
    status, why = probe(address, client_keys_for(dep.coordinator), timeout_s)
    if status in (PROBE_REFUSED, PROBE_HANDSHAKE):
        raise ConfigError(why)
    progress(f"pdkv: {why}" + ("" if status == PROBE_OK else "; starting the instances anyway (they connect when "
                                                              "it is up)"))

