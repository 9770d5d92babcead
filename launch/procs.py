"""What a deployment runs: validation, and the command line, environment and readiness of each process.

Nothing here starts a process; ``launch.supervise.Deployment`` does, from the ``ProcSpec``s of
``plan(dep)``.

CPU cores (``vllm.cpu_bind``, default "split"): vLLM's CPU worker pins its OpenMP threads
(``VLLM_CPU_OMP_THREADS_BIND``). Its own "auto" pins every instance of a machine to the same
cores (core 0 on a 2-core machine, cores 0-1 with a KV connector), and instances whose threads
share cores wait at barriers for each other's preempted threads, orders of magnitude slower.
"split" gives each instance its own share of the cores this process may use, round-robin when
there are more instances than cores (then they share, but each still starts). A tensor-parallel
instance (``prefill.tp``/``decode.tp``) has one worker per rank and one core list per rank
("0|1": rank 0 on core 0, rank 1 on core 1); "split" shares the cores out by rank.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from common.config import ConfigError
from launch.gpus import (
    GpuSlot,
    cuda_args,
    cuda_env,
    gpu_slots,
    own_gpu_slots,
    parse_env,
    resolve_device,
    resolve_dtype,
)
from launch.kv_config import kv_transfer_config
from launch.topology import Instance, Layout, layout, local_instances, reach_host, share
from pd.config import DeploymentConfig
from pd.connector.heads import check_deployment, group_tp
from pd.coordinator.curve import effective_auth, is_loopback, read_token
from store.base import parse_path
from store.hf3fs import Hf3fsStore
from transport import server_specs

log = logging.getLogger("pd.launch")

# vLLM's CPU attention backend accepts only block sizes that are multiples of this
# ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])" otherwise, after ~1 minute of startup).
CPU_BLOCK_MULTIPLE = 32
_CORE_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_RANK_LISTS = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*(\|\d+(-\d+)?(,\d+(-\d+)?)*)*")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class ProcSpec:
    """One child process: its name (also its log file's), command, extra env and readiness check."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None  # GET answers 200 when ready
    port: int | None = None  # with no health_url: ready once this TCP port accepts connections
    host: str = "127.0.0.1"
    # The proxy: ready once its /health says every upstream (remote ones too) answers.
    upstreams: bool = False
    bind: str = ""  # the host it listens on ("" = host); for the port checks
    # Environment read from files when the child starts (name -> path), e.g. the API token: the
    # dry run prints "$(cat path)", never the secret.
    env_files: dict[str, str] = field(default_factory=dict)
    # False: once the deployment is ready, its exit is reported and the rest goes on (a transport
    # server: decode then falls back to the store, then recomputes); at startup it is fatal.
    critical: bool = True
    # The cores the whole process runs on, its children too (a CPU vLLM instance: its API server,
    # engine core and workers on the cores of its VLLM_CPU_OMP_THREADS_BIND); () = any.
    cpus: tuple[int, ...] = ()


def check_store(cfg, make: bool = True) -> None:
    """Refuse a store config that cannot work, before anything starts; ``make``: create missing
    local store directories (a dry run only checks that they could be made)."""
    if cfg.backend == "none":
        return
    if cfg.backend == "hf3fs":
        try:
            import hf3fs_fuse.io  # noqa: F401
        except ImportError:
            raise ConfigError("connector.store.backend hf3fs needs hf3fs_py_usrbio (built from the 3FS source "
                              "tree, see docs); a 3FS FUSE mount can be used with backend local meanwhile") from None
        # Open each base path once for reading: the same checks the instances make (mount point,
        # base path under it, budget), refused here before anything starts.
        for d in range(max(1, len(cfg.hf3fs.base_paths or cfg.paths))):
            try:
                Hf3fsStore(cfg, d, writer=False).close()
            except (ValueError, OSError) as e:
                raise ConfigError(f"connector.store (backend hf3fs): {e}") from None
        return
    if not cfg.paths:
        raise ConfigError(f"connector.store.paths: backend {cfg.backend} needs at least one directory "
                          "(--store-path DIR[,DIR...])")
    for raw in cfg.paths:
        path = Path(parse_path(raw))
        if not path.exists():  # made, as LMCache makes its local disk path (owner-only)
            if not make:
                parent = next(p for p in path.absolute().parents if p.exists())
                if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
                    continue
                raise ConfigError(f"connector.store.paths: {raw} does not exist and cannot be made: "
                                  f"{parent} is not a writable directory")
            try:
                path.mkdir(mode=0o700, parents=True)
            except OSError as e:
                raise ConfigError(f"connector.store.paths: {raw} does not exist and cannot be made: "
                                  f"{e.strerror or e}") from None
        if not path.is_dir():
            raise ConfigError(f"connector.store.paths: {raw} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"connector.store.paths: {raw} is not writable")


def check_model(path: str) -> Path:
    """The resolved model directory; ConfigError("not a model: ...") unless it has config.json and a tokenizer."""
    if not path:
        raise ConfigError("no model given; pass --model PATH or set `model:` in the config")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"not a model: {path} is not a directory")
    if not (p / "config.json").is_file():
        raise ConfigError(f"not a model: {path} has no config.json")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"not a model: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    try:
        json.loads((p / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"not a model: {p / 'config.json'} is not valid JSON: {e}") from None
    return p.resolve()


def check_config(dep: DeploymentConfig) -> None:
    """Checks across keys that ``pd.config.load`` cannot make on one value."""
    if dep.prefill.count + dep.decode.count == 0:
        raise ConfigError("no instances: prefill.count and decode.count are both 0")
    if dep.mode == "pd" and (dep.prefill.count < 1 or dep.decode.count < 1):
        raise ConfigError("mode pd needs at least one prefill and one decode instance "
                          f"(got prefill.count={dep.prefill.count}, decode.count={dep.decode.count})")
    bs = dep.vllm.block_size
    parse_env(dep.vllm.env, "vllm.env")
    for group in ("prefill", "decode"):
        parse_env(getattr(dep, group).env, f"{group}.env")
    check_deployment(dep)
    if dep.vllm.device == "cpu" and bs % CPU_BLOCK_MULTIPLE:
        raise ConfigError(f"vllm.block_size: {bs} is not allowed; vLLM's CPU attention needs a multiple of "
                          f"{CPU_BLOCK_MULTIPLE}")
    for group in ("prefill", "decode"):
        g = getattr(dep, group)
        if g.count and g.port_base + g.count - 1 > 65535:
            raise ConfigError(f"{group}.port_base: {g.port_base} with {g.count} instances needs ports up to "
                              f"{g.port_base + g.count - 1}; allowed: ports up to 65535")
    t = dep.connector.transport
    if dep.mode == "pd" and t.kind == "shm" and t.shm_memory == "gpu" and dep.vllm.device == "cpu":
        raise ConfigError("connector.transport.shm_memory: gpu keeps chunks in the prefill's GPU memory; "
                          "vllm.device is cpu; allowed there: host")
    if dep.mode == "pd" and dep.connector.chunk_size % bs:
        raise ConfigError(f"connector.chunk_size: {dep.connector.chunk_size} is not a multiple of "
                          f"vllm.block_size ({bs})")


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound now."""
    return bind_error(host, port) is not None


def bind_error(host: str, port: int) -> int | None:
    """The errno binding ``host:port`` fails with now (None: it can be bound)."""
    host = "0.0.0.0" if host.strip() in ("*", "") else host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror:
            return errno.EADDRNOTAVAIL
        except OSError as e:
            return e.errno or errno.EADDRINUSE
    return None


def instance_ports(dep: DeploymentConfig) -> list[tuple[str, str, int, str]]:
    """(name, role, port, group) of every vLLM instance (on every host); role is prefill, decode or
    colocated.

    In colocated mode the instances are ``instance-0..`` on the prefill ports, then the decode ports.
    """
    return [i.as_tuple() for i in layout(dep).instances]


def wanted_ports(dep: DeploymentConfig, roles: str | list[str] | None = None,
                 host: str | None = None) -> list[tuple[str, str, int]]:
    """(what, bind host, port) of every port this host's share of the deployment listens on."""
    return [(s.name, s.bind or s.host, s.port) for s in plan(dep, roles, host) if s.port]


def check_ports(dep: DeploymentConfig, roles: str | list[str] | None = None, host: str | None = None) -> None:
    """ConfigError unless every port of this host's share is distinct, in range and free."""
    wanted = wanted_ports(dep, roles, host)
    seen: dict[int, str] = {}
    for what, bind, port in wanted:
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} ({what}) is out of range; allowed 1..65535")
        if port in seen:
            raise ConfigError(f"port {port} is used twice: by {seen[port]} and by {what}; "
                              "change a port_base or port")
        seen[port] = what
    for what, bind, port in wanted:
        err = bind_error(bind, port)
        if err == errno.EADDRNOTAVAIL:
            raise ConfigError(f"{what} cannot listen on {bind}:{port}: {bind} is not an address of this host "
                              "(is this the right --host/--role, or should it listen on 0.0.0.0?)")
        if err is not None:
            raise ConfigError(f"port {port} ({what}) is already in use on {bind}")


def served_name(dep: DeploymentConfig) -> str:
    """The model name clients send: served_model_name, else the model directory's name."""
    return dep.served_model_name or Path(dep.model).name


def cpu_binds(mode: str, n: int, tps: list[int] | None = None) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND for each of ``n`` instances whose TP sizes are ``tps`` (default
    all 1; see the module docstring)."""
    tps = tps or [1] * n
    if mode in ("auto", "nobind"):
        return [mode] * n
    if mode == "split":
        cores = sorted(os.sched_getaffinity(0))
        ranks = sum(tps)
        if ranks >= len(cores):
            per_rank = [str(cores[i % len(cores)]) for i in range(ranks)]
        else:
            per = len(cores) // ranks
            per_rank = [",".join(str(c) for c in cores[i * per:(i + 1) * per]) for i in range(ranks)]
        starts = [sum(tps[:i]) for i in range(n)]
        return ["|".join(per_rank[s:s + tp]) for s, tp in zip(starts, tps)]
    lists = [x.strip() for x in mode.split(";")]
    if len(lists) != n or not all(_RANK_LISTS.fullmatch(x) for x in lists):
        raise ConfigError(f"vllm.cpu_bind: {mode!r} gives {len(lists)} core lists for {n} instances; "
                          "allowed: split, auto, nobind, or one list per instance separated by ';' (a "
                          "tensor-parallel instance: one list per rank separated by '|', e.g. 0|1)")
    for x, tp in zip(lists, tps):
        if len(x.split("|")) != tp:
            raise ConfigError(f"vllm.cpu_bind: {x!r} gives {len(x.split('|'))} core lists for an instance with "
                              f"tp {tp}; allowed: one list per rank separated by '|'")
    return lists


def bind_cores(bind: str) -> tuple[int, ...]:
    """The cores named by a VLLM_CPU_OMP_THREADS_BIND value ("0,2-3|4": 0, 2, 3, 4); () for auto, nobind."""
    if not _RANK_LISTS.fullmatch(bind):
        return ()
    cores: set[int] = set()
    for part in re.split(r"[|,]", bind):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(cores))


def pin_here(spec: ProcSpec) -> set[int] | None:
    """The cores to pin ``spec``'s process to on this machine: its ``cpus`` where this process may
    use them all; None (not pinned) without ``cpus`` or where some are not ours (logged)."""
    if not spec.cpus:
        return None
    ours = os.sched_getaffinity(0)
    if not set(spec.cpus) <= ours:
        log.warning("%s: cores %s are not all among this machine's %s; its processes are not pinned "
                    "(its OpenMP threads still are)", spec.name, list(spec.cpus), sorted(ours))
        return None
    return set(spec.cpus)


def vllm_env(dep: DeploymentConfig, bind: str, group: str = "prefill", slot: GpuSlot | None = None) -> dict[str, str]:
    """Environment of one vLLM instance (on top of the launcher's): cpu settings, or its GPUs; then
    ``vllm.env`` and the group's ``env``."""
    if slot is None:
        env = {"PYTHONHASHSEED": "0", "VLLM_CPU_OMP_THREADS_BIND": bind}
        if not dep.vllm.kv_cache_memory_gb:  # the variable would override --kv-cache-memory-bytes
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(dep.vllm.kv_cache_space_gb))
    else:
        env = cuda_env(dep, slot)
    env.update(parse_env(dep.vllm.env, "vllm.env"))
    env.update(parse_env(getattr(dep, group).env, f"{group}.env"))
    return env


def vllm_spec(dep: DeploymentConfig, name: str, role: str, port: int, group: str, bind: str = "auto",
              slot: GpuSlot | None = None, host: str = "127.0.0.1", coordinator: str = "") -> ProcSpec:
    """One vLLM OpenAI server listening on ``host``; with the P/D connector (reaching the coordinator at
    ``coordinator``, default the config's) unless ``role`` is colocated; on its GPUs with ``slot``."""
    v = dep.vllm
    dtype = resolve_dtype(dep, "cpu" if slot is None else "cuda")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(dep.model).resolve()),
            "--served-model-name", served_name(dep), "--host", host, "--port", str(port),
            "--max-model-len", str(v.max_model_len), "--block-size", str(v.block_size),
            "--max-num-seqs", str(v.max_num_seqs), "--dtype", dtype]
    if v.enforce_eager:
        argv.append("--enforce-eager")
    if v.load_format:
        argv += ["--load-format", v.load_format]
    tp = group_tp(dep, group)
    if slot is not None:
        argv += cuda_args(dep, slot, tp)
    else:
        if v.kv_cache_memory_gb:  # below VLLM_CPU_KVCACHE_SPACE's whole GiB
            argv += ["--kv-cache-memory-bytes", str(int(v.kv_cache_memory_gb * (1 << 30)))]
        if tp > 1:  # vLLM's CPU backend runs TP ranks as worker processes
            argv += ["--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp"]
    if role in ("prefill", "decode"):
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(dep, role, name, coordinator))]
    argv += list(v.extra_args) + list(getattr(dep, group).extra_args)
    near = reach_host(host)
    files = {"VLLM_API_KEY": v.api_key_file} if v.api_key_file else {}
    # On the CPU a P/D instance runs wholly on its cores, not only its OpenMP threads: a decode
    # waiting for KV spins (vLLM's engine loop and its workers' message queue), and its API server
    # and engine core, left free, were then scheduled onto the prefill's core. (A colocated
    # instance never waits so; its API server stays free to use an idle core.)
    env = vllm_env(dep, bind, group, slot)  # the OpenMP bind as vllm.env or the group's env may set it
    pin = slot is None and role in ("prefill", "decode")
    return ProcSpec(name, argv, env, f"http://{near}:{port}/health", port, near, bind=host, env_files=files,
                    cpus=bind_cores(env.get("VLLM_CPU_OMP_THREADS_BIND", "")) if pin else ())


