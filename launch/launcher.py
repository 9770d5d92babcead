"""`pd launch`: start a deployment (coordinator, vLLM instances, proxy), watch it, stop it cleanly.

The flags (each with a YAML key) are applied to the config and everything is validated before
anything starts (model directory, ports, key files, cross-key checks). One progress line is
printed per process as it becomes ready, then ``pdkv ready: proxy at URL (run dir: DIR)``.
Ctrl-C/SIGTERM stops everything, removes the shared-memory pool and exits 0. If a child dies, the
launcher says which one, its exit code and the tail of its log, stops the rest and exits 1. The
processes are supervised by ``launch.supervise``; keys and tokens are ``launch.auth``'s.

Multi-host (``launch.topology``): ``--role control|prefill|decode`` (a comma list; default all)
or ``--host NAME`` (a ``hosts:`` entry) starts one host's share. An instance share first asks the
coordinator whether it answers and accepts this host's keys (refused keys stop the launch; a
coordinator not up yet is only reported, the instances connect when it comes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import yaml

from common.config import ConfigError, load, merge
from launch import k8s, ray_launch
from launch.auth import exposure_warnings, preflight, resolve_auth
from launch.procs import (
    ProcSpec,
    check_model,
    check_store,
    format_command,
    plan,
    plan_hosts,
)
from launch.supervise import Deployment, serve_until_stopped
from launch.topology import share
from pd.config import DeploymentConfig, StrictLoader, load_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd launch``; each has a YAML key (in parentheses)."""
    p.add_argument("--config", help="deployment YAML (see examples/pd.yaml); flags override it")
    p.add_argument("--model", help="HF model directory (model)")
    p.add_argument("--prefill", type=int, metavar="N",
                   help="number of prefill instances (prefill.count); colocated: instances on the prefill ports")
    p.add_argument("--decode", type=int, metavar="M", help="number of decode instances (decode.count)")
    p.add_argument("--prefill-tp", type=int, metavar="T",
                   help="tensor-parallel size of each prefill instance (prefill.tp)")
    p.add_argument("--decode-tp", type=int, metavar="T", help="tensor-parallel size of each decode instance (decode.tp)")
    p.add_argument("--mode", choices=("pd", "colocated"), help="P/D or plain instances behind the proxy (mode)")
    p.add_argument("--port", type=int, help="proxy port (proxy.port)")
    p.add_argument("--run-dir", help="directory for the logs (run_dir); default runs/<time>")
    p.add_argument("--transport", choices=("shm", "mooncake", "infinistore", "none"),
                   help="connector.transport.kind; none = P/D through the store alone")
    p.add_argument("--transport-url", metavar="URL",
                   help="infinistore: the server, infinistore://host:port/?device=mlx5_0 "
                        "(connector.transport.infinistore.url)")
    p.add_argument("--store", choices=("none", "local", "hf3fs"), help="connector.store.backend")
    p.add_argument("--store-path", metavar="DIR[,DIR...]", help="connector.store.paths")
    p.add_argument("--store-size-gb", type=float, metavar="N", help="connector.store.size_gb")
    p.add_argument("--role", metavar="ROLES",
                   help="this host's share: all (default), or a comma list of control (coordinator, transport "
                        "servers, proxy), prefill, decode")
    p.add_argument("--host", metavar="NAME", help="this host's share is hosts.NAME's roles (a hosts: section)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="start the deployment on an existing Ray cluster (ray: section); ADDRESS: its head, "
                        "host:port (default ray.address, auto)")
    p.add_argument("--keys-dir", metavar="DIR", help="coordinator.keys_dir (CurveZMQ keys; see pd keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key (VALUE is YAML), e.g. --set coordinator.advertise_host=10.0.0.1 "
                        "--set decode.urls=[http://10.0.0.2:8200]; repeatable, after the other flags")
    p.add_argument("--dry-run", action="store_true", help="print the commands with their environment and exit "
                   "(with a hosts: section and no --host, every host's; with --role all, each role's)")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object per line")
    k8s.add_arguments(p)


