"""A store with the DRAM tier (store/dram.py) in front of its disk store (local or hf3fs):
``store.make_store`` builds it when ``StoreConfig.dram_gb`` > 0 (docs/design.md, "The DRAM tier").

* Writes go through: ``put`` hands the value to the disk store (asynchronous, as without the tier)
  and, if the disk store took it, copies it into DRAM. DRAM thus holds values that are also on
  disk or queued for it; evicting one from DRAM (by the store's policy) leaves the disk copy, which
  still serves it. A store opened with ``writer=False`` puts nothing in either.
* Reads try DRAM first; a disk hit is copied into DRAM (by readers too: a decode's fallback read
  warms the tier for every instance of the host).
* ``contains`` (prefix reuse) counts a key present in either tier.
* The counters are the disk store's, with DRAM hits added to ``hits``/``get_bytes``, and the
  tier's own ``dram_*`` counters beside them.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Sequence

from common.bytes import byte_view
from store.base import KVStore, parse_path
from store.dram import DramRead, DramTier, default_dir
from store.reads import Readers


def dram_name(cfg: Any) -> str:
    """The arena's name for the store of ``cfg``: a digest of where its disk values live, so the
    instances of a host that share a store share one DRAM tier, and other stores have their own."""
    where = {"backend": cfg.backend, "paths": [os.path.abspath(parse_path(p)) for p in cfg.paths],
             "hf3fs": [cfg.hf3fs.mount_point, list(cfg.hf3fs.base_paths)] if cfg.backend == "hf3fs" else []}
    return hashlib.blake2b(json.dumps(where, sort_keys=True).encode(), digest_size=8).hexdigest()


#: The tiers this process has open, shared by its stores (a worker owning several head groups has
#: one store each): one mapping, pinned once. (directory, name, size, eviction) -> [tier, users].
_OPEN: dict[tuple, list] = {}
_OPEN_LOCK = threading.Lock()


def make_dram(cfg: Any, directory: str | None = None) -> DramTier:
    """The DRAM tier of the store of ``cfg`` (``dram_gb`` > 0), shared with this process's other
    stores of that tier; give it back with ``release_dram``."""
    k = (directory or default_dir(), dram_name(cfg), int(cfg.dram_gb * 1e9), cfg.eviction)
    with _OPEN_LOCK:
        got = _OPEN.get(k)
        if got is None:
            got = _OPEN[k] = [DramTier(k[2], k[1], k[3], k[0]), 0]
        got[1] += 1
        return got[0]


def release_dram(tier: DramTier) -> None:
    """One user of ``tier`` is done; the last one closes it (a tier not from ``make_dram`` too)."""
    with _OPEN_LOCK:
        for k, got in list(_OPEN.items()):
            if got[0] is tier:
                got[1] -= 1
                if got[1] > 0:
                    return
                del _OPEN[k]
    tier.close()


class TieredStore:
    """``store.base.KVStore``: ``dram`` in front of ``disk`` (see the module docstring)."""

    def __init__(self, disk: KVStore, dram: DramTier, read_threads: int = 1) -> None:
        self.disk, self.dram = disk, dram
        self._readers = Readers(read_threads, "pd-dram-read")
        self.location = f"{disk.location}+dram:{dram.path}"
        self.max_value = disk.max_value
        self._closed = False

    @property
    def stats(self) -> dict[str, int]:
        s = dict(self.disk.stats)
        s["hits"] += self.dram.stats["dram_hits"]
        s["get_bytes"] += self.dram.stats["dram_get_bytes"]
        s.update(self.dram.stats)
        return s

    def put(self, key: str, data: Any) -> bool:
        ok = self.disk.put(key, data)
        if ok and not self._closed:
            self.dram.put(key, data)
        return ok

    def get(self, key: str, into: Any) -> int:
        return self.get_many([key], [into])[0]

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        if len(keys) != len(intos):
            raise ValueError(f"get_many: {len(keys)} keys but {len(intos)} buffers")
        outs = [byte_view(b) for b in intos]
        for out in outs:
            if out.readonly:
                raise ValueError("get: the destination buffer is read-only")
        got = [0] * len(keys) if self._closed else self._readers.map(self.dram.get, list(zip(keys, outs)))
        need = [j for j, n in enumerate(got) if not n]
        if need:
            for j, n in zip(need, self.disk.get_many([keys[j] for j in need], [outs[j] for j in need])):
                got[j] = n
            fills = [(keys[j], outs[j][:got[j]]) for j in need if got[j]]
            if fills and not self._closed:
                self._readers.map(self._fill, fills)
        return got

    def _fill(self, key: str, data: memoryview) -> int:
        return int(self.dram.put(key, data, fill=True))

    #: ``acquire``/``release``: DRAM hits are read in place (``DramTier.acquire``), not copied out.
    zero_copy = True

    def acquire(self, keys: Sequence[str]) -> list[DramRead | None]:
        """Each key's value in the DRAM tier, in place (None: not there; the disk is not read)."""
        return [None if self._closed else self.dram.acquire(k) for k in keys]

    def release(self, reads: Sequence[DramRead | None]) -> list[bool]:
        """For each read, whether its value stayed intact while it was used (None: False)."""
        return [r is not None and not self._closed and self.dram.release(r) for r in reads]

    def contains(self, keys: Sequence[str]) -> int:
        n = 0
        while n < len(keys):
            a = 0 if self._closed else self.dram.contains(keys[n:])
            b = self.disk.contains(keys[n + a:])
            n += a + b
            if not a and not b:
                break
        return n

    def keys(self) -> list[str]:
        """The disk store's keys (every DRAM value is, or was, on disk)."""
        return self.disk.keys()

    def delete(self, keys: Sequence[str]) -> int:
        in_dram = [False] * len(keys) if self._closed else self.dram.delete(keys)
        return sum(bool(self.disk.delete([k])) or d for k, d in zip(keys, in_dram))

    def usage(self) -> dict:
        return {**self.disk.usage(), **self.stats, **self.dram.usage()}

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self.disk.flush(timeout_s)

    def close(self) -> None:
        self._readers.close()
        self.disk.close()
        if not self._closed:
            self._closed = True
            release_dram(self.dram)

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