def check_coordinator_security(dep: DeploymentConfig, lay: Layout) -> None:
    """Refuse a coordinator that listens, or is reached, beyond loopback without authentication."""
    c = dep.coordinator
    if dep.mode != "pd" or effective_auth(c) != "none" or c.allow_insecure:
        return
    host = lay.coordinator_address.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
    where = f"hosts.{lay.control_host}" if lay.control_host else "coordinator"
    keys = (f"{where}.bind", f"{where}.address") if lay.control_host else ("coordinator.host",
                                                                           "coordinator.advertise_host")
    for key, value in zip(keys, (lay.coordinator_bind, host)):
        if not is_loopback(value):
            raise ConfigError(
                f"{key} {value!r} is not a loopback address and coordinator.auth is none: anyone who can reach the "
                "port could publish, consume and free KV transfers. Make keys with `pd keys DIR`, then set "
                "coordinator.auth: curve and coordinator.keys_dir: DIR (or, on a network you trust, "
                "coordinator.allow_insecure: true)")


def check_transport_reach(dep: DeploymentConfig, lay: Layout) -> None:
    """The shm transport moves KV within one host: refuse pools placed on different hosts."""
    if dep.mode != "pd" or dep.connector.transport.kind != "shm":
        return
    if lay.hosts:  # hosts at loopback addresses (127.0.0.1, 127.0.0.2, ...) are all this machine
        where = sorted({"this machine" if is_loopback(dep.hosts[i.host].address) else i.host
                        for i in lay.instances})
    else:  # without hosts:, two distinct non-loopback URL hosts are two machines
        where = sorted({h for h in (urlparse(i.url).hostname or "" for i in lay.instances) if not is_loopback(h)})
    if len(where) > 1:
        raise ConfigError(f"connector.transport.kind: shm moves KV only within one host, but the instances run on "
                          f"{', '.join(where)}; use a network transport (see the README's transport rows), or "
                          "kind none with a store on a directory every host shares")