def parse_set(items: list[str]) -> dict:
    """``["a.b=1", ...]`` as a nested override dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
            raise ConfigError(f"--set: {item!r} is not KEY=VALUE (e.g. coordinator.advertise_host=10.0.0.1)")
        try:
            value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: {raw!r} is not a YAML value: {e}") from None
        if _key_type(key.strip()) is str and not isinstance(value, str) and not isinstance(value, (list, dict)):
            value = raw.strip()  # vllm.cpu_bind=0 means "0"
        d = out
        parts = key.strip().split(".")
        for k in parts[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise ConfigError(f"--set: {key} conflicts with an earlier --set")
        d[parts[-1]] = value
    return out


def _key_type(key: str):
    """The type of the config field at dotted ``key`` (None if there is none)."""
    tp = DeploymentConfig
    for part in key.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def config_from_args(args: argparse.Namespace) -> DeploymentConfig:
    """The YAML config (or the defaults) with the flags applied; ConfigError on any bad value."""
    dep = load_yaml(args.config) if args.config else load(DeploymentConfig, {})
    over: dict = {}
    for key, value in (("model", args.model), ("mode", args.mode), ("run_dir", args.run_dir)):
        if value is not None:
            over[key] = value
    for group in ("prefill", "decode"):
        g = {k: v for k, v in (("count", getattr(args, group, None)), ("tp", getattr(args, f"{group}_tp", None)))
             if v is not None}
        if g:
            over[group] = g
    if args.port is not None:
        over["proxy"] = {"port": args.port}
    if getattr(args, "keys_dir", None):
        over["coordinator"] = {"keys_dir": args.keys_dir}
    conn: dict = {}
    if getattr(args, "transport", None) is not None:
        conn["transport"] = {"kind": args.transport}
    if getattr(args, "transport_url", None):
        if (args.transport or dep.connector.transport.kind) != "infinistore":
            raise ConfigError("--transport-url: only for --transport infinistore (the InfiniStore server's "
                              "infinistore://host:port/?device=... URL)")
        conn.setdefault("transport", {})["infinistore"] = {"url": args.transport_url}
    store = {k: v for k, v in (("backend", getattr(args, "store", None)),
                               ("size_gb", getattr(args, "store_size_gb", None))) if v is not None}
    if getattr(args, "store_path", None):
        store["paths"] = [p for p in args.store_path.split(",") if p]
    if store:
        conn["store"] = store
    if conn:
        over["connector"] = conn
    dep = merge(dep, over)
    if getattr(args, "set", None):
        dep = merge(dep, parse_set(args.set))
    dep.model = str(check_model(dep.model))
    if dep.connector.transport.name == "default":
        # Two deployments of one host must not share a pool: stopping one would remove the other's.
        # Their proxy ports differ (one port cannot serve both), so the pool is named by it.
        dep.connector.transport.name = f"default-{dep.proxy.port}"
    resolve_auth(dep)
    # the instances and the proxy may run elsewhere than this cwd
    for section, key in ((dep.proxy, "api_key_file"), (dep.coordinator, "keys_dir"), (dep.vllm, "api_key_file")):
        if getattr(section, key):
            setattr(section, key, str(Path(getattr(section, key)).expanduser().resolve()))
    if dep.mode == "pd" and not getattr(args, "emit", None):  # --emit: the store's paths are in the pods
        check_store(dep.connector.store, make=not getattr(args, "dry_run", False))
    return dep


def _print_specs(specs: list[ProcSpec], as_json: bool, share_: str = "", roles: list[str] = ()) -> None:
    for spec in specs:
        if as_json:
            print(json.dumps({"host": share_, "roles": list(roles), "name": spec.name, "argv": spec.argv,
                              "env": spec.env, "health_url": spec.health_url, "port": spec.port,
                              "bind": spec.bind or spec.host, "cpus": list(spec.cpus)}))
        else:
            print(format_command(spec))


def dry_run(dep: DeploymentConfig, roles: str | None, host: str | None, as_json: bool = False) -> None:
    """Print the commands: this share's, or (a hosts: section without --host) every host's."""
    if dep.hosts and host is None and roles is None:
        for name, host_roles, specs in plan_hosts(dep):
            h = dep.hosts[name]
            if not as_json:
                print(f"### host {name} ({h.address}): {', '.join(host_roles)}; run there: "
                      f"pd launch --config FILE --host {name}")
            _print_specs(specs, as_json, name, host_roles)
        return
    label, parsed = share(dep, roles, host)
    specs = plan(dep, roles, host) if (roles is not None or host is not None) else plan(dep)
    _print_specs(specs, as_json, label, parsed)


def run(args: argparse.Namespace) -> int:
    """``pd launch``: 0 after a clean stop (Ctrl-C/SIGTERM), 1 if a child died, 2 on bad config."""
    dep = config_from_args(args)
    roles, host = getattr(args, "role", None), getattr(args, "host", None)
    if getattr(args, "emit", None):
        return k8s.run_emit(dep, args)
    if getattr(args, "ray", None) is not None:
        if args.dry_run or roles is not None or host is not None:
            raise ConfigError("--ray places every part on the Ray cluster; it takes no --role, --host or --dry-run")
        return ray_launch.run(dep, args.ray)
    if args.dry_run:
        dry_run(dep, roles, host, getattr(args, "json", False))
        return 0
    deployment = Deployment(dep, roles, host) if (roles is not None or host is not None) else Deployment(dep)
    deployment.check()
    for line in exposure_warnings(dep, deployment.specs):
        print(f"pdkv: warning: {line}", file=sys.stderr, flush=True)
    preflight(dep, deployment.roles, progress=lambda line: print(line, flush=True))

    def start() -> str:
        deployment.start(progress=lambda line: print(line, flush=True))
        if "control" in deployment.roles:
            return f"pdkv ready: proxy at {deployment.proxy_url} (run dir: {deployment.run_dir})"
        return f"pdkv ready: {', '.join(s.name for s in deployment.specs)} (run dir: {deployment.run_dir})"

    return serve_until_stopped(start, deployment.watch, deployment.stop)
