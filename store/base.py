"""The persistent KV store interface (decode fallback and prefix reuse across requests).

A store maps chunk keys (``namespace/rank/hexhash``, see ``pd.connector.keys``) to opaque byte strings
(normally whole chunks in ``pd.connector.chunk`` format). It is a cache: any value may vanish at any time
(eviction, corruption, disk errors), and every failure is reported as a miss or a dropped put,
never as an exception on the serving path.

Also what every backend shares: its counters, the per-writer budget, the paths it is given.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from common.config import ConfigError

#: A writer's budget is at least this (bytes).
MIN_BUDGET = 1 << 20

#: The counters both stores keep (each adds its own after these).
STAT_KEYS = (
    "puts",             # put() calls queued
    "put_bytes",        # payload bytes queued
    "duplicates",       # put() of a key already stored or queued (skipped, returned True)
    "dropped",          # put() returned False (queue full, too large, closed)
    "queue_full",       # ... of which the queue was full
    "too_large",        # ... of which the value can never fit in the budget
    "read_only",        # ... of which the store was opened with writer=False
    "writes",           # values written
    "write_bytes",      # bytes of those values
    "write_errors",     # queued puts lost to an I/O error while writing (ENOSPC, EIO, ...)
    "budget_drops",     # queued puts lost because in-flight writes held the rest of the budget
    "evictions",        # values removed to make room
    "hits",
    "misses",           # absent, too long for the buffer, corrupt, or an I/O error
    "get_bytes",
    "queue_hits",       # ... hits served from the write queue (not yet on disk)
    "corrupt",          # values found torn/corrupt/mismatched (removed)
    "deletes",          # keys removed by delete()
    "recovered",        # values found at start
)


def parse_path(p: str) -> str:
    """A ``StoreConfig.paths`` entry as a path (the ``file://`` prefix dropped)."""
    return p[len("file://"):] if p.startswith("file://") else p


def writer_budget(cfg: Any, n_paths: int, backend: str, paths: str = "path(s)") -> int:
    """Bytes one writing process may keep: ``size_gb`` over ``n_paths`` paths and the
    ``writers`` of each (see ``StoreConfig``). ValueError below ``MIN_BUDGET``."""
    writers = max(1, int(cfg.writers))
    budget = int(cfg.size_gb * 1e9 / n_paths / writers)
    if budget < MIN_BUDGET:
        raise ConfigError(
            f"store.size_gb={cfg.size_gb} gives {budget} bytes per writer over {n_paths} "
            f"{paths} and {writers} writer(s) per path; the {backend} store needs at least {MIN_BUDGET} "
            "bytes (1 MiB) per writer")
    return budget


@runtime_checkable
class KVStore(Protocol):
    #: Counters (names depend on the backend; ``usage()`` returns them too).
    stats: dict[str, int]
    #: Where the values live, for log lines: ``local:<dir>``, ``hf3fs:<root>``.
    location: str
    #: A bound on the value one ``put`` can store (bytes; the budget, or the slab, and the write
    #: queue): a larger one is always dropped and counted ``too_large``.
    max_value: int

    def put(self, key: str, data: Any) -> bool:
        """Queue a copy of ``data`` (any buffer-protocol object) for writing under ``key``.

        Asynchronous: returns at once, never waits for disk I/O; the caller may reuse its
        buffer as soon as this returns. False = dropped (queue full, larger than the budget,
        store closed), counted in ``stats["dropped"]``. True does not promise the value will
        be readable later (a write may still fail, or the value may be evicted).
        """
        ...

    def get(self, key: str, into: Any) -> int:
        """Read the value of ``key`` into the writable buffer ``into``.

        Returns the number of bytes read; 0 = miss (absent, longer than ``into``, corrupt,
        or an I/O error). Bytes of ``into`` beyond the returned length are left unspecified.
        """
        ...

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        """``get`` of each key into its buffer, as one batch where the backend can (hf3fs: one
        ring submit per staging area); the same results as ``get`` one by one."""
        ...

    def contains(self, keys: Sequence[str]) -> int:
        """Length of the longest prefix of ``keys`` that is present (for prefix reuse)."""
        ...

    def delete(self, keys: Sequence[str]) -> int:
        """Remove these keys; returns how many were present."""
        ...

    def usage(self) -> dict:
        """``bytes``, ``files``, ``budget`` and the counters of ``stats``."""
        ...

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued put has been written (or failed); False on timeout."""
        ...

    def close(self) -> None:
        """Flush briefly, then stop background threads; later puts are dropped."""
        ...