def transport_servers(dep: DeploymentConfig, here: bool = True) -> list[ProcSpec]:
    """The servers the transport needs on the control host (``transport.server_specs``)."""
    specs = []
    t = dep.connector.transport
    for d in (server_specs(t) if here else server_specs(t, here=False)) or []:
        bind = str(d.get("host") or "127.0.0.1")
        port = int(d["port"]) if d.get("port") else None
        specs.append(ProcSpec(str(d["name"]), [str(a) for a in d["argv"]], dict(d.get("env") or {}),
                              d.get("health_url"), port, reach_host(bind), bind=bind, critical=False))
    return specs


def coordinator_spec(dep: DeploymentConfig, lay: Layout) -> ProcSpec:
    c = dep.coordinator
    argv = [sys.executable, "-m", "launch.cli", "coordinator", "--host", lay.coordinator_bind, "--port", str(c.port),
            "--entry-ttl-s", str(c.entry_ttl_s), "--instance-ttl-s", str(c.instance_ttl_s)]
    if effective_auth(c) == "curve":
        argv += ["--auth", "curve", "--keys-dir", c.keys_dir]
    if c.allow_insecure:
        argv.append("--allow-insecure")
    near = reach_host(lay.coordinator_bind)
    return ProcSpec("coordinator", argv, port=c.port, host=near, bind=lay.coordinator_bind)


