"""The persistent store's settings (``connector.store`` in a deployment's YAML)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import choices, rng


@dataclass
class Hf3fsConfig:
    """3FS USRBIO settings of store backend hf3fs (names and ranges as LMCache's hf3fs_* keys)."""

    # The 3FS FUSE mount (e.g. /3fs/stage); empty = found from the base path.
    mount_point: str = ""
    # Shared memory registered with the 3FS client (iovec), MB; half for reads, half for writes.
    iov_size_mb: int = field(default=200, metadata=rng(100, 2048))
    # Entries of each ioring (requests that can be prepared before a submit).
    ior_entries: int = field(default=256, metadata=rng(128, 1024))
    # 0: submit every I/O at once; <0: batches of at most -io_depth; >0 (exact batches) is refused
    # by store/hf3fs.py, whose batches vary in size.
    io_depth: int = field(default=0, metadata=rng(-128, 128))
    # NUMA node of the iovec/ioring memory; -1 = the current process's.
    numa: int = field(default=-1, metadata=rng(-1))
    # Longest wait for one batch's I/Os (a stuck FUSE daemon, a storage outage): its values are
    # then misses or dropped writes, and its ring is not used again until they have completed.
    io_timeout_s: float = field(default=5.0, metadata=rng(0.01, 3600))
    # Write threads, each with its own write ioring and its share of the write iovec.
    io_threads: int = field(default=4, metadata=rng(2, 16))
    # Directories (relative to mount_point, or absolute under it); KV-head group g (pd.connector.heads; the
    # TP rank with one TP size) uses base_paths[g % len]; empty = store.paths, else <mount_point>/pdkv.
    base_paths: list[str] = field(default_factory=list)


@dataclass
class StoreConfig:
    """The persistent KV store (decode fallback and prefix reuse across requests)."""

    backend: str = field(default="none", metadata=choices("none", "local", "hf3fs"))
    # Directories for store/local (``file://`` prefix allowed); KV-head group g (pd.connector.heads; the TP
    # rank with one TP size) uses paths[g % len(paths)].
    paths: list[str] = field(default_factory=list)
    # One budget across all paths and writers; least valuable chunks (by ``eviction``) go first.
    size_gb: float = field(default=10.0, metadata=rng(0.001, 1 << 20))
    # Processes writing to each path: each keeps to size_gb / len(paths) / writers, so together they
    # keep to size_gb. pd launch raises it to the prefill ranks that share a path.
    writers: int = field(default=1, metadata=rng(1, 4096))
    eviction: str = field(default="lru", metadata=choices("lru", "lfu", "fifo"))
    o_direct: bool = False
    # Bytes waiting in the write queue; a put beyond this is dropped and counted.
    queue_mb: int = field(default=256, metadata=rng(1, 1 << 20))
    write_threads: int = field(default=1, metadata=rng(1, 64))
    # Threads that read one batch of chunks at once (local files, the DRAM tier; store/reads.py).
    read_threads: int = field(default=4, metadata=rng(1, 64))
    # Prefill writes every chunk it sends through to the store: "always" or "never".
    write_through: str = field(default="always", metadata=choices("always", "never"))
    # The DRAM tier (store/dram.py): GB of shared memory (/dev/shm) in front of the disk store, shared
    # by the instances of this host that use the same store paths; 0 = off.
    dram_gb: float = field(default=0.0, metadata=rng(0, 1 << 20))
    # Backend hf3fs only (3FS USRBIO).
    hf3fs: Hf3fsConfig = field(default_factory=Hf3fsConfig)
