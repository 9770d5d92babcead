"""The transport's settings (``connector.transport`` in a deployment's YAML)."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlparse

from common.config import ConfigError, choices, host_port, rng, url_host


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
    protocol: str = field(default="tcp", metadata=choices("tcp", "rdma"))
    # rdma: the NIC(s), e.g. mlx5_0 or mlx5_0,mlx5_1; "" = Mooncake picks.
    device_name: str = ""
    # The address this process advertises to peers; "" = its address on the route to the master.
    local_hostname: str = ""
    # Memory this process contributes to the pool, MiB: 0 (none; it then only reads and writes
    # other processes' memory) or at least 16. The master evicts old values when the pool is full.
    global_segment_size_mb: int = field(default=1024, metadata=rng(0, 1 << 22))
    # Registered staging memory of this process, MiB: zero-copy slots and put/get copies live
    # here, so it bounds the largest value and the bytes in flight at once.
    local_buffer_size_mb: int = field(default=256, metadata=rng(1, 1 << 20))
    # Puts go to this process's own segment when it has one (a producer's chunks stay in its
    # memory, as with shm; readers pull them); false: anywhere in the pool.
    prefer_local_segment: bool = True
    # Longest one batched call may take; a later answer counts as a miss / a dropped put.
    op_timeout_s: float = field(default=10.0, metadata=rng(0.1, 3600))
    # Longest the start-up probe of the master (and of an HTTP metadata server) waits for an
    # answer; no answer: a TransportError naming what was tried.
    connect_timeout_s: float = field(default=5.0, metadata=rng(0.1, 600))
    # The launcher starts the master (mooncake_master) on the control host when true.
    start_master: bool = False
    # Where the master listens (RPC, metadata, metrics): "" = the host of `master`; 0.0.0.0 = all.
    # The master has no authentication: keep it on a private network.
    bind_host: str = ""
    # The master's HTTP metadata server port (metadata_server: master).
    metadata_port: int = field(default=8080, metadata=rng(1, 65535))
    # The master's HTTP metrics/health port (GET /health).
    metrics_port: int = field(default=9003, metadata=rng(1, 65535))
    # The master evicts eviction_ratio of the pool once it is eviction_high_watermark_ratio full.
    eviction_high_watermark_ratio: float = field(default=0.9, metadata=rng(0.1, 1.0))
    eviction_ratio: float = field(default=0.05, metadata=rng(0.01, 0.9))

    def master_host_port(self) -> tuple[str, int]:
        """``master`` as (host, port); ConfigError naming the key when it does not parse."""
        return host_port(self.master, "connector.transport.mooncake.master")

    def metadata_url(self) -> str:
        """The metadata server as the client takes it (P2PHANDSHAKE or an http(s) URL)."""
        v = self.metadata_server.strip()
        if v.lower() == "master":
            host, _ = self.master_host_port()
            return f"http://{url_host(host)}:{self.metadata_port}/metadata"
        if v.upper() == "P2PHANDSHAKE":
            return "P2PHANDSHAKE"
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


@dataclass
class InfinistoreConfig:
    """Transport kind infinistore: one InfiniStore server holds the values in its DRAM pool, every
    instance is a client, over RDMA or TCP. ``server()`` / ``check()`` check formats at start."""

    # The server as LMCache writes it: infinistore://host:port/?device=mlx5_0 (device: the RDMA NIC
    # of this host, needed by connection_type rdma). IPv4 literals or names (resolved here).
    url: str = "infinistore://127.0.0.1:22345"
    # rdma: one-sided reads/writes of registered memory; tcp: the bytes over the control socket.
    connection_type: str = field(default="rdma", metadata=choices("rdma", "tcp"))
    # rdma: IB (InfiniBand) or Ethernet (RoCE v2).
    link_type: str = field(default="IB", metadata=choices("IB", "Ethernet"))
    ib_port: int = field(default=1, metadata=rng(1, 255))
    # rdma: the GID index (RoCE); -1 = InfiniStore picks. Needs an InfiniStore newer than 0.2.35.
    gid_index: int = field(default=-1, metadata=rng(-1, 255))
    # Staging memory of this process, MiB (registered with the NIC once in rdma mode): every value
    # moves from or into slots of it, so it bounds the bytes in flight and the largest value.
    staging_mb: int = field(default=512, metadata=rng(1, 1 << 20))
    # The largest value (chunk) a zero-copy read reserves room for, MiB (at most staging_mb).
    max_value_mb: int = field(default=64, metadata=rng(1, 1 << 16))
    # rdma: batched calls in flight on the connection (the server allows 128).
    max_inflight: int = field(default=64, metadata=rng(1, 128))
    # tcp: connections (one per thread) a batch is spread over.
    tcp_threads: int = field(default=4, metadata=rng(1, 64))
    # Longest one batched call may take; a later answer counts as a miss / a dropped put.
    op_timeout_s: float = field(default=10.0, metadata=rng(0.1, 3600))
    connect_timeout_s: float = field(default=5.0, metadata=rng(0.1, 600))
    # The launcher starts the server (`infinistore`) on the control host when true.
    start_server: bool = False
    # The server's pool, GB (registered with its NIC at start), and its allocation unit, KB.
    server_prealloc_gb: int = field(default=16, metadata=rng(1, 1 << 14))
    server_minimal_allocate_kb: int = field(default=64, metadata=rng(16, 1 << 20))
    # The server's HTTP management port (GET /kvmap_len, POST /purge).
    server_manage_port: int = field(default=18080, metadata=rng(1, 65535))
    # A directory holding a libibverbs.so.1 the server loads instead of the system's: "" = the
    # system's. The released server needs an RDMA device even for TCP; on a host without one,
    # the test double build/verbs-double (tests/doubles/verbs) lets it serve TCP (see the README).
    server_libibverbs: str = ""

    def server(self) -> tuple[str, int, str]:
        """``url`` as (host, port, device); ConfigError naming the key when it does not parse."""
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
    kind: str = field(default="shm", metadata=choices("shm", "mooncake", "infinistore", "none"))
    # Per-producer budget of the shared-memory pool; the oldest unconsumed chunks are evicted.
    pool_size_mb: int = field(default=1024, metadata=rng(1, 1 << 20))
    # Directory for the shm pool (a tmpfs); each deployment uses its own sub-directory.
    shm_dir: str = "/dev/shm"
    # Where a prefill keeps its shm chunks: host (shared memory, CUDA-pinned on a GPU) or gpu (its
    # GPU's memory, pool_size_mb of it; decode reads them device to device through CUDA IPC, on
    # the same GPU or one with peer access; needs vLLM on CUDA). See transport/shm_gpu.py.
    shm_memory: str = field(default="host", metadata=choices("host", "gpu"))
    # Deployment name: the pool lives in <shm_dir>/pdkv-<name>. `pd launch` makes "default"
    # default-<proxy port>, so that two deployments of one host never share (and remove) one pool.
    name: str = "default"
    # Kind mooncake only.
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)
    # Kind infinistore only.
    infinistore: InfinistoreConfig = field(default_factory=InfinistoreConfig)
