"""What a deployment runs: the command line, environment and readiness check of each process."""
from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pd.config import ConfigError, DeploymentConfig, kv_transfer_config


@dataclass
class ProcSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None  # GET returns 200 when ready; None = ready once started
    port: int | None = None


def check_model(path: str) -> Path:
    p = Path(path)
    if not path:
        raise ConfigError("no model given; pass --model PATH or set `model:` in the config")
    if not p.is_dir():
        raise ConfigError(f"not a model: {path} is not a directory")
    if not (p / "config.json").is_file():
        raise ConfigError(f"not a model: {path} has no config.json")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"not a model: {path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        json.loads((p / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"not a model: {p / 'config.json'} is not valid JSON: {e}") from None
    return p.resolve()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def instance_ports(dep: DeploymentConfig) -> list[tuple[str, str, int]]:
    """(name, role, port) of every vLLM instance."""
    out = []
    for role, group in (("prefill", dep.prefill), ("decode", dep.decode)):
        for i in range(group.count):
            out.append((f"{role}-{i}", role, group.port_base + i))
    return out


def check_ports(dep: DeploymentConfig) -> None:
    wanted = [("proxy", dep.proxy.host, dep.proxy.port)]
    if dep.mode == "pd":
        wanted.append(("coordinator", dep.coordinator.host, dep.coordinator.port))
    wanted += [(name, "127.0.0.1", port) for name, _, port in instance_ports(dep)]
    seen: dict[int, str] = {}
    for what, host, port in wanted:
        if port in seen:
            raise ConfigError(f"port {port} is used twice: by {seen[port]} and by {what}; change a port_base or port")
        seen[port] = what
        if port_in_use(host, port):
            raise ConfigError(f"port {port} ({what}) is already in use on {host}")


def served_name(dep: DeploymentConfig) -> str:
    return dep.served_model_name or Path(dep.model).resolve().name


def vllm_spec(dep: DeploymentConfig, name: str, role: str, port: int, with_connector: bool) -> ProcSpec:
    v = dep.vllm
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(dep.model).resolve()),
            "--served-model-name", served_name(dep), "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(v.max_model_len), "--block-size", str(v.block_size),
            "--max-num-seqs", str(v.max_num_seqs), "--dtype", v.dtype]
    if v.enforce_eager:
        argv.append("--enforce-eager")
    if with_connector:
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(dep, role, name))]
    group = dep.prefill if role == "prefill" else dep.decode
    argv += v.extra_args + group.extra_args
    env = {"VLLM_CPU_KVCACHE_SPACE": str(v.kv_cache_space_gb), "PYTHONHASHSEED": "0"}
    return ProcSpec(name, argv, env, f"http://127.0.0.1:{port}/health", port)


def cpu_binds(mode: str, n: int) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND for each of ``n`` instances.

    On a small machine, instances whose OpenMP threads are all bound to the same cores slow
    each other down by orders of magnitude (threads wait at barriers for preempted peers), so
    by default each instance gets its own cores.
    """
    if mode in ("auto", "nobind"):
        return [mode] * n
    if mode == "split":
        cores = sorted(os.sched_getaffinity(0))
        if n >= len(cores):
            return [str(cores[i % len(cores)]) for i in range(n)]
        per = len(cores) // n
        return [",".join(str(c) for c in cores[i * per:(i + 1) * per]) for i in range(n)]
    lists = [x.strip() for x in mode.split(";")]
    if len(lists) != n or not all(lists):
        raise ConfigError(f"vllm.cpu_bind: {mode!r} gives {len(lists)} core lists for {n} instances; "
                          "allowed: split, auto, nobind, or one list per instance separated by ';'")
    return lists


def plan(dep: DeploymentConfig) -> list[ProcSpec]:
    """Every process of the deployment, in start order."""
    py = [sys.executable, "-m", "pd.cli"]
    specs: list[ProcSpec] = []
    instances = instance_ports(dep)
    if not instances:
        raise ConfigError("no instances: prefill.count and decode.count are both 0")
    if dep.mode == "pd":
        if dep.prefill.count < 1 or dep.decode.count < 1:
            raise ConfigError("mode pd needs at least one prefill and one decode instance "
                              f"(got prefill.count={dep.prefill.count}, decode.count={dep.decode.count})")
        c = dep.coordinator
        specs.append(ProcSpec("coordinator", py + ["coordinator", "--host", c.host, "--port", str(c.port),
                                                   "--entry-ttl-s", str(c.entry_ttl_s),
                                                   "--instance-ttl-s", str(c.instance_ttl_s)], port=c.port))
    binds = cpu_binds(dep.vllm.cpu_bind, len(instances))
    for (name, role, port), bind in zip(instances, binds):
        spec = vllm_spec(dep, name, role, port, with_connector=dep.mode == "pd")
        spec.env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        specs.append(spec)
    urls = {role: ",".join(f"http://127.0.0.1:{p}" for _, r, p in instances if r == role) for role in ("prefill", "decode")}
    proxy = py + ["proxy", "--host", dep.proxy.host, "--port", str(dep.proxy.port), "--policy", dep.proxy.policy,
                  "--upstream-timeout-s", str(dep.proxy.upstream_timeout_s)]
    if dep.mode == "pd":
        proxy += ["--prefill", urls["prefill"], "--decode", urls["decode"], "--coordinator", dep.coordinator.address]
    else:
        proxy += ["--colocated", ",".join(u for u in (urls["prefill"], urls["decode"]) if u)]
    specs.append(ProcSpec("proxy", proxy, {}, f"http://{dep.proxy.host}:{dep.proxy.port}/health", dep.proxy.port))
    return specs


def format_command(spec: ProcSpec) -> str:
    import shlex

    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items())
    return f"# {spec.name}\n{env + ' ' if env else ''}{shlex.join(spec.argv)}"


def child_env(spec: ProcSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