# vLLM options under which a chat answer is parsed (tool calls, reasoning), which a completions
# request for the decode half would not do: chat then takes the old flow.
CHAT_PARSERS = ("--tool-call-parser", "--enable-auto-tool-choice", "--reasoning-parser")


def proxy_spec(dep: DeploymentConfig, lay: Layout) -> ProcSpec:
    p = dep.proxy
    argv = [sys.executable, "-m", "launch.cli", "proxy", "--host", p.host, "--port", str(p.port), "--policy", p.policy,
            "--upstream-timeout-s", str(p.upstream_timeout_s)]
    argv += ["--header-timeout-s", str(p.header_timeout_s), "--body-timeout-s", str(p.body_timeout_s)]
    argv += ["--prefix-block-tokens", str(p.prefix_block_tokens), "--prefix-load-slack", str(p.prefix_load_slack),
             "--kv-usage-poll-s", str(p.kv_usage_poll_s)]
    if dep.mode == "pd":
        argv += ["--prefill", ",".join(lay.urls("prefill")), "--decode", ",".join(lay.urls("decode")),
                 "--coordinator", lay.coordinator_address]
        if effective_auth(dep.coordinator) == "curve":
            argv += ["--coordinator-keys-dir", dep.coordinator.keys_dir,
                     "--coordinator-client-key", dep.coordinator.client_key]
        argv += ["--first-token", p.first_token, "--early-decode", p.early_decode]
        args = dep.vllm.extra_args + dep.prefill.extra_args + dep.decode.extra_args
        if not p.chat_first_token or any(a.split("=")[0] in CHAT_PARSERS for a in args):
            argv.append("--no-chat-first-token")
    else:
        argv += ["--colocated", ",".join(lay.urls("colocated"))]
    if dep.vllm.api_key_file:
        argv += ["--upstream-api-key-file", dep.vllm.api_key_file]
    if p.api_key_file:
        argv += ["--api-key-file", p.api_key_file]
    near = reach_host(p.host)
    return ProcSpec("proxy", argv, {}, f"http://{near}:{p.port}/health", p.port, near, upstreams=True, bind=p.host)


