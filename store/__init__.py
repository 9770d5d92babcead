"""Persistent KV stores: ``make_store`` builds the one ``StoreConfig.backend`` names."""
from __future__ import annotations

from typing import Any

from common.config import ConfigError
from store.base import KVStore
from store.hf3fs import Hf3fsStore
from store.local import LocalStore
from store.tiered import TieredStore, make_dram

__all__ = ["KVStore", "make_store"]


def make_store(cfg: Any, device_index: int = 0, writer: bool = True) -> KVStore | None:
    """The store of ``cfg`` (a ``store.config.StoreConfig``) for device ``device_index``.

    ``writer=False`` opens it for reading only (a scheduler's lookups, a decode worker's
    fallback): no writer threads, no directory claimed, every ``put`` dropped and counted.

    With ``dram_gb`` > 0, the store is the DRAM tier in front of that backend (store/tiered.py).

    None for backend ``none``. Raises ValueError with a clear message for a backend that
    cannot be built or a configuration it refuses (missing/unwritable path, tiny budget).
    """
    backend = cfg.backend
    if backend == "none":
        if cfg.dram_gb:
            raise ConfigError(f"store.dram_gb={cfg.dram_gb} needs a store to sit in front of; set store.backend "
                              "to local or hf3fs (with store.paths), or dram_gb to 0")
        return None
    if backend == "local":
        disk: KVStore = LocalStore(cfg, device_index, writer=writer)
    elif backend == "hf3fs":
        disk = Hf3fsStore(cfg, device_index, writer=writer)
    else:
        raise ConfigError(f"unknown store backend {backend!r}; choose none, local or hf3fs")
    if not cfg.dram_gb:
        return disk
    try:
        return TieredStore(disk, make_dram(cfg), int(getattr(cfg, "read_threads", 1)))
    except BaseException:
        disk.close()
        raise