def plan(dep: DeploymentConfig, roles: str | list[str] | None = None, host: str | None = None,
         elsewhere: bool = False) -> list[ProcSpec]:
    """The processes of this host's share of the deployment, in start order (coordinator, transport
    servers, instances, proxy): ``host`` names a ``hosts:`` entry, else ``roles`` (default all).

    ``vllm.device`` cpu binds each instance to its cores; cuda gives it its GPUs (``launch.gpus``);
    both count only the instances started here. ``elsewhere``: the processes run in containers
    of a cluster (``launch.k8s``), not here: each instance has GPUs of its own from 0, and the
    transport's servers are named as on the image's PATH.
    """
    check_config(dep)
    _, roles = share(dep, roles, host)
    lay = layout(dep)
    check_coordinator_security(dep, lay)
    check_transport_reach(dep, lay)
    pd_mode = dep.mode == "pd"
    specs: list[ProcSpec] = []
    if "control" in roles and pd_mode:
        specs.append(coordinator_spec(dep, lay))
        specs += transport_servers(dep, here=not elsewhere)
    local: list[Instance] = local_instances(lay, roles, host or "")
    tuples = [i.as_tuple() for i in local]
    extra = [{"host": i.bind, "coordinator": lay.coordinator_address} for i in local]
    if local and resolve_device(dep) == "cuda":
        slots = own_gpu_slots(dep, tuples) if elsewhere else gpu_slots(dep, tuples)
        specs += [vllm_spec(dep, *t, slot=slot, **x) for t, slot, x in zip(tuples, slots, extra)]
    elif local:
        binds = cpu_binds(dep.vllm.cpu_bind, len(local), [group_tp(dep, t[3]) for t in tuples])
        specs += [vllm_spec(dep, *t, bind=b, **x) for t, b, x in zip(tuples, binds, extra)]
    if "control" in roles:
        specs.append(proxy_spec(dep, lay))
    return specs


def plan_hosts(dep: DeploymentConfig) -> list[tuple[str, list[str], list[ProcSpec]]]:
    """(host, roles, specs) of every host of a ``hosts:`` section, or of each role without one."""
    if dep.hosts:
        return [(name, share(dep, host=name)[1], plan(dep, host=name)) for name in dep.hosts]
    return [(role, [role], plan(dep, [role])) for role in ("control", "prefill", "decode")]


def format_command(spec: ProcSpec) -> str:
    """``# name`` and a shell line (env assignments, then the command) that runs ``spec``."""
    env = " ".join([f"{k}={shlex.quote(v)}" for k, v in spec.env.items()]
                   + [f'{k}="$(cat {shlex.quote(f)})"' for k, f in spec.env_files.items()])
    pin = f"taskset -c {','.join(map(str, spec.cpus))} " if spec.cpus else ""
    return f"# {spec.name}\n{env + ' ' if env else ''}{pin}{shlex.join(spec.argv)}"


def child_env(spec: ProcSpec) -> dict[str, str]:
    """The full environment of a child: ours, the spec's, and the repository on PYTHONPATH."""
    env = dict(os.environ)
    env.update(spec.env)
    env.update({k: read_token(f) for k, f in spec.env_files.items()})
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
